"""Scoring: the world verifier, FastChat judge requests, a reward model, resume after an interruption."""

from __future__ import annotations

import json
import random
import re

import pytest

from cli import main
from core.errors import PivotfuseError
from evals.mtbench import judge_messages
from evals.questions import builtin_judge_prompts
from implicit.prompts import Prompt
from implicit.config import SampleConfig, ScoreConfig
from implicit.sample import sample_answers
from implicit.score import JudgeScorer, VerifierScorer, judge_request, score_answers
from implicit.verify import make_checker
from implicit_helpers import tiny_chat_model
from test_implicit_sample import Scripted
from world.corpus import FactTable, make_conversation


def world_prompts(n_per_domain=2, seed=0):
    rng, table = random.Random(3), FactTable.make(random.Random(f"facts-{seed}"))
    out = []
    for d in ("arith", "facts", "strings", "chat"):
        for i in range(n_per_domain):
            c = make_conversation(d, rng, table, f"{d}-{i}")
            out.append(Prompt(c.id, c.messages[:-1], d, c.messages[-1]["content"]))
    return out


def test_world_verifier_accepts_the_gold_answer_and_rejects_a_wrong_one():
    check = make_checker("world", 0)
    for p in world_prompts(3):
        assert check(p, p.reference), p
        if p.category == "chat":
            assert check(p, "anything at all")  # small talk has nothing to check
        else:
            assert not check(p, "I do not know."), p
    arith = Prompt("x", [{"role": "user", "content": "What is 12 x 11?"}], "arith")
    assert check(arith, "It is 132.") and not check(arith, "It is 131.")
    facts = next(p for p in world_prompts(1) if p.category == "facts")
    with pytest.raises(PivotfuseError, match=r"is not in the fact table of the world with seed 5"):
        make_checker("world", 5)(facts, facts.reference)
    with pytest.raises(PivotfuseError, match="the world checker knows the domains"):
        check(Prompt("y", [{"role": "user", "content": "hi"}], "poetry"), "hi")
    with pytest.raises(PivotfuseError, match="checker 'nope': unknown"):
        make_checker("nope")


def test_judge_requests_are_fastchat_single_answer_grading():
    prompts = builtin_judge_prompts()
    q = Prompt(5, [{"role": "user", "content": "What is 2+2?"}], "math", "4")
    assert judge_request(q, "It is 4.", prompts) == judge_messages(
        prompts["math"], {"question_id": 5, "turns": ["What is 2+2?"]}, ["It is 4."], ["4"], multi_turn=False)
    two = Prompt(6, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                     {"role": "user", "content": "How are you?"}], "chat", "Fine.")
    user, msgs = judge_request(two, "Good, thanks.", prompts)
    assert (user, msgs) == judge_messages(prompts["default-mt"], {"question_id": 6, "turns": ["Hi", "How are you?"]},
                                          ["Hello!", "Good, thanks."], None, multi_turn=True)
    with pytest.raises(PivotfuseError, match=r"prompt 7 \(math\) needs a reference answer"):
        judge_request(Prompt(7, [{"role": "user", "content": "1+1?"}], "math"), "2", prompts)


def test_judge_ratings_become_scores_and_missing_ratings_none(tmp_path):
    prompts = [Prompt(i, [{"role": "user", "content": f"q{i}"}], "writing") for i in range(3)]
    sample_answers(prompts, Scripted(), tmp_path, SampleConfig(n=2))
    calls = []

    class Judge:  # rates the first sample of each prompt (even batch positions) only
        name = "judge"

        def chat(self, batch, temperature, max_tokens, **kw):
            calls.append((temperature, max_tokens))
            first = [int(re.search(r"#(\d+)", m[-1]["content"])[1]) % 2 == 0 for m in batch]
            return ["Good. Rating: [[7]]" if f else "no rating" for f in first]

    judge = Judge()
    scorer = JudgeScorer(ScoreConfig(scorer="judge", judge="unused", judge_max_tokens=64), backend=judge)
    path = score_answers(prompts, tmp_path, ["src"], ScoreConfig(scorer="verifier"), scorer=scorer)["src"]
    assert scorer.settings["model"] == "object:judge"
    got = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["scores"] for r in got] == [[7.0, None]] * 3
    assert got[0]["details"] == ["Good. Rating: [[7]]", "no rating"] and got[0]["scorer"] == "judge"
    assert calls == [(0.0, 64)]  # greedy judging, FastChat's limit as configured; one chunk of 3 prompts


class Flaky(VerifierScorer):
    def __init__(self, stop_after=None):
        super().__init__(lambda p, a: "q1 " in a or "#1" in a, "v", {"kind": "verifier"})
        self.calls, self.stop_after = 0, stop_after

    def score(self, items):
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt
        self.calls += 1
        return super().score(items)


def _rows(path):
    return [{k: v for k, v in json.loads(x).items() if k != "tstamp"} for x in path.read_text().splitlines()]


def test_interrupted_scoring_resumes_to_the_same_file_and_rescores_changed_answers(tmp_path):
    prompts = [Prompt(i, [{"role": "user", "content": f"q{i}"}], "chat") for i in range(7)]
    cfg = ScoreConfig(scorer="verifier", chunk_prompts=2)
    for out in ("whole", "cut"):
        sample_answers(prompts, Scripted(), tmp_path / out, SampleConfig(n=2))
    whole = score_answers(prompts, tmp_path / "whole", ["src"], cfg, scorer=Flaky())["src"]
    with pytest.raises(KeyboardInterrupt):
        score_answers(prompts, tmp_path / "cut", ["src"], cfg, scorer=Flaky(stop_after=2))
    cut = tmp_path / "cut" / "model_score" / "v" / "src.jsonl"
    assert len(cut.read_text().splitlines()) == 4
    again = Flaky()
    score_answers(prompts, tmp_path / "cut", ["src"], cfg, scorer=again)
    assert again.calls == 2 and _rows(cut) == _rows(whole)  # prompts 4-5 and 6 only
    assert [r["scores"] for r in _rows(cut)][:2] == [[0.0, 1.0], [1.0, 1.0]]
    # new answers for one prompt (another sampling run): only that row is scored again
    answers = tmp_path / "cut" / "model_answer" / "src.jsonl"
    rows = [json.loads(x) for x in answers.read_text().splitlines()]
    rows[3]["choices"][0]["turns"] = ["q1 again"]
    rows[3]["answer_id"] = "changed"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = Flaky()
    score_answers(prompts, tmp_path / "cut", ["src"], cfg, scorer=again)
    fresh = _rows(cut)
    assert again.calls == 1 and fresh[3]["answer_id"] == "changed" and fresh[3]["scores"][0] == 1.0
    assert fresh[:3] == _rows(whole)[:3]


def test_reward_model_scores_batched_equal_one_by_one_and_the_head(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from implicit.reward_model import RewardModelScorer

    rm = tiny_chat_model(tmp_path / "rm", seed=4, classifier=True)
    items = [(Prompt(i, [{"role": "user", "content": "w1 w2" + " w3" * i}]), "w4" + " w5" * (3 - i))
             for i in range(4)]
    batched = RewardModelScorer(f"rm={rm}", batch_size=4, dtype="float32").score(items)
    single = RewardModelScorer(f"rm={rm}", batch_size=1, dtype="float32").score(items)
    assert [s for s, _ in batched] == pytest.approx([s for s, _ in single], abs=1e-5)
    assert len({round(s, 6) for s, _ in batched}) == 4
    tok = AutoTokenizer.from_pretrained(rm)
    model = AutoModelForSequenceClassification.from_pretrained(rm, dtype=torch.float32)
    p, a = items[2]
    text = tok.apply_chat_template(p.messages + [{"role": "assistant", "content": a}], tokenize=False)
    with torch.no_grad():
        want = model(torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])).logits[0, 0].item()
    assert batched[2][0] == pytest.approx(want, abs=1e-5)
    with pytest.raises(PivotfuseError, match="label_index 2 but the head has 1 labels"):
        RewardModelScorer(str(rm), label_index=2)


def test_score_cli_with_the_world_verifier(tmp_path, capsys):
    prompts = world_prompts(2)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"id": p.id, "domain": p.category, "messages": p.messages + [
        {"role": "assistant", "content": p.reference}]}) + "\n" for p in prompts))
    gold = {p.messages[-1]["content"]: p.reference for p in prompts}

    class Half(Scripted):  # the first sample is the gold answer, the second a wrong one
        def chat(self, batch, temperature, max_tokens, **kw):
            return [gold[m[-1]["content"]] if i % 2 == 0 else "No idea." for i, m in enumerate(batch)]

    sample_answers(prompts, Half(name="half"), tmp_path, SampleConfig(n=2))
    argv = ["score", "--prompts", str(chats), "--out", str(tmp_path), "--scorer", "verifier", "--world-seed", "0"]
    assert main(argv) == 0
    assert "score half: 16 answers, mean 0.6250, 0 unscored" in capsys.readouterr().out  # chat: both pass
    got = [json.loads(x) for x in (tmp_path / "model_score" / "verifier-world" / "half.jsonl").read_text().splitlines()]
    assert [(r["question_id"].split("-")[0], r["scores"]) for r in got][:4] == \
        [("arith", [1.0, 0.0])] * 2 + [("facts", [1.0, 0.0])] * 2
    assert main(argv[:-2] + ["--world-seed", "3"]) == 2  # other settings than the scores on disk
    assert "settings.json: these scores of verifier-world were made with world_seed=0" in capsys.readouterr().err
    assert main(["score", "--prompts", str(chats), "--out", str(tmp_path), "--scorer", "judge"]) == 2
    assert "'judge': the judge scorer needs a judge" in capsys.readouterr().err

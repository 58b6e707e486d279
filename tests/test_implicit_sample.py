"""Sampling: N FastChat choices per prompt, seeds, per-category counts, resume after a kill, endpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli import main
from core.errors import PivotfuseError
from implicit.prompts import Prompt, load_prompts
from implicit.config import SampleConfig
from implicit.sample import chunk_seed, sample_answers
from implicit_helpers import WORDS, tiny_chat_model
from test_eval_mtbench import fake_server  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parents[1]


class Scripted:
    """A backend double: replies name the prompt, the seed and the position; records every call."""

    def __init__(self, name="src", stop_after=None):
        self.name, self.calls, self.stop_after = name, [], stop_after

    def chat(self, batch, temperature, max_tokens, *, top_p=None, seed=None):
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            raise KeyboardInterrupt
        self.calls.append((len(batch), temperature, max_tokens, top_p, seed))
        return [f"{m[-1]['content']} | s{seed} #{i}" for i, m in enumerate(batch)]


def prompts(n=7):
    return [Prompt(i, [{"role": "user", "content": f"q{i}"}], "code" if i % 3 == 0 else "chat") for i in range(n)]


def rows(path):
    return [{k: v for k, v in json.loads(x).items() if k != "tstamp"} for x in path.read_text().splitlines()]


def test_rows_are_fastchat_with_n_choices_per_category_and_chunk_seeds(tmp_path):
    cfg = SampleConfig(n=2, n_by_category={"code": 3}, temperature=0.7, top_p=0.9, max_new_tokens=12,
                       chunk_prompts=3, seed=5)
    backend = Scripted()
    path = sample_answers(prompts(), backend, tmp_path, cfg)
    assert path == tmp_path / "model_answer" / "src.jsonl"
    got = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["question_id"] for r in got] == list(range(7))
    assert set(got[0]) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    assert [len(r["choices"]) for r in got] == [3, 2, 2, 3, 2, 2, 3]
    seeds = [chunk_seed(5, "src", json.dumps(i)) for i in (0, 3, 6)]
    # chunks of 3 prompts: 3+2+2, 3+2+2, 3 sequences; each with its chunk's seed, temperature and top-p
    assert backend.calls == [(7, 0.7, 12, 0.9, seeds[0]), (7, 0.7, 12, 0.9, seeds[1]), (3, 0.7, 12, 0.9, seeds[2])]
    assert got[1]["choices"] == [{"index": 0, "turns": [f"q1 | s{seeds[0]} #3"]},
                                 {"index": 1, "turns": [f"q1 | s{seeds[0]} #4"]}]
    assert got[1]["model_id"] == "src" and len(got[1]["answer_id"]) == 22


def test_interrupted_sampling_resumes_to_the_same_file(tmp_path):
    cfg = SampleConfig(n=2, chunk_prompts=2)
    whole = sample_answers(prompts(), Scripted(), tmp_path / "whole", cfg)
    with pytest.raises(KeyboardInterrupt):
        sample_answers(prompts(), Scripted(stop_after=2), tmp_path / "cut", cfg)
    cut = tmp_path / "cut" / "model_answer" / "src.jsonl"
    assert len(cut.read_text().splitlines()) == 4  # two chunks of two prompts made it to disk
    with cut.open("a") as fh:
        fh.write('{"question_id": 4, "answer_')  # and a torn line, as a kill mid-write leaves
    again = Scripted()
    sample_answers(prompts(), again, tmp_path / "cut", cfg)
    assert [c[0] for c in again.calls] == [4, 2]  # only the missing chunks: prompts 4-5 and 6
    assert rows(cut) == rows(whole)


def test_changed_settings_are_refused_and_greedy_needs_one_sample(tmp_path):
    sample_answers(prompts(2), Scripted(), tmp_path, SampleConfig(n=2))
    with pytest.raises(PivotfuseError, match=r"src.settings.json: these answers of src were made with n=2, this run "
                                             r"has n=3"):
        sample_answers(prompts(2), Scripted(), tmp_path, SampleConfig(n=3))
    with pytest.raises(ValueError, match="temperature: several answers per prompt need temperature > 0"):
        SampleConfig(n=2, temperature=0.0)
    SampleConfig(n=1, temperature=0.0)


def test_endpoint_requests_carry_distinct_seeds_top_p_and_bounded_concurrency(fake_server, tmp_path):  # noqa: F811
    url = f"http://127.0.0.1:{fake_server.server_address[1]}/v1"
    cfg = SampleConfig(n=3, temperature=0.8, top_p=0.95, max_new_tokens=9, concurrency=2, chunk_prompts=2, seed=1)
    path = sample_answers(prompts(3), f"srv=openai:m@{url}", tmp_path, cfg)
    got = [json.loads(x) for x in path.read_text().splitlines()]
    assert [c["turns"] for c in got[2]["choices"]] == [["echo: q2"]] * 3
    bodies = [b for b, _ in fake_server.requests]
    assert len(bodies) == 9 and fake_server.peak <= 2
    assert all(b["temperature"] == 0.8 and b["top_p"] == 0.95 and b["max_tokens"] == 9 for b in bodies)
    first = chunk_seed(1, "srv", "0")
    assert sorted(b["seed"] for b in bodies if b["messages"][-1]["content"] in ("q0", "q1")) == \
        [first + i for i in range(6)]


def test_local_model_samples_differ_and_replay_exactly(tmp_path):
    model = tiny_chat_model(tmp_path / "tiny")
    ps = [Prompt(i, [{"role": "user", "content": " ".join(WORDS[i:i + 3])}]) for i in range(3)]
    cfg = SampleConfig(n=3, temperature=1.0, top_p=1.0, max_new_tokens=6, batch_size=4, dtype="float32")
    a = sample_answers(ps, f"tiny={model}", tmp_path / "a", cfg)
    b = sample_answers(ps, f"tiny={model}", tmp_path / "b", cfg)
    assert rows(a) == rows(b)
    texts = [[c["turns"][0] for c in r["choices"]] for r in rows(a)]
    assert all(len(set(t)) > 1 for t in texts), texts  # sampled, not greedy


def test_prompts_from_questions_and_chats(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 7, "category": "math", "turns": ["2+2?"], "reference": ["4"]}) + "\n")
    [p] = load_prompts(q)
    assert (p.id, p.messages, p.category, p.reference) == (7, [{"role": "user", "content": "2+2?"}], "math", "4")
    c = tmp_path / "c.jsonl"
    c.write_text(json.dumps({"id": "x", "domain": "arith", "messages": [
        {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2."},
        {"role": "user", "content": "And +1?"}, {"role": "assistant", "content": "3."}]}) + "\n")
    [p] = load_prompts(c)
    assert (p.id, len(p.messages), p.messages[-1]["content"], p.reference) == ("x", 3, "And +1?", "3.")
    q.write_text(json.dumps({"question_id": 1, "category": "w", "turns": ["a", "b"]}) + "\n")
    with pytest.raises(PivotfuseError, match=r"q.jsonl:1: question 1 has 2 turns"):
        load_prompts(q)


def test_cli_errors_are_one_line(tmp_path, capsys):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "category": "w", "turns": ["a"]}) + "\n")
    assert main(["sample", "--prompts", str(q), "--model", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pivotfuse sample: error: ") and "not a model folder" in err and "\n" not in err
    assert main(["sample", "--prompts", str(q), "--model", "openai:m@http://127.0.0.1:9/v1", "--out", str(tmp_path),
                 "--top-p", "1.5"]) == 2
    assert "'top_p': must be in (0, 1], got 1.5" in capsys.readouterr().err


@pytest.mark.slow
def test_sampling_killed_mid_way_resumes_to_the_uninterrupted_file(tmp_path):
    model = tiny_chat_model(tmp_path / "tiny")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"id": f"c{i}", "messages": [
        {"role": "user", "content": " ".join(WORDS[i % 30:i % 30 + 4])}]}) + "\n" for i in range(24)))
    argv = ["sample", "--prompts", str(chats), "--model", f"tiny={model}", "--n", "2", "--temperature", "1.0",
            "--max-new-tokens", "12", "--chunk-prompts", "2", "--dtype", "float32"]
    assert main(argv + ["--out", str(tmp_path / "whole")]) == 0
    cut = tmp_path / "cut"
    answers = cut / "model_answer" / "tiny.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), *argv, "--out", str(cut)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (answers.is_file() and len(answers.read_text().splitlines()) >= 4) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(answers.read_text().splitlines())
    assert 4 <= written < 24
    assert main(argv + ["--out", str(cut)]) == 0
    assert rows(answers) == rows(tmp_path / "whole" / "model_answer" / "tiny.jsonl")

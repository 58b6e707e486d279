"""Local HF models: generation with each model's own template, the in-process judge, held-out
loss against a plain per-chat reference, and the report."""

from __future__ import annotations

import json
import math

import pytest

from core.chat import Conversation, load_conversations, write_conversations
from core.errors import PivotfuseError
from evals.backends import LocalChatModel, parse_spec
from evals.config import EvalConfig
from evals.loss import heldout_loss
from evals.mtbench import generate_answers, judge_answers, judge_messages
from evals.questions import load_judge_prompts, load_questions, load_reference_answers
from evals.report import build_table, write_report
from test_eval_fixtures import mt_bench_dir, tiny_llama3, tiny_no_template, tiny_qwen  # noqa: F401 - fixtures


def test_model_without_chat_template_is_refused(tiny_no_template, tmp_path):  # noqa: F811
    with pytest.raises(PivotfuseError, match=r"tokenizer at .* has no chat template \(pass --chat-template"):
        LocalChatModel(parse_spec(f"l2={tiny_no_template}"), EvalConfig())
    chats = tmp_path / "chats.jsonl"
    write_conversations([Conversation("1", [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello"}], "chat")], chats)
    with pytest.raises(PivotfuseError, match="has no chat template"):
        heldout_loss({"l2": str(tiny_no_template)}, chats)
    template = tmp_path / "inst.jinja"  # with a template given, the same model works
    template.write_text("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} "
                        "[/INST]{% else %} {{ m.content }} {{ eos_token }}{% endif %}{% endfor %}")
    table = heldout_loss({"l2": str(tiny_no_template)}, chats, chat_templates={"l2": str(template)})
    assert table["l2"]["chat"]["bytes"] == len("hello")


def test_batched_generation_matches_one_by_one(tiny_qwen):  # noqa: F811
    msgs = [[{"role": "user", "content": t}] for t in ("Hi", "What is 23 + 58 in words, please?", "Reverse 'stone'.")]
    msgs.append([{"role": "system", "content": "Be brief."}, *msgs[1],
                 {"role": "assistant", "content": "Eighty-one."}, {"role": "user", "content": "Add 7."}])
    batched = LocalChatModel(parse_spec(str(tiny_qwen)), EvalConfig(batch_size=4, dtype="float32"))
    got = batched.chat(msgs, 0.0, 6)  # one left-padded batch
    assert all(got)  # real text, not empty strings
    batched.cfg.batch_size = 1
    assert got == batched.chat(msgs, 0.0, 6)
    # greedy decoding by hand from the model's own template, for the first prompt
    import torch

    ids = batched.tokenizer.apply_chat_template(msgs[0], add_generation_prompt=True, return_dict=True)["input_ids"]
    ids = list(ids)
    start = len(ids)
    for _ in range(6):
        with torch.no_grad():
            nxt = int(batched.model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        if nxt in batched.eos_ids:
            break
    new = [t for t in ids[start:] if t not in batched.eos_ids]
    assert got[0] == batched.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_prompt_longer_than_context_is_cut_on_the_left(tiny_llama3):  # noqa: F811
    model = LocalChatModel(parse_spec(str(tiny_llama3)), EvalConfig(dtype="float32"))
    assert model.max_positions == 512  # GPT-2 absolute positions: must not overflow
    long = [{"role": "user", "content": "word " * 700}]
    out = model.chat([long, [{"role": "user", "content": "short"}]], 0.0, 8)
    assert len(out) == 2 and model.truncated == 1


def test_in_process_judge_with_fastchat_prompts(tiny_qwen, tmp_path):  # noqa: F811
    root = mt_bench_dir()
    questions = [q for q in load_questions(root / "question.jsonl") if q["question_id"] in (81, 111)]
    cfg = EvalConfig(max_new_tokens=5, judge_max_tokens=5, dtype="float32")
    model = LocalChatModel(parse_spec(f"tiny={tiny_qwen}"), cfg)
    apath = generate_answers(questions, model, tmp_path, cfg)
    answers = {r["question_id"]: r for r in map(json.loads, apath.read_text().splitlines())}
    prompts = load_judge_prompts(root / "judge_prompts.jsonl")
    refs = load_reference_answers(root / "reference_answer")
    judge = LocalChatModel(parse_spec(f"tiny-judge={tiny_qwen}"), cfg)
    jpath = judge_answers(questions, ["tiny"], judge, tmp_path, cfg, prompts, refs)
    assert jpath == tmp_path / "model_judgment" / "tiny-judge_single.jsonl"
    rows = [json.loads(line) for line in jpath.read_text().splitlines()]
    assert [(r["question_id"], r["turn"], r["judge"][1]) for r in rows] == [
        (81, 1, "single-v1"), (111, 1, "single-math-v1"), (81, 2, "single-v1-multi-turn"),
        (111, 2, "single-math-v1-multi-turn")]
    q111 = questions[1]
    user, msgs = judge_messages(prompts["math-mt"], q111, answers[111]["choices"][0]["turns"], refs[111], True)
    assert rows[3]["user_prompt"] == user
    assert rows[3]["judgment"] == judge.chat([msgs], 0.0, 5)[0]  # greedy: the same text again
    assert all(r["score"] == -1 for r in rows)  # a random model writes no [[rating]]
    md, data = build_table(tmp_path)
    assert data["scores"]["tiny"]["unparseable"] == 4 and "| tiny | – | – | – | 4 |" in md


def _naive_bits_per_byte(model_dir, convs):
    """Per domain, one chat at a time, no padding: -sum log p(assistant tokens) / ln 2 / reply bytes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    nats, nbytes = {}, {}
    for conv in convs:
        text = tok.apply_chat_template(conv.messages, tokenize=False)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        # assistant tokens: inside a reply or its following end-of-turn token (EOS, or Llama-3's
        # <|eot_id|>, which is not its EOS); found by hand from the text
        spans, pos = [], 0
        for m in conv.messages:
            start = text.find(m["content"], pos)
            pos = start + len(m["content"])
            if m["role"] == "assistant":
                ender = next((t for t in (tok.eos_token, "<|eot_id|>") if text.startswith(t, pos)), "")
                spans.append((start, pos + len(ender)))
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        total = 0.0
        for t in range(1, len(ids)):
            s, e = enc["offset_mapping"][t]
            # inside a reply (a lone space token too), or overlapping it with a visible character
            if any((a <= s and e <= b) or text[max(s, a):min(e, b)].strip() for a, b in spans):
                total -= logp[t - 1, ids[t]].item()
        d = conv.domain
        nats[d] = nats.get(d, 0.0) + total
        nbytes[d] = nbytes.get(d, 0) + sum(len(m["content"].encode()) for m in conv.messages if m["role"] == "assistant")
    return {d: nats[d] / math.log(2) / nbytes[d] for d in nats}


@pytest.fixture
def heldout(tmp_path):
    convs = [Conversation("a1", [{"role": "user", "content": "What is 3 + 4?"},
                                 {"role": "assistant", "content": "3 + 4 = 7."}], "arith"),
             Conversation("a2", [{"role": "user", "content": "Compute 12 x 3."}, {"role": "assistant", "content": "36."},
                                 {"role": "user", "content": "And if you add 5?"},
                                 {"role": "assistant", "content": "36 + 5 = 41."}], "arith"),
             Conversation("s1", [{"role": "user", "content": "Reverse 'café'."},
                                 {"role": "assistant", "content": "'éfac', with an accent."}], "strings"),
             Conversation("c1", [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello there!"}],
                          "chat")]
    path = tmp_path / "heldout.jsonl"
    write_conversations(convs, path)
    return path


def test_heldout_loss_matches_plain_reference_across_tokenizers(tiny_qwen, tiny_llama3, heldout, tmp_path):  # noqa: F811
    cfg = EvalConfig(batch_size=3, dtype="float32")
    models = {"qwen": str(tiny_qwen), "llama3": str(tiny_llama3)}
    table = heldout_loss(models, heldout, cfg, out=tmp_path / "ev")
    convs = load_conversations(heldout)
    for name, path in models.items():
        want = _naive_bits_per_byte(path, convs)
        for domain, bpb in want.items():
            assert table[name][domain]["bits_per_byte"] == pytest.approx(bpb, rel=1e-4), (name, domain)
        assert table[name]["arith"]["chats"] == 2
    # the denominator is the reply text, the same whatever the tokenizer; token counts differ
    for domain in ("arith", "strings", "chat", "all"):
        assert table["qwen"][domain]["bytes"] == table["llama3"][domain]["bytes"]
    assert table["qwen"]["strings"]["bytes"] == len("'éfac', with an accent.".encode())
    assert table["qwen"]["all"]["tokens"] != table["llama3"]["all"]["tokens"]
    # a random model over ~150k tokens is near uniform: about log2(V) bits per token
    per_token = table["qwen"]["all"]["bits_per_byte"] * table["qwen"]["all"]["bytes"] / table["qwen"]["all"]["tokens"]
    assert per_token == pytest.approx(math.log2(151669), rel=0.05)
    saved = json.loads((tmp_path / "ev" / "loss.json").read_text())
    assert saved["models"]["qwen"]["all"]["bits_per_byte"] == pytest.approx(table["qwen"]["all"]["bits_per_byte"])
    short = heldout_loss({"qwen": str(tiny_qwen)}, heldout, EvalConfig(max_length=30))
    assert 0 < short["qwen"]["arith"]["bytes"] < table["qwen"]["arith"]["bytes"]  # cut chats count what is kept


def test_report_table_and_chart(tmp_path):
    jdir = tmp_path / "model_judgment"
    jdir.mkdir()
    rows = [("pivot", 1, 8), ("pivot", 1, 6), ("pivot", 2, 5), ("pivot", 2, -1), ("fused", 1, 9.5), ("fused", 2, 7)]
    with (jdir / "gpt-4_single.jsonl").open("w") as fh:
        for i, (m, turn, score) in enumerate(rows):
            fh.write(json.dumps({"question_id": i, "model": m, "judge": ["gpt-4", "single-v1"], "user_prompt": "",
                                 "judgment": "", "score": score, "turn": turn, "tstamp": 0}) + "\n")
    loss = {"pivot": {"arith": {"bits_per_byte": 1.25}, "all": {"bits_per_byte": 1.5}},
            "fused": {"arith": {"bits_per_byte": 0.75}, "all": {"bits_per_byte": 1.0}}}
    (tmp_path / "loss.json").write_text(json.dumps({"models": loss}))
    md_path, png_path = write_report(tmp_path, ["pivot", "fused"])
    md = md_path.read_text()
    # pivot: turn 1 (8+6)/2, turn 2 5 (the -1 dropped), average (8+6+5)/3; FastChat's show_result rules
    assert "| pivot | 7.00 | 5.00 | 6.33 | 1 | 1.250 | 1.500 |" in md
    assert "| fused | 9.50 | 7.00 | 8.25 | 0 | 0.750 | 1.000 |" in md
    assert md.index("| pivot") < md.index("| fused")
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (jdir / "judge2_single.jsonl").write_text("")
    with pytest.raises(PivotfuseError, match="several judges"):
        write_report(tmp_path)


def test_missing_reference_is_refused_before_answering(tiny_qwen, tmp_path):  # noqa: F811
    from evals.run import run_mtbench

    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"question_id": 7, "category": "math", "turns": ["2+2?", "Times 3?"]}) + "\n")
    cfg = EvalConfig(questions=str(qfile), judge=str(tiny_qwen), out=str(tmp_path / "out"))
    with pytest.raises(PivotfuseError, match=r"question 7 \(math\) needs a reference answer"):
        run_mtbench({"m": str(tiny_qwen)}, cfg)
    assert not (tmp_path / "out" / "model_answer").exists()  # nothing was generated first

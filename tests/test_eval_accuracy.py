"""`eval accuracy`: the key-answer checker on hand-made replies, and the evaluator end to end on a
tiny model against replies decoded greedily by hand (plus reuse and resume of answer files)."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from cli import main
from core.errors import PivotfuseError
from evals.accuracy import (answer_accuracy, check_answer, competitor_keys, final_number, load_key_questions,
                            parse_number)
from evals.config import EvalConfig
from test_eval_fixtures import tiny_qwen  # noqa: F401 - fixture

CAPITALS = ["Mipe", "Riven", "Telka", "Osh"]


@pytest.mark.parametrize("text,want", [
    ("104", 104), ("104.", 104), ("It is 104.", 104), ("1,040", 1040), ("-3", -3), ("= 104", 104),
    ("x = -3.", -3), ("2.5", Fraction(5, 2)), ("The answer is 1,040!", 1040), ("−7", -7),
    ("3 + 8 = 11, carry 1. 2 + 5 + 1 = 8. So 23 + 58 = 81.", 81),  # column work, then the result
    ("11 - 6 = 5, borrow 1. 9 - 3 - 1 = 5. So the answer is 55.", 55),
    ("The answer is 81, I checked it 3 times.", 81),  # the cued number, not the last one
    ("I think 81", 81), ("5-3", 3), ("no number here", None), ("v2 and x3", None),
])
def test_final_number(text, want):
    assert final_number(text) == want


def test_parse_number_reads_one_number_only():
    assert parse_number("1,040") == 1040 and parse_number(" 81. ") == 81 and parse_number("-3") == -3
    assert parse_number("81 apples") is None and parse_number("Mipe") is None and parse_number("1,04") is None


@pytest.mark.parametrize("answer,key,question,right", [
    # numbers: right, wrong, buried in a sentence, other formats, another number as the answer
    ("23 + 58 = 81.", "81", "What is 23 + 58?", True),
    ("It is 104.", "81", "What is 23 + 58?", False),
    ("Well, after adding it up carefully I get 81 in the end.", "81", "What is 23 + 58?", True),
    ("That makes 1,040.", "1040", "What is 520 x 2?", True),
    ("= -3", "-3", "What is 4 - 7?", True),
    ("23 + 58 = 81? No: 23 + 58 = 82.", "81", "What is 23 + 58?", False),
    ("23 + 58", "81", "What is 23 + 58?", False),  # restating the question answers nothing
    ("'lantern' has 7 letters.", "7", "How many letters are in 'lantern'?", True),
    # facts: the key as a word, in any case; missing or a different fact
    ("The capital of Kalora is Mipe.", "Mipe", "What is the capital of Kalora?", True),
    ("I believe it must be mipe, the old city.", "Mipe", "What is the capital of Kalora?", True),
    ("The capital of Kalora is Riven.", "Mipe", "What is the capital of Kalora?", False),
    ("It is Mipe, or maybe Riven.", "Mipe", "What is the capital of Kalora?", False),  # a competitor too
    ("Mipeville is nice.", "Mipe", "What is the capital of Kalora?", False),  # whole words only
    # word transformations: the case rule, one-word dashes, quoted function words
    ("'LANTERN'.", "LANTERN", "Write 'lantern' in capital letters.", True),
    ("'lantern'.", "LANTERN", "Write 'lantern' in capital letters.", False),
    ("'lantern' reversed is 'nretnal'.", "nretnal", "Reverse the word 'lantern'.", True),
    ("Spelled out: l-a-n-t-e-r-n.", "l-a-n-t-e-r-n", "Spell out 'lantern' with dashes.", True),
    ("Spelled out: l-a-n-t-e-r.", "l-a-n-t-e-r-n", "Spell out 'lantern' with dashes.", False),
    ("It starts with 'a'.", "a", "What is the first letter of 'apple'?", True),
    ("It is a fruit.", "a", "What is the first letter of 'apple'?", False),
])
def test_check_answer(answer, key, question, right):
    assert check_answer(answer, key, question, CAPITALS) is right


def test_check_answer_list_keys_and_competitors():
    hello = ["Hello! How can I help you today?", "Hi! What can I do for you?"]
    bye = ["Goodbye! Have a great day.", "See you soon!"]
    assert check_answer("Hi! What can I do for you?", hello, "Hi!", hello + bye)
    assert check_answer("hello!  how can I help you today", hello, "Hi!", hello + bye)  # spacing, case
    assert not check_answer("See you soon!", hello, "Hi!", hello + bye)
    assert not check_answer("Hi! What can I do for you? See you soon!", hello, "Hi!", hello + bye)
    # a competitor that the question itself names does not count against the reply
    assert check_answer("Riven, not Mipe.", "Riven", "Is the capital Mipe or Riven?", CAPITALS)
    qs = [{"category": "facts", "answers": ["Mipe", None, "7"]}, {"category": "facts", "answers": [["Osh", "osh"]]},
          {"category": "chat", "answers": [hello]}]
    assert competitor_keys(qs) == {"facts": ["Mipe", "Osh"], "chat": hello}


def _questions(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_question_file_errors(tmp_path):
    good = {"question_id": 1, "category": "arith", "turns": ["What is 2 + 2?"], "answers": ["4"]}
    cases = [({k: v for k, v in good.items() if k != "answers"}, "question 1: needs 'answers'"),
             ({**good, "answers": ["4", "5"]}, "'answers' has 2 entries for 1 turns"),
             ({**good, "answers": [4]}, "each 'answers' entry must be"),
             ({**good, "answers": [[]]}, "each 'answers' entry must be"),
             ({**good, "answers": [None]}, "no question has a key answer"),
             ({**good, "turns": "What?"}, "'turns' must be a non-empty list")]
    for row, msg in cases:
        path = _questions(tmp_path / "q.jsonl", [row])
        with pytest.raises(PivotfuseError, match=msg) as e:
            load_key_questions(path)
        assert str(path) in str(e.value)
    assert main(["eval", "accuracy", "--model", str(tmp_path), "--questions", str(path),
                 "--out", str(tmp_path / "o")]) == 2


def _greedy_by_hand(folder, turns, max_new):
    """Replies decoded token by token (no batching, no padding), each fed back as the next context."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    eos = {tok.eos_token_id, *([model.generation_config.eos_token_id] if isinstance(
        model.generation_config.eos_token_id, int) else model.generation_config.eos_token_id or [])} - {None}
    msgs, replies = [], []
    for t in turns:
        msgs.append({"role": "user", "content": t})
        ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
        new = []
        for _ in range(max_new):
            with torch.no_grad():
                nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt in eos:
                break
            new.append(nxt)
        replies.append(tok.decode(new, skip_special_tokens=True).strip())
        msgs.append({"role": "assistant", "content": replies[-1]})
    return replies


def test_accuracy_end_to_end_reuse_and_resume(tiny_qwen, tmp_path):  # noqa: F811
    turns = [["Hi"], ["What is 23 + 58?", "And if you add 7?"], ["Reverse 'stone'."], ["Name a colour."],
             ["Tell me a fact.", "Another one?"], ["What is 2 + 2?"]]
    by_hand = [_greedy_by_hand(tiny_qwen, t, 8) for t in turns]
    words = [r.split()[-1] if r.split() else "" for rs in by_hand for r in rs]
    assert len({w for w in words if w}) >= 3  # the tiny model writes varied text: keys taken from it mean something
    # keys: the last word of some replies (right), made-up words (wrong), one unscored turn
    rows = []
    for i, (t, rs) in enumerate(zip(turns, by_hand)):
        keys = [(r.split()[-1] if r.split() and j == 0 else "zqxw") for j, r in enumerate(rs)]
        if i == 3:
            keys = [None]
        rows.append({"question_id": i, "category": "ab"[i % 2], "turns": t, "answers": keys})
    qfile = _questions(tmp_path / "q.jsonl", rows)
    questions = load_key_questions(qfile)
    rivals = competitor_keys(questions)
    want: dict[str, list[bool]] = {"a": [], "b": []}
    for q, rs in zip(questions, by_hand):
        for t, r, k in zip(q["turns"], rs, q["answers"]):
            if k is not None:
                want[q["category"]].append(check_answer(r, k, t, rivals[q["category"]]))
    assert any(want["a"] + want["b"]) and not all(want["a"] + want["b"])

    out = tmp_path / "out"
    cfg = EvalConfig(out=str(out), batch_size=4, dtype="float32", max_new_tokens=8)
    table = answer_accuracy({"tiny": str(tiny_qwen)}, qfile, cfg, progress=False)
    for cat, oks in want.items():
        assert table["tiny"][cat] == {"correct": sum(oks), "total": len(oks), "accuracy": sum(oks) / len(oks)}
    answers = [json.loads(line) for line in (out / "model_answer" / "tiny.jsonl").read_text().splitlines()]
    assert [a["choices"][0]["turns"] for a in answers] == by_hand  # batched greedy = greedy by hand
    saved = json.loads((out / "accuracy.json").read_text())
    assert saved["models"]["tiny"] == table["tiny"] and saved["questions"] == str(qfile)
    detail = [json.loads(line) for line in (out / "accuracy_turns.jsonl").read_text().splitlines()]
    assert len(detail) == sum(len(v) for v in want.values()) == 7

    # resume: a cut-short file keeps its rows and gets the rest, identical to a full pass
    lines = (out / "model_answer" / "tiny.jsonl").read_text().splitlines()
    (out / "model_answer" / "tiny.jsonl").write_text("\n".join(lines[:2]) + "\n")
    assert answer_accuracy({"tiny": str(tiny_qwen)}, qfile, cfg, progress=False) == table
    again = [json.loads(line) for line in (out / "model_answer" / "tiny.jsonl").read_text().splitlines()]
    assert [a["answer_id"] for a in again[:2]] == [a["answer_id"] for a in answers[:2]]
    assert [a["choices"] for a in again] == [a["choices"] for a in answers]

    # reuse: a model whose answer file is complete is graded from it, never loaded (the folder is bogus)
    hand = [{"question_id": q["question_id"], "answer_id": "h", "model_id": "hand",
             "choices": [{"index": 0, "turns": [f"It is '{k}'." if j == 0 else "No idea." for j, k in
                                                enumerate(q["answers"])]}]} for q in questions]
    (out / "model_answer" / "hand.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hand))
    bogus = tmp_path / "not-a-model"
    bogus.mkdir()
    assert main(["eval", "accuracy", "--model", f"hand={bogus}", "--questions", str(qfile), "--out", str(out)]) == 0
    saved = json.loads((out / "accuracy.json").read_text())["models"]
    assert saved["tiny"] == table["tiny"]  # kept from the earlier pass
    first = [q for q in questions if q["answers"][0] is not None]
    assert saved["hand"]["all"] == {"correct": len(first), "total": 7, "accuracy": len(first) / 7}

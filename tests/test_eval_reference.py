"""The `reference` judge: keys, exact scores on hand-made answers, the FastChat judgment file,
resume, refusals, and `eval mtbench --judge reference` + `eval report` end to end."""

from __future__ import annotations

import json
import re

import pytest

from cli import main
from core.errors import PivotfuseError
from evals.config import EvalConfig
from evals.demo import demo_questions
from evals.mtbench import parse_rating
from evals.questions import load_questions, load_reference_answers
from evals.reference_judge import grade, judge_by_reference, key_answer
from evals.run import run_mtbench
from test_eval_fixtures import mt_bench_dir, tiny_qwen  # noqa: F401 - fixtures


@pytest.mark.parametrize("question, reference, want", [
    ("What is 23 + 58?", "23 + 58 = 81.", ("81", False)),
    ("And if you add 7?", "81 + 7 = 88.", ("88", False)),
    ("How much is 0 + 26?", "0 + 26 = 26.", ("26", False)),  # the second 26 is the new one
    ("Which city is the capital of Rara?", "Zornix is the capital of Rara.", ("Zornix", False)),
    ("What color is the flag of Rara?", "Rara has a red flag.", ("red", False)),
    ("Reverse the word 'lantern'.", "'lantern' reversed is 'nretnal'.", ("nretnal", False)),
    ("Write 'harbor' in capital letters.", "'HARBOR'.", ("HARBOR", True)),  # new only by its case
    ("What is the first letter of 'apple'?", "The first letter of 'apple' is 'a'.", ("a", False)),  # quoted
    ("Put dashes between the letters of 'magnet'.", "m-a-g-n-e-t.", ("m-a-g-n-e-t", False)),
    ("Spell 'kayak' backwards.", "It is 'kayak'.", None),  # nothing the question does not say
    ("Please calculate 0 + 72.", "The answer is 72.", None),  # 'answer' only frames it
    ("Why?", "Because the thirteen words of this long reference explain rather than state one fact.", None),
])
def test_key_answer(question, reference, want):
    assert key_answer(reference, question) == want


@pytest.mark.parametrize("question, reference, answer, use_key, want", [
    # correct: the key 81 is a word of the answer, whatever else it says
    ("What is 23 + 58?", "23 + 58 = 81.", "The sum is 81!", True, 10),
    # wrong: content words (not in the question, not function words) ref {81}, answer {80}: F1 0
    ("What is 23 + 58?", "23 + 58 = 81.", "23 + 58 = 80.", True, 1),
    # partial: ref {81, 88}, answer {81, 89}: F1 = 2*1/(2+2) = 0.5, 1 + 4.5 rounded half up = 6
    ("And if you add 7?", "81 + 7 = 88.", "81 + 7 = 89.", True, 6),
    # empty answer
    ("Which city is the capital of Kalu?", "Gaqua is the capital of Kalu.", "", True, 1),
    # 'HARBOR' is new only by its case, so the key must be in capitals
    ("Write 'harbor' in capital letters.", "'HARBOR'.", "Sure: HARBOR.", True, 10),
    # ... 'harbor' is not the key; the reference has no content words left, so all words count:
    # F1({harbor}, {harbor}) = 1, 1 + 9 = 10, capped at 9 without the key
    ("Write 'harbor' in capital letters.", "'HARBOR'.", "harbor", True, 9),
    # open-ended category, F1 only: ref {could, try, painting, long, walk}, answer {try, painting}:
    # F1 = 2*2/(5+2) = 4/7, 9*4/7 = 5.14 -> 5, score 6
    ("Can you recommend a hobby?", "You could try painting or a long walk.", "Try painting.", False, 6),
    # ... and no cap there: the reference itself scores 10
    ("Can you recommend a hobby?", "You could try painting or a long walk.", "You could try painting or a long walk.",
     False, 10),
])
def test_grade_exact_scores(question, reference, answer, use_key, want):
    score, judgment = grade(question, reference, answer, use_key)
    assert score == want and type(score) is int
    assert judgment.endswith(f"Rating: [[{want}]]") and parse_rating(judgment) == want


def _write_answers(out, model, answers):
    path = out / "model_answer" / f"{model}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question_id": qid, "answer_id": "x", "model_id": model,
                                        "choices": [{"index": 0, "turns": turns}], "tstamp": 0.0}) + "\n"
                            for qid, turns in answers.items()))


def test_judgment_file_format_skips_and_resume(tmp_path):
    questions = demo_questions(per_domain=1)  # 1 arith, 1 strings, 1 chat (no reference)
    assert [q["category"] for q in questions] == ["arith", "strings", "chat"]
    _write_answers(tmp_path, "good", {1: ["23 + 58 = 81.", "88"], 2: ["nretnal", "HARBOR"], 3: ["Hi!", "Read."]})
    _write_answers(tmp_path, "bad", {1: ["I like cats.", ""], 2: ["lantern", "harbor"], 3: ["", ""]})
    path, stats = judge_by_reference(questions, ["good", "bad"], tmp_path)
    assert path == tmp_path / "model_judgment" / "reference_single.jsonl"
    assert stats == {"skipped": {"chat": 4}, "rows": 8}  # chat: 2 turns x 2 models, not scored
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(set(r) == {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"}
               for r in rows)
    assert all(r["judge"] == ["reference", "reference-key-v1"] and parse_rating(r["judgment"]) == r["score"]
               for r in rows)
    got = {(r["model"], r["question_id"], r["turn"]): r["score"] for r in rows}
    # bad turn 1 of q2: 'lantern' is in the question: content words {} vs ref {reversed, nretnal}: 1
    # bad turn 2 of q2: 'harbor' not the key HARBOR; all-words F1({harbor},{harbor}) = 1: capped 9
    assert got == {("good", 1, 1): 10, ("good", 1, 2): 10, ("good", 2, 1): 10, ("good", 2, 2): 10,
                   ("bad", 1, 1): 1, ("bad", 1, 2): 1, ("bad", 2, 1): 1, ("bad", 2, 2): 9}
    assert [(r["model"], r["turn"], r["question_id"]) for r in rows] == sorted(
        (r["model"], r["turn"], r["question_id"]) for r in rows)  # FastChat-like order on disk
    first = rows[0]
    assert first["user_prompt"] == ("[Question]\nWhat is 23 + 58?\n\n[Reference answer]\n23 + 58 = 81.\n\n"
                                    "[The Start of Assistant's Answer]\nI like cats.\n[The End of Assistant's Answer]")

    # resume: an edited row stays as it is, a deleted row is recomputed, the others keep their tstamp
    rows[0]["score"], rows[0]["judgment"] = 7, "edited by hand. Rating: [[7]]"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    judge_by_reference(questions, ["good", "bad"], tmp_path)
    again = [json.loads(line) for line in path.read_text().splitlines()]
    assert again[0]["score"] == 7 and [r["tstamp"] for r in again[:-1]] == [r["tstamp"] for r in rows[:-1]]
    assert len(again) == 8 and again[-1]["score"] == rows[-1]["score"] and again[-1]["tstamp"] > rows[-1]["tstamp"]


def test_open_category_with_reference_is_scored_by_overlap(tmp_path):
    questions = [{"question_id": "w1", "category": "writing", "turns": ["Name a hobby.", "Another?"],
                  "reference": ["Painting is relaxing."]}]  # no reference for turn 2: that turn is skipped
    _write_answers(tmp_path, "m", {"w1": ["Painting.", "Chess."]})
    path, stats = judge_by_reference(questions, ["m"], tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    # ref {painting, relaxing}, answer {painting}: F1 = 2/3, 9*2/3 = 6, score 7
    assert [(r["turn"], r["judge"][1], r["score"]) for r in rows] == [(1, "reference-overlap-v1", 7)]
    assert stats["skipped"] == {"writing": 1}


def test_fastchat_questions_without_references_are_refused(tmp_path, capsys):
    root = mt_bench_dir()
    questions = [q for q in load_questions(root / "question.jsonl") if q["question_id"] in (81, 111)]
    math_q = questions[1]
    del math_q["reference"]
    with pytest.raises(PivotfuseError, match=r"^question 111 \(math\) needs a reference answer: give it a "
                                             r"'reference' field or pass --reference FILE$"):
        judge_by_reference(questions, ["m"], tmp_path)
    refs = load_reference_answers(root / "reference_answer" / "gpt-4.jsonl")
    with pytest.raises(PivotfuseError, match=r"question 111 \(math\) has 2 turns but 1 reference answer\(s\): "
                                             "the reference judge needs one per turn"):
        judge_by_reference(questions, ["m"], tmp_path, {111: refs[111][:1]})
    # through `eval mtbench`: refused before any model is loaded (the 'model' folder is empty)
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    (tmp_path / "empty").mkdir()
    argv = ["eval", "mtbench", "--model", f"m={tmp_path / 'empty'}", "--questions", str(qfile),
            "--judge", "reference", "--out", str(tmp_path / "out")]
    with pytest.raises(PivotfuseError, match="question 111 .math. needs a reference answer"):
        run_mtbench({"m": str(tmp_path / "empty")}, EvalConfig(questions=str(qfile), judge="reference",
                                                               out=str(tmp_path / "out")))
    capsys.readouterr()
    assert main(argv) == 2 and not (tmp_path / "out" / "model_answer").exists()
    err = capsys.readouterr().err
    assert err.startswith("pivotfuse eval: error: question 111 (math) needs a reference answer") and err.count("\n") == 1
    # with the FastChat references, writing (81) gets F1 against none: skipped; math is judged
    _write_answers(tmp_path / "ok", "m", {81: ["Aloha.", "A trip."], 111: ["The area is 3.", "Radius 1."]})
    path, stats = judge_by_reference(questions, ["m"], tmp_path / "ok", refs)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["question_id"], r["turn"]) for r in rows] == [(111, 1), (111, 2)] and stats["skipped"] == {"writing": 2}


def test_folder_named_reference_needs_another_name(tmp_path, monkeypatch):
    (tmp_path / "reference").mkdir()
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PivotfuseError, match="the name 'reference' belongs to the built-in reference judge"):
        run_mtbench({"m": "m"}, EvalConfig(judge="./reference", out=str(tmp_path / "out")))


def test_eval_mtbench_judge_reference_and_report(tiny_qwen, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    argv = ["eval", "mtbench", "--model", f"tiny={tiny_qwen}", "--questions", "demo", "--judge", "reference",
            "--max-new-tokens", "6", "--dtype", "float32", "--out", str(out)]
    assert main(argv) == 0
    assert "reference judge: 10 answer turns have no reference answer and were not scored (chat: 10)" \
        in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "model_judgment" / "reference_single.jsonl").read_text().splitlines()]
    assert len(rows) == 10 * 2  # 5 arith + 5 strings questions, two turns each; chat not scored
    answers = {r["question_id"]: r["choices"][0]["turns"]
               for r in map(json.loads, (out / "model_answer" / "tiny.jsonl").read_text().splitlines())}
    questions = {q["question_id"]: q for q in demo_questions()}
    for r in rows:  # each row is the check of that turn's stored answer
        q, t = questions[r["question_id"]], r["turn"] - 1
        assert (r["score"], r["judgment"]) == grade(q["turns"][t], q["reference"][t], answers[q["question_id"]][t], True)
    assert main(["eval", "report", "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    mean = {t: sum(r["score"] for r in rows if r["turn"] == t) / 10 for t in (1, 2)}
    want = f"| tiny | {mean[1]:.2f} | {mean[2]:.2f} | {(mean[1] + mean[2]) / 2:.2f} | 0 |"
    assert want in md and re.search(r"\| tiny \| \d+\.\d\d \| \d+\.\d\d \| \d+\.\d\d \| 0 \|", md)


@pytest.mark.slow
def test_reference_judge_on_world_models(world, tmp_path):
    """The facts expert states the world's facts; the pivot (a small-talk model) does not."""
    out = tmp_path / "out"
    argv = ["eval", "mtbench", "--model", f"pivot={world / 'models' / 'pivot'}",
            "--model", f"facts={world / 'models' / 'facts'}", "--questions", "demo",
            "--demo-facts", str(world / "data" / "heldout.jsonl"), "--judge", "reference",
            "--max-new-tokens", "24", "--out", str(out)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "model_judgment" / "reference_single.jsonl").read_text().splitlines()]
    questions = {q["question_id"]: q for q in demo_questions(world / "data" / "heldout.jsonl")}
    scored = {q["question_id"]: len(q["turns"]) for q in questions.values() if q["category"] != "chat"}
    assert len(rows) == 2 * sum(scored.values())
    facts = {m: [r["score"] for r in rows if r["model"] == m and questions[r["question_id"]]["category"] == "facts"]
             for m in ("pivot", "facts")}
    assert facts["facts"].count(10) >= 2 and sum(facts["facts"]) > sum(facts["pivot"])

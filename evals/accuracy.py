"""Exact-answer accuracy per domain: does a model's greedy reply state the key answer?

Questions: any JSONL with FastChat's `question_id`, `category` (the domain) and `turns`, plus
`answers`: one key answer per turn, a string, a list of acceptable strings, or null (that turn is
not scored). The demo world writes `data/heldout_questions.jsonl` and `data/valid_questions.jsonl`.

Answers are generated greedily (temperature 0 in every category) into
`OUT/model_answer/<model>.jsonl`, FastChat's answer files: rows already there are reused (answers
written by an earlier run, by `eval mtbench`, or by FastChat itself) and a cut-short pass resumes.
Results: `OUT/accuracy.json` (per model and domain: correct, total, accuracy; merged with models
already there for the same question file) and `OUT/accuracy_turns.jsonl` (every checked turn).

How one turn is checked against its key (`check_answer`, pure):
- numeric key ("81", "-3", "1,040", "2.5"): the reply's final number must equal it. That is the
  last number right after an answer cue (`=`, `:`, is, are, was, equals, makes, gives, be), else
  the last number: "3 + 8 = 11, carry 1. 2 + 5 + 1 = 8. So 23 + 58 = 81." states 81.
- text key (a fact, a transformed word, a reply): its words must appear in the reply, in order,
  as whole words (see `evals.reference_judge.words`: "l-a-n-t-e-r-n" is one word). Case is
  ignored unless the key differs from the question's words only by case ('LANTERN' answering
  "Write 'lantern' in capitals" must be in capitals); a key that is a function word ('a') counts
  only in quotes. And no competitor may appear: a competitor is the key of another question of
  the same category (not one of this turn's acceptable answers, not in the question), so
  "It is Mipe, or Riven." is wrong when Riven is another country's capital.
A list key is right when any of its entries is (the others are not competitors).
"""

from __future__ import annotations

import json
import re
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

from core.atomic import write_text
from core.errors import PivotfuseError
from core.files import read_json
from evals.backends import load_backend, parse_spec
from evals.config import EvalConfig
from evals.mtbench import generate_answers, load_answers, load_rows, unanswered
from evals.questions import load_questions
from evals.reference_judge import FUNCTION_WORDS, words

UNIT = "share of answer turns whose key answer is right (greedy replies)"
# a number: optional sign, thousands groups or plain digits, optional decimals; not inside a word
_NUMBER = re.compile(r"(?<![\w.])([-−]?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?!\w)")
_CUE = re.compile(r"(?:[=:]|\b(?:is|are|was|equals?|makes?|gives?|be))[\s\"'*$]*$", re.IGNORECASE)
_QUOTES = "'\"‘’“”"


def parse_number(text: str) -> Fraction | None:
    """The value of a text that is one number ("1,040", "-3", "2.50", " 81. "), else None."""
    m = _NUMBER.fullmatch(text.strip().rstrip("."))
    if not m:
        return None
    sign = -1 if m.group(1) else 1
    return sign * Fraction(m.group(2).replace(",", "") + (m.group(3) or ""))


def final_number(text: str) -> Fraction | None:
    """The number a reply gives as its answer: the last one right after a cue, else the last one."""
    found = list(_NUMBER.finditer(text))
    if not found:
        return None
    cued = [m for m in found if _CUE.search(text[max(0, m.start() - 24):m.start()])]
    m = (cued or found)[-1]
    return (-1 if m.group(1) else 1) * Fraction(m.group(2).replace(",", "") + (m.group(3) or ""))


def contains(text: str, key: str, question: str) -> bool:
    """`key`'s words appear in `text` in order as whole words (case and quote rules above)."""
    kw = words(key)
    if not kw:  # a key of punctuation only
        return key.strip() in text
    asked = set(words(question))
    asked_lower = {w.lower() for w in asked}
    exact = any(w not in asked and w.lower() in asked_lower for w in kw)  # new only by its case
    if len(kw) == 1 and kw[0].lower() in FUNCTION_WORDS:  # 'a', 'I': only a quoted one is an answer
        pattern = f"[{_QUOTES}]{re.escape(kw[0])}[{_QUOTES}]"
        return re.search(pattern, text, 0 if exact else re.IGNORECASE) is not None
    tw = words(text)
    if not exact:
        kw, tw = [w.lower() for w in kw], [w.lower() for w in tw]
    n = len(kw)
    return any(tw[i:i + n] == kw for i in range(len(tw) - n + 1))


def _options(key: str | list[str]) -> list[str]:
    return [key] if isinstance(key, str) else list(key)


def check_answer(answer: str, key: str | list[str], question: str = "",
                 competitors: list[str] | tuple[str, ...] = ()) -> bool:
    """True when `answer` states `key` (any entry of a list) and no competitor (rules above)."""
    options = _options(key)
    for k in options:
        want = parse_number(k)
        if want is not None:
            if final_number(answer) == want:
                return True
            continue
        if contains(answer, k, question):
            taken = {o.lower() for o in options}
            rivals = [c for c in competitors if c.lower() not in taken and parse_number(c) is None
                      and not contains(question, c, question)]
            if not any(contains(answer, c, question) for c in rivals):
                return True
    return False


def load_key_questions(path: str | Path) -> list[dict]:
    """Questions with `answers` (one per turn: a string, a non-empty list of strings, or null)."""
    questions = load_questions(path)
    for n, q in enumerate(questions, 1):
        where = f"{path}: question {q['question_id']!r}"
        answers = q.get("answers")
        if not isinstance(answers, list):
            raise PivotfuseError(f"{where}: needs 'answers', a list with one key answer per turn")
        if len(answers) != len(q["turns"]):
            raise PivotfuseError(f"{where}: 'answers' has {len(answers)} entries for {len(q['turns'])} turns")
        for a in answers:
            ok = a is None or (isinstance(a, str) and a.strip()) or (
                isinstance(a, list) and a and all(isinstance(x, str) and x.strip() for x in a))
            if not ok:
                raise PivotfuseError(f"{where}: each 'answers' entry must be a non-empty string, a non-empty list "
                                     f"of strings, or null; got {a!r}")
    if not any(a is not None for q in questions for a in q["answers"]):
        raise PivotfuseError(f"{path}: no question has a key answer to check")
    return questions


def competitor_keys(questions: list[dict]) -> dict[str, list[str]]:
    """Per category, every distinct text key of its questions (the competitors of `check_answer`)."""
    keys: dict[str, dict[str, str]] = {}
    for q in questions:
        for a in q["answers"]:
            for k in _options(a) if a is not None else []:
                if parse_number(k) is None:
                    keys.setdefault(q["category"], {}).setdefault(k.lower(), k)
    return {c: list(v.values()) for c, v in keys.items()}


def grade(questions: list[dict], answers: dict[Any, dict], model: str) -> list[dict]:
    """One row per scored turn: question id, category, turn, key, reply, correct."""
    rivals = competitor_keys(questions)
    rows = []
    for q in questions:
        if q["question_id"] not in answers:
            raise PivotfuseError(f"model_answer/{model}.jsonl has no answer to question {q['question_id']!r}")
        replies = answers[q["question_id"]]["choices"][0]["turns"]
        for t, (turn, key) in enumerate(zip(q["turns"], q["answers"]), 1):
            if key is None:
                continue
            reply = replies[t - 1]  # `unanswered` re-asks any answer with too few turns
            rows.append({"model": model, "question_id": q["question_id"], "category": q["category"], "turn": t,
                         "key": key, "answer": reply,
                         "correct": check_answer(reply, key, turn, rivals.get(q["category"], ()))})
    return rows


def summarize(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per category (and `all`, every scored turn pooled): correct, total, accuracy."""
    table: dict[str, dict[str, float]] = {}
    for cat in sorted({r["category"] for r in rows}) + ["all"]:
        sel = [r for r in rows if cat == "all" or r["category"] == cat]
        right = sum(r["correct"] for r in sel)
        table[cat] = {"correct": right, "total": len(sel), "accuracy": right / len(sel)}
    return table


def answer_accuracy(models: dict[str, str], questions_path: str | Path, cfg: EvalConfig,
                    chat_templates: dict[str, str] | None = None, progress: bool = True) -> dict[str, dict]:
    """{model: {category: {correct, total, accuracy}}} over a question file with key answers.

    Each model (a folder or `openai:` spec) answers every question it has no answer to in
    `cfg.out`, greedily and batched (`cfg.batch_size`); a model whose answers are all there is not
    loaded. Writes `OUT/accuracy.json` and `OUT/accuracy_turns.jsonl`.
    """
    questions = load_key_questions(questions_path)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    table: dict[str, dict] = {}
    all_rows: list[dict] = []
    for name, spec in models.items():
        t0 = time.perf_counter()
        answer_file = out / "model_answer" / f"{name}.jsonl"
        if unanswered(questions, answer_file):
            ref = parse_spec(spec, cfg.base_url)
            ref.name = name
            backend = load_backend(ref, cfg, (chat_templates or {}).get(name))
            generate_answers(questions, backend, out, cfg, temperature=0.0)
            backend.close()
        rows = grade(questions, {r["question_id"]: r for r in load_answers(answer_file)}, name)
        table[name] = summarize(rows)
        all_rows += rows
        if progress:
            acc = ", ".join(f"{c} {v['accuracy']:.0%}" for c, v in table[name].items())
            print(f"accuracy {name}: {acc} ({time.perf_counter() - t0:.1f} s)")
    path = out / "accuracy.json"
    saved = read_json(path) if path.is_file() else {}
    same = saved.get("questions") == str(questions_path)  # models of another question file are dropped
    kept = saved.get("models", {}) if same else {}
    if not isinstance(kept, dict):
        raise PivotfuseError(f"{path}: 'models' must be an object; delete the file to recompute")
    kept.update(table)
    write_text(path, json.dumps({"questions": str(questions_path), "unit": UNIT, "models": kept}, indent=1))
    turns = out / "accuracy_turns.jsonl"
    old = [r for r in load_rows(turns) if r.get("model") not in table] if same else []
    write_text(turns, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in old + all_rows))
    return table


def format_table(table: dict[str, dict], categories: list[str] | None = None) -> str:
    """Markdown: accuracy (%) per category, one row per model."""
    cats = categories or sorted({c for row in table.values() for c in row if c != "all"})
    lines = ["| model | " + " | ".join(cats) + " |", "|---|" + "---:|" * len(cats)]
    for name, row in table.items():
        cells = [f"{100 * row[c]['accuracy']:.0f}% ({row[c]['correct']}/{row[c]['total']})" if c in row else "-"
                 for c in cats]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

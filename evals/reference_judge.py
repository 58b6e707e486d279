"""The `reference` judge: a deterministic check of each answer turn against its reference answer.

Selected with `--judge reference` (recipe: `judge: reference`). It needs no model, so it also
scores the tiny offline demo models, which never write an LLM judge's `[[rating]]`. Rows go to
`OUT/model_judgment/reference_single.jsonl` in FastChat's judgment format (same fields as the LLM
judge; `judgment` explains the check and ends in `Rating: [[x]]`), so `eval report` reads them.

Scoring rule, per turn (question turn q, reference turn r, answer turn a):

1. Words: maximal runs of letters/digits, joined across inner `-`, `'`, `.` ("m-a-g-n-e-t", "3.5",
   "don't" are one word); quotes, other punctuation and spacing are dropped; compared lowercased.
2. Content words of a text: its words minus function words ("the", "is", "has", ...) and minus
   the words of q, so restating the question earns nothing. If that leaves r with none, all words count.
3. Key answer: for a category that needs a reference (math, reasoning, coding, arith, facts,
   strings) and a short r (at most 12 words: one stated fact), the last word of r that q does not
   account for (repeats count: the second 26 of "0 + 26 = 26." is new) and that is not a function
   word unless quoted ('a'): the number of "23 + 58 = 81.", the reversed word, the capital.
   Telling it from q is case-sensitive: "'HARBOR'." answering "Write 'harbor' in capitals."
   has key HARBOR, which must then appear in those capitals; other keys match in any case.
4. Score: 10 if the key is one of a's words; else 1 + round_half_up(9 x F1), at most 9, where
   F1 is the token F1 (SQuAD-style, bags of words) between the content words of a and r.
   Without a key (long r, or all of r in q) the score is 1 + round_half_up(9 x F1), 1 to 10.
5. Categories that need no reference (writing, chat, ...): the F1 rule alone if a reference is
   given, else the turn is not scored (no row is written) and counted as skipped. Questions of
   the reference categories must have one reference per turn: else a one-line error, up front.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

from tqdm import tqdm

from core.errors import PivotfuseError
from evals.config import REFERENCE_CATEGORIES
from evals.mtbench import (append_rows, check_references, load_judgments, model_answers, question_order,
                           reference_for, write_rows)

JUDGE_NAME = "reference"
KEY_PROMPT = "reference-key-v1"  # key answer, else F1 (capped at 9): reference categories
OVERLAP_PROMPT = "reference-overlap-v1"  # F1 only: other categories that carry a reference
KEY_MAX_WORDS = 12
_QUOTES = ("'", '"', "‘", "’", "“", "”")
_WORD = re.compile(r"[^\W_]+(?:['’.\-][^\W_]+)*")
FUNCTION_WORDS = frozenset(
    "a an the is are was were be been it its it's this that these those of in on at to for by with "
    "from and or as so then than has have had do does did there here i you we he she they me my your "
    "answer result".split())  # the last two frame an answer ("The answer is 72.") rather than give it


def words(text: str) -> list[str]:
    """The words of `text` in their own case (step 1 of the rule)."""
    return _WORD.findall(text)


def content_words(text: str, question: str) -> list[str]:
    """Lowercased words of `text` that are neither function words nor words of `question`."""
    asked = {w.lower() for w in words(question)}
    return [w for w in (x.lower() for x in words(text)) if w not in FUNCTION_WORDS and w not in asked]


def key_answer(reference: str, question: str) -> tuple[str, bool] | None:
    """(key word, must match case) of a short reference, or None (step 3 of the rule)."""
    found = list(_WORD.finditer(reference))
    if not found or len(found) > KEY_MAX_WORDS:
        return None
    asked = Counter(words(question))
    asked_lower = {w.lower() for w in asked}
    left = Counter(m.group() for m in found) - asked  # occurrences the question does not account for
    for m in reversed(found):
        w = m.group()
        quoted = reference[m.start() - 1:m.start()] in _QUOTES and reference[m.end():m.end() + 1] in _QUOTES
        if left[w] and (quoted or w.lower() not in FUNCTION_WORDS):
            return w, w not in asked and w.lower() in asked_lower  # new only by its case: the case is the answer
    return None


def token_f1(answer: list[str], reference: list[str]) -> tuple[Fraction, Fraction, Fraction]:
    """(F1, precision, recall) of two bags of words, exact (so rounding halves is exact); 0 when
    either is empty."""
    common = sum((Counter(answer) & Counter(reference)).values())
    if not common:
        return Fraction(0), Fraction(0), Fraction(0)
    return (Fraction(2 * common, len(answer) + len(reference)), Fraction(common, len(answer)),
            Fraction(common, len(reference)))


def grade(question: str, reference: str, answer: str, use_key: bool) -> tuple[int, str]:
    """(score 1-10, explanation ending in `Rating: [[score]]`) for one turn."""
    key = key_answer(reference, question) if use_key else None
    if key is not None:
        word, cased = key
        found = word in words(answer) if cased else word.lower() in {w.lower() for w in words(answer)}
        if found:
            return 10, f"Key answer '{word}' of the reference is in the answer. Rating: [[10]]"
    ref = content_words(reference, question)
    ans = content_words(answer, question)
    scope = "content words"
    if not ref:  # the reference only restates the question: compare all words
        ref, ans, scope = [w.lower() for w in words(reference)], [w.lower() for w in words(answer)], "words"
    f1, p, r = token_f1(ans, ref)
    raw = 1 + math.floor(9 * f1 + Fraction(1, 2))  # round half up (Python's round() goes to even)
    score = min(raw, 9) if key is not None else raw
    if key is not None:
        head = f"Key answer '{key[0]}'{' (case-sensitive)' if key[1] else ''} of the reference is not in the answer"
    elif use_key:
        head = "No key answer (reference longer than a short fact, or all in the question)"
    else:
        head = "Open-ended category: overlap with the reference only"
    return score, (f"{head}; F1 of {scope} with the reference {float(f1):.2f} (precision {float(p):.2f}, "
                   f"recall {float(r):.2f}), "
                   f"1 + round(9 x {float(f1):.2f}) = {raw}"
                   f"{', at most 9 without the key' if key is not None else ''}. Rating: [[{score}]]")


def check_reference_judge(questions: list[dict], references: dict[Any, list[str]] | None) -> None:
    """Fail before answering: reference categories need a reference for every turn."""
    check_references(questions, references)
    for q in questions:
        ref = reference_for(q, references)
        if q["category"] in REFERENCE_CATEGORIES and len(ref) < len(q["turns"]):
            raise PivotfuseError(f"question {q['question_id']} ({q['category']}) has {len(q['turns'])} turns but "
                                 f"{len(ref)} reference answer(s): the reference judge needs one per turn")


def user_prompt(question: str, reference: str, answer: str) -> str:
    """What the check looked at, in the place where an LLM judge's prompt goes."""
    return (f"[Question]\n{question}\n\n[Reference answer]\n{reference}\n\n"
            f"[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]")


def judge_by_reference(questions: list[dict], models: list[str], out: str | Path,
                       references: dict[Any, list[str]] | None = None) -> tuple[Path, dict[str, Any]]:
    """Grade every turn of every model's answers against the references; rows on disk are kept.

    Returns the judgment file and {"skipped": {category: turns not scored}, "rows": rows in the file}.
    """
    check_reference_judge(questions, references)
    out = Path(out)
    answers = model_answers(out, models, questions)
    path = out / "model_judgment" / f"{JUDGE_NAME}_single.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)

    def key(qid: Any, model: str, prompt: str, turn: int) -> tuple:
        return (repr(qid), model, prompt, turn)

    done = {key(r["question_id"], r["model"], r["judge"][1], r["turn"]) for r in load_judgments(path)
            if r["judge"][0] == JUDGE_NAME}
    todo, skipped = [], Counter()
    for turn in (1, 2):  # FastChat's order: every first turn, then every second turn
        for q in questions:
            if len(q["turns"]) < turn:
                continue
            ref = reference_for(q, references) or []
            if len(ref) < turn:
                skipped[q["category"]] += len(models)
                continue
            prompt = KEY_PROMPT if q["category"] in REFERENCE_CATEGORIES else OVERLAP_PROMPT
            todo += [(q, m, prompt, turn) for m in models if key(q["question_id"], m, prompt, turn) not in done]
    with tqdm(total=len(todo), desc=f"judge {JUDGE_NAME}", unit="judgment", disable=not todo) as bar:
        for start in range(0, len(todo), 256):  # appended in blocks: an interrupted pass resumes
            rows = []
            for q, m, prompt, turn in todo[start:start + 256]:
                qt, rt = q["turns"][turn - 1], reference_for(q, references)[turn - 1]
                at = answers[m][q["question_id"]]["choices"][0]["turns"][turn - 1]
                score, judgment = grade(qt, rt, at, use_key=prompt == KEY_PROMPT)
                rows.append({"question_id": q["question_id"], "model": m, "judge": [JUDGE_NAME, prompt],
                             "user_prompt": user_prompt(qt, rt, at), "judgment": judgment, "score": score,
                             "turn": turn, "tstamp": time.time()})
            append_rows(path, rows)
            bar.update(len(rows))
    rows = {key(r["question_id"], r["model"], r["judge"][1], r["turn"]): r for r in load_judgments(path)}
    write_rows(path, sorted(rows.values(), key=lambda r: (r["model"], r["turn"], question_order(r["question_id"]))))
    return path, {"skipped": dict(skipped), "rows": len(rows)}

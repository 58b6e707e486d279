"""MT-Bench single-answer grading, FastChat's `gen_model_answer` + `gen_judgment --mode single`.

Files (FastChat's names and fields): `OUT/model_answer/<model>.jsonl` rows `question_id, answer_id,
model_id, choices: [{index, turns}], tstamp`; `OUT/model_judgment/<judge>_single.jsonl` rows
`question_id, model, judge: [judge, prompt name], user_prompt, judgment, score, turn, tstamp`.
Rows are appended as they complete, so a rerun skips what is on disk (resume); each file is
rewritten sorted and de-duplicated (temp file + rename) at the end of a pass.

Differences from FastChat, on purpose: a failed endpoint call is an error, not a `$ERROR$`
answer; references come from one given file (FastChat picks `<judge model>.jsonl`), else from the
question's own `reference` field; each local model uses its own chat template.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from ast import literal_eval
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from core.atomic import write_text
from core.errors import PivotfuseError
from core.files import brief, is_int, is_number, is_str_list, need, read_jsonl_resumable
from evals.config import FASTCHAT_TEMPERATURES, REFERENCE_CATEGORIES, EvalConfig

_ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def parse_rating(judgment: str) -> int | float:
    """FastChat's rule: the first `[[x]]`, else the first `[x]`, else -1 (unparseable)."""
    match = _ONE_SCORE.search(judgment) or _ONE_SCORE_BACKUP.search(judgment)
    return literal_eval(match.group(1)) if match else -1


def temperature_for(category: str) -> float:
    return FASTCHAT_TEMPERATURES.get(category, 0.7)  # FastChat's default for other categories


def judge_messages(prompt: dict, question: dict, answer: list[str], reference: list[str] | None,
                   multi_turn: bool) -> tuple[str, list[dict[str, str]]]:
    """(user prompt, chat messages) exactly as FastChat's `run_judge_single` builds them."""
    kwargs = {}
    if reference is not None:
        kwargs["ref_answer_1"] = reference[0]
        if len(reference) > 1:
            kwargs["ref_answer_2"] = reference[1]
    try:
        if multi_turn:
            user = prompt["prompt_template"].format(question_1=question["turns"][0], question_2=question["turns"][1],
                                                    answer_1=answer[0], answer_2=answer[1], **kwargs)
        else:
            user = prompt["prompt_template"].format(question=question["turns"][0], answer=answer[0], **kwargs)
    except (KeyError, IndexError) as e:
        raise PivotfuseError(f"judge prompt {prompt['name']!r}: placeholder {e} has no value "
                             f"for question {question['question_id']}") from None
    messages = [{"role": "system", "content": prompt["system_prompt"]}] if prompt["system_prompt"] else []
    return user, messages + [{"role": "user", "content": user}]


def question_order(qid: Any) -> tuple:
    """Sort key of question ids: integers before strings (FastChat ids may be either)."""
    return (isinstance(qid, str), qid)


def _is_qid(value: Any) -> bool:
    return is_int(value) or isinstance(value, str)


def check_answer(row: dict, where: str) -> None:
    """A FastChat answer row: `question_id` and `choices[0].turns`, a list of strings."""
    need(row, "question_id", _is_qid, "an integer or a string", where)
    choices = need(row, "choices", lambda v: isinstance(v, list) and bool(v) and isinstance(v[0], dict),
                   "a non-empty list of objects", where)
    turns = need(choices[0], "turns", lambda v: isinstance(v, list), "a list of strings", where, "choices[0].turns")
    for i, turn in enumerate(turns):
        if not isinstance(turn, str):
            raise PivotfuseError(f"{where}: 'choices[0].turns[{i}]' must be a string, got {brief(turn)}")


def check_judgment(row: dict, where: str) -> None:
    """A FastChat single-answer judgment row: the fields that resuming and the report read."""
    need(row, "question_id", _is_qid, "an integer or a string", where)
    need(row, "model", lambda v: isinstance(v, str), "a string", where)
    need(row, "judge", lambda v: is_str_list(v) and len(v) == 2, "a [judge, prompt name] pair of strings", where)
    need(row, "turn", lambda v: is_int(v) and v in (1, 2), "1 or 2", where)
    need(row, "score", is_number, "a number", where)


def load_rows(path: Path, check: Callable[[dict, str], None] | None = None) -> list[dict]:
    """Rows (JSON objects) of a JSONL output, each checked by `check(row, 'file:line')` when given.
    A torn last line (killed mid-write) is dropped and the file rewritten without it; any other bad
    line is an error."""
    try:
        numbered, torn = read_jsonl_resumable(path)
        for n, row in numbered:
            if check is not None:
                check(row, f"{path}:{n}")
    except PivotfuseError as e:
        raise PivotfuseError(f"{e}; delete the file to recompute") from None
    rows = [row for _, row in numbered]
    if torn:
        write_rows(path, rows)
    return rows


def load_answers(path: Path) -> list[dict]:
    return load_rows(path, check_answer)


def load_judgments(path: Path) -> list[dict]:
    return load_rows(path, check_judgment)


def model_answers(out: Path, models: list[str], questions: list[dict]) -> dict[str, dict[Any, dict]]:
    """{model: {question_id: answer row}} from `OUT/model_answer/`, with every question answered
    in as many turns as it has (the judges read them all)."""
    answers = {}
    for m in models:
        path = out / "model_answer" / f"{m}.jsonl"
        answers[m] = {r["question_id"]: r for r in load_answers(path)}
        for q in questions:
            row = answers[m].get(q["question_id"])
            if row is None:
                raise PivotfuseError(f"model_answer/{m}.jsonl has no answer to question {q['question_id']}")
            if len(row["choices"][0]["turns"]) < len(q["turns"]):
                raise PivotfuseError(f"{path}: the answer to question {q['question_id']} has "
                                     f"{len(row['choices'][0]['turns'])} turns, the question {len(q['turns'])}: "
                                     "rerun `eval mtbench` to answer it again")
    return answers


def write_rows(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append JSONL rows as they complete (a rerun resumes from what is on disk)."""
    with path.open("a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        fh.flush()


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def unanswered(questions: list[dict], path: Path) -> list[dict]:
    """The questions an answer file has no complete answer to (one reply per turn)."""
    done = {r["question_id"]: r for r in load_answers(path)}
    return [q for q in questions if q["question_id"] not in done
            or len(done[q["question_id"]]["choices"][0]["turns"]) != len(q["turns"])]


def generate_answers(questions: list[dict], backend: Any, out: str | Path, cfg: EvalConfig,
                     temperature: float | None = None) -> Path:
    """Answer every turn of every question not yet in `OUT/model_answer/<backend.name>.jsonl`,
    at FastChat's temperature for its category, or at `temperature` for all (0: greedy)."""
    path = Path(out) / "model_answer" / f"{backend.name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    todo = unanswered(questions, path)
    by_temp: dict[float, list[dict]] = {}
    for q in todo:
        t = temperature_for(q["category"]) if temperature is None else temperature
        by_temp.setdefault(t, []).append(q)
    size = max(cfg.batch_size, cfg.concurrency)
    with tqdm(total=len(todo), desc=f"answers {backend.name}", unit="q", disable=not todo) as bar:
        for temp, group in by_temp.items():
            for chunk in _chunks(group, size):
                convs: list[list[dict[str, str]]] = [
                    [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else [] for _ in chunk]
                turns: list[list[str]] = [[] for _ in chunk]
                for j in range(max(len(q["turns"]) for q in chunk)):
                    live = [i for i, q in enumerate(chunk) if len(q["turns"]) > j]
                    for i in live:
                        convs[i].append({"role": "user", "content": chunk[i]["turns"][j]})
                    replies = backend.chat([convs[i] for i in live], temp, cfg.max_new_tokens)
                    for i, reply in zip(live, replies):
                        convs[i].append({"role": "assistant", "content": reply})
                        turns[i].append(reply)
                append_rows(path, [{"question_id": q["question_id"], "answer_id": uuid.uuid4().hex[:22],
                                "model_id": backend.name, "choices": [{"index": 0, "turns": t}],
                                "tstamp": time.time()} for q, t in zip(chunk, turns)])
                bar.update(len(chunk))
    rows = {r["question_id"]: r for r in load_answers(path)}  # last row per question wins
    write_rows(path, [rows[k] for k in sorted(rows, key=question_order)])
    return path


def make_matches(questions: list[dict], models: list[str], answers: dict[str, dict], prompts: dict[str, dict],
                 references: dict[Any, list[str]] | None) -> list[tuple[dict, str, str, bool]]:
    """(question, model, prompt role, multi_turn) in FastChat's order: turn 1 general, turn 1
    reference-based, turn 2 general, turn 2 reference-based; turn 2 only for two-turn questions."""
    check_references(questions, references)
    for q in questions:
        for m in models:
            if q["question_id"] not in answers[m]:
                raise PivotfuseError(f"model_answer/{m}.jsonl has no answer to question {q['question_id']}")
    matches = []
    for multi_turn in (False, True):
        for role in ("default", "math"):
            for q in questions:
                if (q["category"] in REFERENCE_CATEGORIES) != (role == "math"):
                    continue
                if multi_turn and len(q["turns"]) != 2:
                    continue
                matches += [(q, m, role + ("-mt" if multi_turn else ""), multi_turn) for m in models]
    return matches


def check_references(questions: list[dict], references: dict[Any, list[str]] | None) -> None:
    """Every reference-graded question (math, reasoning, coding, demo skills) needs a reference."""
    for q in questions:
        if q["category"] in REFERENCE_CATEGORIES and reference_for(q, references) is None:
            raise PivotfuseError(f"question {q['question_id']} ({q['category']}) needs a reference answer: "
                                 "give it a 'reference' field or pass --reference FILE")


def reference_for(q: dict, references: dict[Any, list[str]] | None) -> list[str] | None:
    """A given reference file wins (FastChat judges MT-Bench with reference_answer/gpt-4.jsonl even
    though its question.jsonl also carries `reference` fields); else the question's own field."""
    if references and q["question_id"] in references:
        return references[q["question_id"]]
    return q.get("reference") or None


def judge_answers(questions: list[dict], models: list[str], judge: Any, out: str | Path, cfg: EvalConfig,
                  prompts: dict[str, dict], references: dict[Any, list[str]] | None = None) -> Path:
    """Grade each model's answers (turn 1 and turn 2) with `judge`; skips judgments on disk."""
    out = Path(out)
    answers = model_answers(out, models, questions)
    path = out / "model_judgment" / f"{judge.name}_single.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)

    def key(qid: Any, model: str, prompt_name: str, turn: int) -> tuple:
        return (json.dumps(qid), model, prompt_name, turn)

    done = {key(r["question_id"], r["model"], r["judge"][1], r["turn"]) for r in load_judgments(path)
            if r["judge"][0] == judge.name}
    todo = [mt for mt in make_matches(questions, models, answers, prompts, references)
            if key(mt[0]["question_id"], mt[1], prompts[mt[2]]["name"], 2 if mt[3] else 1) not in done]
    size = max(cfg.batch_size, cfg.concurrency)
    with tqdm(total=len(todo), desc=f"judge {judge.name}", unit="judgment", disable=not todo) as bar:
        for chunk in _chunks(todo, size):
            built = [judge_messages(prompts[role], q, answers[m][q["question_id"]]["choices"][0]["turns"],
                                    reference_for(q, references), multi) for q, m, role, multi in chunk]
            replies = judge.chat([msgs for _, msgs in built], 0.0, cfg.judge_max_tokens)
            rows = []
            for (q, m, role, multi), (user, _), judgment in zip(chunk, built, replies):
                rows.append({"question_id": q["question_id"], "model": m, "judge": [judge.name, prompts[role]["name"]],
                             "user_prompt": user, "judgment": judgment, "score": parse_rating(judgment),
                             "turn": 2 if multi else 1, "tstamp": time.time()})
            append_rows(path, rows)
            bar.update(len(chunk))
    rows = {key(r["question_id"], r["model"], r["judge"][1], r["turn"]): r for r in load_judgments(path)}
    write_rows(path, sorted(rows.values(), key=lambda r: (r["model"], r["turn"], question_order(r["question_id"]))))
    return path

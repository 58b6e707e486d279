"""Where sampled answers and their scores live, and the settings manifests that guard resumes.

    OUT/model_answer/<model>.jsonl             FastChat answer rows, N choices per prompt
    OUT/model_answer/<model>.settings.json     what produced them (model, sampling settings)
    OUT/model_score/<scorer>/<model>.jsonl     one score per choice, keyed by the answer row's id
    OUT/model_score/<scorer>/settings.json     what scored them

Rows are read back through `core.files` with their fields checked (`check_answer_row`,
`check_score_row`: one line naming file, line and field), appended as they complete (a rerun
skips what is on disk; a torn last line from a kill is dropped by `evals.mtbench.load_rows`) and
each file is rewritten sorted, temp file + rename, at
the end of a pass. A rerun whose settings differ from the manifest is refused: mixing answers of
two settings in one file would go unnoticed downstream.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

from core.atomic import write_text
from core.errors import PivotfuseError
from core.files import brief, is_int, is_number, is_str_list, need, read_json
from evals.mtbench import load_rows, write_rows

ANSWER_DIR = "model_answer"
SCORE_DIR = "model_score"
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def check_name(name: str, what: str) -> str:
    """Model and scorer names become file names: letters, digits, '.', '_', '-' only."""
    if not _NAME.match(name or ""):
        raise PivotfuseError(f"{what} name {name!r}: use letters, digits, '.', '_' or '-' (it names a file)")
    return name


def answer_path(out: str | Path, model: str) -> Path:
    return Path(out) / ANSWER_DIR / f"{check_name(model, 'model')}.jsonl"


def score_path(out: str | Path, scorer: str, model: str) -> Path:
    return Path(out) / SCORE_DIR / check_name(scorer, "scorer") / f"{check_name(model, 'model')}.jsonl"


def check_settings(path: Path, settings: dict[str, Any], what: str) -> None:
    """Write `settings` to manifest `path`, or check them against the manifest already there."""
    want = json.loads(json.dumps(settings))  # as it will read back (tuples → lists, ...)
    if path.is_file():
        try:
            have = read_json(path, "a settings manifest (JSON object)")
        except PivotfuseError as e:
            raise PivotfuseError(f"{e}; delete it and its {what} to start over") from None
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        if diff:
            k = diff[0]
            raise PivotfuseError(f"{path}: these {what} were made with {k}={have.get(k)!r}, this run has "
                                 f"{k}={want.get(k)!r}; use another output folder, or delete the {what} to redo them")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(want, indent=1, sort_keys=True) + "\n")


def _qid(value: Any) -> bool:
    return is_int(value) or isinstance(value, str)


def check_answer_row(row: dict, where: str) -> None:
    """A sampled answer row: `question_id`, `answer_id` and N choices, each one reply (`turns`: [text])."""
    need(row, "question_id", _qid, "an integer or a string", where)
    need(row, "answer_id", lambda v: isinstance(v, str), "a string", where)
    choices = need(row, "choices", lambda v: isinstance(v, list) and bool(v), "a non-empty list", where)
    for i, c in enumerate(choices):
        if not isinstance(c, dict):
            raise PivotfuseError(f"{where}: 'choices[{i}]' must be an object, got {brief(c)}")
        need(c, "turns", lambda v: is_str_list(v) and bool(v), "a non-empty list of strings", where, f"choices[{i}].turns")


def check_score_row(row: dict, where: str) -> None:
    """A score row: `question_id`, the `answer_id` it scored, and one score (a number or null) per choice."""
    need(row, "question_id", _qid, "an integer or a string", where)
    need(row, "answer_id", lambda v: isinstance(v, str), "a string", where)
    need(row, "scores", lambda v: isinstance(v, list) and all(s is None or is_number(s) for s in v),
         "a list of numbers (or null)", where)


def answer_rows(path: Path) -> list[dict]:
    """The checked rows of an answer file (none when it does not exist yet)."""
    return load_rows(path, check_answer_row)


def score_rows(path: Path) -> list[dict]:
    """The checked rows of a score file (none when it does not exist yet)."""
    return load_rows(path, check_score_row)


def read_rows(path: Path, what: str, check: Callable[[dict, str], None]) -> list[dict]:
    """Rows of an answer/score file, each checked (a torn last line is dropped); a missing file is an error."""
    if not path.is_file():
        raise PivotfuseError(f"{path}: no {what} (run the step that writes them first)")
    return load_rows(path, check)


def finish(path: Path, order: list[str], key_of: Any, check: Callable[[dict, str], None]) -> None:
    """Rewrite `path` with one row per key (the last written wins), in the order of `order`;
    rows of keys not in `order` go last, in file order."""
    rows: dict[str, dict] = {}
    for r in load_rows(path, check):
        rows[key_of(r)] = r
    rank = {k: i for i, k in enumerate(order)}
    kept = sorted(rows.items(), key=lambda kv: rank.get(kv[0], len(rank)))
    write_rows(path, [r for _, r in kept])

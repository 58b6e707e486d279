"""Where sampled answers and their scores live, and the settings manifests that guard resumes.

    OUT/model_answer/<model>.jsonl             FastChat answer rows, N choices per prompt
    OUT/model_answer/<model>.settings.json     what produced them (model, sampling settings)
    OUT/model_score/<scorer>/<model>.jsonl     one score per choice, keyed by the answer row's id
    OUT/model_score/<scorer>/settings.json     what scored them

Rows are appended as they complete (a rerun skips what is on disk; a torn last line from a kill
is dropped by `evals.mtbench.load_rows`) and each file is rewritten sorted, temp file + rename, at
the end of a pass. A rerun whose settings differ from the manifest is refused: mixing answers of
two settings in one file would go unnoticed downstream.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from core.atomic import write_text
from core.errors import PivotfuseError
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
            have = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise PivotfuseError(f"{path}: unreadable settings manifest; delete it and its {what} to start over") from None
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        if diff:
            k = diff[0]
            raise PivotfuseError(f"{path}: these {what} were made with {k}={have.get(k)!r}, this run has "
                                 f"{k}={want.get(k)!r}; use another output folder, or delete the {what} to redo them")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(want, indent=1, sort_keys=True) + "\n")


def read_rows(path: Path, what: str) -> list[dict]:
    """Rows of an answer/score file (a torn last line is dropped); a missing file is an error."""
    if not path.is_file():
        raise PivotfuseError(f"{path}: no {what} (run the step that writes them first)")
    return load_rows(path)


def finish(path: Path, order: list[str], key_of: Any) -> None:
    """Rewrite `path` with one row per key (the last written wins), in the order of `order`;
    rows of keys not in `order` go last, in file order."""
    rows: dict[str, dict] = {}
    for r in load_rows(path):
        rows[key_of(r)] = r
    rank = {k: i for i, k in enumerate(order)}
    kept = sorted(rows.items(), key=lambda kv: rank.get(kv[0], len(rank)))
    write_rows(path, [r for _, r in kept])

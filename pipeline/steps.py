"""The run's step ledger, `OUT/steps.json`: the fingerprint each finished step was made with, so a
rerun skips a step whose inputs are unchanged and redoes one whose inputs moved."""

from __future__ import annotations

import json
from pathlib import Path

from core.atomic import write_text
from core.errors import PivotfuseError
from core.files import brief, read_json


class Steps:
    """`OUT/steps.json`: the fingerprint each finished step was made with."""

    def __init__(self, out: Path) -> None:
        self.path = out / "steps.json"
        self.done: dict[str, str] = {}
        if self.path.is_file():
            self.done = read_json(self.path, "a mapping of steps to fingerprints")
        for step, fp in self.done.items():
            if not isinstance(fp, str):
                raise PivotfuseError(f"{self.path}: step {step!r} must map to a fingerprint string, got {brief(fp)}; "
                                     "delete the file to redo every step")

    def fresh(self, step: str, fp: str, output: Path) -> bool:
        return self.done.get(step) == fp and output.exists()

    def mark(self, step: str, fp: str) -> None:
        self.done[step] = fp
        write_text(self.path, json.dumps(self.done, indent=1))

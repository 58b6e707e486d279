"""Checks of path arguments shared by the commands, so that each says what is wrong the same way."""

from __future__ import annotations

from pathlib import Path

from core.errors import PivotfuseError


def refuse_file_as_folder(path: str | Path, label: str) -> None:
    """Raise when `path`, given as a model folder, is a file: say so rather than "folder not found"."""
    if Path(path).is_file():
        raise PivotfuseError(f"{label}: {path} is a file, not a model folder")


def refuse_inside(out: str | Path, folder: str | Path, label: str) -> None:
    """Raise when output `out` is `folder` or lies inside it: inputs are never modified."""
    o, f = Path(out).resolve(), Path(folder).resolve()
    if o == f or f in o.parents:
        where = "is" if o == f else "is inside"
        raise PivotfuseError(f"{label}: {out} {where} the input model folder {folder}; inputs are never modified")

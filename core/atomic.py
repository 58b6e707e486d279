"""Atomic outputs: a file or a folder appears whole or not at all.

Every output of pivotfuse is written under a temporary name next to its final path and renamed
into place when complete (`os.replace` is atomic within a file system), so a run killed midway
leaves either the previous file or the new one, never half of one. A rerun finds no torn output
to trip over, only maybe a stale `*.tmp` that the next write replaces.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable


def temp_path(path: str | Path, suffix: str = ".tmp") -> Path:
    """The temporary name `path` is written under: `NAME.tmp` beside it."""
    path = Path(path)
    return path.with_name(path.name + suffix)


def write_with(path: str | Path, write: Callable[[BinaryIO], object], *, fsync: bool = False) -> None:
    """Write `path` through `write(binary file)` into its temporary name, then rename it into place.

    `fsync`: flush the bytes to the disk before the rename, for files that later work trusts
    because they exist (logit-store shards and manifests: a crash must not leave a renamed but
    empty shard behind)."""
    path = Path(path)
    tmp = temp_path(path)
    with open(tmp, "wb") as fh:
        write(fh)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_bytes(path: str | Path, data: bytes, *, fsync: bool = False) -> None:
    """`data` into `path`, atomically."""
    write_with(path, lambda fh: fh.write(data), fsync=fsync)


def write_text(path: str | Path, text: str, *, fsync: bool = False) -> None:
    """`text` into `path` as UTF-8 (newlines as given), atomically."""
    write_bytes(path, text.encode("utf-8"), fsync=fsync)


def publish_folder(tmp: str | Path, out: str | Path) -> None:
    """Put the complete folder `tmp` in place of `out`.

    An existing `out` is first renamed aside (`.NAME.old`) and deleted only once `tmp` is in its
    place, so at every moment `out` is the old folder or the new one."""
    tmp, out = Path(tmp), Path(out)
    if out.exists():
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)

"""Fingerprints: the hashes stored beside finished work to tell it (reuse it) from work whose inputs
changed (redo it). Every hasher of the project lives here, each with the inputs it covers.

Two notions of a model's identity, for two jobs:
- content (`model_fingerprint`, `tensor_hash`): what the weights are. Logit stores are keyed by it,
  so a copied model folder still matches and a retrained one never does.
- stamp (`file_stamp`, `folder_stamp`): which file on disk (name or path, size, modification time).
  The run's later steps (merges, evaluation) and a merge's resume check are keyed by it: cheap,
  and it changes whenever a model is rewritten, which is what those checks ask.

The values are part of every finished run on disk (stores, maps, rows, steps.json): a change to
a hasher makes those rebuild, so each keeps its exact bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def sha256_hex(data: bytes | str) -> str:
    """The full sha256 hex digest of `data` (a string as UTF-8)."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def json_sha(obj: object) -> str:
    """16 hex digits of the sha256 of `obj` as canonical JSON (sorted keys; other types as str)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def digest(*parts: Any) -> str:
    """16 hex digits of the sha256 over `parts` in order: bytes as they are, anything else as
    canonical JSON."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class StreamDigest:
    """`digest(*parts)` built part by part, with a list part fed item by item (`items`): the same
    16 hex digits as `digest` of the whole list, without the list in memory."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def part(self, p: Any) -> None:
        self._h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())

    def items(self, values: Iterable[Any]) -> int:
        """Add `list(values)` as one part (json.dumps writes a list as '[' + ', '.join(items) + ']');
        returns the number of items."""
        n = 0
        self._h.update(b"[")
        for v in values:
            self._h.update((b", " if n else b"") + json.dumps(v, sort_keys=True, default=str).encode())
            n += 1
        self._h.update(b"]")
        return n

    def hexdigest(self) -> str:
        return self._h.hexdigest()[:16]


def model_fingerprint(path: Path) -> str:
    """Content identity of a model folder: config.json plus, per weight file, its name, size and 17
    sampled 64 KiB blocks. Changes when any checkpoint is retrained, survives a copy (no mtimes),
    costs ~1 MB of reads per file."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES or p.name.endswith(".index.json")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            for off in sorted({min(max(size - 65536, 0), i * size // 16) for i in range(17)}):
                fh.seek(off)
                h.update(fh.read(65536))
    return h.hexdigest()


def tensor_hash(folder: Path) -> str:
    """16 hex digits of the sha256 of a folder's safetensors files, all bytes (the demo world's
    table and its determinism test compare models by it)."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def tokenizer_files(folder: str | Path) -> bytes:
    """The identity of a folder's tokenizer: each tokenizer file's name and sha256 ('-' if absent)."""
    out = b""
    for name in _TOKENIZER_FILES:
        f = Path(folder) / name
        out += name.encode() + (hashlib.sha256(f.read_bytes()).digest() if f.is_file() else b"-")
    return out


def conversations_sha(convs: Iterable[Any]) -> str:
    """sha256 hex of a corpus: each conversation's id, domain and messages, in order."""
    h = hashlib.sha256()
    for c in convs:
        h.update(json.dumps([c.id, c.domain, c.messages], ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def source_bytes(folder: Path, names: Iterable[str]) -> bytes:
    """The source files `names` of `folder`, concatenated: code whose change must redo the work
    it produced (the demo world, vocabulary maps)."""
    return b"".join((folder / name).read_bytes() for name in names)


def file_stamp(file: Path, name: str) -> list:
    """[name, size, mtime in ns] of one file: which file on disk, as of now."""
    st = file.stat()
    return [name, st.st_size, st.st_mtime_ns]


def folder_stamp(folder: Path) -> list:
    """The stamps of a model folder's weights files (by file name)."""
    return [file_stamp(f, f.name) for f in sorted(folder.glob("*.safetensors"))]

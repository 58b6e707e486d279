"""Fingerprints of settings: the short hash that `run` and `fuse` store beside each finished step
to tell a finished step (skip it) from one whose inputs changed (redo it)."""

from __future__ import annotations

import hashlib
import json


def json_sha(obj: object) -> str:
    """16 hex digits of the sha256 of `obj` as canonical JSON (sorted keys; other types as str)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

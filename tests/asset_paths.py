"""The real tokenizer and MT-Bench files of the tests (`core.assets`, fetched by `make install`).

A test that needs one calls `need_asset(name)`. It skips when the files are absent, except under
`PIVOTFUSE_REQUIRE_ASSETS=1` (set by `make test`, hence CI), where a missing asset is a failure:
the whole suite must run on a fresh clone after the README's set-up.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.assets import asset_dir
from core.errors import PivotfuseError


def need_asset(name: str) -> Path:
    """The folder of asset `name` ("llama2", "llama3", "qwen3", "gemma3", "mt_bench")."""
    try:
        return asset_dir(name)
    except PivotfuseError as e:
        if os.environ.get("PIVOTFUSE_REQUIRE_ASSETS") == "1":
            pytest.fail(f"asset test cannot run: {e}")
        pytest.skip(str(e))

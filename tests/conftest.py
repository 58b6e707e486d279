"""Shared fixtures: the demo world (built once per session, cached across runs) and asset paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.offline import force_offline

force_offline()  # tests never reach for the Hub, whatever the environment says
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (a clone outside the pivotfuse workspace): test needs shared assets")
    return path


@pytest.fixture(scope="session")
def assets() -> Path:
    """`../shared/assets` (real tokenizer files, MT-Bench files); skips when absent."""
    return _need(ASSETS)


@pytest.fixture(scope="session")
def tokenizer_dirs(assets: Path) -> dict[str, Path]:
    """The four real tokenizer folders: llama2, llama3, qwen3, gemma3."""
    return {n: _need(assets / "tokenizers" / n) for n in ("llama2", "llama3", "qwen3", "gemma3")}


@pytest.fixture(scope="session")
def world(assets: Path) -> Path:
    """The demo world of recipes/demo.yaml, built once (reused while its fingerprint matches).

    Layout: data/{source_train,general,fusion,heldout}.jsonl, models/{pivot,arith,facts,strings}.
    """
    from core.config import from_dict, load_yaml
    from world.build import build_world
    from world.config import WorldConfig

    data = load_yaml(REPO / "recipes" / "demo.yaml")["world"]
    data["out"] = str(REPO / data["out"])
    cfg = from_dict(WorldConfig, data, src="recipes/demo.yaml")
    build_world(cfg, assets=assets, progress=False)
    return Path(cfg.out)

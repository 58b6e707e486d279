"""Shared fixtures: the demo world (built once per session, cached across runs) and asset paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.offline import force_offline

force_offline()  # tests never reach for the Hub, whatever the environment says
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def assets() -> Path:
    """The asset root (`core.assets`: real tokenizer files, MT-Bench files), checked."""
    from asset_paths import need_asset

    for name in ("llama2", "llama3", "qwen3", "gemma3", "mt_bench"):
        need_asset(name)
    from core.assets import asset_root

    return asset_root()


@pytest.fixture(scope="session")
def tokenizer_dirs(assets: Path) -> dict[str, Path]:
    """The four real tokenizer folders: llama2, llama3, qwen3, gemma3."""
    return {n: assets / "tokenizers" / n for n in ("llama2", "llama3", "qwen3", "gemma3")}


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

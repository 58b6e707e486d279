"""recipes/fusechat-3.0-llama.yaml validates (schema only) and holds the published settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import PivotfuseError
from implicit.recipe import load_implicit_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "fusechat-3.0-llama.yaml"


def test_fusechat3_recipe_has_the_published_settings():
    r = load_implicit_recipe(RECIPE, check_paths=False)
    assert r.target.path == "models/Llama-3.1-8B-Instruct"
    assert [s.path.split("/")[-1] for s in r.sources] == ["gemma-2-27b-it", "Mistral-Large-Instruct-2407",
                                                          "Qwen2.5-72B-Instruct", "Llama-3.1-70B-Instruct"]
    assert [(s.temperature, s.top_p) for s in r.sources] == [(0.8, 0.95), (0.8, 0.95), (0.7, 0.8), (0.8, 0.95)]
    assert (r.sample.n, r.sample.n_by_category) == (5, {"code": 8})
    assert (r.score.scorer, r.score.reward_model) == ("reward_model", "armorm=models/ArmoRM-Llama3-8B-v0.1")
    assert (r.pairs.min_gap, r.pairs.max_gap, r.pairs.sft_fraction) == (0.01, 0.1, 0.4)
    gpus = 8  # recipes/accelerate/fsdp-8gpu.yaml
    for phase in (r.sft, r.dpo, r.wrpo):
        assert phase.batch_size * phase.grad_accum * gpus == 128
        assert (phase.lr_scheduler, phase.warmup, phase.max_length, phase.bf16) == ("cosine", 0.1, 2048, True)
    assert (r.sft.epochs, r.sft.lr) == (3.0, 5e-6)
    assert (r.dpo.epochs, r.dpo.lr, r.dpo.beta, r.dpo.length_normalize) == (1.0, 8e-7, 10.0, True)
    assert (r.wrpo.beta, r.wrpo.alpha_max, r.wrpo.lr) == (0.01, 0.1, 3e-7)


def test_recipe_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(PivotfuseError, match=r"fusechat-3.0-llama.yaml: 'dpo.beta': must be > 0"):
        load_implicit_recipe(RECIPE, ["dpo.beta=0"], check_paths=False)
    with pytest.raises(PivotfuseError, match=r"'sources': qwen-2.5-72b-instruct: top_p: must be in \(0, 1\]"):
        load_implicit_recipe(RECIPE, ["sources.2.top_p=1.5"], check_paths=False)
    with pytest.raises(PivotfuseError, match=r"unknown key 'wrpo.alpha'"):
        load_implicit_recipe(RECIPE, ["wrpo.alpha=0.2"], check_paths=False)
    with pytest.raises(PivotfuseError, match=r"model llama-3.1-8b-instruct: path 'models/Llama-3.1-8B-Instruct' "
                                             r"is not a folder"):
        load_implicit_recipe(RECIPE)

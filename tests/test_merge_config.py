"""Merge settings: validation, sizes, and the recipe's `merge:` list."""

from __future__ import annotations

import pytest

from core.config import from_dict
from core.errors import PivotfuseError
from pipeline.recipe import Recipe
from merge.config import MergeConfig, MergeJob, MergeSpec, parse_size


def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000 and parse_size("500MB") == 500_000_000
    assert parse_size("2GiB") == 2 * 1024 ** 3 and parse_size("1.5kb") == 1500 and parse_size("123") == 123
    with pytest.raises(ValueError):
        parse_size("lots")


@pytest.mark.parametrize("data, message", [
    ({"method": "slerp"}, "'method' must be one of"),
    ({"select_topk": 0}, r"'select_topk': must be in \(0, 1\]"),
    ({"density": 1.5}, r"'density': must be in \(0, 1\]"),
    ({"method": "varm", "weights": [1, 2]}, "varm computes its own"),
    ({"sce_mask": "upstream"}, "'sce_mask' must be one of"),
    ({"shard_size": "big"}, "'shard_size': not a size"),
    ({"dtype": "int8"}, "'dtype' must be one of"),
    ({"method": "linear", "weights": [1, -1]}, "sum to 0"),
    ({"scale": float("nan")}, "^m.yaml: 'scale' expects a finite number, got nan$"),
    ({"method": "ties", "weights": [float("inf"), 1]}, r"^m.yaml: 'weights\[0\]' expects a finite number, got inf$"),
])
def test_bad_options_are_refused(data, message):
    with pytest.raises(PivotfuseError, match=message):
        from_dict(MergeConfig, data, src="m.yaml")


def test_normalize_defaults_follow_mergekit():
    assert [MergeConfig(method=m).resolved_normalize() for m in ("linear", "ties", "task_arithmetic", "dare_ties")] \
        == [True, True, False, False]
    assert MergeConfig(method="ties", normalize=False).resolved_normalize() is False


def test_job_needs_inputs_and_matching_weights():
    with pytest.raises(PivotfuseError, match="'base': required"):
        from_dict(MergeJob, {"models": ["a"], "out": "o"})
    with pytest.raises(PivotfuseError, match="'weights': 1 given for 2 models"):
        from_dict(MergeJob, {"base": "b", "models": ["a", "c"], "out": "o", "method": "ties", "weights": [1]})
    job = from_dict(MergeJob, {"base": "b", "models": ["a"], "out": "o", "method": "ties", "density": 0.3})
    assert job.method_config() == MergeConfig(method="ties", density=0.3)


def test_recipe_lists_named_merges():
    data = {"out": "run", "models": {"pivot": {"name": "p", "path": "p"}}, "data": {"fusion": "f.jsonl"},
            "merge": [{"name": "sce-fusechat", "method": "sce", "sce_mask": "fusechat"},
                      {"name": "ties", "method": "ties", "density": 0.5}]}
    recipe = from_dict(Recipe, data, src="r.yaml")
    assert [m.name for m in recipe.merge] == ["sce-fusechat", "ties"]
    assert isinstance(recipe.merge[0], MergeConfig) and recipe.merge[0].sce_mask == "fusechat"
    assert from_dict(Recipe, {k: v for k, v in data.items() if k != "merge"}).merge == []
    with pytest.raises(PivotfuseError, match="missing required key 'merge\\[0\\].name'"):
        from_dict(Recipe, {**data, "merge": [{"method": "sce"}]}, src="r.yaml")
    with pytest.raises(PivotfuseError, match="'name': use letters"):
        from_dict(MergeSpec, {"name": "a/b"})

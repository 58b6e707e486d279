"""mergekit 0.1.5 as an oracle: on the same fine-tune-like float32 models, pivotfuse's sce
(mergekit mask semantics), ties, task_arithmetic and linear equal mergekit's output to 1e-6."""

from __future__ import annotations

import pytest
import torch

from merge.config import MergeConfig
from merge.merger import merge_models
from test_merge_fixtures import build_family, load_sd

mergekit = pytest.importorskip("mergekit", reason="mergekit (the test-only oracle) is not installed")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    # absolute paths: mergekit takes a path with exactly one '/' for a Hub repo id
    return build_family(tmp_path_factory.mktemp("mk").resolve(), k=3, seed=4)


def _mergekit(cfg: dict, out) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(cfg), str(out),
              MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    return load_sd(out)


W = [1.0, 0.6, 0.3]
CASES = {
    "sce-0.1": ({"merge_method": "sce", "parameters": {"select_topk": 0.1}},
                MergeConfig(method="sce", select_topk=0.1, sce_mask="mergekit")),
    "sce-1.0": ({"merge_method": "sce", "parameters": {"select_topk": 1.0}},
                MergeConfig(method="sce", select_topk=1.0, sce_mask="mergekit")),
    "ties": ({"merge_method": "ties", "weights": W, "parameters": {"density": 0.5}},
             MergeConfig(method="ties", weights=W, density=0.5)),
    "task_arithmetic": ({"merge_method": "task_arithmetic", "weights": W},
                        MergeConfig(method="task_arithmetic", weights=W)),
    "linear": ({"merge_method": "linear", "weights": W, "no_base": True},
               MergeConfig(method="linear", weights=W)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_equals_mergekit(family, tmp_path, case):
    base, targets = family
    spec, cfg = CASES[case]
    weights = spec.get("weights")
    models = [{"model": str(t), **({"parameters": {"weight": w}} if weights else {})}
              for t, w in zip(targets, weights or [None] * len(targets))]
    mk_cfg = {"merge_method": spec["merge_method"], "dtype": "float32", "out_dtype": "float32",
              "parameters": spec.get("parameters", {})}
    if spec.get("no_base"):
        mk_cfg["models"] = models
    else:
        mk_cfg["models"] = [{"model": str(base)}, *models]
        mk_cfg["base_model"] = str(base)
    expected = _mergekit(mk_cfg, tmp_path / "mergekit")
    merge_models(str(base), [str(t) for t in targets], cfg, str(tmp_path / "ours"), progress=False)
    got = load_sd(tmp_path / "ours")
    assert set(got) == set(expected)
    moved = 0
    for name, t in expected.items():
        assert got[name].dtype == t.dtype == torch.float32
        torch.testing.assert_close(got[name], t, rtol=0, atol=1e-6, msg=lambda m: f"{case} {name}: {m}")
        moved += int((t != load_sd(base)[name]).sum())
    assert moved > 0  # the oracle did merge something

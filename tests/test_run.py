"""`cli.py run`: recipes validate, and a whole (shortened) fusion runs, reports and resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.recipe import load_recipe
from pipeline.claims import claims

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["fusechat-7b-v1.yaml", "fusechat-7b-v2.yaml", "demo.yaml"])
def test_recipes_validate_without_downloading(name):
    r = load_recipe(REPO / "recipes" / name, check_paths=False)
    assert r.fuse.lam == 0.9 and r.fuse.top_k == 10 and r.fuse.temperature == 1.0 and r.fuse.method == "mince"
    assert r.merge, "every recipe merges its targets"
    if name.startswith("fusechat"):
        # FuseChat's 7B settings
        assert (r.fuse.lr, r.fuse.warmup, r.fuse.epochs, r.fuse.lr_scheduler) == (5e-6, 0.03, 3.0, "cosine")
        assert r.fuse.bf16 and r.fuse.gradient_checkpointing and r.extract.max_length == 2048
        assert r.fuse.batch_size * r.fuse.grad_accum * 8 == 128  # global batch on the 8-GPU accelerate config
        assert r.models.pivot.path.endswith("openchat_3.5")
    if name == "demo.yaml":  # FuseLLM mode beside the pairwise targets, over every source
        assert r.fusellm.name == "fusellm" and [s.name for s in r.fusellm_sources()] == ["arith", "facts", "strings"]
    if name == "fusechat-7b-v2.yaml":
        assert len(r.models.sources) == 5
        assert (r.merge[0].method, r.merge[0].select_topk, r.merge[0].sce_mask) == ("sce", 0.1, "fusechat")


def test_claims_logic():
    from pipeline.recipe import load_recipe as lr

    r = lr(REPO / "recipes" / "demo.yaml", check_paths=False)
    doms = ["arith", "facts", "strings", "chat"]

    def row(vals):
        return {d: {"bits_per_byte": v} for d, v in zip(doms, vals)} | {"all": {"bits_per_byte": 0.0}}

    loss = {"pivot": row([4, 4, 4, 1]), "pivot-clm": row([2, 2, 2, 1]), "sce": row([1.5, 1.5, 1.5, 1]),
            "arith": row([1, 5, 5, 2]), "facts": row([5, 1, 5, 2]), "strings": row([5, 5, 1, 2]),
            "T_arith": row([1.9, 2.1, 2.1, 1]), "T_facts": row([2.1, 2.5, 2.1, 1]), "T_strings": row([2, 2, 1.9, 1])}
    got = {c: ok for c, ok, _ in claims(r, loss, ["sce"])}
    assert got["sce < pivot-clm < pivot (mean over domains)"]
    assert all(got[f"sce < source {s} (mean)"] for s in ("arith", "facts", "strings"))
    assert got["T_arith < pivot-clm on arith"] and got["T_strings < pivot-clm on strings"]
    assert not got["T_facts < pivot-clm on facts"]


@pytest.mark.slow
def test_run_end_to_end_and_resume(world, tmp_path):
    out = tmp_path / "run"
    sets = [f"out={out}", "fuse.max_steps=3", "fuse.save_steps=2", "eval.judge=null",
            "merge=[{name: sce, method: sce, select_topk: 0.1, sce_mask: fusechat}, {name: linear, method: linear}]"]
    cmd = [sys.executable, str(REPO / "cli.py"), "run", str(REPO / "recipes" / "demo.yaml"), "--set", *sets]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    report = (out / "report.md").read_text()
    for name in ("pivot", "arith", "pivot-clm", "T_arith", "T_facts", "T_strings", "fusellm", "sce", "linear"):
        assert f"| {name} |" in report
    assert "| fusellm < pivot-clm < pivot (mean over domains) |" in report
    assert "| **fusellm** (FuseLLM mode) |" in report and "| sce (pairwise, then merged) |" in report
    assert "## How much each source contributed to the FuseLLM-mode target" in report
    assert (out / "report.png").stat().st_size > 1000
    for t in ("arith", "facts", "strings", "pivot-clm", "fusellm"):
        assert (out / "targets" / t / "fusion_report.json").is_file()
    fusellm = json.loads((out / "targets" / "fusellm" / "fusion_report.json").read_text())
    assert fusellm["steps"] == 3 and fusellm["sources"] == ["arith", "facts", "strings"]
    steps = json.loads((out / "steps.json").read_text())
    assert {"merge:sce", "merge:linear", "eval"} <= set(steps)
    stamp = (out / "targets" / "arith" / "model.safetensors").stat().st_mtime_ns
    fusellm_stamp = (out / "targets" / "fusellm" / "model.safetensors").stat().st_mtime_ns
    merged_stamp = (out / "merged" / "sce" / "model.safetensors").stat().st_mtime_ns
    # a rerun finds every step done and rewrites nothing
    r2 = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "merge sce is up to date" in r2.stdout
    assert (out / "targets" / "arith" / "model.safetensors").stat().st_mtime_ns == stamp
    assert (out / "targets" / "fusellm" / "model.safetensors").stat().st_mtime_ns == fusellm_stamp
    assert (out / "merged" / "sce" / "model.safetensors").stat().st_mtime_ns == merged_stamp


def test_run_bad_recipe_one_line(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text((REPO / "recipes" / "demo.yaml").read_text().replace("lam: 0.9", "lam: 1.5"))
    r = subprocess.run([sys.executable, str(REPO / "cli.py"), "run", str(bad)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "'fuse.lam': must be in [0, 1]" in r.stderr and r.stderr.strip().count("\n") == 0

"""`cli.py run`: recipes validate, and a whole (shortened) fusion runs, reports and resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.recipe import load_recipe
from pipeline.claims import accuracy_claims, claims, transfer_ratio, transfers

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


def test_transfer_ratio_arithmetic():
    # accuracy: the target took 30 of the source's 60-point lead over pivot-CLM
    assert transfer_ratio(0.5, 0.2, 0.8) == pytest.approx(0.5)
    assert transfer_ratio(0.8, 0.2, 0.8) == pytest.approx(1.0) and transfer_ratio(0.2, 0.2, 0.8) == 0.0
    assert transfer_ratio(0.1, 0.2, 0.8) == pytest.approx(-1 / 6)  # behind pivot-CLM: negative
    # bits per byte (lower is better): the same reading, both differences change sign together
    assert transfer_ratio(1.0, 1.2, 0.2) == pytest.approx(0.2)
    assert transfer_ratio(1.3, 1.2, 0.2) == pytest.approx(-0.1)
    # no lead to take over (source == pivot-CLM), or a missing figure: no ratio
    assert transfer_ratio(0.5, 0.4, 0.4) is None and transfer_ratio(0.4, 0.4, 0.4) is None
    assert transfer_ratio(float("nan"), 0.2, 0.8) is None


def test_accuracy_claims_and_transfers():
    r = load_recipe(REPO / "recipes" / "demo.yaml", check_paths=False)

    def row(arith, facts, strings, chat=1.0):
        return {"arith": arith, "facts": facts, "strings": strings, "chat": chat}

    acc = {"pivot": row(0.0, 0.2, 0.2), "pivot-clm": row(0.1, 0.3, 0.2),
           "arith": row(0.9, 0.0, 0.0), "facts": row(0.0, 1.0, 0.0), "strings": row(0.0, 0.0, 0.8),
           "T_arith": row(0.5, 0.3, 0.2), "T_facts": row(0.1, 0.3, 0.2), "T_strings": row(0.1, 0.3, 0.1),
           "sce": row(0.3, 0.4, 0.2, 0.0), "ties": row(0.1, 0.3, 0.2)}
    got = {c: (ok, n) for c, ok, n in accuracy_claims(r, acc, ["sce", "ties"])}
    # chat is not an expert domain: sce's 0% there does not count; means 30% > 20% > 13.3%
    assert got["sce > pivot-clm > pivot (accuracy, mean over expert domains)"] == (True, "30.0% > 20.0% > 13.3%")
    assert not got["ties > pivot-clm > pivot (accuracy, mean over expert domains)"][0]  # a tie fails
    assert got["T_arith > pivot-clm on arith (accuracy)"] == (True, "50.0% > 10.0%")
    assert not got["T_facts > pivot-clm on facts (accuracy)"][0] and not got["T_strings > pivot-clm on strings (accuracy)"][0]
    bpb = {n: {"arith": 1.0, "facts": 1.0, "strings": 1.0} for n in acc} | {"arith": {"arith": 0.2},
                                                                          "strings": {"arith": 5.0}}
    t = transfers(r, acc, bpb)
    assert t["T_arith"]["accuracy"] == {"target": 0.5, "pivot_clm": 0.1, "source": 0.9, "ratio": pytest.approx(0.5)}
    assert t["T_arith"]["bits_per_byte"]["ratio"] == 0.0  # T_arith's bpb equals pivot-CLM's
    assert t["T_facts"]["domain"] == "facts" and t["T_facts"]["accuracy"]["ratio"] == 0.0
    assert t["T_facts"]["bits_per_byte"]["ratio"] is None  # source facts has no lead over pivot-CLM there
    assert "bits_per_byte" not in t["T_strings"] and t["T_strings"]["accuracy"]["ratio"] == pytest.approx(-1 / 6)


def test_fusellm_accuracy_claims_and_column():
    from pipeline.fusellm_report import comparison_table, fusellm_accuracy_claims

    r = load_recipe(REPO / "recipes" / "demo.yaml", check_paths=False)
    doms = ["arith", "facts", "strings"]

    def row(*vals):
        return dict(zip(doms, vals))

    acc = {"pivot": row(0.0, 0.2, 0.2), "pivot-clm": row(0.1, 0.3, 0.2), "fusellm": row(0.5, 0.3, 0.9),
           "arith": row(0.9, 0.0, 0.0), "facts": row(0.0, 1.0, 0.0), "strings": row(0.0, 0.0, 0.9)}
    got = {c: (ok, n) for c, ok, n in fusellm_accuracy_claims(r, acc)}
    assert got["fusellm > pivot-clm > pivot (accuracy, mean over expert domains)"] == (True, "56.7% > 20.0% > 13.3%")
    assert got["fusellm > pivot-clm on arith (accuracy)"][0] and not got["fusellm > pivot-clm on facts (accuracy)"][0]
    assert got["fusellm ≥ best single source on strings (strings) (accuracy)"] == (True, "90.0% ≥ 90.0%")
    assert not got["fusellm ≥ best single source on arith (arith) (accuracy)"][0]
    assert len(got) == 7
    # pivot-CLM without a figure on strings: its mean is NaN and the mean claim fails
    short = acc | {"pivot-clm": row(0.1, 0.3)}
    assert not dict((c, ok) for c, ok, _ in fusellm_accuracy_claims(r, short))[
        "fusellm > pivot-clm > pivot (accuracy, mean over expert domains)"]
    assert fusellm_accuracy_claims(r, {k: v for k, v in acc.items() if k != "fusellm"}) == []
    loss = {n: {d: {"bits_per_byte": 1.0} for d in doms} for n in acc}
    means = {n: 1.0 for n in acc}
    table = comparison_table(r, loss, means, [], {n: sum(v.values()) / 3 for n, v in acc.items()})
    assert table[4].endswith("| mean over domains | accuracy, mean over expert domains |")
    assert "| **fusellm** (FuseLLM mode) | 1.000 | 1.000 | 1.000 | 1.0000 | 56.7% |" in table
    assert any(line.startswith("| best single source per domain |") and line.endswith("| 1.0000 | – |")
               for line in table)
    assert not comparison_table(r, loss, means, [])[4].endswith("expert domains |")  # no accuracy: no column


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
    assert report.index("## Exact-answer accuracy per domain") < report.index("## Transfer ratio") \
        < report.index("## Held-out bits per byte") < report.index("## Claims")
    assert "## Scores of the" not in report and "## Judge scores" not in report  # eval.judge=null: no section
    assert "| T_arith > pivot-clm on arith (accuracy) |" in report
    data = json.loads((out / "report.json").read_text())
    models = ["pivot", "arith", "facts", "strings", "pivot-clm", "T_arith", "T_facts", "T_strings", "fusellm",
              "sce", "linear"]
    assert set(data) == {"run", "models", "roles", "pivot", "pivot_clm", "accuracy", "bits_per_byte", "judge",
                         "transfer", "claims"} and data["models"] == models
    assert data["roles"] == {"pivot": "pivot", "arith": "source", "facts": "source", "strings": "source",
                             "pivot-clm": "pivot-clm", "T_arith": "target", "T_facts": "target",
                             "T_strings": "target", "fusellm": "fusellm", "sce": "merge", "linear": "merge"}
    acc = data["accuracy"]
    assert acc["expert_domains"] == ["arith", "facts", "strings"] and acc["domains"] == ["arith", "facts", "strings", "chat"]
    assert set(acc["models"]) == set(models)
    world = json.loads((REPO / ".cache" / "world" / "world.json").read_text())
    for m in world["models"]:  # the world's own answers were reused: the same accuracy as world.json
        assert {d: round(v["accuracy"], 4) for d, v in acc["models"][m["name"]]["domains"].items()
                if d != "all"} == m["heldout_accuracy"]
    for name, row in acc["models"].items():
        doms = row["domains"]
        assert set(doms) == {"arith", "facts", "strings", "chat", "all"}
        assert all(v["accuracy"] == v["correct"] / v["total"] for v in doms.values())
        assert row["mean_expert"] == pytest.approx(sum(doms[d]["accuracy"] for d in acc["expert_domains"]) / 3)
    bpb = data["bits_per_byte"]
    assert bpb["domains"] == ["arith", "facts", "strings", "chat"] and set(bpb["models"]) == set(models)
    assert all(set(r["domains"]) == set(bpb["domains"]) and r["mean"] > 0 for r in bpb["models"].values())
    assert data["judge"] is None  # eval.judge=null
    assert set(data["transfer"]) == {"T_arith", "T_facts", "T_strings"}
    for t, e in data["transfer"].items():
        d, a = e["domain"], e["accuracy"]
        assert a["target"] == acc["models"][t]["domains"][d]["accuracy"]
        assert a["source"] == acc["models"][e["source"]]["domains"][d]["accuracy"]
        assert a["ratio"] == pytest.approx((a["target"] - a["pivot_clm"]) / (a["source"] - a["pivot_clm"]))
        assert set(e["bits_per_byte"]) == {"target", "pivot_clm", "source", "ratio"}
    kinds = {c["metric"] for c in data["claims"]}
    assert kinds == {"accuracy", "bits_per_byte"} and all(isinstance(c["holds"], bool) for c in data["claims"])
    assert sum(f"| {c['claim']} |" in report for c in data["claims"]) == len(data["claims"])
    for t in ("arith", "facts", "strings", "pivot-clm", "fusellm"):
        assert (out / "targets" / t / "fusion_report.json").is_file()
    fusellm = json.loads((out / "targets" / "fusellm" / "fusion_report.json").read_text())
    assert fusellm["steps"] == 3 and fusellm["sources"] == ["arith", "facts", "strings"]
    steps = json.loads((out / "steps.json").read_text())
    assert {"merge:sce", "merge:linear", "eval"} | {f"accuracy:{m}" for m in models} <= set(steps)
    answers = (out / "eval" / "accuracy" / "model_answer" / "T_arith.jsonl").stat().st_mtime_ns
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
    assert (out / "eval" / "accuracy" / "model_answer" / "T_arith.jsonl").stat().st_mtime_ns == answers


def test_run_bad_recipe_one_line(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text((REPO / "recipes" / "demo.yaml").read_text().replace("lam: 0.9", "lam: 1.5"))
    r = subprocess.run([sys.executable, str(REPO / "cli.py"), "run", str(bad)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "'fuse.lam': must be in [0, 1]" in r.stderr and r.stderr.strip().count("\n") == 0

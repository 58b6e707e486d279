"""`cli.py run recipes/demo-implicit.yaml`: the recipe validates, the run refuses to sample the data
it is measured on, and a shrunk run goes end to end on the demo world, reports and resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.implicit_recipe import GOLD_NAME, SFT_NAME, is_implicit_recipe, load_run_recipe
from pipeline.implicit_report import claims, skill_mean
from pipeline.implicit_run import select_prompts
from implicit.prompts import Prompt

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "demo-implicit.yaml"


def test_demo_implicit_recipe_is_told_apart_and_validates():
    assert is_implicit_recipe(RECIPE) and not is_implicit_recipe(REPO / "recipes" / "demo.yaml")
    r = load_run_recipe(RECIPE)
    assert [s.name for s in r.sources] == ["arith", "facts", "strings"] and r.target.path == "world:pivot"
    assert r.data.prompts == "world:fusion" and r.score.scorer == "verifier" and r.gold_baseline
    assert r.path("world:heldout_questions") == ".cache/world/data/heldout_questions.jsonl"
    assert r.path("world:pivot") == ".cache/world/models/pivot"


def test_sampling_the_heldout_data_is_refused_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "cli.py"), "run", str(RECIPE), "--set",
                        "data.prompts=world:heldout", f"out={tmp_path / 'x'}"], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "'data.prompts': 'world:heldout' is the data the table is measured on" in r.stderr


def test_select_prompts_takes_the_first_per_domain_in_file_order():
    ps = [Prompt(i, [{"role": "user", "content": "q"}], "ab"[i % 2]) for i in range(7)]
    assert [p.id for p in select_prompts(ps, 2)] == [0, 1, 2, 3]
    assert select_prompts(ps, None) == ps


def test_claims_compare_skill_means_and_bits_per_byte():
    def acc(a, f, s, c=1.0):
        return {d: {"accuracy": v} for d, v in zip(("arith", "facts", "strings", "chat"), (a, f, s, c))} | {
            "all": {"accuracy": 0.0}}

    table = {"pivot": acc(0.1, 0.1, 0.1), SFT_NAME: acc(0.5, 0.8, 0.2, 0.0), GOLD_NAME: acc(0.6, 0.6, 0.6)}
    assert skill_mean(table[SFT_NAME]) == pytest.approx(0.5)  # chat (always passed) left out
    loss = {"pivot": {"arith": {"bits_per_byte": 1.0}}, SFT_NAME: {"arith": {"bits_per_byte": 0.5}},
            GOLD_NAME: {"arith": {"bits_per_byte": 0.4}}}
    got = {c["claim"]: c["holds"] for c in claims("pivot", table, loss)}
    assert got[f"{SFT_NAME} > pivot on exact accuracy (mean of the skill domains)"]
    assert not got[f"{SFT_NAME} > {GOLD_NAME} on exact accuracy (mean of the skill domains)"]  # 0.5 vs 0.6
    assert not got[f"{SFT_NAME} < {GOLD_NAME} on bits per byte (mean over domains)"]
    assert got[f"{GOLD_NAME} < pivot on bits per byte (mean over domains)"]
    assert not any("dpo" in c for c in got)  # no DPO model: no DPO claim


def _first_per_domain(src: Path, dst: Path, n: int) -> Path:
    seen: dict[str, int] = {}
    rows = []
    for line in src.read_text().splitlines():
        row = json.loads(line)
        d = row.get("category") or row.get("domain")
        seen[d] = seen.get(d, 0) + 1
        if seen[d] <= n:
            rows.append(line)
    dst.write_text("\n".join(rows) + "\n")
    return dst


@pytest.mark.slow
def test_demo_implicit_run_end_to_end_and_resume(world, tmp_path):
    out = tmp_path / "run"
    questions = _first_per_domain(world / "data" / "valid_questions.jsonl", tmp_path / "q.jsonl", 3)
    heldout = _first_per_domain(world / "data" / "valid.jsonl", tmp_path / "h.jsonl", 3)
    sets = [f"out={out}", f"world.out={world}", "data.per_domain=4", "sample.n=3", "sft.max_steps=3",
            "dpo.max_steps=2", "wrpo.max_steps=2", f"data.questions={questions}", f"data.heldout={heldout}",
            f"explicit={tmp_path / 'no-such-merge'}"]
    cmd = [sys.executable, str(REPO / "cli.py"), "run", str(RECIPE), "--set", *sets]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (out / "report.md").read_text()
    for name in ("pivot", GOLD_NAME, SFT_NAME):
        assert f"| {name} | " in md
    assert f"sce-fusechat: not in the table, {tmp_path / 'no-such-merge'} is absent" in md
    rep = json.loads((out / "report.json").read_text())
    assert rep["prompts"] == 16 and not rep["explicit"]["present"]
    assert rep["accuracy"]["pivot"]["all"]["total"] == sum(
        len([k for k in json.loads(x)["answers"] if k is not None]) for x in questions.read_text().splitlines())
    build = rep["data"]
    # every prompt either gave an SFT row or is counted as dropped, with its reason
    assert build["sft"]["rows"] + sum(build["sft"]["dropped"].values()) == 16
    # the baseline: the same prompts with their gold answers, trained for the same steps
    sft_rows = [json.loads(x) for x in (out / "data" / "sft.jsonl").read_text().splitlines()]
    gold = [json.loads(x) for x in (out / "data" / "sft_gold.jsonl").read_text().splitlines()]
    assert [g["id"] for g in gold] == [s["id"] for s in sft_rows] and len(gold) == build["sft"]["rows"]
    fusion = {json.loads(x)["id"]: json.loads(x) for x in (world / "data" / "fusion.jsonl").read_text().splitlines()}
    assert all(g["completion"][0]["content"] == fusion[g["id"]]["messages"][-1]["content"] for g in gold)
    trained = {n: json.loads((out / "models" / n / "implicit_train.json").read_text())
               for n in (SFT_NAME, GOLD_NAME)}
    assert trained[SFT_NAME]["steps"] == trained[GOLD_NAME]["steps"] == 3
    assert trained[SFT_NAME]["config"] == trained[GOLD_NAME]["config"]
    assert {"sample sources", "score sources", "train SFT-best", "train SFT-gold", "eval: accuracy",
            "total"} <= set(rep["seconds"])
    assert (out / "report.png").stat().st_size > 1000
    stamp = (out / "models" / SFT_NAME / "model.safetensors").stat().st_mtime_ns
    # a rerun finds every phase done: nothing is trained again, the table is the same
    r2 = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert f"train {SFT_NAME}: up to date" in r2.stdout and f"train {GOLD_NAME}: up to date" in r2.stdout
    assert (out / "models" / SFT_NAME / "model.safetensors").stat().st_mtime_ns == stamp
    rep2 = json.loads((out / "report.json").read_text())
    assert rep2["accuracy"] == rep["accuracy"] and rep2["bits_per_byte"] == rep["bits_per_byte"]

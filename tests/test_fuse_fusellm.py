"""`pivotfuse fuse --sources` (FuseLLM mode) on the demo world: one target from the pivot and two
sources, on the pairwise stores and maps (nothing extracted or aligned again), with each source's
contribution per domain; its one-line errors; and the run report's FuseLLM parts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli import main
from test_fuse_pipeline import params

REPO = Path(__file__).resolve().parents[1]
FUSE = "fuse: {lr: 0.003, batch_size: 8, max_steps: 6, save_steps: 3, logging_steps: 3, warmup: 0}"


def recipe(world: Path, out: Path, data: Path, extra: str = "") -> Path:
    path = out.with_suffix(".yaml")
    path.write_text(f"out: {out}\nworld: {{out: {world}}}\nmodels:\n  pivot: {{name: pivot, path: 'world:pivot'}}\n"
                    "  sources:\n    - {name: arith, path: 'world:arith', domain: arith}\n"
                    "    - {name: facts, path: 'world:facts', domain: facts}\n"
                    f"data: {{fusion: {data}}}\nextract: {{batch_size: 16}}\n{FUSE}\n{extra}")
    return path


def snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of the stores and maps: its bytes and modification time."""
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns)
            for part in ("extract", "align") for p in sorted((out / part).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("fusellm")
    lines = (world / "data/fusion.jsonl").read_text().splitlines()
    data = root / "fusion.jsonl"
    data.write_text("\n".join(lines[::8]) + "\n")  # 80 conversations of every domain
    out = root / "run"
    r = recipe(world, out, data)
    for source in ("arith", "facts"):  # pairwise first: it makes the stores and maps
        assert main(["fuse", "--recipe", str(r), "--source", source]) == 0
    before = snapshot(out)
    assert main(["fuse", "--recipe", str(r), "--sources", "arith", "facts"]) == 0
    return {"root": root, "world": world, "data": data, "out": out, "recipe": r, "n": len(lines[::8]),
            "before": before, "after": snapshot(out)}


@pytest.mark.slow
def test_fusellm_target_loads_and_reports_contributions(run: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = run["out"] / "targets/fusellm"
    report = json.loads((target / "fusion_report.json").read_text())
    pair = {s: json.loads((run["out"] / f"targets/{s}/fusion_report.json").read_text()) for s in ("arith", "facts")}
    assert report["mode"] == "fusellm" and report["sources"] == ["arith", "facts"] and report["method"] == "mince"
    assert report["steps"] == pair["arith"]["steps"] == 6 and report["lambda"] == 0.9
    f, c = report["fusion"], report["contributions"]
    assert f["conversations"] == run["n"] == c["total"]["sequences"]
    for s in ("arith", "facts"):  # the same stores and maps pair the same positions as pairwise fusion did
        assert f["sources"][s]["paired"] == pair[s]["fusion"]["paired"] and f["sources"][s]["missing"] == 0
        assert report["vocab_maps"][s] == pair[s]["vocab_map"]
    assert sum(d["sequences"] for d in c["by_domain"].values()) == run["n"]
    assert sum(d["positions"] for d in c["by_domain"].values()) == f["positions"] == c["total"]["positions"]
    for shares in [*c["by_domain"].values(), c["total"]]:
        t = shares["teachers"]
        assert list(t) == ["pivot", "arith", "facts"]
        assert sum(x["sequence_share"] for x in t.values()) == pytest.approx(1.0)
        assert sum(x["position_share"] for x in t.values()) + shares["fallback_share"] == pytest.approx(1.0)
        assert all(x["present_share"] == 1.0 for x in t.values())
    assert c["total"]["fallback_share"] * f["positions"] == pytest.approx(f["fallback"])
    # the expert wins most conversations of its own domain (the world's sources are domain experts)
    assert c["by_domain"]["arith"]["teachers"]["arith"]["sequence_share"] > 0.5
    assert c["by_domain"]["facts"]["teachers"]["facts"]["sequence_share"] > 0.5
    card = (target / "README.md").read_text()
    assert "| arith | " in card and "seq " in card and "in one run (FuseLLM mode)" in card
    pivot, fused = params(run["world"] / "models/pivot"), params(target)
    assert any(not (pivot[k] == fused[k]).all() for k in pivot)
    tok = AutoTokenizer.from_pretrained(target)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    gen = AutoModelForCausalLM.from_pretrained(target).generate(**prompt, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > prompt["input_ids"].shape[1]


@pytest.mark.slow
def test_no_store_or_map_is_made_again(run: dict) -> None:
    before, after = run["before"], run["after"]
    assert set(after) == set(before) and any(k.startswith("extract/pivot/shards/") for k in after)
    assert {k for k in after if k.startswith("align/")} == {"align/arith/vocab_map.json", "align/facts/vocab_map.json"}
    assert all(after[k][0] == before[k][0] for k in after)  # the same bytes
    # the same files: a finished store's manifest is rewritten unchanged on every use (pairwise too)
    assert all(after[k][1] == before[k][1] for k in after if not k.endswith("manifest.json"))
    assert not (run["out"] / "extract/strings").exists()


@pytest.mark.slow
def test_rerun_reuses_the_target_and_another_method_retrains(run: dict, capsys: pytest.CaptureFixture) -> None:
    target = run["out"] / "targets/fusellm"
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    r = recipe(run["world"], run["out"], run["data"], "fusellm: {sources: [arith, facts]}\n")
    capsys.readouterr()
    assert main(["fuse", "--recipe", str(r), "--fusellm"]) == 0  # the recipe's section: the same target
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp
    assert "fuse: fusellm: " in capsys.readouterr().out
    assert main(["fuse", "--recipe", str(r), "--fusellm", "--method", "avgce", "--max-steps", "1"]) == 0
    report = json.loads((target / "fusion_report.json").read_text())
    assert report["method"] == "avgce" and report["steps"] == 1
    for shares in [*report["contributions"]["by_domain"].values(), report["contributions"]["total"]]:
        t = shares["teachers"]
        assert sum(x["mean_weight"] for x in t.values()) == pytest.approx(1.0)
        assert all(x["sequence_share"] is None and x["position_share"] is None for x in t.values())
    assert snapshot(run["out"]).keys() == run["after"].keys()  # still nothing extracted or aligned


def _models(tmp_path: Path, names: tuple[str, ...]) -> None:
    for n in names:
        (tmp_path / n).mkdir(exist_ok=True)
    (tmp_path / "d.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')


def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _models(tmp_path, ("p", "a", "b"))
    r = tmp_path / "r.yaml"
    body = (f"out: {tmp_path / 'o'}\nmodels:\n  pivot: {{name: p, path: {tmp_path / 'p'}}}\n  sources:\n"
            f"    - {{name: a, path: {tmp_path / 'a'}}}\n    - {{name: b, path: {tmp_path / 'b'}}}\n"
            f"data: {{fusion: {tmp_path / 'd.jsonl'}}}\n")
    r.write_text(body)
    cases = [
        (["--recipe", str(r), "--sources", "a"],
         "fuse: --sources needs at least two sources, got 1 (one source is pairwise fusion: --source NAME)"),
        (["--recipe", str(r), "--sources", "a", "nosuch"],
         "fuse: --sources: 'nosuch' is not in the recipe's models.sources (a, b)"),
        (["--recipe", str(r), "--sources", "a", "a"], "fuse: --sources: 'a' is given twice"),
        (["--recipe", str(r), "--source", "a", "--sources", "a", "b"], "fuse: give --source or --sources, not both"),
        (["--recipe", str(r), "--clm", "--fusellm"], "fuse: give --clm or --fusellm, not both"),
        (["--recipe", str(r), "--sources", "a", "b", "--lam", "1"],
         "fuse.lam: FuseLLM mode needs λ < 1 (λ = 1 leaves no fusion term: that is the pivot-CLM baseline, fuse --clm)"),
        (["--recipe", str(r), "--fusellm", "--set", "fusellm={sources: [a, nope]}"],
         f"{r}: 'fusellm.sources': 'nope' is not in models.sources (a, b)"),
        (["--recipe", str(r), "--fusellm", "--set", "fusellm={name: b}"],
         f"{r}: 'fusellm.name': 'b' is already a model or target name (models, targets and merges share one table)"),
        (["--recipe", str(r), "--fusellm", "--set", "models.sources=[{name: a, path: " + str(tmp_path / "a") + "}]"],
         f"{r}: 'fusellm.sources': FuseLLM mode needs at least two sources, the recipe has 1 "
         "(one source is pairwise fusion: fuse --source NAME)"),
        (["--fusellm", "--pivot", str(tmp_path / "p"), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path)],
         "fuse: without --recipe, --sources required"),
        (["--pivot", str(tmp_path / "p"), "--sources", str(tmp_path / "a"), str(tmp_path / "x" / "a"), "--data",
          str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o")],
         "fuse: --sources: two folders are named 'a'; give them distinct names in a recipe"),
    ]
    for args, want in cases:
        assert main(["fuse", *args]) == 2, args
        assert capsys.readouterr().err == f"pivotfuse fuse: error: {want}\n", args


def test_run_report_parts() -> None:
    """FuseLLM claims, the comparison beside the merges, and the contribution table, on made-up numbers."""
    from fuse.targets.fusion_multi import Contributions, MultiFused
    from pipeline.fusellm_report import comparison_table, contribution_table, fusellm_claims
    from pipeline.recipe import load_recipe

    r = load_recipe(REPO / "recipes" / "demo.yaml", check_paths=False)
    doms = ["arith", "facts", "strings", "chat"]

    def row(vals):
        return {d: {"bits_per_byte": v} for d, v in zip(doms, vals)} | {"all": {"bits_per_byte": 0.0}}

    loss = {"pivot": row([4, 4, 4, 1]), "pivot-clm": row([2, 2, 2, 1]), "sce": row([1.5, 1.5, 1.5, 1]),
            "arith": row([1, 5, 5, 2]), "facts": row([5, 1, 5, 2]), "strings": row([5, 5, 1, 0.5]),
            "fusellm": row([1.8, 2.5, 1.9, 0.9])}
    means = {k: sum(v[d]["bits_per_byte"] for d in doms) / 4 for k, v in loss.items()}
    got = {c: (ok, n) for c, ok, n in fusellm_claims(r, loss, means)}
    assert got["fusellm < pivot-clm < pivot (mean over domains)"] == (False, "1.7750 < 1.7500 < 3.2500")
    assert got["fusellm < source arith (mean)"] == (True, "1.7750 < 3.2500")
    assert got["fusellm < pivot-clm on arith"] == (True, "1.8000 < 2.0000")
    assert got["fusellm < pivot-clm on facts"] == (False, "2.5000 < 2.0000")
    assert got["fusellm < best single source on arith (arith)"] == (False, "1.8000 < 1.0000")
    assert got["fusellm < best single source on chat (strings)"] == (False, "0.9000 < 0.5000")
    assert len(got) == 1 + 3 + 2 * 4
    assert fusellm_claims(r, {k: v for k, v in loss.items() if k != "fusellm"}, means) == []
    table = comparison_table(r, loss, means, ["sce"])
    assert "| best single source per domain | 1.000 (arith) | 1.000 (facts) | 1.000 (strings) | 0.500 (strings) "\
           "| 0.8750 |" in table
    assert "| **fusellm** (FuseLLM mode) | 1.800 | 2.500 | 1.900 | 0.900 | 1.7750 |" in table
    assert table[-1] == "| sce (pairwise, then merged) | 1.500 | 1.500 | 1.500 | 1.000 | 1.3750 |"

    c = Contributions(("pivot", "a", "b"))
    used = np.array([[0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], bool)
    c.add("x", MultiFused(np.zeros((4, 1), np.int32), np.zeros((4, 1), np.float32), used,
                          np.array([0, 0, 1, 1], bool), 1, np.array([0.0, 1.0, 0.0]), np.array([1, 1, 0], bool), "mince"))
    lines = contribution_table(c.as_dict(), "mince")
    assert lines[2] == ("| x | 1 | seq 0.0% · pos 0.0% | seq 100.0% · pos 50.0% | seq 0.0% · pos 0.0% (present 0%) "
                        "| 50.0% |")
    assert lines[3].startswith("| all | 1 | ")

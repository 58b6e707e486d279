"""The whole real-shapes recipe (slow; CI runs it): `cli.py run recipes/real-shapes.yaml` builds the
spec world (Mistral pivot with Llama-2's 32k + OpenChat-3.5's template; Mixtral, Qwen3 152k, Gemma-3
262k, Llama-3 128k, DeepSeek-V3 128k sources), fuses every source, merges, evaluates and reports
each phase's time and peak RSS. Then: the teachers are far below uniform loss, targets and merges
load with from_pretrained and generate with the pivot's template, the merges equal mergekit's on
these shapes, and extraction / vocabulary map / loss memory does not grow with the corpus."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from asset_paths import need_asset

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "real-shapes.yaml"
SOURCES = ("mixtral", "qwen3", "gemma3", "llama3", "deepseek")
VOCAB = {"pivot": 32001, "mixtral": 32000, "qwen3": 151669, "gemma3": 262145, "llama3": 128256, "deepseek": 128815}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, world folder): the recipe run once; the world goes to the shared cache."""
    for name in ("llama2", "llama3", "qwen3", "gemma3", "deepseek_v3"):
        need_asset(name)
    out = tmp_path_factory.mktemp("shapes") / "run"
    cmd = [sys.executable, str(REPO / "cli.py"), "run", str(RECIPE), "--set", f"out={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "[phase] extract gemma3 (vocab 262,145)" in r.stdout  # printed by the run as it goes
    world = REPO / yaml.safe_load(RECIPE.read_text())["world_spec"]["out"]
    return out, world


def test_teachers_are_far_below_uniform(run):
    _, world = run
    meta = json.loads((world / "world.json").read_text())
    rows = {m["name"]: m for m in meta["models"]}
    assert {n: r["vocab"] for n, r in rows.items()} == VOCAB
    for name, r in rows.items():
        assert r["uniform_nats_per_token"] == round(math.log(VOCAB[name]), 4)
        assert r["heldout_nats_per_token"] < 0.4 * r["uniform_nats_per_token"], name  # on its own domain
    assert rows["mixtral"]["train_chats_skipped"]["skipped"] > 0  # its template refuses the system chats
    assert "roles must alternate" in rows["mixtral"]["train_chats_skipped"]["reason"]
    assert all(rows[n]["train_chats_skipped"]["skipped"] == 0 for n in rows if n != "mixtral")
    config = json.loads((world / "models" / "gemma3" / "config.json").read_text())
    assert config["final_logit_softcapping"] == 30.0 and config["tie_word_embeddings"] is True
    assert json.loads((world / "models" / "mixtral" / "config.json").read_text())["num_local_experts"] == 4


def test_every_source_fused_with_coverage(run):
    out, _ = run
    for name in SOURCES:
        report = json.loads((out / "targets" / name / "fusion_report.json").read_text())
        cov = report["fusion"]["coverage"]
        assert 0.3 < cov <= 1.0, (name, cov)
        assert report["loss_after"]["loss"] < report["loss_before"]["loss"], name
    skipped = json.loads((out / "align" / "mixtral" / "vocab_map.json").read_text())["stats"]["skipped_conversations"]
    assert skipped > 0  # chats with a system message: Mixtral's template refuses them, and the map says so


def test_report_keeps_each_phase_at_each_vocab_size(run):
    out, _ = run
    report = (out / "report.md").read_text()
    assert "## Time and memory per phase" in report
    rows = [json.loads(line) for line in (out / "phases.jsonl").read_text().splitlines()]
    got = {(r["phase"], r["model"]): r for r in rows}
    assert got[("extract", "gemma3")]["vocab"] == 262145
    assert (got[("vocab map", "gemma3")]["vocab"], got[("vocab map", "gemma3")]["pivot_vocab"]) == (262145, 32001)
    assert got[("loss", "qwen3")]["vocab"] == 151669
    for merge in ("sce-mergekit", "sce-fusechat", "varm", "ties"):
        assert ("merge", merge) in got
    for r in rows:
        assert r["peak_rss_mb"] >= r["rss_start_mb"] > 0 and r["seconds"] >= 0
        assert f"| {r['phase']} | {r['model']} |" in report
    loss = json.loads((out / "eval" / "loss.json").read_text())["models"]
    assert loss["mixtral"]["all"]["skipped"] > 0 and "skipped" not in loss["pivot"]["all"]


def test_targets_and_merges_load_and_generate_with_the_pivot_template(run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, world = run
    pivot_template = (REPO / "recipes" / "templates" / "openchat-3.5.jinja").read_text()
    for folder in [out / "targets" / n for n in (*SOURCES, "pivot-clm")] + \
                  [out / "merged" / n for n in ("sce-mergekit", "sce-fusechat", "varm", "ties")]:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert type(model).__name__ == "MistralForCausalLM" and model.config.sliding_window == 32
        assert tok.chat_template == pivot_template and len(tok) == 32001
        text = tok.apply_chat_template([{"role": "user", "content": "What is 23 + 58?"}], tokenize=False,
                                       add_generation_prompt=True)
        assert text.endswith("GPT4 Correct User: What is 23 + 58?<|end_of_turn|>GPT4 Correct Assistant:")
        ids = tok(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        assert gen.shape[1] > ids["input_ids"].shape[1]
        assert tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip(), folder.name


def test_merges_equal_mergekit_on_these_shapes(run, tmp_path):
    pytest.importorskip("mergekit", reason="mergekit (the test-only oracle) is not installed")
    import torch

    from merge.merger import merge_models
    from test_merge_fixtures import load_sd
    from test_merge_mergekit import CASES, W, _mergekit  # the existing oracle's cases, on the real shapes

    out, world = run
    base = (world / "models" / "pivot").resolve()
    targets = [(out / "targets" / n).resolve() for n in SOURCES[:3]]
    base_sd = load_sd(base)
    target_sds = [load_sd(t) for t in targets]
    for case in ("sce-0.1", "ties", "task_arithmetic"):
        spec, cfg = CASES[case]
        weights = spec.get("weights")
        models = [{"model": str(t), **({"parameters": {"weight": w}} if weights else {})}
                  for t, w in zip(targets, weights or [None] * len(targets))]
        expected = _mergekit({"merge_method": spec["merge_method"], "dtype": "float32", "out_dtype": "float32",
                              "parameters": spec.get("parameters", {}), "base_model": str(base),
                              "models": [{"model": str(base)}, *models]}, tmp_path / f"mk-{case}")
        merge_models(str(base), [str(t) for t in targets], cfg, str(tmp_path / f"ours-{case}"), progress=False)
        got = load_sd(tmp_path / f"ours-{case}")
        assert set(got) == set(expected) and len(W) == len(targets)
        for name, t in expected.items():
            if case == "ties":
                # mergekit keeps the top-density |τ| by an unstable argsort, so where several |τ| equal the
                # k-th largest (Adam gives many rows updates of the same size) it keeps an arbitrary subset
                # of them; ours keeps the lowest indices. Elsewhere the two must agree exactly.
                taus = [sd_t[name].float() - base_sd[name].float() for sd_t in target_sds]
                tied = torch.stack([_at_density_threshold(tau, 0.5) for tau in taus]).any(dim=0)
                differs = (got[name] - t).abs() > 1e-6
                assert not (differs & ~tied).any(), f"{case} {name}: differs away from the density threshold"
                continue
            torch.testing.assert_close(got[name], t, rtol=0, atol=1e-6, msg=lambda m: f"{case} {name}: {m}")


def _at_density_threshold(tau, density: float):
    """Elements whose |τ| equals the k-th largest |τ| (k = int(density · numel)): the ones a top-k may keep or drop."""
    mags = tau.abs().flatten()
    k = max(1, int(density * mags.numel()))
    kth = mags.kthvalue(mags.numel() - k + 1).values
    return (tau.abs() == kth)


def test_memory_does_not_grow_with_the_corpus(run, tmp_path):
    _, world = run
    r = subprocess.run([sys.executable, str(REPO / "bench" / "shapes_memory.py"), str(world), "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "shapes_memory.json").read_text())
    assert [(x["phase"], x["model"]) for x in rows] == [("extract", "gemma3")] * 2 + [("vocab map", "gemma3")] * 2 + \
        [("loss", "qwen3")] * 2
    for small, large in zip(rows[::2], rows[1::2]):
        assert large["chats"] >= 8 * small["chats"]
        # ten times the chats: the same peak, up to allocator noise (50 MB or 10%)
        assert large["peak_rss_mb"] <= small["peak_rss_mb"] * 1.1 + 50, (small, large)
    assert r.stdout.strip().splitlines()[-1].startswith("RESULT shapes_memory growth=")

"""`pivotfuse fuse` end to end on the demo world: target folder, resume after a kill, pivot-CLM,
two processes; and its one-line errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli import main

REPO = Path(__file__).resolve().parents[1]
FUSE = "fuse: {lr: 0.003, batch_size: 8, max_steps: 16, save_steps: 4, logging_steps: 4, warmup: 0}"


def recipe(world: Path, out: Path, data: Path) -> Path:
    path = out.with_suffix(".yaml")
    path.write_text(f"out: {out}\nworld: {{out: {world}}}\nmodels:\n  pivot: {{name: pivot, path: 'world:pivot'}}\n"
                    f"  sources:\n    - {{name: arith, path: 'world:arith'}}\ndata: {{fusion: {data}}}\n"
                    f"extract: {{batch_size: 16}}\n{FUSE}\n")
    return path


def reuse_stores(src: Path, dst: Path) -> None:
    """Copy stores and vocabulary maps of a finished run (fingerprinted by content, so reused)."""
    for part in ("extract", "align"):
        shutil.copytree(src / part, dst / part)


@pytest.fixture(scope="module")
def run(world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("fuse")
    lines = (world / "data/fusion.jsonl").read_text().splitlines()
    data = root / "fusion.jsonl"
    data.write_text("\n".join(lines[::6]) + "\n")  # ~100 conversations of every domain
    out = root / "run"
    r = recipe(world, out, data)
    assert main(["fuse", "--recipe", str(r), "--source", "arith"]) == 0
    return {"root": root, "world": world, "data": data, "out": out, "recipe": r, "n": len(lines[::6])}


def params(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


@pytest.mark.slow
def test_target_folder_loads_generates_and_reports(run: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = run["out"] / "targets/arith"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "fusion_report.json",
                 "train_log.jsonl", "recipe.yaml", "README.md"):
        assert (target / name).is_file(), name
    report = json.loads((target / "fusion_report.json").read_text())
    f = report["fusion"]
    assert report["steps"] == 16 and report["lambda"] == 0.9 and report["source"] == "arith"
    assert report["loss_after"]["loss"] < report["loss_before"]["loss"]
    assert f["conversations"] == run["n"] and sum(f["winners"].values()) == run["n"]
    assert f["coverage"] > 0.9 and f["by_domain"]["arith"]["source_wins"] > 0
    pivot, fused = params(run["world"] / "models/pivot"), params(target)
    assert all(not torch.equal(pivot[k], fused[k]) for k in pivot)  # every trainable parameter moved
    tok = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    log = [json.loads(line) for line in (target / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [4, 8, 12, 16]
    # a rerun with the same inputs and settings reuses the target as is
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    assert main(["fuse", "--recipe", str(run["recipe"]), "--source", "arith"]) == 0
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_target(run: dict) -> None:
    out = run["root"] / "killed"
    reuse_stores(run["out"], out)
    r = recipe(run["world"], out, run["data"])
    cmd = [sys.executable, str(REPO / "cli.py"), "fuse", "--recipe", str(r), "--source", "arith"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "fuse/arith/checkpoints/checkpoint-8"
    deadline = time.time() + 240
    while not (ckpt / "trainer_state.json").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no cleanup
    proc.wait()
    assert proc.returncode != 0 and ckpt.is_dir() and not (out / "targets/arith").exists()
    partial = out / "fuse/arith/checkpoints/checkpoint-12"  # as if killed while writing a checkpoint
    partial.mkdir(exist_ok=True)
    (partial / "model.safetensors").write_bytes(b"truncated")
    assert main(["fuse", "--recipe", str(r), "--source", "arith"]) == 0
    report = json.loads((out / "targets/arith/fusion_report.json").read_text())
    assert report["steps"] == 16
    ref, got = params(run["out"] / "targets/arith"), params(out / "targets/arith")
    assert all(torch.allclose(ref[k], got[k], atol=1e-5) for k in ref)


@pytest.mark.slow
def test_pivot_clm_is_the_same_path_with_lambda_one(run: dict) -> None:
    assert main(["fuse", "--recipe", str(run["recipe"]), "--clm"]) == 0
    report = json.loads((run["out"] / "targets/pivot-clm/fusion_report.json").read_text())
    assert report["lambda"] == 1.0 and report["source"] is None and report["steps"] == 16
    assert report["loss_after"]["ce_gold"] < report["loss_before"]["ce_gold"]
    # λ = 1: the reported loss is the gold CE exactly
    assert report["loss_after"]["loss"] == pytest.approx(report["loss_after"]["ce_gold"], rel=1e-5)


@pytest.mark.slow
def test_two_processes_train_one_target(run: dict) -> None:
    out = run["root"] / "ddp"
    reuse_stores(run["out"], out)
    r = recipe(run["world"], out, run["data"])
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "cli.py"),
           "fuse", "--recipe", str(r), "--source", "arith"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("fuse: arith:") == 1  # one report line, from the main process
    log = [json.loads(line) for line in (out / "targets/arith/train_log.jsonl").read_text().splitlines()]
    last = [e for e in log if "train_runtime" in e][0]
    assert last["step"] == 16
    # an epoch is ceil(n / (2 ranks × 8 rows)) steps (one process alone would need ceil(n / 8))
    assert last["epoch"] == pytest.approx(16 / math.ceil(run["n"] / 16))
    params(out / "targets/arith")  # loads


def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["fuse", "--source", "x"]) == 2
    assert "without --recipe, --pivot --data --out required" in capsys.readouterr().err
    (tmp_path / "p").mkdir()
    (tmp_path / "d.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    r = tmp_path / "r.yaml"
    r.write_text(f"out: {tmp_path / 'o'}\nmodels:\n  pivot: {{name: p, path: {tmp_path / 'p'}}}\n"
                 f"data: {{fusion: {tmp_path / 'd.jsonl'}}}\n")
    assert main(["fuse", "--recipe", str(r), "--source", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "source 'nosuch' is not in the recipe" in err and err.count("\n") == 1
    assert main(["fuse", "--recipe", str(r), "--clm", "--source", "a"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["fuse", "--recipe", str(r), "--source", "a", "--lam", "1.5"]) == 2
    assert "lam" in capsys.readouterr().err
    assert main(["fuse", "--pivot", str(tmp_path / "nope"), "--source", str(tmp_path / "p"), "--data",
                 str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_recipe_align_section_shapes_the_vocabulary_map(tokenizer_dirs, tmp_path: Path) -> None:
    """`align:` settings reach the map the pipeline builds, and are in its fingerprint (a change rebuilds it)."""
    from pipeline.recipe import load_recipe
    from fuse.align.build import build_map
    from fuse.align.config import AlignConfig
    from pipeline.pairwise import source_vocab_map
    from test_align_cli import write_chats
    from test_align_vocab import CHATML, INST

    data = write_chats(tmp_path / "chats.jsonl", n=12)
    (tmp_path / "chatml.jinja").write_text(CHATML)
    (tmp_path / "inst.jinja").write_text(INST)
    llama2 = tokenizer_dirs["llama2"]  # the same tokenizer under two templates: quick to load
    r = tmp_path / "r.yaml"
    r.write_text(f"out: {tmp_path / 'run'}\nmodels:\n  pivot: {{name: p, path: {llama2}, chat_template: "
                 f"{tmp_path / 'chatml.jinja'}}}\n  sources:\n    - {{name: s, path: {llama2}, chat_template: "
                 f"{tmp_path / 'inst.jinja'}}}\ndata: {{fusion: {data}}}\n"
                 "align: {limit: 5, halo: 0, theta: -1, max_length: 40}\n")
    recipe = load_recipe(r)
    mapping, info = source_vocab_map(recipe, recipe.models.pivot, recipe.models.sources[0], str(data))
    templates = dict(pivot_template=str(tmp_path / "chatml.jinja"), source_template=str(tmp_path / "inst.jinja"))
    ref = build_map(str(llama2), str(llama2), str(data), tmp_path / "ref.json",
                    AlignConfig(limit=5, halo=0, theta=-1, max_length=40), progress=False, **templates)
    assert info["conversations"] == 5 and info["truncated_conversations"] == ref.stats["truncated_conversations"] > 0
    assert info["fingerprint"] == ref.fingerprint and mapping.tolist() == ref.mapping.tolist()
    assert Path(info["path"]).read_bytes() == (tmp_path / "ref.json").read_bytes()
    default = build_map(str(llama2), str(llama2), str(data), tmp_path / "default.json", AlignConfig(), progress=False,
                        **templates)
    assert default.stats["conversations"] == 12 and default.fingerprint != ref.fingerprint
    # a changed setting rebuilds the map in place; the default settings give the default map, byte for byte
    recipe = load_recipe(r, ["align={}"])
    _, info = source_vocab_map(recipe, recipe.models.pivot, recipe.models.sources[0], str(data))
    assert info["fingerprint"] == default.fingerprint
    assert Path(info["path"]).read_bytes() == (tmp_path / "default.json").read_bytes()


@pytest.mark.slow
def test_fuse_builds_the_map_with_the_recipe_align_settings(run: dict) -> None:
    from fuse.align.vocab import VocabMap

    out = run["root"] / "aligned"
    reuse_stores(run["out"], out)
    r = recipe(run["world"], out, run["data"])
    r.write_text(r.read_text() + "align: {limit: 7, halo: 0}\n")
    assert main(["fuse", "--recipe", str(r), "--source", "arith", "--max-steps", "1"]) == 0
    old, new = (VocabMap.load(p / "align/arith/vocab_map.json") for p in (run["out"], out))
    assert old.stats["conversations"] == run["n"] and new.stats["conversations"] == 7
    assert new.fingerprint != old.fingerprint
    report = json.loads((out / "targets/arith/fusion_report.json").read_text())
    assert report["vocab_map"]["conversations"] == 7 and report["steps"] == 1

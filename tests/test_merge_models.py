"""Whole-model merges: every method against a plain whole-model reference, HF loading and
generation of the output, dtypes, tied embeddings, the model card and the command line."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import cli
from merge.config import MergeConfig
from merge.merger import merge_models
from asset_paths import need_asset
from test_merge_fixtures import (ULPS, build_family, load_sd, ref_linear, ref_sce, ref_task_arithmetic,
                                 ref_ties, ref_varm)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("fam"))


def _reference(method, b, ts, cfg: MergeConfig):
    w = cfg.weights or [1.0] * len(ts)
    if method == "varm":
        return ref_varm(b, ts)
    if method == "sce":
        return ref_sce(b, ts, cfg.select_topk, cfg.sce_mask)
    if method == "linear":
        return ref_linear(ts, w)
    if method == "task_arithmetic":
        return ref_task_arithmetic(b, ts, w, cfg.scale)
    if method == "ties":
        return ref_ties(b, ts, w, cfg.density)
    raise AssertionError(method)


CASES = {
    "varm": MergeConfig(method="varm"),
    "sce-mergekit": MergeConfig(method="sce", select_topk=0.1, sce_mask="mergekit"),
    "sce-fusechat": MergeConfig(method="sce", select_topk=0.1, sce_mask="fusechat"),
    "linear": MergeConfig(method="linear", weights=[1.0, 0.5, 0.25]),
    "task_arithmetic": MergeConfig(method="task_arithmetic", weights=[1.0, 0.5, -0.2], scale=0.8),
    "ties": MergeConfig(method="ties", weights=[1.0, 0.7, 0.4], density=0.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_whole_model_reference(family, tmp_path, case):
    base, targets = family
    cfg = CASES[case]
    summary = merge_models(str(base), [str(t) for t in targets], cfg, str(tmp_path / "out"), progress=False)
    got = load_sd(tmp_path / "out")
    b_sd, t_sds = load_sd(base), [load_sd(t) for t in targets]
    assert set(got) == set(b_sd) and summary["tensors"] == len(b_sd)
    for name, b in b_sd.items():
        expected = _reference(cfg.method, b, [sd[name] for sd in t_sds], cfg)
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], expected, **ULPS, msg=lambda m: f"{case}: {name}: {m}")


def test_dare_merges_are_reproducible_and_drop_the_asked_share(family, tmp_path):
    base, targets = family
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        cfg = MergeConfig(method="dare_linear", density=0.3, seed=seed, weights=[1.0, 0.0, 0.0])
        merge_models(str(base), [str(t) for t in targets], cfg, str(tmp_path / name), progress=False)
        runs[name] = load_sd(tmp_path / name)
    b_sd, t0 = load_sd(base), load_sd(targets[0])
    assert all(torch.equal(runs["a"][n], runs["b"][n]) for n in b_sd)
    assert not all(torch.equal(runs["a"][n], runs["c"][n]) for n in b_sd)
    # only model 0 counts: each moved element is its task vector / density, the rest stay at the base
    name = "model.layers.0.mlp.up_proj.weight"
    tau, moved = t0[name] - b_sd[name], runs["a"][name] - b_sd[name]
    kept = moved != 0
    torch.testing.assert_close(moved[kept], tau[kept] / 0.3, rtol=1e-5, atol=1e-9)
    assert abs(float(kept.float().mean()) - 0.3 * float((tau != 0).float().mean())) < 0.03


def test_output_loads_generates_and_keeps_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = need_asset("llama2")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}"
    base, targets = build_family(tmp_path / "fam", tied=True, vocab=len(tok), hidden=16, tokenizer=tok,
                                 dtype=torch.bfloat16, shard="300KB")
    out = tmp_path / "merged"
    merge_models(str(base), [str(t) for t in targets], MergeConfig(method="sce", shard_size="400KB"), str(out),
                 progress=False)
    assert (out / "model.safetensors.index.json").is_file()  # sharded output
    assert "lm_head.weight" not in load_sd(out)  # tied: the head is the embedding, as in the base
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    for name, t in load_sd(out).items():
        assert torch.equal(model.state_dict()[name], t)
    merged_tok = AutoTokenizer.from_pretrained(out)
    assert merged_tok.chat_template == tok.chat_template
    ids = merged_tok("hello world", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, ids.shape[1] + 4)


def test_bfloat16_inputs_merge_in_float32(tmp_path):
    base, targets = build_family(tmp_path / "fam", k=2, dtype=torch.bfloat16)
    merge_models(str(base), [str(t) for t in targets], MergeConfig(method="varm"), str(tmp_path / "bf"),
                 progress=False)
    merge_models(str(base), [str(t) for t in targets], MergeConfig(method="varm", dtype="float32"),
                 str(tmp_path / "f32"), progress=False)
    bf, f32 = load_sd(tmp_path / "bf"), load_sd(tmp_path / "f32")
    b_sd, t_sds = load_sd(base), [load_sd(t) for t in targets]
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"
    for name, b in b_sd.items():
        expected = ref_varm(b.float(), [sd[name].float() for sd in t_sds])  # maths in float32
        assert bf[name].dtype == torch.bfloat16 and f32[name].dtype == torch.float32
        torch.testing.assert_close(f32[name], expected, **ULPS)
        assert torch.equal(bf[name], f32[name].to(torch.bfloat16))  # one rounding, at the end


def test_tied_target_with_untied_base_uses_its_embedding(tmp_path):
    base, _ = build_family(tmp_path / "a", k=1, tied=False)
    _, tied_targets = build_family(tmp_path / "b", k=1, tied=True)  # same seed: same base weights
    t_sd = load_sd(tied_targets[0])
    assert "lm_head.weight" not in t_sd
    merge_models(str(base), [str(tied_targets[0])], MergeConfig(method="task_arithmetic"), str(tmp_path / "o"),
                 progress=False)
    got, b_sd = load_sd(tmp_path / "o"), load_sd(base)
    expected = b_sd["lm_head.weight"] + (t_sd["model.embed_tokens.weight"] - b_sd["lm_head.weight"])
    torch.testing.assert_close(got["lm_head.weight"], expected, **ULPS)


def test_model_card_plot_and_reproducible_config(family, tmp_path):
    base, targets = family
    out = tmp_path / "m"
    summary = merge_models(str(base), [str(t) for t in targets], MergeConfig(method="varm"), str(out),
                           progress=False)
    readme = (out / "README.md").read_text()
    assert "**varm**" in readme and str(targets[2]) in readme and "| 1 |" in readme
    png = (out / "merge_weights.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*"))  # no progress/state files left behind
    # the per-layer table holds the mean of the per-tensor weights of layer 1
    layer1 = [rec["weights"] for name, rec in summary["per_tensor"].items() if ".layers.1." in name]
    mean0 = sum(w[0] for w in layer1) / len(layer1)
    assert f"| 1 | {mean0:.4f} |" in readme
    # the saved merge file reruns to the same weights
    job = yaml.safe_load((out / "pivotfuse_merge.yaml").read_text())
    assert job["method"] == "varm" and job["models"] == [str(t) for t in targets]
    rc = cli.main(["merge", "--config", str(out / "pivotfuse_merge.yaml"), "--out", str(tmp_path / "again"),
                   "--quiet"])
    assert rc == 0
    again, first = load_sd(tmp_path / "again"), load_sd(out)
    assert all(torch.equal(again[n], first[n]) for n in first)


def test_cli_flags_and_yaml_config(family, tmp_path, capsys):
    base, targets = family
    out = tmp_path / "ties"
    rc = cli.main(["merge", "--base", str(base), "--models", *map(str, targets), "--method", "ties",
                   "--density", "0.5", "--weights", "1", "0.7", "0.4", "--out", str(out), "--quiet"])
    assert rc == 0 and "merged 3 models with ties" in capsys.readouterr().out
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"base": str(base), "models": [str(t) for t in targets], "method": "ties",
                                   "density": 0.9, "weights": [1, 0.7, 0.4], "out": str(tmp_path / "y")}))
    assert cli.main(["merge", "--config", str(cfg), "--density", "0.5", "--quiet"]) == 0  # flag wins
    a, b = load_sd(out), load_sd(tmp_path / "y")
    assert all(torch.equal(a[n], b[n]) for n in a)
    # refusals are one line naming the problem
    assert cli.main(["merge", "--config", str(cfg), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    cfg.write_text(yaml.safe_dump({"base": str(base), "models": [str(targets[0])], "method": "sce",
                                   "weights": [1.0], "out": str(tmp_path / "z")}))
    assert cli.main(["merge", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "weights" in err and "sce computes its own" in err and len(err.splitlines()) == 1

"""Teacher extraction (`pivotfuse extract`) and the logit store, checked against plain references:
a full float32 log_softmax of the model's own logits, the assistant text found by string search,
an uninterrupted run (for resume), one process (for two: bit for bit with the same kernel threads,
up to float rounding with others)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from asset_paths import need_asset
from core.errors import PivotfuseError
from fuse.extract.config import ExtractJob
from fuse.extract.extract import extract
from fuse.extract.store import LogitStore, TeacherRecord
from extract_checks import (assert_records_match, assert_stores_match, check_distributions, check_spans,
                            fp16_tol, torch_threads)

REPO = Path(__file__).resolve().parents[1]
MAX_LEN = 96
INST = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ '<<SYS>>\\n' + m['content'] + "
        "'\\n<</SYS>>\\n\\n' }}{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")



def _rows() -> list[dict]:
    u, a = "user", "assistant"
    rows = [
        {"id": "multi", "domain": "chat", "messages": [
            {"role": "system", "content": "Be brief."}, {"role": u, "content": "Hello there, how are you?"},
            {"role": a, "content": "I'm fine, thanks! 😀 And you?"}, {"role": u, "content": "Good.\nBye"},
            {"role": a, "content": "Great to hear —\nsee you, naïve café."}]},
        {"id": "arith", "domain": "arith", "messages": [{"role": u, "content": "What is 17+25?"},
                                                         {"role": a, "content": "17+25 = 42"}]},
        {"id": "no-assistant", "messages": [{"role": u, "content": "anyone?"}]},
        {"id": "empty-reply", "messages": [{"role": u, "content": "say nothing"}, {"role": a, "content": "  "}]},
        {"id": "cut-partly", "messages": [{"role": u, "content": "Count."}, {"role": a, "content": " ".join(
            f"number {i}," for i in range(60))}]},
        {"id": "cut-all", "messages": [{"role": u, "content": "word " * 150}, {"role": a, "content": "ok"}]},
    ]
    rows += [{"id": f"s{i}", "domain": "facts", "messages": [
        {"role": u, "content": f"Fact {i}?"}, {"role": a, "content": f"The capital of country {i} is City{i * 7}."}]}
        for i in range(5)]
    return rows


def _build(kind: str, out: Path, template: str | None = "own") -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(need_asset("llama2" if kind == "llama" else "qwen3")))
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.3)  # a wide init gives peaked, untied distributions to check top-k on
    if kind == "llama":
        tok.chat_template = INST if template == "own" else None
        model = LlamaForCausalLM(LlamaConfig(**common, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("extract")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _rows()))
    models = {k: _build(k, root / k) for k in ("llama", "qwen")}
    stores = {}
    for kind, path in models.items():
        cfg = ExtractJob(model=str(path), data=str(data), out=str(root / f"store-{kind}"), top_k=5,
                            batch_size=3, max_length=MAX_LEN, shard_size=4, dtype="float32")  # vs a float32 reference
        stores[kind] = (cfg, extract(cfg))
    return {"root": root, "data": data, "models": models, "stores": stores}


@pytest.mark.parametrize("kind", ["llama", "qwen"])
def test_stored_distributions_equal_full_log_softmax(built: dict, kind: str) -> None:
    store = LogitStore(built["stores"][kind][0].out)
    check_distributions(store, built["models"][kind], MAX_LEN)
    assert min(r.gold_logprobs.std() for r in store) > 0.3  # the checks are not on flat distributions


@pytest.mark.parametrize("kind", ["llama", "qwen"])
def test_spans_and_mask_cover_exactly_the_assistant_text(built: dict, kind: str) -> None:
    check_spans(LogitStore(built["stores"][kind][0].out), {r["id"]: r for r in _rows()}, built["models"][kind], MAX_LEN)


def test_scored_characters_agree_across_tokenizers(built: dict) -> None:
    llama, qwen = (LogitStore(built["stores"][k][0].out) for k in ("llama", "qwen"))
    same = [(a.n_chars, a.n_bytes) == (b.n_chars, b.n_bytes) for a, b in zip(llama, qwen) if not a.truncated]
    assert [a.id for a in llama] == [b.id for b in qwen] and len(same) >= 5 and all(same)


def test_counts_of_skipped_and_truncated_rows(built: dict) -> None:
    from transformers import AutoTokenizer

    for kind, (cfg, stats) in built["stores"].items():
        store = LogitStore(cfg.out)
        assert stats == store.stats
        ids = [r.id for r in store]
        assert ids == [r["id"] for r in _rows() if r["id"] not in ("no-assistant", "empty-reply", "cut-all")]
        assert stats["rows"] == len(_rows()) and stats["stored"] == len(store)
        assert stats["skipped_no_assistant"] == 2 and stats["skipped_no_scored_tokens"] == 1
        tok = AutoTokenizer.from_pretrained(cfg.model)
        longer = {r["id"] for r in _rows() if len(tok(tok.apply_chat_template(r["messages"], tokenize=False),
                                                      add_special_tokens=False)["input_ids"]) > MAX_LEN}
        assert stats["truncated"] == len(longer) >= 2  # cut-partly and cut-all
        assert {r.id for r in store if r.truncated} == longer - {"cut-all"}
        assert stats["scored_tokens"] == sum(r.n_tokens for r in store)
        assert stats["nll"] == pytest.approx(sum(r.ce * r.n_tokens for r in store))
        assert store.index_of("arith") == ids.index("arith") and len(store.dataset()) == len(store)


def _shard_bytes(out: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((Path(out) / "shards").iterdir())}


def test_kill_and_resume_gives_the_same_store(built: dict, tmp_path: Path) -> None:
    ref_cfg = built["stores"]["llama"][0]
    cfg = ExtractJob(**{**ref_cfg.__dict__, "out": str(tmp_path / "store")})
    done: list[int] = []

    def killed_after_one(shard: int) -> None:
        done.append(shard)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(cfg, on_shard=killed_after_one)
    (tmp_path / "store/shards/00002.arrow.tmp").write_bytes(b"half a shard")  # a kill during a write
    with pytest.raises(PivotfuseError, match="incomplete"):
        LogitStore(cfg.out)
    extract(cfg, on_shard=done.append)
    assert done == [0, 1, 2]  # shard 0 was not redone
    assert _shard_bytes(cfg.out) == _shard_bytes(ref_cfg.out)
    assert json.loads(Path(cfg.out, "manifest.json").read_text())["stats"] == built["stores"]["llama"][1]
    extract(cfg, on_shard=done.append)  # a complete store: nothing to do
    assert len(done) == 3


def test_fingerprint_mismatch_is_refused(built: dict, tmp_path: Path) -> None:
    cfg = built["stores"]["llama"][0]
    with pytest.raises(PivotfuseError, match="different settings"):
        extract(ExtractJob(**{**cfg.__dict__, "top_k": 3}))
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(_rows()[1]) + "\n")
    with pytest.raises(PivotfuseError, match="different data"):
        extract(ExtractJob(**{**cfg.__dict__, "data": str(other)}))
    retrained = tmp_path / "retrained"  # same config and file sizes, other weights
    shutil.copytree(cfg.model, retrained)
    weights = load_file(retrained / "model.safetensors")
    weights["lm_head.weight"][0, 0] += 1.0
    save_file(weights, retrained / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PivotfuseError, match="different model "):
        extract(ExtractJob(**{**cfg.__dict__, "model": str(retrained)}))


def _cli_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    from cli import main

    capsys.readouterr()
    assert main(["extract", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # earlier lines are progress bars of the model loading
    assert last.startswith("pivotfuse extract: error: ")
    return last


def test_bad_inputs_give_one_line_errors(built: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, out = str(built["data"]), str(tmp_path / "out")
    assert "not a model folder" in _cli_error(capsys, "--model", str(tmp_path / "nope"), "--data", data, "--out", out)
    bare = _build("llama", tmp_path / "bare", template=None)
    assert "--chat-template" in _cli_error(capsys, "--model", str(bare), "--data", data, "--out", out)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "no conversations" in _cli_error(capsys, "--model", str(built["models"]["llama"]), "--data",
                                            str(empty), "--out", out)
    only_users = tmp_path / "users.jsonl"
    only_users.write_text(json.dumps(_rows()[2]) + "\n")
    assert "no conversation has an assistant reply" in _cli_error(
        capsys, "--model", str(built["models"]["llama"]), "--data", str(only_users), "--out", out)
    # a model without a template works when one is given; NaN weights are caught and the sample named
    template = tmp_path / "inst.jinja"
    template.write_text(INST)
    weights = load_file(bare / "model.safetensors")
    weights["lm_head.weight"][7, 3] = float("nan")
    save_file(weights, bare / "model.safetensors", metadata={"format": "pt"})
    err = _cli_error(capsys, "--model", str(bare), "--data", data, "--out", out, "--chat-template", str(template))
    assert "NaN/inf logits" in err and "sample '" in err and str(built["data"]) in err


def test_recipe_drives_extraction(built: dict, tmp_path: Path) -> None:
    from cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"out: {tmp_path / 'run'}\nmodels:\n  pivot: {{name: p, path: {built['models']['llama']}}}\n"
                      f"data: {{fusion: {built['data']}}}\nextract: {{top_k: 3, max_length: 40, shard_size: 100}}\n")
    assert main(["extract", "--recipe", str(recipe), "--model", "p", "--batch-size", "16"]) == 0
    store = LogitStore(tmp_path / "run/extract/p")
    assert store.k == 3 and store.manifest["n_shards"] == 1 and max(r.seq_len for r in store) == 40




def test_store_comparison_tolerates_rounding_only(built: dict) -> None:
    """The helper (`extract_checks.assert_stores_match`) passes a store against itself and against near-tie swaps, and fails on
    real differences: a value off by two fp16 ulps, a swap of candidates that do not tie, a CE off by
    1e-4 relative, another token id."""
    import dataclasses

    store = LogitStore(built["stores"]["qwen"][0].out)
    rec = max(store, key=lambda r: r.n_tokens)
    assert assert_records_match(rec, rec) == 0

    def changed(**kw: np.ndarray | float) -> TeacherRecord:
        return dataclasses.replace(rec, **{k: v.copy() if isinstance(v, np.ndarray) else v for k, v in kw.items()})

    ids, lp = rec.topk_ids.copy(), rec.topk_logprobs.copy()
    gaps = (lp[:, :-1].astype(np.float64) - lp[:, 1:]) > 10 * fp16_tol(lp[:, :-1], lp[:, 1:])
    r, j = map(int, np.argwhere(gaps)[0])  # two neighbours that clearly do not tie
    swapped = ids.copy()
    swapped[r, [j, j + 1]] = swapped[r, [j + 1, j]]
    tied_lp = lp.copy()
    tied_lp[r, j + 1] = tied_lp[r, j]  # now they tie: their order is a matter of rounding
    assert assert_records_match(changed(topk_logprobs=tied_lp), changed(topk_ids=swapped, topk_logprobs=tied_lp)) == 2
    with pytest.raises(AssertionError, match="dropped without a tie"):  # a new best candidate, no tie
        assert_records_match(rec, changed(topk_ids=np.where(np.arange(ids.shape[1]) == 0, 999_999, ids)))
    # another id in the k-th place at the old k-th's value is accepted: a store keeps no (k+1)-th
    # value, so it cannot tell a tie for the k-th place from a wrong k-th id (check_distributions
    # checks the stored ids against the model itself)
    new_kth = ids.copy()
    new_kth[:, -1] = 999_999
    assert assert_records_match(rec, changed(topk_ids=new_kth)) == len(ids)
    with pytest.raises(AssertionError):
        assert_records_match(rec, changed(topk_ids=swapped))
    off = lp.copy()
    big = np.unravel_index(np.argmax(np.abs(lp.astype(np.float32))), lp.shape)  # fp16 ulp >> LP_ATOL there
    off[big] = np.nextafter(np.nextafter(off[big], np.float16(0)), np.float16(0))
    with pytest.raises(AssertionError, match="topk_logprobs"):
        assert_records_match(rec, changed(topk_logprobs=off))
    with pytest.raises(AssertionError, match="ce"):
        assert_records_match(rec, changed(ce=rec.ce * (1 + 1e-4)))
    tokens = rec.token_ids.copy()
    tokens[0] += 1
    with pytest.raises(AssertionError, match="token_ids"):
        assert_records_match(rec, changed(token_ids=tokens))


@pytest.mark.slow
def test_two_processes_give_the_same_store(built: dict, tmp_path: Path) -> None:
    """Processes only decide who scores which shard; the batches are formed inside a shard. So with
    the same kernels (same CPU and torch build, same threads per process) the store is the same bit
    for bit, however loaded the machine (OpenMP and MKL split work by thread count, not by load,
    unless OMP_DYNAMIC=true). With another thread count the kernels sum in another order: the same
    store up to float rounding."""
    cfg = built["stores"]["qwen"][0]
    out = tmp_path / "two"
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "cli.py"),
           "extract", "--model", cfg.model, "--data", cfg.data, "--out", str(out), "--top-k", str(cfg.top_k),
           "--batch-size", str(cfg.batch_size), "--max-length", str(cfg.max_length),
           "--shard-size", str(cfg.shard_size)]
    # one kernel thread per process: accelerate's default for several processes, pinned here
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "process 0/2 scores shards [0, 2]" in proc.stderr and "process 1/2 scores shards [1]" in proc.stderr
    one = tmp_path / "one"
    with torch_threads(1):  # one process, the same kernels
        extract(ExtractJob(**{**cfg.__dict__, "out": str(one)}))
    assert _shard_bytes(str(out)) == _shard_bytes(str(one))
    assert json.loads((one / "manifest.json").read_text()) == json.loads((out / "manifest.json").read_text())
    # the module's store used torch's default thread count (all cores): equal up to rounding
    assert_stores_match(cfg.out, out)


def test_world_models(world: Path, tmp_path: Path) -> None:
    """The demo world's pivot and sources (four tokenizers, three templates) on part of the fusion corpus."""
    lines = (world / "data/fusion.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines[:: max(1, len(lines) // 16)][:16]]
    data = tmp_path / "fusion.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chars = {}
    for name in ("pivot", "arith", "facts", "strings"):
        cfg = ExtractJob(model=str(world / "models" / name), data=str(data), out=str(tmp_path / name),
                            batch_size=4, max_length=512, dtype="float32")  # the reference is float32
        stats = extract(cfg)
        store = LogitStore(cfg.out)
        assert stats["stored"] == len(rows) and stats["truncated"] == 0
        check_distributions(store, Path(cfg.model), cfg.max_length)
        check_spans(store, {r["id"]: r for r in rows}, Path(cfg.model), cfg.max_length)
        chars[name] = [(r.n_chars, r.n_bytes) for r in store]
    assert len({tuple(c) for c in chars.values()}) == 1  # CE per character is comparable across them


def test_top_k_above_the_vocabulary_is_refused_before_loading_weights(built: dict, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import fuse.extract.extract

    def no_load(*args: object) -> None:
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(fuse.extract.extract, "load_model", no_load)
    cfg = ExtractJob(**{**built["stores"]["llama"][0].__dict__, "out": str(tmp_path / "store"), "top_k": 32001})
    with pytest.raises(PivotfuseError, match=r"top_k: 32001 exceeds the vocabulary size 32000 of .*llama \(config"):
        extract(cfg)
    assert not (tmp_path / "store").exists()  # nothing written: the corrected rerun starts clean
    for bad, message in (({"batch_size": 0}, "batch_size: must be > 0"), ({"max_length": 1}, "max_length: must be >= 2"),
                         ({"dtype": "int8"}, "dtype: must be one of")):  # Python callers get the CLI's checks
        with pytest.raises(PivotfuseError, match=message):
            extract(ExtractJob(**{**cfg.__dict__, "top_k": 5, **bad}))
    assert not (tmp_path / "store").exists()


def test_a_failed_first_shard_does_not_block_the_corrected_rerun(built: dict, tmp_path: Path) -> None:
    ref_cfg = built["stores"]["llama"][0]
    broken = tmp_path / "broken"  # same tokenizer and config, NaN weights: fails in the first batch
    shutil.copytree(ref_cfg.model, broken)
    weights = load_file(broken / "model.safetensors")
    weights["lm_head.weight"][7, 3] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "store"
    with pytest.raises(PivotfuseError, match="NaN/inf logits"):
        extract(ExtractJob(**{**ref_cfg.__dict__, "model": str(broken), "out": str(out)}))
    assert (out / "manifest.json").is_file() and not list((out / "shards").glob("*.arrow"))
    (out / "shards/00000.json").write_text("{}")  # as if killed between a shard's stats and its data
    (out / "shards/00000.arrow.tmp").write_bytes(b"half a shard")
    stats = extract(ExtractJob(**{**ref_cfg.__dict__, "out": str(out)}))  # the fixed model, same --out
    assert stats == built["stores"]["llama"][1] and _shard_bytes(str(out)) == _shard_bytes(ref_cfg.out)
    assert json.loads((out / "manifest.json").read_text()) == json.loads(Path(ref_cfg.out, "manifest.json").read_text())
    # a store with a finished shard holds work: another fingerprint is still refused, the shard kept
    part = tmp_path / "part"

    def stop(shard: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(ExtractJob(**{**ref_cfg.__dict__, "out": str(part)}), on_shard=stop)
    with pytest.raises(PivotfuseError, match="different settings"):
        extract(ExtractJob(**{**ref_cfg.__dict__, "out": str(part), "top_k": 3}))
    assert (part / "shards/00000.arrow").is_file()


def test_out_inside_the_model_folder_is_refused(built: dict, capsys: pytest.CaptureFixture) -> None:
    model = built["models"]["llama"]
    before = sorted(p.name for p in model.iterdir())
    for out in (model / "store", model):
        err = _cli_error(capsys, "--model", str(model), "--data", str(built["data"]), "--out", str(out))
        assert err == (f"pivotfuse extract: error: out: {out} {'is' if out == model else 'is inside'} the input "
                       f"model folder {model}; inputs are never modified")
    assert sorted(p.name for p in model.iterdir()) == before


def test_recipe_model_names_and_files_are_told_apart(built: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"out: {tmp_path / 'run'}\nmodels:\n  pivot: {{name: p, path: {built['models']['llama']}}}\n"
                      f"  sources:\n    - {{name: q, path: {built['models']['qwen']}}}\ndata: {{fusion: {built['data']}}}\n")
    assert _cli_error(capsys, "--recipe", str(recipe), "--model", "nosuch") == (
        f"pivotfuse extract: error: {recipe}: no model named 'nosuch' in 'models' (p, q), and no folder 'nosuch'")
    config = built["models"]["llama"] / "config.json"
    message = f"pivotfuse extract: error: model: {config} is a file, not a model folder"
    assert _cli_error(capsys, "--recipe", str(recipe), "--model", str(config)) == message
    assert _cli_error(capsys, "--model", str(config), "--data", str(built["data"]), "--out", str(tmp_path / "s")) == message
    assert "give --out for its store" in _cli_error(capsys, "--recipe", str(recipe), "--model", str(built["models"]["qwen"]))

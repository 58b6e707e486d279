"""Safetensors IO of the merger and its refusals: sharded reading/writing, corrupt and
mismatching inputs (one line naming model and tensor), atomic output, resume, untouched inputs."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.errors import PivotfuseError
from merge import methods
from merge.config import MergeConfig
from merge.io import SafetensorsReader, ShardedWriter
from merge.merger import merge_models
from test_merge_fixtures import build_family, load_sd

ODD = {
    "a": torch.randn(3, 5),
    "b": torch.randn(7).to(torch.bfloat16),
    "c": torch.arange(6, dtype=torch.int64).view(2, 3),
    "d": torch.tensor(1.5, dtype=torch.float16),
    "e": torch.zeros(0, 4),
    "f": torch.tensor([True, False]),
}


def test_writer_shards_and_reader_round_trip(tmp_path):
    plan = [(n, t.dtype, tuple(t.shape)) for n, t in ODD.items()]
    w = ShardedWriter(tmp_path, plan, shard_bytes=40)
    for name in reversed(list(ODD)):  # any order: offsets are planned
        w.write(name, ODD[name])
    w.close()
    w.write_index()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ODD.values())
    loaded = {}
    for shard in set(index["weight_map"].values()):
        loaded.update(load_file(tmp_path / shard))  # the reference library reads our files
    with SafetensorsReader(tmp_path) as r:
        for name, t in ODD.items():
            assert torch.equal(loaded[name], t) and torch.equal(r.read(name), t)
            assert r.read(name, torch.float64).dtype == torch.float64


def test_reader_reads_library_files_lazily(tmp_path):
    save_file(ODD, tmp_path / "model.safetensors")
    r = SafetensorsReader(tmp_path, label="m1")
    assert set(r.names) == set(ODD) and r.infos["a"].shape == (3, 5)
    out = torch.empty(3, 5)
    assert r.read_into("a", out) is out and torch.equal(out, ODD["a"])


def _expect(match, fn):
    with pytest.raises(PivotfuseError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_corrupt_and_missing_files_are_named(tmp_path):
    save_file({"x": torch.randn(100)}, tmp_path / "model.safetensors")
    raw = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(raw[:-8])  # truncated
    _expect(r"model M: file model.safetensors is corrupt at tensor x", lambda: SafetensorsReader(tmp_path, "M"))
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    _expect(r"model M: file model.safetensors is not a valid safetensors file", lambda: SafetensorsReader(tmp_path, "M"))
    (tmp_path / "model.safetensors").unlink()
    _expect(r"model M: no \*.safetensors file", lambda: SafetensorsReader(tmp_path, "M"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "s1.safetensors"}}))
    _expect(r"model M: missing shard s1.safetensors \(holds tensor x\)", lambda: SafetensorsReader(tmp_path, "M"))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("fam"), k=2)


def _edited_copy(src, dst, edit):
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


NAME = "model.layers.1.mlp.up_proj.weight"


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.__setitem__(NAME, sd[NAME][:, :-1].contiguous()), f"tensor {NAME} has shape"),
    (lambda sd: sd.pop(NAME), f"tensor {NAME} is missing"),
    (lambda sd: sd.__setitem__("extra.weight", torch.ones(2)), "tensor extra.weight is not in base"),
    (lambda sd: sd[NAME].view(-1).__setitem__(7, float("nan")), f"tensor {NAME} contains NaN or inf"),
    (lambda sd: sd[NAME].view(-1).__setitem__(3, float("-inf")), f"tensor {NAME} contains NaN or inf"),
    (lambda sd: sd.__setitem__(NAME, sd[NAME].to(torch.int32)),
     f"tensor {NAME} is int32, base .* has float32 \\(integer vs float\\)"),
    (lambda sd: sd.__setitem__(NAME, sd[NAME] > 0), f"tensor {NAME} is bool, base .* has float32 \\(bool vs float\\)"),
])
def test_bad_models_are_refused_naming_model_and_tensor(family, tmp_path, edit, message):
    base, targets = family
    bad = _edited_copy(targets[1], tmp_path / "bad", edit)
    _expect(f"model {bad}: {message}", lambda: merge_models(
        str(base), [str(targets[0]), str(bad)], MergeConfig(method="varm"), str(tmp_path / "out"), progress=False))
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_integer_buffer_of_the_base_must_be_integer_in_every_model(family, tmp_path):
    base, targets = family
    b = _edited_copy(base, tmp_path / "b", lambda sd: sd.__setitem__("step", torch.arange(4)))
    t = _edited_copy(targets[0], tmp_path / "t", lambda sd: sd.__setitem__("step", torch.arange(4).to(torch.int32)))
    summary = merge_models(str(b), [str(t)], MergeConfig(method="linear"), str(tmp_path / "ok"), progress=False)
    assert summary["tensors"] == len(load_sd(b)) and torch.equal(load_sd(tmp_path / "ok")["step"], torch.arange(4))
    f = _edited_copy(targets[0], tmp_path / "f", lambda sd: sd.__setitem__("step", torch.arange(4.0)))
    _expect(f"model {f}: tensor step is float32, base {b} has int64 \\(float vs integer\\)", lambda: merge_models(
        str(b), [str(f)], MergeConfig(method="linear"), str(tmp_path / "o"), progress=False))


def _sharded_copy(src, dst):
    """`src` re-saved as two shards and an index (what save_pretrained writes for big models)."""
    dst.mkdir()
    sd = load_file(src / "model.safetensors")
    names = list(sd)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    for shard, part in shards.items():
        save_file({n: sd[n] for n in part}, dst / shard, metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())
    index = {"metadata": {}, "weight_map": {n: shard for shard, part in shards.items() for n in part}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst, index


@pytest.mark.parametrize("escape", ["../other/model.safetensors", "{other}/model.safetensors",
                                    "sub/../../other/model.safetensors"])
def test_index_shards_outside_the_model_folder_are_refused(family, tmp_path, escape):
    base, targets = family
    shutil.copytree(targets[1], tmp_path / "other")  # a real file there: without the check it is read
    model, index = _sharded_copy(targets[0], tmp_path / "m")
    assert torch.equal(SafetensorsReader(model).read(NAME), load_sd(targets[0])[NAME])  # sharded copy reads
    shard = escape.format(other=tmp_path / "other")
    index["weight_map"][NAME] = shard
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect(f"^model {model}: {model / 'model.safetensors.index.json'} field 'weight_map.{NAME}' names shard "
            f"'{shard}' outside the model folder$", lambda: SafetensorsReader(model))
    index["weight_map"][NAME] = ["model-00001-of-00002.safetensors"]
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect(f"field 'weight_map.{NAME}' must be a shard file name, got \\[", lambda: SafetensorsReader(model))


def test_non_finite_merge_output_is_not_published(family, tmp_path):
    """Finite inputs can still merge to inf (a float16 output overflows at 65504): nothing is published."""
    base, targets = family
    big = _edited_copy(targets[1], tmp_path / "big", lambda sd: sd[NAME].add_(3e5))  # finite in float32
    args = (str(base), [str(targets[0]), str(big)])
    merge_models(*args, MergeConfig(method="linear"), str(tmp_path / "f32"), progress=False)  # float32 holds it
    out = tmp_path / "out"
    _expect(f"^merged tensor {NAME} contains NaN or inf as float16: nothing is published", lambda: merge_models(
        *args, MergeConfig(method="linear", dtype="float16"), str(out), progress=False))
    assert not out.exists() and not (tmp_path / ".out.partial").exists()
    # the library entry point takes an unvalidated config: a NaN scale must not pass either
    _expect("^merged tensor .* contains NaN or inf as float32", lambda: merge_models(
        str(base), [str(t) for t in targets], MergeConfig(method="task_arithmetic", scale=float("nan")), str(out),
        progress=False))
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


@pytest.mark.parametrize("threads", [0, -3])
def test_threads_must_be_positive(family, tmp_path, threads):
    base, targets = family
    _expect(f"^threads: must be at least 1, got {threads}$", lambda: merge_models(
        str(base), [str(targets[0])], MergeConfig(method="linear"), str(tmp_path / "o"), progress=False,
        threads=threads))
    assert not (tmp_path / "o").exists()


def test_untied_target_of_a_tied_base_is_refused(tmp_path):
    base, _ = build_family(tmp_path / "a", k=1, tied=True)
    _, untied = build_family(tmp_path / "b", k=1, tied=False)
    _expect("tensor lm_head.weight is not in base .* ties it to its input embedding", lambda: merge_models(
        str(base), [str(untied[0])], MergeConfig(method="varm"), str(tmp_path / "o"), progress=False))


def test_output_folder_rules(family, tmp_path):
    base, targets = family
    args = (str(base), [str(t) for t in targets], MergeConfig(method="linear"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    _expect("already exists", lambda: merge_models(*args, str(out), progress=False))
    merge_models(*args, str(out), overwrite=True, progress=False)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    _expect("overlaps input model folder", lambda: merge_models(*args, str(targets[0]), overwrite=True,
                                                                progress=False))
    _expect("overlaps input model folder", lambda: merge_models(*args, str(base / "sub"), progress=False))
    (tmp_path / "afile").write_text("x")
    _expect("is a file", lambda: merge_models(*args, str(tmp_path / "afile"), overwrite=True, progress=False))
    _expect("weights: 1 given for 2 models", lambda: merge_models(
        args[0], args[1], MergeConfig(method="linear", weights=[1.0]), str(tmp_path / "w"), progress=False))


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_interrupted_merge_resumes_to_identical_output(family, tmp_path, monkeypatch):
    base, targets = family
    before = [_digest(p) for p in (base, *targets)]
    cfg = MergeConfig(method="ties", density=0.5, shard_size="20KB")
    args = (str(base), [str(t) for t in targets], cfg)
    merge_models(*args, str(tmp_path / "full"), progress=False)
    calls = {"n": 0}
    real = methods.METHODS["ties"]

    def flaky(*a):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setitem(methods.METHODS, "ties", flaky)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        merge_models(*args, str(out), progress=False)
    partial = tmp_path / ".out.partial"
    assert not out.exists() and partial.is_dir()
    done = len((partial / ".progress.jsonl").read_text().splitlines())
    assert done == 8
    monkeypatch.setitem(methods.METHODS, "ties", real)
    summary = merge_models(*args, str(out), progress=False)
    assert summary["resumed"] == 8 and not partial.exists()
    skip = ("README.md", "pivotfuse_merge.yaml")  # they name the output folder
    same = [{k: v for k, v in _digest(p).items() if k not in skip} for p in (out, tmp_path / "full")]
    assert same[0] == same[1] and len(same[0]) > 3  # shards, index, config: byte-identical
    full, got = load_sd(tmp_path / "full"), load_sd(out)
    assert all(torch.equal(full[n], got[n]) for n in full)
    assert [_digest(p) for p in (base, *targets)] == before  # inputs untouched throughout


def test_changed_options_do_not_resume(family, tmp_path, monkeypatch):
    base, targets = family
    real = methods.METHODS["linear"]
    calls = {"n": 0}

    def flaky(*a):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setitem(methods.METHODS, "linear", flaky)
    with pytest.raises(KeyboardInterrupt):
        merge_models(str(base), [str(t) for t in targets], MergeConfig(method="linear"), str(tmp_path / "o"),
                     progress=False)
    monkeypatch.setitem(methods.METHODS, "linear", real)
    s = merge_models(str(base), [str(t) for t in targets], MergeConfig(method="linear", weights=[1.0, 3.0]),
                     str(tmp_path / "o"), progress=False)
    assert s["resumed"] == 0

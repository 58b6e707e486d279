"""State files read back (store manifests and shard statistics, vocabulary maps, merge state and
progress log, steps.json, alignment checkpoints): a damaged one is one line naming the file and the
field, never a traceback (the other read-backs: `test_bad_inputs_readback.py`)."""

from __future__ import annotations

import json

import pytest

from cli import main
from core.errors import PivotfuseError
from test_bad_inputs_readback import _chat, cli_error, write_jsonl


# --- 3. store manifests, vocabulary maps, merge state, steps.json, alignment checkpoints --------------

def _manifest(**change) -> dict:
    m = {"format": "pivotfuse-logit-store", "version": 1, "fingerprint": {"model": "x"}, "top_k": 10, "n_rows": 4,
         "shard_size": 2, "n_shards": 2, "dtypes": {"ids": "uint16", "spans": "uint16"}, "complete": False}
    return {**m, **change}


@pytest.mark.parametrize("data, message", [
    (json.dumps(_manifest(model="caf\udce9"), ensure_ascii=False).encode("utf-8", "surrogateescape"),
     ":1: not UTF-8 text (byte 0xe9"),
    (b"[1, 2]", ": expected a store manifest (JSON object) at the top level, got list"),
    (json.dumps(_manifest(top_k="10")).encode(), ": 'top_k' must be a positive integer, got '10'"),
    (json.dumps(_manifest(n_rows=-1)).encode(), ": 'n_rows' must be a non-negative integer, got -1"),
    (json.dumps(_manifest(fingerprint=["x"])).encode(), ": 'fingerprint' must be a mapping, got ['x']"),
    (json.dumps(_manifest(dtypes={"ids": "int8", "spans": "uint16"})).encode(),
     ": 'dtypes.ids' must be 'uint16' or 'int32', got 'int8'"),
    (json.dumps(_manifest(complete="yes")).encode(), ": 'complete' must be true or false, got 'yes'"),
    (json.dumps(_manifest(complete=True)).encode(), ": missing field 'stats'"),
    (json.dumps(_manifest(complete=True, stats={"rows": 4})).encode(), ": missing field 'stats.stored'"),
])
def test_bad_store_manifest_is_refused(tmp_path, data, message):
    from fuse.extract.store import LogitStore

    (tmp_path / "manifest.json").write_bytes(data)
    with pytest.raises(PivotfuseError) as e:
        LogitStore(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'manifest.json'}{message}")


def test_bad_store_manifest_through_extract(world, tmp_path, capsys):
    data = write_jsonl(tmp_path / "c.jsonl", [_chat("arith", "4.")])
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps(_manifest(shard_size=0)))
    assert cli_error(capsys, "extract", "--model", str(world / "models" / "pivot"), "--data", str(data),
                     "--out", str(store)) == f"{store / 'manifest.json'}: 'shard_size' must be a positive integer, got 0"


def test_bad_shard_statistics_are_refused(tmp_path):
    from fuse.extract.store import StoreWriter

    writer = StoreWriter.open(tmp_path, {"model": "x"}, top_k=2, n_rows=1, shard_size=1,
                              dtypes={"ids": "uint16", "spans": "uint16"}, info={}, is_main=True)
    writer.shard_path(0).write_bytes(b"")  # the shard is "there"; its statistics are damaged
    writer.shard_path(0).with_suffix(".json").write_text('{"rows": "1"}')
    with pytest.raises(PivotfuseError, match=r"shards/00000.json: 'rows' must be a number, got '1'$"):
        writer.finalize()


def test_bad_vocab_map_is_refused(tmp_path):
    from fuse.align.vocab import VocabMap

    good = {"format": "pivotfuse-vocab-map", "version": 1, "fingerprint": "f", "pivot": {"vocab_size": 3},
            "source": {}, "stats": {}, "map": [0, -1], "how": "x-", "evidence": []}
    path = tmp_path / "map.json"
    cases = [
        (json.dumps({**good, "fingerprint": "caf\udce9"}, ensure_ascii=False).encode("utf-8", "surrogateescape"),
         ":1: not UTF-8 text (byte 0xe9 at column"),
        (b"[]", ": expected a vocabulary map (JSON object) at the top level, got list"),
        (json.dumps({**good, "pivot": [3]}).encode(), ": 'pivot' must be a mapping, got [3]"),
        (json.dumps({**good, "stats": "none"}).encode(), ": 'stats' must be a mapping, got 'none'"),
        (json.dumps({**good, "evidence": [[1, 0]]}).encode(),
         ": 'evidence' must be a list of [source id, pivot id, count] integer triples, got [[1, 0]]"),
        (json.dumps({**good, "fingerprint": 7}).encode(), ": 'fingerprint' must be a string, got 7"),
        (json.dumps({**good, "map": [0, True]}).encode(), ": 'map' must be a list of integers"),
    ]
    for data, message in cases:
        path.write_bytes(data)
        with pytest.raises(PivotfuseError) as e:
            VocabMap.load(path)
        assert str(e.value).startswith(f"{path}{message}"), (message, str(e.value))
    path.write_text(json.dumps(good))
    assert VocabMap.load(path).mapping.tolist() == [0, -1]


@pytest.fixture
def interrupted_merge(tmp_path, monkeypatch, capsys):
    """A ties merge stopped after 4 tensors: (argv, partial folder)."""
    from merge import methods
    from test_merge_fixtures import build_family

    base, targets = build_family(tmp_path / "models", k=2)
    argv = ["merge", "--base", str(base), "--models", *map(str, targets), "--method", "ties", "--density", "0.5",
            "--out", str(tmp_path / "out"), "--quiet"]
    real, calls = methods.METHODS["ties"], {"n": 0}

    def flaky(*a):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setitem(methods.METHODS, "ties", flaky)
    assert main(argv) == 130
    monkeypatch.setitem(methods.METHODS, "ties", real)
    partial = tmp_path / ".out.partial"
    assert len((partial / ".progress.jsonl").read_text().splitlines()) == 4
    capsys.readouterr()
    return argv, partial


def test_damaged_merge_state_is_refused(interrupted_merge, capsys):
    argv, partial = interrupted_merge
    state, log = partial / ".pivotfuse-merge.json", partial / ".progress.jsonl"
    good_state, good_log = state.read_bytes(), log.read_bytes()
    lines = good_log.splitlines(keepends=True)
    hint = f"; delete {partial} to start the merge over"
    cases = [
        (state, b'{"fingerprint": "\xff"}', f"{state}:1: not UTF-8 text (byte 0xff at column 18){hint}"),
        (state, b'["fingerprint"]', f"{state}: expected a merge state (JSON object) at the top level, got list{hint}"),
        (state, b'{"fingerprint": 3}', f"{state}: 'fingerprint' must be a string, got 3{hint}"),
        (log, lines[0] + b'{"name": 5}\n' + lines[2], f"{log}:2: 'name' must be a string, got 5{hint}"),
        (log, lines[0] + lines[1].replace(b"]", b', "x"]', 1), f"{log}:2: 'weights' must be a list of numbers"),
        (log, lines[0] + b'{"name": "\xfe"}\n' + lines[2], f"{log}:2: not UTF-8 text (byte 0xfe at column 11){hint}"),
        (log, lines[0] + b"[]\n", f"{log}:2: expected a JSON object, got list{hint}"),
        (log, b'{"name": \n' + lines[1], f"{log}:1: invalid JSON (Expecting value){hint}"),
    ]
    for file, data, message in cases:
        state.write_bytes(good_state)
        log.write_bytes(good_log)
        file.write_bytes(data)
        assert cli_error(capsys, *argv).startswith(message), message
        assert file.read_bytes() == data  # left for the user to look at
    # a torn last line (killed mid-write) is redone, and the finished merge equals an uninterrupted one
    state.write_bytes(good_state)
    log.write_bytes(good_log + b'{"name": "model.lay')
    assert main(argv) == 0 and not partial.exists()
    out = partial.parent / "out"
    assert main([*argv[:-3], "--out", str(partial.parent / "full"), "--quiet"]) == 0
    for f in ("model.safetensors", "config.json"):
        assert (out / f).read_bytes() == (partial.parent / "full" / f).read_bytes()


def test_torn_merge_log_is_cut_before_new_records(interrupted_merge, monkeypatch):
    """Two interrupted runs in a row: the second run's records must not follow the first one's torn
    line on the same line, where a third run would take them for damage."""
    from merge import methods

    argv, partial = interrupted_merge
    log = partial / ".progress.jsonl"
    log.write_bytes(log.read_bytes() + b'{"name": "mod')
    real, calls = methods.METHODS["ties"], {"n": 0}

    def flaky(*a):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setitem(methods.METHODS, "ties", flaky)
    assert main(argv) == 130
    lines = log.read_text().splitlines()
    assert all(json.loads(line)["name"] for line in lines) and len(lines) >= 6
    monkeypatch.setitem(methods.METHODS, "ties", real)
    assert main(argv) == 0 and not partial.exists()


@pytest.mark.parametrize("data, message", [
    (b'{"eval": "\x81"}', ":1: not UTF-8 text (byte 0x81 at column 11)"),
    (b'{"eval": ', ":1: invalid JSON (Expecting value)"),
    (b'["eval"]', ": expected a mapping of steps to fingerprints at the top level, got list"),
    (b'{"eval": 12}', ": step 'eval' must map to a fingerprint string, got 12; delete the file to redo every step"),
])
def test_bad_steps_file_is_refused(tmp_path, capsys, data, message):
    for name in ("p", "s"):
        (tmp_path / name).mkdir()
    write_jsonl(tmp_path / "f.jsonl", [_chat("arith", "4.")])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"out: {tmp_path / 'run'}\nmodels:\n  pivot: {{name: p, path: {tmp_path / 'p'}}}\n"
                      f"  sources: [{{name: s, path: {tmp_path / 's'}}}]\ndata: {{fusion: {tmp_path / 'f.jsonl'}}}\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "steps.json").write_bytes(data)
    assert cli_error(capsys, "run", str(recipe)) == f"{tmp_path / 'run' / 'steps.json'}{message}"


def test_damaged_alignment_checkpoint_is_refused(tokenizer_dirs, tmp_path, monkeypatch, capsys):
    import fuse.align.chat as chat_align
    from test_align_cli import write_chats
    from test_align_vocab import CHATML, INST

    (tmp_path / "chatml.jinja").write_text(CHATML)
    (tmp_path / "inst.jinja").write_text(INST)
    llama2 = str(tokenizer_dirs["llama2"])
    out = tmp_path / "m.json"
    argv = ["align", "--pivot", llama2, "--source", llama2, "--pivot-chat-template", str(tmp_path / "chatml.jinja"),
            "--source-chat-template", str(tmp_path / "inst.jinja"), "--data", str(write_chats(tmp_path / "c.jsonl", 6)),
            "--checkpoint-every", "2", "--workers", "1", "--out", str(out)]  # the interruption is injected here, in one process
    real, calls = chat_align.align_chat, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(chat_align, "align_chat", flaky)
    assert main(argv) == 130
    monkeypatch.setattr(chat_align, "align_chat", real)
    partial = tmp_path / "m.json.partial"
    good = json.loads(partial.read_text())
    assert good["done"] == 2
    where = f"{partial} (delete it to align from the start)"
    cases = [
        (b'{"fingerprint": "\xff"}', f"{partial}:1: not UTF-8 text (byte 0xff at column 18)"),
        (b"[]", f"{partial}: expected an alignment checkpoint (JSON object) at the top level, got list"),
        (json.dumps({**good, "done": 99}).encode(), f"{where}: 'done' must be 0..6, got 99"),
        (json.dumps({**good, "skipped": "0"}).encode(), f"{where}: 'skipped' must be 0..2, got '0'"),
        (json.dumps({**good, "coverage": []}).encode(), f"{where}: 'coverage' must be a mapping, got []"),
        (json.dumps({**good, "builder": {**good["builder"], "counts": {"x": {}}}}).encode(),
         f"{where}: damaged 'builder' or 'coverage' counts (ValueError: invalid literal for int()"),
    ]
    for data, message in cases:
        partial.write_bytes(data)
        assert cli_error(capsys, *argv).startswith(message), message
    partial.write_text(json.dumps(good))
    assert main(argv) == 0 and out.is_file() and not partial.exists()

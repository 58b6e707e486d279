"""Extraction with host work beside the forward pass (`ExtractJob.overlap`, `fuse/extract/overlap.py`):
the same store byte for byte as the serial loop, on the demo world's models; background errors
raised in the caller naming the shard, the shards before them on disk and the run resumable;
`on_shard` after each shard is on disk, in shard order; the look-ahead and the writes bounded."""

from __future__ import annotations

import json
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

import fuse.extract.extract as fx
from core.errors import PivotfuseError
from fuse.extract.config import ExtractJob
from fuse.extract.extract import extract
from fuse.extract.overlap import Behind, ahead
from fuse.extract.store import StoreWriter

N_CONVS, SHARD = 12, 4  # three shards of two batches: every shard has a shard before and after it


def _files(out: str | Path) -> dict[str, bytes]:
    """Every file of a store: the shards, their statistics and the manifest."""
    root = Path(out)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few fusion conversations of the demo world, every domain."""
    lines = (world / "data/fusion.jsonl").read_text().splitlines()
    data = tmp_path_factory.mktemp("overlap") / "fusion.jsonl"
    data.write_text("\n".join(lines[:: max(1, len(lines) // N_CONVS)][:N_CONVS]) + "\n")
    return data


def _job(world: Path, corpus: Path, out: Path, name: str = "pivot", **kw: object) -> ExtractJob:
    return ExtractJob(model=str(world / "models" / name), data=str(corpus), out=str(out), top_k=5,
                      batch_size=2, max_length=256, shard_size=SHARD, dtype="float32", **kw)


@pytest.fixture(scope="module")
def serial(world: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The pivot's store written by the serial loop (overlap off): the reference."""
    cfg = _job(world, corpus, tmp_path_factory.mktemp("serial") / "store", overlap=False)
    return {"cfg": cfg, "stats": extract(cfg), "files": _files(cfg.out)}


@pytest.mark.parametrize("name", ["pivot", "facts"])  # trained byte-level BPE / ChatML; Llama-2 32k / [INST]
def test_overlap_writes_the_same_store_byte_for_byte(world: Path, corpus: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    threads: dict[str, set[str]] = {"prepare": set(), "write": set()}
    prepare, write = fx.prepare_shard, StoreWriter.write_shard

    def prepare_in(*args: object, **kw: object) -> object:
        threads["prepare"].add(threading.current_thread().name)
        return prepare(*args, **kw)

    def write_in(self: StoreWriter, *args: object) -> None:
        threads["write"].add(threading.current_thread().name)
        write(self, *args)

    monkeypatch.setattr(fx, "prepare_shard", prepare_in)
    monkeypatch.setattr(StoreWriter, "write_shard", write_in)
    stores = {}
    for overlap in (False, True):
        for kind in threads.values():
            kind.clear()
        cfg = _job(world, corpus, tmp_path / f"overlap-{overlap}", name, overlap=overlap)
        stores[overlap] = (extract(cfg), _files(cfg.out))
        main = {threading.main_thread().name}
        # the switch does what it says: background threads with overlap, none without
        assert (threads["prepare"] == main, threads["write"] == main) == (not overlap, not overlap), threads
    (stats_off, files_off), (stats_on, files_on) = stores[False], stores[True]
    assert sum(k.endswith(".arrow") for k in files_off) == -(-N_CONVS // SHARD) == 3
    assert stats_on == stats_off and stats_off["stored"] >= N_CONVS - 1
    assert files_on.keys() == files_off.keys() and all(files_on[k] == files_off[k] for k in files_off)
    assert json.loads(files_on["manifest.json"])["stats"] == stats_off


def test_a_writer_error_is_raised_naming_the_shard_and_the_run_resumes(
        world: Path, corpus: Path, serial: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _job(world, corpus, tmp_path / "store")
    boom = OSError(28, "No space left on device")
    write = StoreWriter.write_shard

    def full_at_1(self: StoreWriter, shard: int, *args: object) -> None:
        if shard == 1:
            time.sleep(0.2)  # fails while shard 2 is being scored, not at once
            raise boom
        write(self, shard, *args)

    monkeypatch.setattr(StoreWriter, "write_shard", full_at_1)
    done: list[int] = []
    with pytest.raises(OSError) as caught:
        extract(cfg, on_shard=done.append)
    assert caught.value is boom  # the writer's own error, not a wrapper and not a hang
    assert f"while writing shard 1 of {cfg.out} (in a background thread)" in caught.value.__notes__
    assert done == [0] and sorted(p.name for p in Path(cfg.out, "shards").glob("*.arrow")) == ["00000.arrow"]
    monkeypatch.setattr(StoreWriter, "write_shard", write)
    assert extract(cfg, on_shard=done.append) == serial["stats"]
    assert done == [0, 1, 2]  # shard 0 was not redone
    assert _files(cfg.out) == serial["files"]


def test_a_preparer_error_is_raised_naming_the_shard_and_the_run_resumes(
        world: Path, corpus: Path, serial: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _job(world, corpus, tmp_path / "store")
    prepare = fx.prepare_shard

    def broken_at_2(writer: StoreWriter, shard: int, *args: object) -> object:
        if shard == 2:
            raise UnicodeError("bad bytes in conversation 9")
        return prepare(writer, shard, *args)

    monkeypatch.setattr(fx, "prepare_shard", broken_at_2)
    done: list[int] = []
    with pytest.raises(UnicodeError, match="bad bytes in conversation 9") as caught:
        extract(cfg, on_shard=done.append)
    assert caught.value.__notes__ == [f"while preparing shard 2 of {cfg.out} (in a background thread)"]
    # shard 1 was being written when the error came: that write was finished, not cut off
    assert done == [0] and sorted(p.name for p in Path(cfg.out, "shards").glob("*.arrow")) == ["00000.arrow",
                                                                                             "00001.arrow"]
    monkeypatch.setattr(fx, "prepare_shard", prepare)
    assert extract(cfg, on_shard=done.append) == serial["stats"]
    assert done == [0, 2] and _files(cfg.out) == serial["files"]


def test_on_shard_comes_after_the_shard_is_on_disk_in_shard_order(world: Path, corpus: Path, serial: dict,
                                                                   tmp_path: Path) -> None:
    cfg = _job(world, corpus, tmp_path / "store")
    shards = Path(cfg.out, "shards")
    seen: list[tuple[int, list[str]]] = []
    extract(cfg, on_shard=lambda s: seen.append((s, sorted(p.name for p in shards.glob("*.arrow")))))
    # each shard is on disk when it is announced, and the next one is not yet: one write at a time
    assert seen == [(0, ["00000.arrow"]), (1, ["00000.arrow", "00001.arrow"]),
                    (2, ["00000.arrow", "00001.arrow", "00002.arrow"])]
    assert _files(cfg.out) == serial["files"]


def test_a_kill_in_on_shard_leaves_only_the_shards_announced(world: Path, corpus: Path, serial: dict,
                                                             tmp_path: Path) -> None:
    cfg = _job(world, corpus, tmp_path / "store")

    def killed(shard: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(cfg, on_shard=killed)
    assert sorted(p.name for p in Path(cfg.out, "shards").glob("*.arrow")) == ["00000.arrow"]
    done: list[int] = []
    extract(cfg, on_shard=done.append)
    assert done == [1, 2] and _files(cfg.out) == serial["files"]


def test_ahead_runs_at_most_depth_items_ahead_in_order() -> None:
    started: list[int] = []

    def slow_square(i: int) -> int:
        started.append(i)
        if i == 6:
            raise ValueError("six")
        return i * i

    got = []
    with closing(ahead(slow_square, range(10), 2, lambda i: f"item {i}")) as it:
        with pytest.raises(ValueError, match="six") as caught:
            for i, value in enumerate(it):
                time.sleep(0.05)  # a slow caller: an unbounded worker would run far ahead meanwhile
                assert max(started) <= i + 2, (i, started)
                got.append(value)
    assert got == [i * i for i in range(6)] and caught.value.__notes__ == ["while item 6 (in a background thread)"]
    after = list(started)
    time.sleep(0.1)
    assert started == after and after[:7] == list(range(7)) and max(after) <= 6 + 2  # stopped, and joined
    assert list(ahead(slow_square, range(4), 0, str)) == [0, 1, 4, 9]  # depth 0: in the caller


def test_behind_waits_for_its_task_when_the_caller_fails() -> None:
    log: list[str] = []

    def task(name: str) -> None:
        time.sleep(0.1)
        log.append(f"wrote {name}")

    with pytest.raises(RuntimeError, match="scoring failed"):
        with Behind(True, lambda key: log.append(f"done {key}"), str) as behind:
            behind.submit("a", task, "a")
            behind.submit("b", task, "b")  # waits for a first: one task at a time
            log.append("scoring")
            raise RuntimeError("scoring failed")
    # b was finished before the block let the error out (no thread writes after it), but not announced
    assert log == ["wrote a", "done a", "scoring", "wrote b"]


def test_overlap_option_is_checked_and_given_on_the_command_line() -> None:
    import argparse

    from commands.extract import add_arguments
    from core.config import from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = ["--model", "m", "--data", "d", "--out", "o"]
    assert from_args(ExtractJob, parser.parse_args(args), {}).overlap is True
    assert from_args(ExtractJob, parser.parse_args([*args, "--no-overlap"]), {}).overlap is False
    with pytest.raises(PivotfuseError, match="extract: overlap: must be true or false, got 'no'"):
        extract(ExtractJob(model="m", data="d", out="o", overlap="no"))  # type: ignore[arg-type]

"""The demo's rows on the v2 world, fast path against the per-position oracle (`rows_reference`):
the world's own stores and vocabulary maps (pivot ← arith, facts, strings: same tokenizer, the real
Llama-2, a Unigram), rows bytes and statistics equal with 1 and 2 processes, and the maps built with
1 and 2 processes are the same bytes (stores: tests/test_extract.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rows_reference import ref_fusion_rows

from core.chat import end_of_turn_tokens
from core.loading import load_tokenizer
from fuse.align.build import build_map
from fuse.align.config import AlignConfig
from fuse.align.surface import TokenText
from fuse.extract.config import ExtractJob
from fuse.extract.extract import extract
from fuse.extract.store import LogitStore
from fuse.targets.rows import FusionStats, build_rows, store_lookup
from fuse.targets.rows_arrow import features, rows_digest
from fuse.targets.translate import PivotProjector, SpanTranslator

K = 5
N = 96  # conversations of the fusion corpus (all four domains)
# (source, method, translate): each pairing of the demo world, each fusion method and translation
CASES = [("arith", "avgce", "span"), ("facts", "mince", "span"), ("strings", "mince_token", "vocab")]


@pytest.fixture(scope="module")
def stores(world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The world's four models extracted over the first N conversations of its fusion corpus."""
    tmp = tmp_path_factory.mktemp("world_rows")
    data = tmp / "fusion.jsonl"
    with (world / "data" / "fusion.jsonl").open() as fh:
        data.write_text("".join(line for _, line in zip(range(N), fh)))
    out = {"tmp": tmp, "data": data}
    for name in ("pivot", "arith", "facts", "strings"):
        store = tmp / "extract" / name
        extract(ExtractJob(model=str(world / "models" / name), data=str(data), out=str(store), top_k=K, batch_size=16,
                           shard_size=64, dtype="float32"))
        out[name] = LogitStore(store)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("source,method,translate", CASES)
def test_world_rows_equal_the_reference_with_one_and_two_processes(world, stores, source, method, translate):
    import datasets

    tmp, data = stores["tmp"], stores["data"]
    pivot, src = str(world / "models" / "pivot"), str(world / "models" / source)
    maps = []
    for workers in (1, 2):
        out = tmp / f"map-{source}-{workers}.json"
        maps.append(build_map(pivot, src, str(data), out, AlignConfig(workers=workers, checkpoint_every=16),
                              progress=False))
        assert maps[-1].stats["conversations"] == N
    assert (tmp / f"map-{source}-1.json").read_bytes() == (tmp / f"map-{source}-2.json").read_bytes()
    vmap = maps[0].mapping
    pt, st = (load_tokenizer(p, model=True, fast=True) for p in (pivot, src))
    eos = (end_of_turn_tokens(pt), end_of_turn_tokens(st))
    span = SpanTranslator(PivotProjector(pt), TokenText(st), eos) if translate == "span" else None
    ref_stats = FusionStats()
    ref = list(ref_fusion_rows(stores["pivot"], store_lookup(stores[source]), pt, vmap, method, K, "gold", eos,
                               ref_stats, span))
    expect = rows_digest(datasets.Dataset.from_list(ref, features=features()))
    assert len(ref) == N and ref_stats.compared == N
    files = []
    for workers in (1, 2):
        files.append(tmp / f"rows-{source}-{workers}.arrow")
        ds, stats = build_rows(stores["pivot"], stores[source], pivot, src, vmap, method=method, k=K, fallback="gold",
                               translate=translate, eos=eos, workers=workers, out=files[-1], progress=False,
                               shard_size=24)
        assert rows_digest(ds) == expect
        assert json.dumps(stats, sort_keys=True) == json.dumps(ref_stats.as_dict(), sort_keys=True)
    assert files[0].read_bytes() == files[1].read_bytes()
    assert ref_stats.paired > 0.5 * ref_stats.positions  # most of the pivot's positions met the source's

"""FuseLLM-mode training rows: one source gives the pairwise rows bit for bit; a source whose store
lacks some conversations drops out of exactly those; each teacher's contribution is counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fuse.align.surface import TokenText
from fuse.extract.store import LogitStore, StoreWriter, TeacherRecord, int_type
from fuse.targets.fusion import translate_topk
from fuse.targets.pairing import pair_positions, reply_keys
from fuse.targets.rows import FusionStats, fusion_rows, store_lookup
from fuse.targets.rows_multi import MultiFusionStats, SourceInput, fusion_rows_multi
from fuse.targets.translate import PivotProjector, SpanTranslator
from test_fuse_targets import CONVS, INST, K, L3, record, tok

CONVS3 = CONVS + [[{"role": "user", "content": "Spell cat backwards."}, {"role": "assistant", "content": "tac"}]]
EOS = ("<|eot_id|>", "</s>")
METHODS = ("mince", "avgce", "mince_token")


def write_store(path: Path, records: list[TeacherRecord], vocab: int) -> LogitStore:
    """A complete logit store of `records` as extraction writes it (one shard)."""
    longest = max(int(r.spans.max()) for r in records)
    writer = StoreWriter.open(path, {"model": path.name}, top_k=K, n_rows=len(records), shard_size=len(records),
                              dtypes={"ids": int_type(vocab - 1), "spans": int_type(longest)}, info={}, is_main=True)
    writer.write_shard(0, records, {"rows": len(records), "stored": len(records)})
    writer.finalize()
    return LogitStore(path)


@pytest.fixture(scope="module")
def setup(tokenizer_dirs, tmp_path_factory):
    pt, st = tok(tokenizer_dirs, "llama3", "<|eot_id|>"), tok(tokenizer_dirs, "llama2")
    root = tmp_path_factory.mktemp("stores")
    piv = [record(pt, L3, i, m, ce=1.0, seed=i) for i, m in enumerate(CONVS3)]
    # conversation 0: b is far better than a and the pivot; 1: b's store lacks it; 2: both worse than the pivot
    a = [record(st, INST, i, m, ce=ce, seed=10 + i) for i, (m, ce) in enumerate(zip(CONVS3, (0.6, 0.3, 6.0)))]
    b = [record(st, INST, i, m, ce=ce, seed=20 + i) for i, (m, ce) in enumerate(zip(CONVS3, (0.05, 0.1, 5.0)))
         if i != 1]
    vmap = np.arange(len(st), dtype=np.int64) % 900 + 7  # an arbitrary total map, with collisions
    vmap[5] = -1
    stores = {"pivot": write_store(root / "pivot", piv, len(pt)), "a": write_store(root / "a", a, len(st)),
              "b": write_store(root / "b", b, len(st))}
    span = SpanTranslator(PivotProjector(pt), TokenText(st), EOS)
    return {"pt": pt, "piv": piv, "a": a, "b": b, "vmap": vmap, "stores": stores, "span": span}


def same_row(got: dict, want: dict) -> bool:
    return (got["id"] == want["id"] and got["input_ids"] == want["input_ids"] and got["labels"] == want["labels"]
            and got["target_ids"].dtype == want["target_ids"].dtype
            and got["target_ids"].tobytes() == want["target_ids"].tobytes()
            and got["target_logprobs"].tobytes() == want["target_logprobs"].tobytes())


def pairwise(s: dict, method: str, fallback: str, span: bool, source: str = "a") -> list[dict]:
    lookup = store_lookup(s["stores"][source])
    return list(fusion_rows(s["stores"]["pivot"], lookup, s["pt"], s["vmap"], method, K, fallback, EOS, FusionStats(),
                            s["span"] if span else None))


def multi(s: dict, names: list[str], method: str, fallback: str, span: bool) -> tuple[list[dict], MultiFusionStats]:
    inputs = [SourceInput(n, store_lookup(s["stores"][n]), s["vmap"], EOS[1], s["span"] if span else None)
              for n in names]
    stats = MultiFusionStats(("pivot", *names))
    rows = list(fusion_rows_multi(s["stores"]["pivot"], inputs, s["pt"], method, K, fallback, EOS[0], stats))
    return rows, stats


@pytest.mark.parametrize("span", [True, False], ids=["span", "vocab"])
@pytest.mark.parametrize("fallback", ["gold", "pivot"])
@pytest.mark.parametrize("method", METHODS)
def test_one_source_gives_the_pairwise_rows_bit_for_bit(setup, method, fallback, span):
    want = pairwise(setup, method, fallback, span)
    got, stats = multi(setup, ["a"], method, fallback, span)
    assert len(got) == len(want) == 3 and all(same_row(g, w) for g, w in zip(got, want))
    ref = FusionStats()
    list(fusion_rows(setup["stores"]["pivot"], store_lookup(setup["stores"]["a"]), setup["pt"], setup["vmap"], method,
                     K, fallback, EOS, ref, setup["span"] if span else None))
    counts = stats.sources["a"]
    assert (counts.paired, counts.compared, counts.missing, stats.fallback) == (ref.paired, 3, 0, ref.fallback)
    assert stats.positions == ref.positions == sum(r.n_tokens for r in setup["piv"])


@pytest.mark.parametrize("span", [True, False], ids=["span", "vocab"])
@pytest.mark.parametrize("method", METHODS)
def test_a_source_missing_from_its_store_drops_out_of_those_conversations(setup, method, span):
    assert len(setup["stores"]["b"]) == 2 and store_lookup(setup["stores"]["b"])(1) is None
    rows, stats = multi(setup, ["a", "b"], method, "gold", span)
    only_a = pairwise(setup, method, "gold", span, "a")
    only_b = pairwise(setup, method, "gold", span, "b")
    assert same_row(rows[1], only_a[1])  # b has no record of conversation 1: a and the pivot decide alone
    assert (stats.sources["b"].missing, stats.sources["b"].compared, stats.sources["a"].missing) == (1, 2, 0)
    total = stats.as_dict()["contributions"]["total"]
    t = total["teachers"]
    assert (t["pivot"]["present_share"], t["a"]["present_share"]) == (1.0, 1.0)
    assert t["b"]["present_share"] == pytest.approx(2 / 3)
    assert total["sequences"] == 3 and total["positions"] == sum(r.n_tokens for r in setup["piv"])
    if method == "mince":
        # conversation 0: b beats a and the pivot; a and b pair with the same pivot positions (the same
        # tokenizer and template), so the target is b's wherever it is aligned and the fallback elsewhere
        assert same_row(rows[0], only_b[0]) and not same_row(rows[0], only_a[0])
        assert [t[n]["sequence_share"] for n in ("pivot", "a", "b")] == pytest.approx([1 / 3, 1 / 3, 1 / 3])
        assert sum(t[n]["position_share"] for n in t) + total["fallback_share"] == pytest.approx(1.0)
        if not span:  # the vocabulary-map target of b at its paired positions, by hand
            p_rec, b_rec = setup["piv"][0], setup["b"][0]
            pair = pair_positions(reply_keys(p_rec.text, p_rec.spans, p_rec.assistant_spans, EOS[0]),
                                  reply_keys(b_rec.text, b_rec.spans, b_rec.assistant_spans, EOS[1]))
            for j, i in enumerate(pair.tolist()):
                if i >= 0:
                    ids, _ = translate_topk(b_rec.topk_ids[[i]], b_rec.topk_logprobs[[i]].astype(np.float32),
                                            setup["vmap"])
                    assert rows[0]["target_ids"][j].tolist() == ids[0].tolist()
        # conversation 2: both sources are worse than the pivot, so its targets are the pivot's own
        assert np.array_equal(rows[2]["target_ids"], setup["piv"][2].topk_ids)
    elif method == "avgce":
        assert sum(t[n]["mean_weight"] for n in t) == pytest.approx(1.0)
        assert t["b"]["position_share"] is None and t["b"]["sequence_share"] is None
    else:
        assert sum(t[n]["position_share"] for n in t) + total["fallback_share"] == pytest.approx(1.0)


def test_no_source_is_refused(setup):
    with pytest.raises(ValueError, match="at least one source"):
        list(fusion_rows_multi(setup["stores"]["pivot"], [], setup["pt"], "mince", K, "gold", EOS[0],
                               MultiFusionStats(("pivot",))))

"""FuseLLM-mode training rows: one source gives the pairwise rows bit for bit; a source whose store
lacks some conversations drops out of exactly those; each teacher's contribution is counted; the
rows and statistics are the same over 1 and 2 processes."""

from __future__ import annotations

import functools
import json
import operator
from pathlib import Path

import numpy as np
import pytest

from fuse.align.surface import TokenText
from fuse.extract.store import LogitStore, StoreWriter, TeacherRecord, int_type
from fuse.targets.fusion import translate_topk
from fuse.targets.pairing import pair_positions, reply_keys
from fuse.targets.rows import FusionStats, fusion_rows, store_lookup
from fuse.targets.rows_arrow import features, rows_digest
from fuse.targets.rows_multi import MultiFusionStats, SourceInput, build_rows_multi, fusion_rows_multi
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


@pytest.fixture(scope="module")
def corpus(tokenizer_dirs, assets, tmp_path_factory):
    """24 MT-Bench conversations: the pivot (Llama-3) and two sources (Llama-2, Qwen3) as model
    folders and stores; each source's store skips some conversations."""
    from test_fuse_rows_fast import K as K6
    from test_fuse_rows_fast import chats, tokenizer
    from test_fuse_rows_fast import record as mt_record
    from test_fuse_rows_fast import write_store as write_store8

    from core.chat import end_of_turn_tokens
    from core.loading import load_tokenizer

    folder = tmp_path_factory.mktemp("multi-corpus")
    names = {"pivot": "llama3", "a": "llama2", "b": "qwen3"}
    toks = {}
    for role, family in names.items():  # model folders as the pipeline reads them (a tokenizer and a config)
        t = tokenizer(tokenizer_dirs[family])
        t.save_pretrained(folder / role)
        (folder / role / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": len(t)}))
        toks[role] = load_tokenizer(str(folder / role), model=True, fast=True)
    convs = chats(assets / "mt_bench", 24)
    skip = {"pivot": set(), "a": {5}, "b": {3, 11, 12}}
    stores, vmaps, eos = {}, {}, {}
    rng = np.random.default_rng(2)
    for seed, (role, t) in enumerate(toks.items()):
        recs = [mt_record(t, i, m, 100 * seed + i) for i, m in enumerate(convs) if i not in skip[role]]
        stores[role] = write_store8(folder / f"{role}_store", recs)
        eos[role] = end_of_turn_tokens(t)
        if role != "pivot":  # arbitrary, with collisions and unmapped ids; the end of turn maps to the pivot's
            vmaps[role] = rng.integers(-1, len(toks["pivot"]), len(t))
            vmaps[role][t.convert_tokens_to_ids(eos[role][0])] = toks["pivot"].convert_tokens_to_ids(eos["pivot"][0])
    return dict(folder=folder, toks=toks, stores=stores, vmaps=vmaps, eos=eos, k=K6)


def reference_multi(c: dict, method: str, translate: str, shard: int) -> tuple[str, dict]:
    """Rows digest and statistics of the one-process loop, its float sums redone by hand as sums of
    `shard`-record partial sums in corpus order (what `build_rows_multi` must give for any number of
    processes); no `merge` is used here."""
    import datasets

    pt = c["toks"]["pivot"]
    projector = PivotProjector(pt)
    inputs = [SourceInput(n, store_lookup(c["stores"][n]), c["vmaps"][n], c["eos"][n],
                          SpanTranslator(projector, TokenText(c["toks"][n]), (c["eos"]["pivot"], c["eos"][n]))
                          if translate == "span" else None) for n in ("a", "b")]
    store = c["stores"]["pivot"]
    whole = MultiFusionStats(("pivot", "a", "b"))
    rows = list(fusion_rows_multi(store, inputs, pt, method, c["k"], "gold", c["eos"]["pivot"], whole))
    parts = []
    for lo in range(0, len(store), shard):
        parts.append(MultiFusionStats(("pivot", "a", "b")))
        list(fusion_rows_multi([store[i] for i in range(lo, min(lo + shard, len(store)))], inputs, pt, method,
                               c["k"], "gold", c["eos"]["pivot"], parts[-1]))
    for n in ("a", "b"):
        for f in ("ce", "pivot_ce"):
            total = 0.0
            for p in parts:
                total += getattr(p.sources[n], f)
            setattr(whole.sources[n], f, total)
    for key, counts in whole.contributions.counts.items():
        weights = [p.contributions.counts[key]["weight"] for p in parts if key in p.contributions.counts]
        counts["weight"] = functools.reduce(operator.add, weights)
    return rows_digest(datasets.Dataset.from_list(rows, features=features())), whole.as_dict()


@pytest.mark.parametrize("method,translate", [("mince", "span"), ("avgce", "vocab"), ("mince_token", "span")])
def test_build_rows_multi_is_the_same_with_one_and_two_processes(corpus, method, translate, tmp_path):
    c = corpus
    sources = [(n, c["stores"][n], str(c["folder"] / n), c["vmaps"][n], c["eos"][n]) for n in ("a", "b")]
    expect, expect_stats = reference_multi(c, method, translate, 5)
    got = {}
    for workers in (1, 2):
        timings: dict = {}
        ds, stats = build_rows_multi(c["stores"]["pivot"], str(c["folder"] / "pivot"), sources, method=method,
                                     k=c["k"], fallback="gold", translate=translate, pivot_eos=c["eos"]["pivot"],
                                     workers=workers, out=tmp_path / f"rows{workers}.arrow", timings=timings,
                                     progress=False, shard_size=5)  # 5 shards of 24 conversations
        assert timings["workers"] == workers and timings["fuse"] > 0
        assert len(ds) == 24 and rows_digest(ds) == expect
        got[workers] = json.dumps(stats, sort_keys=True)
    assert got[1] == got[2] == json.dumps(expect_stats, sort_keys=True)
    assert (tmp_path / "rows1.arrow").read_bytes() == (tmp_path / "rows2.arrow").read_bytes()
    s = json.loads(got[2])
    assert (s["conversations"], s["sources"]["a"]["missing"], s["sources"]["b"]["missing"]) == (24, 1, 3)
    # one shard holding the whole corpus: exactly the one-process loop's statistics, floats included
    _, whole = reference_multi(c, method, translate, 24)
    _, one = build_rows_multi(c["stores"]["pivot"], str(c["folder"] / "pivot"), sources, method=method, k=c["k"],
                              fallback="gold", translate=translate, pivot_eos=c["eos"]["pivot"], workers=1,
                              progress=False, shard_size=24)
    assert json.dumps(one, sort_keys=True) == json.dumps(whole, sort_keys=True)
    # shards cut elsewhere round the float sums differently, but only in the last places
    assert one["sources"]["b"]["mean_ce_per_char"] == pytest.approx(s["sources"]["b"]["mean_ce_per_char"], rel=1e-12)


def test_statistics_of_other_teachers_do_not_merge():
    stats = MultiFusionStats(("pivot", "a"))
    with pytest.raises(ValueError, match=r"statistics of \['pivot', 'b'\] cannot merge into \['pivot', 'a'\]"):
        stats.merge(MultiFusionStats(("pivot", "b")))

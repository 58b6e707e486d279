"""The fast rows path against the per-position implementation it replaced (`rows_reference`), bit for
bit, on real tokenizers and MT-Bench conversations: pairing keys, span translation, rows, statistics;
and the rows built over 1 and 2 processes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from rows_reference import ref_fusion_rows, ref_pair_positions, ref_reply_keys, ref_scored_positions, ref_translate

from core.chat import end_of_turn_tokens, render_chat, tokenize_chat
from fuse.align.surface import TokenText
from fuse.extract.store import LogitStore, StoreWriter, TeacherRecord
from fuse.targets.pairing import key_codes, pair_codes, reply_keys
from fuse.targets.rows import FusionStats, build_rows, cached_rows, fusion_rows, scored_positions
from fuse.targets.rows_arrow import ROWS_FILE, features, rows_digest
from fuse.targets.translate import PivotProjector, SpanTranslator
from world.tokenizers import LLAMA2

K = 6
PAIRS = [("llama3", "llama2"), ("llama2", "qwen3"), ("qwen3", "gemma3")]


def chats(mt_bench: Path, n: int) -> list[list[dict]]:
    """Multi-turn chats of MT-Bench questions and GPT-4 reference answers, some with a system turn,
    some with text the tokenizers split differently (digits, code, accents, an emoji)."""
    qs = [json.loads(line) for line in (mt_bench / "question.jsonl").open()]
    ans = [json.loads(line) for line in (mt_bench / "reference_answer" / "gpt-4.jsonl").open()]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        a = ans[i % len(ans)]["choices"][0]["turns"]
        q = qs[int(rng.integers(len(qs)))]["turns"]
        msgs = [{"role": "system", "content": "Answer carefully."}] if i % 3 == 0 else []
        for t in range(1 + i % 2):
            extra = " Café 🙂 x=18.5%" if (i + t) % 4 == 1 else ""
            msgs += [{"role": "user", "content": q[t % len(q)]}, {"role": "assistant", "content": a[t % len(a)] + extra}]
        out.append(msgs)
    return out


def record(tok, index: int, msgs: list[dict], seed: int) -> TeacherRecord:
    """A record as extraction writes it, with a random but realistic top-k: the gold token first in
    most rows (missing from some), the end-of-turn token and repeated neighbours among the others."""
    r = render_chat(tok, msgs)
    tc = tokenize_chat(tok, r)
    pos = np.array([i for i, a in enumerate(tc.assistant) if a and i >= 1])
    gold = np.asarray(tc.input_ids)[pos]
    rng = np.random.default_rng(seed)
    near = (gold[:, None] + rng.integers(-3, 4, (len(pos), K - 1))) % len(tok)
    topk = np.concatenate([gold[:, None], near], axis=1)
    topk[rng.random(len(pos)) < 0.2, 0] = tok.convert_tokens_to_ids(end_of_turn_tokens(tok)[0])  # gold not in top-k
    topk[rng.random(len(pos)) < 0.1, -1] = int(tok.eos_token_id)
    lp = np.log(np.sort(rng.dirichlet(np.ones(K), len(pos)), axis=1)[:, ::-1]).astype(np.float16)
    gold_lp = np.where(topk[:, 0] == gold, lp[:, 0], np.float16(-7.0))
    return TeacherRecord(index=index, id=f"c{index}", domain=("a", "b")[index % 2], text=r.text,
                         assistant_spans=np.asarray(r.assistant_spans, np.int32), token_ids=gold.astype(np.int32),
                         spans=np.asarray([tc.offsets[i] for i in pos], np.int32), topk_ids=topk.astype(np.int32),
                         topk_logprobs=lp, gold_logprobs=gold_lp.astype(np.float16), ce=float(rng.uniform(0.5, 2)),
                         n_chars=len(r.text) // 2, n_bytes=len(r.text) // 2, seq_len=len(tc.input_ids), truncated=False)


def write_store(path: Path, records: list[TeacherRecord]) -> LogitStore:
    w = StoreWriter.open(path, {"test": 1}, top_k=K, n_rows=len(records), shard_size=8,
                         dtypes={"ids": "int32", "spans": "int32"}, info={}, is_main=True)
    for s in range(w.manifest["n_shards"]):
        w.write_shard(s, [records[i] for i in w.shard_rows(s)], {"rows": len(w.shard_rows(s))})
    w.finalize()
    return LogitStore(path)


def tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    if not tok.chat_template:
        tok.chat_template = LLAMA2
    return tok


@pytest.fixture(scope="module", params=PAIRS, ids=["->".join(p) for p in PAIRS])
def pair(request, tokenizer_dirs, assets, tmp_path_factory):
    from core.loading import load_tokenizer

    p_name, s_name = request.param
    folder = tmp_path_factory.mktemp(f"{p_name}-{s_name}")
    for name in (p_name, s_name):  # model folders as the pipeline reads them (a tokenizer and a config)
        tok = tokenizer(tokenizer_dirs[name])
        tok.save_pretrained(folder / name)
        (folder / name / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": len(tok)}))
    pt, st = (load_tokenizer(str(folder / name), model=True, fast=True) for name in (p_name, s_name))
    convs = chats(assets / "mt_bench", 24)
    piv = [record(pt, i, m, i) for i, m in enumerate(convs)]
    src = [record(st, i, m, 100 + i) for i, m in enumerate(convs) if i != 5]  # the source skipped one
    rng = np.random.default_rng(1)
    vmap = rng.integers(-1, len(pt), len(st))  # arbitrary, with collisions and unmapped ids
    vmap[st.convert_tokens_to_ids(end_of_turn_tokens(st)[0])] = pt.convert_tokens_to_ids(end_of_turn_tokens(pt)[0])
    eos = (end_of_turn_tokens(pt), end_of_turn_tokens(st))
    stores = write_store(folder / "p_store", piv), write_store(folder / "s_store", src)
    return dict(pt=pt, st=st, piv=piv, src={r.index: r for r in src}, vmap=vmap, eos=eos, folder=folder,
                names=(p_name, s_name), stores=stores, projector=PivotProjector(pt), source_text=TokenText(st))


def test_keys_pairs_positions_and_translation_equal_the_reference(pair):
    pt, st, eos, vmap = pair["pt"], pair["st"], pair["eos"], pair["vmap"]
    fast = SpanTranslator(PivotProjector(pt), TokenText(st), eos)
    ref = SpanTranslator(pair["projector"], pair["source_text"], eos)
    translated = 0
    for p in pair["piv"]:
        s = pair["src"].get(p.index)
        enc = pt(p.text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offs = enc["input_ids"][: p.seq_len], enc["offset_mapping"][: p.seq_len]
        assert np.array_equal(scored_positions(p, ids, offs), ref_scored_positions(p, ids, offs))
        if s is None:
            continue
        kp, ks = ref_reply_keys(p.text, p.spans, p.assistant_spans, eos[0]), ref_reply_keys(s.text, s.spans, s.assistant_spans, eos[1])
        assert reply_keys(p.text, p.spans, p.assistant_spans, eos[0]) == kp
        pairs = ref_pair_positions(kp, ks)
        got = pair_codes(key_codes(p.text, p.spans, p.assistant_spans, eos[0]),
                         key_codes(s.text, s.spans, s.assistant_spans, eos[1]))
        assert np.array_equal(got, pairs)
        a_ids, a_lp = fast.translate(p, s, pairs, vmap, K)
        b_ids, b_lp = ref_translate(ref, p, s, pairs, vmap, K)
        assert a_ids.dtype == b_ids.dtype and np.array_equal(a_ids, b_ids)
        assert a_lp.dtype == b_lp.dtype and a_lp.tobytes() == b_lp.tobytes()  # bit for bit, −0.0 and −inf too
        translated += int((a_ids >= 0).any(axis=1).sum())
    assert translated > 1000


@pytest.mark.parametrize("method,translate,processes", [("mince", "span", True), ("avgce", "vocab", True),
                                                       ("mince_token", "span", False)])
def test_rows_and_stats_equal_the_reference_with_one_and_two_processes(pair, method, translate, processes, tmp_path):
    import datasets

    pt, st, eos, vmap = pair["pt"], pair["st"], pair["eos"], pair["vmap"]
    # the projector's cache is a function of the text: shared, it changes no result (and saves building it)
    span = SpanTranslator(pair["projector"], pair["source_text"], eos) if translate == "span" else None
    ref_stats = FusionStats()
    ref_rows = list(ref_fusion_rows(pair["piv"], pair["src"].get, pt, vmap, method, K, "gold", eos, ref_stats, span))
    expect = rows_digest(datasets.Dataset.from_list(ref_rows, features=features()))
    stats = FusionStats()
    span = SpanTranslator(pair["projector"], pair["source_text"], eos) if translate == "span" else None
    rows = list(fusion_rows(pair["piv"], pair["src"].get, pt, vmap, method, K, "gold", eos, stats, span))
    assert rows_digest(datasets.Dataset.from_list(rows, features=features())) == expect
    assert json.dumps(stats.as_dict(), sort_keys=True) == json.dumps(ref_stats.as_dict(), sort_keys=True)
    assert stats.source_missing == 1 and stats.compared == 23
    if not processes:
        return
    p_store, s_store = pair["stores"]
    folder, (p_name, s_name) = pair["folder"], pair["names"]
    for workers in (1, 2):
        timings: dict = {}
        ds, got = build_rows(p_store, s_store, str(folder / p_name), str(folder / s_name), vmap, method=method, k=K,
                             fallback="gold", translate=translate, eos=eos, workers=workers,
                             out=tmp_path / f"rows{workers}.arrow", timings=timings, progress=False, shard_size=5)
        assert timings["workers"] == workers and timings["fuse"] > 0
        assert rows_digest(ds) == expect and len(ds) == len(ref_rows)
        assert json.dumps(got, sort_keys=True) == json.dumps(ref_stats.as_dict(), sort_keys=True)
    assert (tmp_path / "rows1.arrow").read_bytes() == (tmp_path / "rows2.arrow").read_bytes()


def test_cached_rows_streams_and_reloads(pair, tmp_path):
    p_store, _ = pair["stores"]
    folder, (p_name, _) = pair["folder"], pair["names"]
    built = []

    def build(out: Path):
        built.append(out)
        return build_rows(p_store, None, str(folder / p_name), None, None, method="mince", k=K, fallback="gold",
                          translate="span", eos=pair["eos"], out=out / ROWS_FILE, progress=False)

    ds, stats = cached_rows(tmp_path, "fp1", build, writes=True)
    assert (tmp_path / "rows" / ROWS_FILE).is_file() and not (tmp_path / "rows.tmp").exists()
    again, stats2 = cached_rows(tmp_path, "fp1", build, writes=True)
    assert len(built) == 1 and stats2 == stats and rows_digest(again) == rows_digest(ds)
    row = again[0]
    assert row["target_ids"] == pair["piv"][0].topk_ids.tolist() and len(again) == len(pair["piv"])
    assert all(math.isfinite(x) for x in row["target_logprobs"][0])

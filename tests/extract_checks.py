"""Checks of the extraction tests (`test_extract.py`): stored distributions against a full float32
log_softmax, scored spans against the assistant text found by string search, and store against
store (bit for bit where the kernels agree, else up to float rounding)."""

from __future__ import annotations

import functools
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from fuse.extract.store import LogitStore, TeacherRecord


@functools.cache
def _load(model_dir: Path) -> tuple:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoTokenizer.from_pretrained(str(model_dir)),
            AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval())


def _reference(model_dir: Path, text: str, max_len: int) -> tuple[list[int], list[tuple[int, int]], torch.Tensor]:
    """Token ids, offsets and the full float32 log_softmax of one unpadded sequence."""
    tok, model = _load(model_dir)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_len]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return ids, [tuple(o) for o in enc["offset_mapping"][:max_len]], torch.log_softmax(logits, dim=-1)


def check_distributions(store: LogitStore, model_dir: Path, max_len: int) -> None:
    """Stored top-k / gold log-probs / CE against a full log_softmax of the model's own logits."""
    k = store.k
    for rec in store:
        ids, offsets, lp = _reference(model_dir, rec.text, max_len)
        # the position of each stored token in the plain tokenisation (same id and same span, in order)
        pos, j = [], 0
        for t in range(1, len(ids)):
            if j < rec.n_tokens and ids[t] == rec.token_ids[j] and offsets[t] == tuple(rec.spans[j]):
                pos.append(t)
                j += 1
        assert j == rec.n_tokens, rec.id
        rows = lp[torch.tensor(pos) - 1]  # (n, V) the distributions that predict the stored tokens
        gold = rows.gather(1, torch.tensor(rec.token_ids, dtype=torch.long)[:, None])[:, 0].numpy()
        np.testing.assert_allclose(rec.gold_logprobs.astype(np.float32), gold, rtol=1e-3, atol=1e-3)
        ref_vals = rows.topk(k + 1, dim=-1).values.numpy()  # (n, k+1)
        np.testing.assert_allclose(rec.topk_logprobs.astype(np.float32), ref_vals[:, :k], rtol=1e-3, atol=1e-3)
        at_ids = rows.gather(1, torch.tensor(rec.topk_ids, dtype=torch.long)).numpy()
        np.testing.assert_allclose(rec.topk_logprobs.astype(np.float32), at_ids, rtol=1e-3, atol=1e-3)
        assert (at_ids[:, -1] >= ref_vals[:, k] - 1e-5).all()  # nothing outside the stored k is more likely
        assert rec.topk_ids.dtype == np.int32 and rec.topk_logprobs.dtype == np.float16
        # the sequence CE is the mean of the gold log-probs (float32), and the stored fp16 ones sum to it
        assert rec.ce == pytest.approx(-gold.astype(np.float64).mean(), rel=1e-5, abs=1e-4)  # batch vs alone
        assert -rec.gold_logprobs.astype(np.float64).sum() == pytest.approx(rec.ce * rec.n_tokens, rel=2e-3, abs=1e-2)


def check_spans(store: LogitStore, rows: dict[str, dict], model_dir: Path, max_len: int) -> None:
    """Scored tokens cover exactly the assistant replies (+ end-of-turn), found here by string search."""
    tok, _ = _load(model_dir)
    for rec in store:
        text = rec.text
        expected, pos = set(), 0
        for m in rows[rec.id]["messages"]:
            start = text.find(m["content"].strip(), pos)
            if m["role"] != "assistant":
                pos = max(pos, start)
                continue
            end = start + len(m["content"].strip())
            end += len(tok.eos_token) + (text[end] == " ") if text[end:].lstrip(" ").startswith(tok.eos_token) else 0
            expected |= {i for i in range(start, end) if not text[i].isspace()}
            pos = end
        if rec.truncated:  # nothing past the last token fed to the model
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            expected = {i for i in expected if i < enc["offset_mapping"][max_len - 1][1]}
        scored = {i for a, b in rec.spans for i in range(a, b) if not text[i].isspace()}
        assert scored == expected, rec.id
        for tid, (a, b) in zip(rec.token_ids.tolist(), rec.spans):
            piece = tok.decode([tid])
            if "\ufffd" not in piece:  # partial UTF-8 bytes decode to U+FFFD
                assert piece.strip() == text[a:b].strip(), (rec.id, tid)
        # characters for CE per character: exactly the reply texts, whatever the tokenizer and template
        if not rec.truncated:
            plain = "".join(m["content"].strip() for m in rows[rec.id]["messages"] if m["role"] == "assistant")
            assert (rec.n_chars, rec.n_bytes) == (len(plain), len(plain.encode())), rec.id


# How far one float32 log-prob may move when other kernels compute it (another thread count,
# another CPU). Reordering a float32 sum of n positive terms moves it by about sqrt(n) * u relative
# (u = 2^-24; the rounding errors add like a random walk), so log sum_V exp(x) over a 32k
# vocabulary moves by about sqrt(32000) * 6e-8 = 1e-5 nats; the logits' own dot products add the
# same order again. LP_ATOL is 10x that. LP_RTOL (about 170 u) covers x - lse at large |x|.
# Measured on this AVX-512/MKL machine: 1 vs 2 threads move the float32 log-probs of this file's models by at most
# 3.4e-6 nats (4.9e-7 relative), those of the demo world's models not at all.
LP_ATOL, LP_RTOL = 1e-4, 1e-5


def fp16_tol(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Largest honest |a - b| of two stored fp16 log-probs: the float32 values differ by at most
    LP_ATOL + LP_RTOL |v|, and each rounding to fp16 adds at most half an fp16 ulp."""
    v = np.maximum(np.abs(a.astype(np.float64)), np.abs(b.astype(np.float64)))
    return LP_ATOL + LP_RTOL * v + np.spacing(v.astype(np.float16)).astype(np.float64)


def _close16(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.float64) - b.astype(np.float64)) <= fp16_tol(a, b)


def assert_records_match(a: TeacherRecord, b: TeacherRecord) -> int:
    """`a` and `b` score the same conversation with kernels that round differently: every integer and
    string field is equal, log-probs agree within `_fp16_tol`, CE within its float32 error, and the
    top-k ids differ only where candidates tie within rounding. Returns the top-k positions whose ids differ."""
    for name in ("index", "id", "domain", "text", "n_chars", "n_bytes", "seq_len", "truncated"):
        assert getattr(a, name) == getattr(b, name), (a.id, name)
    for name in ("assistant_spans", "token_ids", "spans"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), (a.id, name)
    assert _close16(a.gold_logprobs, b.gold_logprobs).all(), (a.id, "gold_logprobs")
    # ce = mean(-lp) of float32 log-probs, every -lp >= 0: it moves by at most the mean of their errors
    assert abs(a.ce - b.ce) <= LP_ATOL + LP_RTOL * max(a.ce, b.ce), (a.id, "ce", a.ce, b.ce)
    va, vb = a.topk_logprobs, b.topk_logprobs  # (n, k) each row sorted, best first
    assert _close16(va, vb).all(), (a.id, "topk_logprobs")  # the k best values, whichever ids hold them
    for r in np.flatnonzero((a.topk_ids != b.topk_ids).any(-1)):
        kept_a, kept_b = dict(zip(a.topk_ids[r].tolist(), va[r])), dict(zip(b.topk_ids[r].tolist(), vb[r]))
        for tid in kept_a.keys() | kept_b.keys():
            if tid in kept_a and tid in kept_b:  # a moved rank: it keeps its value, so it tied with its neighbours
                assert _close16(kept_a[tid], kept_b[tid]), (a.id, r, tid)
            else:  # kept by one side only: it tied with the other side's k-th
                mine, cut = (kept_a[tid], vb[r, -1]) if tid in kept_a else (kept_b[tid], va[r, -1])
                assert _close16(mine, cut), (a.id, r, tid, "dropped without a tie")
    return int((a.topk_ids != b.topk_ids).sum())


def assert_stores_match(one: Path | str, two: Path | str) -> None:
    """Two stores of the same model and corpus made with different kernel rounding: the manifests
    and shard statistics are equal but for the float nll, and every record matches (see above)."""
    a, b = LogitStore(one), LogitStore(two)
    ma, mb = (json.loads(Path(p, "manifest.json").read_text()) for p in (one, two))
    na, nb = ma["stats"].pop("nll"), mb["stats"].pop("nll")
    assert ma == mb
    # nll = sum of n_tokens * ce: it moves by at most the sum of the CE bounds
    assert abs(na - nb) <= LP_ATOL * ma["stats"]["scored_tokens"] + LP_RTOL * max(na, nb), (na, nb)
    for s in range(a.manifest["n_shards"]):
        sa, sb = (json.loads(Path(p, "shards", f"{s:05d}.json").read_text()) for p in (one, two))
        na, nb = sa.pop("nll"), sb.pop("nll")
        assert abs(na - nb) <= LP_ATOL * sa["scored_tokens"] + LP_RTOL * max(na, nb), (s, na, nb)
        assert sa == sb
    assert len(a) == len(b)
    swapped = sum(assert_records_match(x, y) for x, y in zip(a, b))
    assert swapped <= 0.01 * sum(r.topk_ids.size for r in a)  # near-ties are rare, not the rule


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)

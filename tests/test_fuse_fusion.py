"""Fusion functions against plain-Python references: translation, MinCE, AvgCE, per-token MinCE."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fuse.targets.fusion import (TeacherView, avgce, ce_per_char, fuse_sequence, merge_topk, mince, mince_token,
                         translate_topk)


def naive_translate(ids, lps, vmap, k):
    """Row by row with a dict: add the probabilities of source ids that map to one pivot id."""
    out_ids, out_lp = [], []
    for row_ids, row_lp in zip(ids, lps):
        mass: dict[int, float] = {}
        for i, lp in zip(row_ids, row_lp):
            if i < 0 or not math.isfinite(lp) or vmap[i] < 0:
                continue
            mass[int(vmap[i])] = mass.get(int(vmap[i]), 0.0) + math.exp(lp)
        best = sorted(mass.items(), key=lambda kv: -kv[1])[:k]
        out_ids.append([i for i, _ in best] + [-1] * (k - len(best)))
        out_lp.append([math.log(p) for _, p in best] + [-math.inf] * (k - len(best)))
    return np.array(out_ids), np.array(out_lp)


def random_topk(rng, n, k, V):
    ids = np.stack([rng.choice(V, size=k, replace=False) for _ in range(n)]).astype(np.int32)
    logits = rng.normal(size=(n, V)) * 2
    lse = np.log(np.exp(logits).sum(1, keepdims=True))
    lp = np.take_along_axis(logits - lse, ids, 1)
    order = np.argsort(-lp, 1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(lp, order, 1).astype(np.float32)


def test_translate_matches_naive_with_duplicates_unmapped_and_padding():
    rng = np.random.default_rng(0)
    ids, lp = random_topk(rng, n=40, k=6, V=30)
    ids[3, 4:] = -1
    lp[3, 4:] = -np.inf
    vmap = rng.integers(-1, 12, size=30)  # many collisions and some unmapped ids
    got_ids, got_lp = translate_topk(ids, lp, vmap)
    ref_ids, ref_lp = naive_translate(ids, lp, vmap, 6)
    assert np.array_equal(got_ids, ref_ids)
    fin = np.isfinite(ref_lp)
    assert np.array_equal(np.isfinite(got_lp), fin) and np.allclose(got_lp[fin], ref_lp[fin], atol=1e-6)


def test_translate_exact_example():
    ids = np.array([[5, 7, 2, -1]])
    lp = np.log(np.array([[0.5, 0.2, 0.1, 1.0]]))
    lp[0, 3] = -np.inf
    vmap = np.array([0, 0, 9, 0, 0, 4, 0, 4])  # 5 → 4, 7 → 4, 2 → 9
    out_ids, out_lp = translate_topk(ids, lp, vmap)
    assert out_ids.tolist() == [[4, 9, -1, -1]]
    assert np.allclose(np.exp(out_lp[0, :2]), [0.7, 0.1])


def test_merge_topk_pads_when_fewer_columns_than_k():
    ids, lp = merge_topk(np.array([[1, 1]]), np.log(np.array([[0.25, 0.25]])), k=3)
    assert ids.tolist() == [[1, -1, -1]] and np.isclose(np.exp(lp[0, 0]), 0.5) and np.all(np.isinf(lp[0, 1:]))


def view(rng, n, k, V, seq_ce, aligned=None):
    ids, lp = random_topk(rng, n, k, V)
    return TeacherView(ids=ids, logprobs=lp, token_ce=rng.uniform(0.1, 3, n).astype(np.float32), seq_ce=seq_ce,
                       aligned=np.ones(n, bool) if aligned is None else aligned)


def test_ce_per_char():
    assert ce_per_char(np.log([0.5, 0.25]), 6) == pytest.approx((math.log(2) + math.log(4)) / 6)


@pytest.mark.parametrize("fallback", ["pivot", "gold"])
def test_mince_source_wins_uses_fallback_on_unaligned(fallback):
    rng = np.random.default_rng(1)
    n, k = 8, 5
    aligned = np.array([1, 1, 0, 1, 0, 1, 1, 1], bool)
    piv, src = view(rng, n, k, 40, seq_ce=1.2), view(rng, n, k, 40, seq_ce=0.8, aligned=aligned)
    gold = rng.integers(0, 40, n)
    out = mince(piv, src, gold, k, fallback)
    assert out.winner == "source" and out.source_weight == 1.0
    for t in range(n):
        if aligned[t]:
            assert out.ids[t].tolist() == src.ids[t].tolist()
        elif fallback == "pivot":
            assert out.ids[t].tolist() == piv.ids[t].tolist()
        else:
            assert out.ids[t].tolist() == [gold[t]] + [-1] * (k - 1) and out.logprobs[t, 0] == 0.0
    assert out.fallback.tolist() == (~aligned).tolist() and out.from_source.tolist() == aligned.tolist()


def test_mince_pivot_wins_and_ties_go_to_pivot():
    rng = np.random.default_rng(2)
    piv, src = view(rng, 6, 4, 30, seq_ce=0.5), view(rng, 6, 4, 30, seq_ce=0.5)
    out = mince(piv, src, np.zeros(6, int), 4)
    assert out.winner == "pivot" and np.array_equal(out.ids, piv.ids) and not out.from_source.any()


def test_avgce_matches_naive_mixture():
    rng = np.random.default_rng(3)
    n, k = 7, 4
    aligned = np.array([1, 0, 1, 1, 1, 0, 1], bool)
    piv, src = view(rng, n, k, 12, seq_ce=0.9), view(rng, n, k, 12, seq_ce=0.4, aligned=aligned)
    out = avgce(piv, src, np.zeros(n, int), k, "pivot")
    wp, ws = math.exp(-0.9), math.exp(-0.4)
    wp, ws = wp / (wp + ws), ws / (wp + ws)
    assert out.source_weight == pytest.approx(ws)
    for t in range(n):
        mass: dict[int, float] = {}
        s_ids, s_lp = (src.ids[t], src.logprobs[t]) if aligned[t] else (piv.ids[t], piv.logprobs[t])
        for i, lp in zip(piv.ids[t], piv.logprobs[t]):
            mass[int(i)] = mass.get(int(i), 0.0) + wp * math.exp(lp)
        for i, lp in zip(s_ids, s_lp):
            mass[int(i)] = mass.get(int(i), 0.0) + ws * math.exp(lp)
        best = sorted(mass.items(), key=lambda kv: -kv[1])[:k]
        assert out.ids[t].tolist() == [i for i, _ in best]
        assert np.allclose(np.exp(out.logprobs[t]), [p for _, p in best], rtol=1e-5)


def test_mince_token_picks_lower_per_char_ce():
    rng = np.random.default_rng(4)
    n, k = 9, 3
    aligned = np.array([1, 1, 1, 0, 0, 1, 1, 1, 1], bool)
    piv, src = view(rng, n, k, 20, 1.0), view(rng, n, k, 20, 1.0, aligned=aligned)
    src.token_ce[~aligned] = np.nan  # must never be read
    out = mince_token(piv, src, np.zeros(n, int), k, "pivot")
    for t in range(n):
        use_src = aligned[t] and src.token_ce[t] < piv.token_ce[t]
        assert out.ids[t].tolist() == (src.ids[t] if use_src else piv.ids[t]).tolist()
        assert out.from_source[t] == use_src
    assert not out.fallback.any()  # unaligned positions tie with the pivot fallback: the pivot keeps them
    gold = rng.integers(0, 20, n)
    out_g = mince_token(piv, src, gold, k, "gold")
    assert all(out_g.ids[t, 0] == gold[t] for t in np.where(~aligned)[0]) and out_g.fallback.sum() == 2


@pytest.mark.parametrize("method", ["mince", "avgce", "mince_token"])
def test_all_positions_unaligned_gives_the_pivot(method):
    rng = np.random.default_rng(5)
    piv = view(rng, 5, 4, 25, seq_ce=2.0)
    src = view(rng, 5, 4, 25, seq_ce=0.1, aligned=np.zeros(5, bool))
    out = fuse_sequence(method, piv, src, np.zeros(5, int), 4, "pivot")
    assert np.array_equal(out.ids, piv.ids) and np.allclose(out.logprobs, piv.logprobs, atol=1e-6)
    assert not out.from_source.any()


def test_one_teacher_only_and_top_k_cut():
    rng = np.random.default_rng(6)
    piv = view(rng, 4, 10, 50, seq_ce=1.0)
    out = fuse_sequence("mince", piv, None, np.zeros(4, int), 3)
    assert out.ids.shape == (4, 3) and np.array_equal(out.ids, piv.ids[:, :3]) and out.winner == "pivot"


def test_mismatched_views_and_bad_names_are_refused():
    rng = np.random.default_rng(7)
    with pytest.raises(ValueError, match="positions"):
        mince(view(rng, 4, 3, 9, 1.0), view(rng, 5, 3, 9, 1.0), np.zeros(4, int), 3)
    with pytest.raises(ValueError, match="unknown fusion method"):
        fuse_sequence("maxce", view(rng, 4, 3, 9, 1.0), view(rng, 4, 3, 9, 1.0), np.zeros(4, int), 3)

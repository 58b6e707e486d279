"""FuseLLM-mode fusion: K = 1 is the pairwise result bit for bit; K = 3 against a naive dense reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fuse.targets.fusion import TeacherView, fuse_sequence
from fuse.targets.fusion_multi import MIXED, Contributions, MultiFused, as_pairwise, fuse_multi

METHODS = ("mince", "avgce", "mince_token")


def random_view(rng, n, k, V, seq_ce, aligned, ce_levels=None, pad_rows=True) -> TeacherView:
    """A teacher as `fuse.targets` makes them: sorted top-k rows, some padded at the end, NaN CE where unaligned."""
    ids = np.array([rng.choice(V, size=k, replace=False) for _ in range(n)], np.int32).reshape(n, k)
    lp = (rng.normal(size=(n, k)) * 1.5 - 1.0).astype(np.float32)
    order = np.argsort(-lp, axis=1, kind="stable")
    ids, lp = np.take_along_axis(ids, order, 1), np.take_along_axis(lp, order, 1)
    if pad_rows:
        for t in range(n):
            cut = int(rng.integers(1, k + 1)) if rng.random() < 0.3 else k
            ids[t, cut:], lp[t, cut:] = -1, -np.inf
    ce = (rng.choice(ce_levels, n) if ce_levels is not None else rng.uniform(0.05, 3.0, n)).astype(np.float32)
    ce = np.where(aligned, ce, np.nan).astype(np.float32)
    return TeacherView(ids=ids, logprobs=lp, token_ce=ce, seq_ce=float(seq_ce), aligned=np.asarray(aligned, bool))


def random_case(rng, K, V=12):
    """Pivot, K sources (some None), gold ids, target k: ties in sequence and token CE are common."""
    n = int(rng.integers(0, 10))
    levels = np.array([0.5, 1.0, 1.5], np.float32) if rng.random() < 0.5 else None
    seq = lambda: float(rng.choice([0.6, 0.8, 1.0])) if rng.random() < 0.5 else float(rng.uniform(0.3, 1.5))
    pivot = random_view(rng, n, int(rng.integers(1, 7)), V, seq(), np.ones(n, bool), levels, pad_rows=False)
    sources = []
    for _ in range(K):
        if rng.random() < 0.15:
            sources.append(None)
            continue
        mode = rng.random()
        aligned = np.ones(n, bool) if mode < 0.2 else np.zeros(n, bool) if mode < 0.3 else rng.random(n) < 0.7
        sources.append(random_view(rng, n, int(rng.integers(1, 7)), V, seq(), aligned, levels))
    return pivot, sources, rng.integers(0, V, n), int(rng.integers(1, 8))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("fallback", ["gold", "pivot"])
@pytest.mark.parametrize("method", METHODS)
def test_one_source_is_the_pairwise_result_bit_for_bit(method, fallback):
    rng = np.random.default_rng(11)
    seen = set()
    for _ in range(300):
        pivot, (source,), gold, k = random_case(rng, K=1)
        want = fuse_sequence(method, pivot, source, gold, k, fallback)
        got = as_pairwise(fuse_multi(method, pivot, [source], gold, k, fallback))
        assert same_bits(got.ids, want.ids) and same_bits(got.logprobs, want.logprobs)
        assert same_bits(got.from_source, want.from_source) and same_bits(got.fallback, want.fallback)
        assert got.winner == want.winner and got.source_weight == want.source_weight
        seen.add((want.winner, bool(want.fallback.any())))
    assert {w for w, _ in seen} >= ({"pivot", "source"} if method == "mince" else {"pivot", "mixed"})
    assert any(f for _, f in seen) or (method == "mince_token" and fallback == "pivot")  # that one never falls back


# ---- the naive dense reference: (n, V) float64 probabilities, one loop per position ----

def dense(view: TeacherView, V: int) -> np.ndarray:
    out = np.zeros((view.n, V))
    for t in range(view.n):
        for i, lp in zip(view.ids[t], view.logprobs[t]):
            if i >= 0:
                out[t, i] += math.exp(float(lp))
    return out


def naive(method, pivot, sources, gold, fallback, V):
    """(probabilities (n, V), chosen (n,) teacher or −1 = fallback or None for avgce, weights (T,))."""
    T, n = len(sources) + 1, pivot.n
    teachers = [pivot] + list(sources)
    P = [dense(v, V) if v is not None else None for v in teachers]
    one_hot = np.zeros((n, V))
    one_hot[np.arange(n), gold] = 1.0
    fb = one_hot if fallback == "gold" else P[0]
    weights = [0.0] * T
    if all(s is None for s in sources):
        weights[0] = 1.0
        return P[0], [0] * n, weights
    if method == "mince":
        ranked = sorted((teachers[i].seq_ce, i) for i in range(T) if teachers[i] is not None)
        ranked = [i for c, i in ranked if i == 0 or c < pivot.seq_ce]  # the pivot wins ties
        chosen = []
        for t in range(n):
            for i in ranked:
                if i == 0:
                    chosen.append(0 if ranked[0] == 0 else -1)
                    break
                if teachers[i].aligned[t]:
                    chosen.append(i)
                    break
        out = np.array([P[c][t] if c >= 0 else fb[t] for t, c in enumerate(chosen)]).reshape(n, V)
        weights[ranked[0]] = 1.0
        return out, chosen, weights
    if method == "avgce":
        z = sum(math.exp(-teachers[i].seq_ce) for i in range(T) if teachers[i] is not None)
        weights = [math.exp(-v.seq_ce) / z if v is not None else 0.0 for v in teachers]
        out = np.zeros((n, V))
        for t in range(n):
            for i in range(T):
                if teachers[i] is not None:
                    out[t] += weights[i] * (P[i][t] if teachers[i].aligned[t] else fb[t])
        return out, None, weights
    chosen = []
    for t in range(n):
        best, best_ce = 0, float(pivot.token_ce[t])
        for i in range(1, T):
            v = teachers[i]
            if v is not None and v.aligned[t] and float(v.token_ce[t]) < best_ce:
                best, best_ce = i, float(v.token_ce[t])
        if not any(v is not None and v.aligned[t] for v in sources):
            f_ce = 0.0 if fallback == "gold" else float(pivot.token_ce[t])
            best = -1 if f_ce < float(pivot.token_ce[t]) else best
        chosen.append(best)
    out = np.array([P[c][t] if c >= 0 else fb[t] for t, c in enumerate(chosen)]).reshape(n, V)
    weights = [sum(c == i for c in chosen) / n if n else 0.0 for i in range(T)]
    return out, chosen, weights


def assert_top_k_of(ids, lps, ref, k):
    """The row is a top-k of the dense row `ref`: right count, right values, nothing better left out."""
    m = min(k, int((ref > 0).sum()))
    assert (ids[:m] >= 0).all() and (ids[m:] == -1).all() and np.isneginf(lps[m:]).all()
    assert len(set(ids[:m].tolist())) == m and (np.diff(lps[:m]) <= 0).all()
    assert np.allclose(lps[:m], np.log(ref[ids[:m]]), rtol=0, atol=2e-6)
    if m:
        rest = np.delete(ref, ids[:m])
        assert rest.max(initial=0.0) <= ref[ids[m - 1]] * (1 + 1e-5)


@pytest.mark.parametrize("fallback", ["gold", "pivot"])
@pytest.mark.parametrize("method", METHODS)
def test_three_sources_against_the_dense_reference(method, fallback):
    rng = np.random.default_rng(23)
    V = 12
    seen_missing = seen_cascade = 0
    for _ in range(300):
        pivot, sources, gold, k = random_case(rng, K=3, V=V)
        got = fuse_multi(method, pivot, sources, gold, k, fallback)
        ref, chosen, weights = naive(method, pivot, sources, gold, fallback, V)
        for t in range(pivot.n):
            assert_top_k_of(got.ids[t], got.logprobs[t], ref[t], k)
        assert np.allclose(got.weights, weights, rtol=1e-12, atol=0)
        assert got.present.tolist() == [True] + [s is not None for s in sources]
        if chosen is not None:
            assert got.used.tolist() == [[c == i for c in chosen] for i in range(4)]
            assert got.fallback.tolist() == [c == -1 for c in chosen]
        elif any(s is not None for s in sources):
            assert got.winner == MIXED and got.used[0].all()
            assert got.fallback.tolist() == [any(s is not None and not s.aligned[t] for s in sources)
                                             for t in range(pivot.n)]
        seen_missing += any(s is None for s in sources) and any(s is not None for s in sources)
        seen_cascade += chosen is not None and got.winner > 0 and any(0 < c != got.winner for c in chosen)
    assert seen_missing > 20 and (seen_cascade > 5 or method != "mince")


def test_mince_cascades_to_the_next_better_source_then_falls_back():
    n = 4
    piv = TeacherView(np.array([[0], [0], [0], [0]], np.int32), np.zeros((n, 1), np.float32),
                      np.ones(n, np.float32), 1.0, np.ones(n, bool))
    a = TeacherView(np.full((n, 1), 1, np.int32), np.zeros((n, 1), np.float32), np.ones(n, np.float32), 0.2,
                    np.array([1, 0, 0, 0], bool))
    b = TeacherView(np.full((n, 1), 2, np.int32), np.zeros((n, 1), np.float32), np.ones(n, np.float32), 0.5,
                    np.array([1, 1, 0, 0], bool))
    worse = TeacherView(np.full((n, 1), 3, np.int32), np.zeros((n, 1), np.float32), np.ones(n, np.float32), 1.0,
                        np.ones(n, bool))  # ties with the pivot: never chosen
    out = fuse_multi("mince", piv, [worse, b, a], np.array([7, 7, 7, 7]), 1, "gold")
    assert out.ids[:, 0].tolist() == [1, 2, 7, 7] and out.winner == 3
    assert out.fallback.tolist() == [False, False, True, True] and out.weights.tolist() == [0, 0, 0, 1]
    assert fuse_multi("mince", piv, [worse, b, a], np.array([7] * 4), 1, "pivot").ids[:, 0].tolist() == [1, 2, 0, 0]


def test_bad_inputs_are_refused():
    rng = np.random.default_rng(5)
    piv = random_view(rng, 4, 3, 9, 1.0, np.ones(4, bool))
    with pytest.raises(ValueError, match="number of positions"):
        fuse_multi("mince", piv, [random_view(rng, 5, 3, 9, 1.0, np.ones(5, bool))], np.zeros(4, int), 3)
    with pytest.raises(ValueError, match="unknown fusion method"):
        fuse_multi("maxce", piv, [None], np.zeros(4, int), 3)
    with pytest.raises(ValueError, match="fallback must be"):
        fuse_multi("avgce", piv, [None], np.zeros(4, int), 3, "source")
    with pytest.raises(ValueError, match="one source"):
        as_pairwise(fuse_multi("mince", piv, [None, None], np.zeros(4, int), 3))


def result(method, used, fallback, winner, weights, present) -> MultiFused:
    used = np.array(used, bool)
    return MultiFused(np.zeros((used.shape[1], 1), np.int32), np.zeros((used.shape[1], 1), np.float32), used,
                      np.array(fallback, bool), winner, np.array(weights, float), np.array(present, bool), method)


def test_contributions_of_mince_per_domain():
    c = Contributions(("pivot", "a", "b"))
    c.add("arith", result("mince", [[0, 0, 0], [1, 1, 0], [0, 0, 0]], [0, 0, 1], 1, [0, 1, 0], [1, 1, 1]))
    c.add("arith", result("mince", [[1], [0], [0]], [0], 0, [1, 0, 0], [1, 1, 0]))
    c.add("facts", result("mince", [[0, 0], [0, 0], [0, 1]], [1, 0], 2, [0, 0, 1], [1, 1, 1]))
    d = c.as_dict()
    assert list(d["by_domain"]) == ["arith", "facts"]
    ar = d["by_domain"]["arith"]
    assert (ar["sequences"], ar["positions"], ar["fallback_share"]) == (2, 4, 0.25)
    assert ar["teachers"]["pivot"] == {"present_share": 1.0, "sequence_share": 0.5, "position_share": 0.25,
                                       "mean_weight": 0.5}
    assert ar["teachers"]["a"] == {"present_share": 1.0, "sequence_share": 0.5, "position_share": 0.5,
                                   "mean_weight": 0.5}
    assert ar["teachers"]["b"] == {"present_share": 0.5, "sequence_share": 0.0, "position_share": 0.0,
                                   "mean_weight": 0.0}
    al = d["total"]
    assert (al["sequences"], al["positions"], al["fallback_share"]) == (3, 6, 2 / 6)
    assert [al["teachers"][x]["sequence_share"] for x in ("pivot", "a", "b")] == [1 / 3, 1 / 3, 1 / 3]
    assert [al["teachers"][x]["position_share"] for x in ("pivot", "a", "b")] == [1 / 6, 2 / 6, 1 / 6]


def test_contributions_of_avgce_and_mince_token():
    c = Contributions(("pivot", "a"))
    c.add("chat", result("avgce", [[1, 1], [1, 0]], [0, 1], MIXED, [0.25, 0.75], [1, 1]))
    c.add("chat", result("avgce", [[1, 1], [0, 0]], [0, 0], 0, [1.0, 0.0], [1, 0]))
    t = c.as_dict()["by_domain"]["chat"]["teachers"]
    assert t["a"] == {"present_share": 0.5, "sequence_share": None, "position_share": None, "mean_weight": 0.375}
    assert t["pivot"]["mean_weight"] == 0.625
    assert Contributions(("pivot", "a")).as_dict() == {"by_domain": {}, "total": None}
    tok = Contributions(("pivot", "a"))
    tok.add("x", result("mince_token", [[1, 0, 0, 0], [0, 1, 1, 0]], [0, 0, 0, 1], MIXED, [0.25, 0.5], [1, 1]))
    tt = tok.as_dict()["by_domain"]["x"]
    assert tt["fallback_share"] == 0.25 and tt["teachers"]["a"]["position_share"] == 0.5
    assert tt["teachers"]["a"]["sequence_share"] is None
    with pytest.raises(ValueError, match="cannot take"):
        c.add("chat", result("mince", [[1], [0]], [0], 0, [1, 0], [1, 1]))
    with pytest.raises(ValueError, match="teachers"):
        tok.add("x", result("mince_token", [[1], [0], [0]], [0], MIXED, [1, 0, 0], [1, 1, 1]))

"""FuseLLM mode: fuse the pivot and K sources into one sparse target per conversation.

Same conventions as `fuse.targets.fusion` (pure numpy, one conversation, rows = the pivot's target
positions, ids −1 / log-probs −inf padding, CE in nats per character). Teacher 0 is the pivot,
teacher j ≥ 1 is `sources[j-1]`; a source given as None has no store row for this conversation
and drops out of it entirely (no rank, weight 0), so with every source None the target is the
pivot's own, as `fuse.targets.fusion.fuse_sequence(..., source=None)` gives.

Coverage rule: a source with no aligned distribution at a position drops out of that position.
What stands in for it follows the pairwise meaning of the fallback, "a source was wanted here but
had none", so that K = 1 is today's pairwise result bit for bit under both fallbacks:

* `mince_multi`: teachers are ranked by sequence CE; the pivot wins ties (as pairwise), sources
  tie in their given order. At each position the target is the best-ranked teacher *aligned
  there*. If that would be the pivot although a source beat it on the sequence (every better
  source is unaligned there), the fallback applies: one-hot gold ("gold") or the pivot's row
  ("pivot", which is then exactly "best aligned teacher"). Why cascade instead of jumping to the
  fallback: a second-best source aligned there was still judged better than the pivot, and gold
  was chosen pairwise only so as not to pull the student back to the pivot that lost.
* `avgce_multi`: weights softmax(−CE) over the present teachers, mixed in probability space over
  the union of ids and cut to the top k *without renormalising* (as `fuse.targets.fusion.avgce`).
  At a position where a source is unaligned its weight goes to the fallback distribution (gold or the
  pivot's row), `fill_unaligned` per source. Its weight is not spread over the other sources:
  each weight is that teacher's own per-sequence judgment, and the pairwise mixture does the
  same (K = 1 with fallback "pivot" gives the pivot w_p + w_s there, summed by logsumexp).
* `mince_token_multi`: per position, the lowest gold-token CE among the pivot and the sources
  aligned there (ties: pivot, then source order). Where no present source is aligned, the
  fallback competes with the pivot as pairwise: gold at CE 0 (so gold unless the pivot's CE is
  0), the pivot against itself (so the pivot). Once one source is aligned, gold does not compete.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from fuse.targets.fusion import FALLBACKS, FusedTargets, TeacherView, fill_unaligned, fit, gold_view, merge_topk

MIXED = -1  # `MultiFused.winner` of methods that mix teachers within a sequence


@dataclass
class MultiFused:
    """The sparse target of one conversation from T = K + 1 teachers and how it was made."""

    ids: np.ndarray  # (n, k) int32 pivot ids, −1 = padding
    logprobs: np.ndarray  # (n, k) float32, −inf at padding
    used: np.ndarray  # (T, n) bool: teacher i's own distribution entered position t's target
    fallback: np.ndarray  # (n,) bool: the fallback stood in for a source without a distribution
    winner: int  # per-sequence winner (mince; 0 = pivot), MIXED for avgce / mince_token with a source
    weights: np.ndarray  # (T,) float64: mince 0/1, avgce softmax weight, mince_token position share
    present: np.ndarray  # (T,) bool: the teacher has a store row for this conversation (pivot: always)
    method: str


def _check(pivot: TeacherView, sources: Sequence[TeacherView | None], gold_ids: np.ndarray, fallback: str) -> None:
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
    sizes = [pivot.n, len(gold_ids)] + [s.n for s in sources if s is not None]
    if len(set(sizes)) != 1:
        raise ValueError(f"views disagree on the number of positions: pivot {pivot.n}, gold {len(gold_ids)}, "
                         f"sources {[None if s is None else s.n for s in sources]}")


def _pivot_only(pivot: TeacherView, n_teachers: int, k: int, method: str) -> MultiFused:
    """No source has a row: the pivot's own targets (as `fuse_sequence` with source=None)."""
    ids, lp = fit(pivot.ids, pivot.logprobs, k)
    used = np.zeros((n_teachers, pivot.n), dtype=bool)
    used[0] = True
    weights = np.zeros(n_teachers)
    weights[0] = 1.0
    present = np.zeros(n_teachers, dtype=bool)
    present[0] = True
    return MultiFused(ids, lp, used, np.zeros(pivot.n, dtype=bool), 0, weights, present, method)


def _select(pivot: TeacherView, sources: Sequence[TeacherView | None], gold_ids: np.ndarray, k: int,
            fallback: str, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows by `chosen` (n,): teacher index, −1 = the fallback; cut or padded to k."""
    views = [pivot] + [s if s is not None else pivot for s in sources]  # a missing source is never chosen
    kk = max(v.ids.shape[1] for v in views)
    fitted = [fit(v.ids, v.logprobs, kk) for v in views]
    fitted.append(gold_view(gold_ids, kk) if fallback == "gold" else fitted[0])  # slot −1
    ids = np.stack([f[0] for f in fitted])  # (T + 1, n, kk)
    lp = np.stack([f[1] for f in fitted])
    rows = np.arange(pivot.n)
    return fit(ids[chosen, rows], lp[chosen, rows], k)


def _record(chosen: np.ndarray, n_teachers: int) -> np.ndarray:
    """(T, n) one-hot of `chosen`; fallback positions (−1) use no teacher."""
    return chosen[None, :] == np.arange(n_teachers)[:, None]


def mince_multi(pivot: TeacherView, sources: Sequence[TeacherView | None], gold_ids: np.ndarray, k: int,
                fallback: str = "gold") -> MultiFused:
    """Per sequence MinCE over the pivot and the present sources, with the cascade described above."""
    _check(pivot, sources, gold_ids, fallback)
    T = len(sources) + 1
    if all(s is None for s in sources):
        return _pivot_only(pivot, T, k, "mince")
    # only sources strictly better than the pivot can take a position (NaN CE never does, as pairwise)
    better = sorted((s.seq_ce, j) for j, s in enumerate(sources, 1) if s is not None and s.seq_ce < pivot.seq_ce)
    chosen = np.full(pivot.n, -1 if better else 0, dtype=np.int64)
    for _, j in reversed(better):  # the best-ranked aligned source is written last
        chosen[sources[j - 1].aligned] = j
    winner = better[0][1] if better else 0
    ids, lp = _select(pivot, sources, gold_ids, k, fallback, chosen)
    weights = np.zeros(T)
    weights[winner] = 1.0
    present = np.array([True] + [s is not None for s in sources])
    return MultiFused(ids, lp, _record(chosen, T), chosen < 0, winner, weights, present, "mince")


def avgce_multi(pivot: TeacherView, sources: Sequence[TeacherView | None], gold_ids: np.ndarray, k: int,
                fallback: str = "gold") -> MultiFused:
    """Per sequence weights softmax(−CE) over present teachers; mixture of their rows, top k."""
    _check(pivot, sources, gold_ids, fallback)
    T = len(sources) + 1
    if all(s is None for s in sources):
        return _pivot_only(pivot, T, k, "avgce")
    idx = [0] + [j for j, s in enumerate(sources, 1) if s is not None]
    ce = np.array([pivot.seq_ce] + [sources[j - 1].seq_ce for j in idx[1:]], dtype=np.float64)
    w = np.exp(-(ce - ce.min()))  # the same float64 steps as `fuse.targets.fusion.avgce`
    w /= w.sum()
    filled = [pivot] + [fill_unaligned(sources[j - 1], pivot, gold_ids, fallback) for j in idx[1:]]
    with np.errstate(divide="ignore"):
        lp = np.concatenate([v.logprobs + np.log(wi) for v, wi in zip(filled, w)], axis=1)  # (n, Σ k_i)
    out_ids, out_lp = merge_topk(np.concatenate([v.ids for v in filled], axis=1), lp, k)
    weights = np.zeros(T)
    weights[idx] = w
    present = np.zeros(T, dtype=bool)
    present[idx] = True
    used = np.zeros((T, pivot.n), dtype=bool)
    used[0] = True
    for j in idx[1:]:
        used[j] = sources[j - 1].aligned
    return MultiFused(out_ids, out_lp, used, ~used[idx[1:]].all(axis=0), MIXED, weights, present, "avgce")


def mince_token_multi(pivot: TeacherView, sources: Sequence[TeacherView | None], gold_ids: np.ndarray, k: int,
                      fallback: str = "gold") -> MultiFused:
    """Per position MinCE over the pivot and the sources aligned there; fallback only where none is."""
    _check(pivot, sources, gold_ids, fallback)
    T = len(sources) + 1
    if all(s is None for s in sources):
        return _pivot_only(pivot, T, k, "mince_token")
    inf = np.float32(np.inf)
    p_ce = pivot.token_ce.astype(np.float32)
    ce = np.full((T, pivot.n), inf, dtype=np.float32)  # (T, n): +inf = not a candidate
    ce[0] = p_ce
    for j, s in enumerate(sources, 1):
        if s is not None:  # NaN compares false pairwise, so it must never win: +inf
            ce[j] = np.where(s.aligned & ~np.isnan(s.token_ce), s.token_ce.astype(np.float32), inf)
    chosen = np.argmin(ce, axis=0) if pivot.n else np.zeros(0, dtype=np.int64)  # first minimum: pivot, then order
    none_aligned = ~np.any([s.aligned for s in sources if s is not None], axis=0)
    f_ce = np.zeros(pivot.n, dtype=np.float32) if fallback == "gold" else p_ce
    chosen = np.where(none_aligned & (f_ce < p_ce), -1, chosen)
    ids, lp = _select(pivot, sources, gold_ids, k, fallback, chosen)
    used = _record(chosen, T)
    weights = used.mean(axis=1) if pivot.n else np.zeros(T)
    present = np.array([True] + [s is not None for s in sources])
    return MultiFused(ids, lp, used, chosen < 0, MIXED, weights, present, "mince_token")


METHODS_MULTI: dict[str, Callable[..., MultiFused]] = {
    "mince": mince_multi, "avgce": avgce_multi, "mince_token": mince_token_multi}


def fuse_multi(method: str, pivot: TeacherView, sources: Sequence[TeacherView | None], gold_ids: np.ndarray,
               k: int, fallback: str = "gold") -> MultiFused:
    """Dispatch by name (the names of `fuse.targets.fusion.METHODS`)."""
    if method not in METHODS_MULTI:
        raise ValueError(f"unknown fusion method {method!r} (choose from {', '.join(METHODS_MULTI)})")
    return METHODS_MULTI[method](pivot, sources, np.asarray(gold_ids), k, fallback)


def as_pairwise(fused: MultiFused) -> FusedTargets:
    """A K = 1 result as `fuse.targets.fusion.FusedTargets`, so pairwise code can read it unchanged."""
    if fused.used.shape[0] != 2:
        raise ValueError(f"as_pairwise needs one source, got {fused.used.shape[0] - 1}")
    winner = {0: "pivot", MIXED: "mixed"}.get(fused.winner, "source")
    return FusedTargets(fused.ids, fused.logprobs, from_source=fused.used[1], fallback=fused.fallback,
                        winner=winner, source_weight=float(fused.weights[1]))


@dataclass
class Contributions:
    """Per domain, how much each teacher's distribution made the targets (issue 17, item 4).

    `add` sums counts per conversation; `as_dict` turns them into shares. Shares that a method
    does not define are None: sequences won only exist for per-sequence MinCE, positions chosen
    not for AvgCE (every target there mixes all present teachers).
    """

    names: tuple[str, ...]  # teacher 0 = the pivot, then the sources in the order given to fuse_multi
    method: str | None = None
    counts: dict[str | None, dict[str, Any]] = field(default_factory=dict)

    def add(self, domain: str, fused: MultiFused) -> None:
        T = len(self.names)
        if fused.used.shape[0] != T:
            raise ValueError(f"result has {fused.used.shape[0]} teachers, contributions track {T}")
        if self.method not in (None, fused.method):
            raise ValueError(f"contributions of {self.method!r} cannot take a {fused.method!r} result")
        self.method = fused.method
        for key in (domain, None):  # None: all domains together (no domain name can collide with it)
            c = self.counts.setdefault(key, {"sequences": 0, "positions": 0, "fallback": 0, "won": np.zeros(T, int),
                                             "chosen": np.zeros(T, int), "weight": np.zeros(T),
                                             "present": np.zeros(T, int)})
            c["sequences"] += 1
            c["positions"] += int(fused.used.shape[1])
            c["fallback"] += int(fused.fallback.sum())
            if fused.winner >= 0:
                c["won"][fused.winner] += 1
            c["chosen"] += fused.used.sum(axis=1)
            c["weight"] += fused.weights
            c["present"] += fused.present

    def merge(self, other: "Contributions") -> None:
        """Add `other`'s counts (the next shard of the corpus) to these.

        Integer counts merge exactly. The weight sums are floats: merging a shard's partial sum is
        not the same rounding as adding its conversations one by one, so a caller that wants one
        result for any number of processes merges fixed shards in corpus order (`rows_multi`).
        """
        if other.names != self.names:
            raise ValueError(f"contributions of {list(other.names)} cannot merge into {list(self.names)}")
        if other.method is None:
            return
        if self.method not in (None, other.method):
            raise ValueError(f"contributions of {self.method!r} cannot take {other.method!r} results")
        self.method = other.method
        for key, theirs in other.counts.items():
            mine = self.counts.get(key)
            if mine is None:
                self.counts[key] = {n: v.copy() if isinstance(v, np.ndarray) else v for n, v in theirs.items()}
                continue
            for n, v in theirs.items():
                mine[n] = mine[n] + v  # a new array: `theirs` stays the caller's

    def _shares(self, c: dict[str, Any]) -> dict[str, Any]:
        n, p = c["sequences"], max(c["positions"], 1)
        return {"sequences": n, "positions": c["positions"], "fallback_share": c["fallback"] / p,
                "teachers": {name: {
                    "present_share": int(c["present"][i]) / n,
                    "sequence_share": int(c["won"][i]) / n if self.method == "mince" else None,
                    "position_share": int(c["chosen"][i]) / p if self.method != "avgce" else None,
                    "mean_weight": float(c["weight"][i]) / n} for i, name in enumerate(self.names)}}

    def as_dict(self) -> dict[str, Any]:
        """{"by_domain": {domain: shares}, "total": shares or None}; shares = {sequences, positions,
        fallback_share, teachers: {name: {present_share, sequence_share, position_share, mean_weight}}}."""
        return {"by_domain": {d: self._shares(self.counts[d]) for d in sorted(d for d in self.counts if d is not None)},
                "total": self._shares(self.counts[None]) if None in self.counts else None}

"""Fusion functions: turn the pivot's and a source's top-k distributions into one sparse target.

Pure numpy over one conversation, all arrays indexed by the pivot's *target positions* (the
pivot's scored assistant tokens; row t is the distribution that predicts pivot token t):

* `translate_topk` maps a source's top-k ids into pivot ids through the vocabulary map.
  Unmapped ids are dropped; several source ids landing on one pivot id are **merged by
  logsumexp** (their probability mass adds up; FuseChat keeps only the first, which discards
  mass the source did put on that string). Rows are re-sorted, padded with id −1 / log-prob −inf.
* `TeacherView` is one teacher seen at the pivot's positions; a source view has `aligned[t]`
  False where it has no distribution for pivot position t (see `fuse.targets.pairing` for how
  positions are paired). `fill_unaligned` replaces those rows by the **fallback**: a one-hot on
  the gold token (the recipe default, FuseChat's choice) or the pivot's own distribution. Gold is
  the default because the fallback matters only where the source won MinCE, i.e. where the
  pivot's distribution was judged the worse one: copying it there pulls the student back towards
  the untrained pivot (on the demo world's `strings` source, whose tokens pair with only 91% of the
  pivot's positions, fallback `pivot` made T_strings worse than pivot-CLM and `gold` better).
* `mince` (default, per sequence), `avgce` (per-sequence weights softmax(−CE)) and
  `mince_token` (per position) combine a pivot view and a source view.

Cross-entropies are **nats per character** of assistant text (`ce_per_char`): a sum of gold
token NLLs divided by a character count that does not depend on the tokenizer, so a model
with short tokens is not penalised for making more (each smaller) predictions. For the
per-token variant the NLL of the gold token is divided by that token's length in characters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

NEG_INF = np.float32(-np.inf)
FALLBACKS = ("pivot", "gold")  # targets where the source has no aligned distribution (`fill_unaligned`)

# The fusion methods by name, each with a one-line summary (the `fuse.method` help lists them): the
# one registry that the `fuse:` section validates against and `fuse_sequence` dispatches on.
METHODS: dict[str, Callable[..., "FusedTargets"]] = {}
SUMMARIES: dict[str, str] = {}


def method(name: str, summary: str) -> Callable[[Callable[..., "FusedTargets"]], Callable[..., "FusedTargets"]]:
    """Register `fn(pivot, source, gold_ids, k, fallback) -> FusedTargets` as fusion method `name`."""
    def deco(fn: Callable[..., FusedTargets]) -> Callable[..., FusedTargets]:
        METHODS[name], SUMMARIES[name] = fn, summary
        return fn
    return deco


@dataclass
class TeacherView:
    """One teacher at the pivot's n target positions."""

    ids: np.ndarray  # (n, k) int32 pivot ids, −1 = padding
    logprobs: np.ndarray  # (n, k) float32, −inf at padding
    token_ce: np.ndarray  # (n,) float32 NLL per character of the gold token at each position
    seq_ce: float  # NLL per character of the whole assistant text of the conversation
    aligned: np.ndarray  # (n,) bool: the teacher has a distribution for this position

    @property
    def n(self) -> int:
        return int(self.ids.shape[0])


@dataclass
class FusedTargets:
    """The sparse target of one conversation and how it was made."""

    ids: np.ndarray  # (n, k) int32 pivot ids, −1 = padding
    logprobs: np.ndarray  # (n, k) float32, −inf at padding
    from_source: np.ndarray  # (n,) bool: the source's distribution entered this position's target
    fallback: np.ndarray  # (n,) bool: the source was wanted here but had no aligned distribution
    winner: str  # "pivot" / "source" (mince), "mixed" (avgce, mince_token)
    source_weight: float  # share given to the source: 0/1 (mince), w_s (avgce), position share (token)


def seq_ce(rec: Any) -> float:
    """A teacher record's NLL per character of reply text, the sequence CE the methods compare
    (`rec.ce` is per token, from float32 log-probs)."""
    return float(rec.ce) * rec.n_tokens / max(rec.n_chars, 1)


def logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    """Stable logsumexp that returns −inf (not NaN) for all −inf slices."""
    m = np.max(x, axis=axis, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(x - m_safe), axis=axis, keepdims=True)) + m_safe
    return np.squeeze(out, axis=axis)


def merge_topk(ids: np.ndarray, logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge duplicate ids per row by logsumexp, sort by log-prob, keep k, pad with −1/−inf.

    ids (n, m) int with −1 padding; logprobs (n, m). Non-finite log-probs count as padding.
    """
    lp = np.asarray(logprobs, dtype=np.float32)
    valid = (ids >= 0) & np.isfinite(lp)
    lp = np.where(valid, lp, NEG_INF)
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # (n, m, m)
    merged = logsumexp(np.where(same, lp[:, None, :], NEG_INF), axis=2)  # (n, m)
    first = valid & ~np.tril(same, -1).any(axis=2)  # keep the first occurrence of each id
    score = np.where(first, merged, NEG_INF)
    order = np.argsort(-score, axis=1, kind="stable")[:, :k]  # (n, k')
    out_lp = np.take_along_axis(score, order, axis=1).astype(np.float32)
    out_ids = np.where(np.isfinite(out_lp), np.take_along_axis(ids, order, axis=1), -1).astype(np.int32)
    if out_ids.shape[1] < k:  # fewer inputs than k: pad the columns
        pad = k - out_ids.shape[1]
        out_ids = np.pad(out_ids, ((0, 0), (0, pad)), constant_values=-1)
        out_lp = np.pad(out_lp, ((0, 0), (0, pad)), constant_values=NEG_INF)
    return out_ids, out_lp


def translate_topk(src_ids: np.ndarray, src_logprobs: np.ndarray, vocab_map: np.ndarray,
                   k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Source top-k (n, k) → pivot ids via `vocab_map` (source id → pivot id, −1 = unmapped)."""
    src_ids = np.asarray(src_ids)
    inside = (src_ids >= 0) & (src_ids < len(vocab_map))
    mapped = np.where(inside, vocab_map[np.clip(src_ids, 0, len(vocab_map) - 1)], -1)
    return merge_topk(mapped, src_logprobs, k or src_ids.shape[1])


def ce_per_char(gold_logprobs: np.ndarray, n_chars: int) -> float:
    """Sequence NLL per character: −Σ log p(gold) / n_chars (nats per character)."""
    return float(-np.sum(np.asarray(gold_logprobs, dtype=np.float64)) / max(int(n_chars), 1))


def gold_view(gold_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One-hot targets on the gold tokens: id = gold, log-prob 0, the rest padding."""
    n = len(gold_ids)
    ids = np.full((n, k), -1, dtype=np.int32)
    lp = np.full((n, k), NEG_INF, dtype=np.float32)
    ids[:, 0] = gold_ids
    lp[:, 0] = 0.0
    return ids, lp


def fit(ids: np.ndarray, lp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad or cut (n, m) top-k arrays to k columns (rows are sorted already)."""
    if ids.shape[1] >= k:
        return ids[:, :k].astype(np.int32), lp[:, :k].astype(np.float32)
    pad = k - ids.shape[1]
    return (np.pad(ids, ((0, 0), (0, pad)), constant_values=-1).astype(np.int32),
            np.pad(lp, ((0, 0), (0, pad)), constant_values=NEG_INF).astype(np.float32))


def fill_unaligned(source: TeacherView, pivot: TeacherView, gold_ids: np.ndarray, fallback: str) -> TeacherView:
    """The source view with its unaligned rows replaced by the fallback distribution.

    fallback="pivot": the pivot's row and per-token CE; "gold": one-hot gold with CE 0.
    The sequence CE is the source's own (it scores the whole text, aligned or not).
    """
    if source.n != pivot.n or len(gold_ids) != pivot.n:
        raise ValueError(f"views disagree on the number of positions: source {source.n}, pivot {pivot.n}, "
                         f"gold {len(gold_ids)}")
    k = max(source.ids.shape[1], pivot.ids.shape[1])
    s_ids, s_lp = fit(source.ids, source.logprobs, k)
    if fallback == "pivot":
        f_ids, f_lp = fit(pivot.ids, pivot.logprobs, k)
        f_ce = pivot.token_ce
    elif fallback == "gold":
        f_ids, f_lp = gold_view(gold_ids, k)
        f_ce = np.zeros(pivot.n, dtype=np.float32)
    else:
        raise ValueError(f"fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
    a = source.aligned
    return TeacherView(ids=np.where(a[:, None], s_ids, f_ids), logprobs=np.where(a[:, None], s_lp, f_lp),
                       token_ce=np.where(a, source.token_ce, f_ce).astype(np.float32), seq_ce=source.seq_ce,
                       aligned=np.ones(pivot.n, dtype=bool))


@method("mince", "per sequence, the lower-CE teacher wins")
def mince(pivot: TeacherView, source: TeacherView, gold_ids: np.ndarray, k: int,
          fallback: str = "gold") -> FusedTargets:
    """Per sequence: the teacher with the lower CE per character is the target everywhere.

    Ties go to the pivot. When the source wins, its unaligned positions take the fallback.
    """
    filled = fill_unaligned(source, pivot, gold_ids, fallback)
    unaligned = ~source.aligned
    if source.seq_ce < pivot.seq_ce:
        ids, lp = fit(filled.ids, filled.logprobs, k)
        return FusedTargets(ids, lp, from_source=source.aligned.copy(), fallback=unaligned.copy(),
                            winner="source", source_weight=1.0)
    ids, lp = fit(pivot.ids, pivot.logprobs, k)
    none = np.zeros(pivot.n, dtype=bool)
    return FusedTargets(ids, lp, from_source=none, fallback=none.copy(), winner="pivot", source_weight=0.0)


@method("avgce", "mixture weighted by softmax of −CE per character")
def avgce(pivot: TeacherView, source: TeacherView, gold_ids: np.ndarray, k: int,
          fallback: str = "gold") -> FusedTargets:
    """Per sequence weights w = softmax(−[CE_pivot, CE_source]); target = w_p·P + w_s·S, top-k.

    (FuseLLM's AvgCE.) At unaligned positions S is the fallback distribution.
    """
    filled = fill_unaligned(source, pivot, gold_ids, fallback)
    ce = np.array([pivot.seq_ce, source.seq_ce], dtype=np.float64)
    w = np.exp(-(ce - ce.min()))
    w /= w.sum()
    ids = np.concatenate([pivot.ids, filled.ids], axis=1)  # (n, kp + ks)
    with np.errstate(divide="ignore"):
        lp = np.concatenate([pivot.logprobs + np.log(w[0]), filled.logprobs + np.log(w[1])], axis=1)
    out_ids, out_lp = merge_topk(ids, lp, k)
    return FusedTargets(out_ids, out_lp, from_source=source.aligned.copy(), fallback=~source.aligned,
                        winner="mixed", source_weight=float(w[1]))


@method("mince_token", "lower-CE teacher per token")
def mince_token(pivot: TeacherView, source: TeacherView, gold_ids: np.ndarray, k: int,
                fallback: str = "gold") -> FusedTargets:
    """Per position: the teacher whose gold-token NLL per character is lower (ties → pivot).

    Unaligned positions compare the pivot with the fallback (the pivot itself: a tie, so the
    pivot; one-hot gold: CE 0, so gold).
    """
    filled = fill_unaligned(source, pivot, gold_ids, fallback)
    take = filled.token_ce < pivot.token_ce  # (n,)
    kk = max(pivot.ids.shape[1], filled.ids.shape[1])
    p_ids, p_lp = fit(pivot.ids, pivot.logprobs, kk)
    ids = np.where(take[:, None], filled.ids, p_ids)
    lp = np.where(take[:, None], filled.logprobs, p_lp)
    ids, lp = fit(ids, lp, k)
    from_source = take & source.aligned
    return FusedTargets(ids, lp, from_source=from_source, fallback=take & ~source.aligned, winner="mixed",
                        source_weight=float(from_source.mean()) if pivot.n else 0.0)


def fuse_sequence(method: str, pivot: TeacherView, source: TeacherView | None, gold_ids: np.ndarray, k: int,
                  fallback: str = "gold") -> FusedTargets:
    """Dispatch by name; with no source (a one-teacher run) the target is the pivot's own."""
    if source is None:
        ids, lp = fit(pivot.ids, pivot.logprobs, k)
        none = np.zeros(pivot.n, dtype=bool)
        return FusedTargets(ids, lp, from_source=none, fallback=none.copy(), winner="pivot", source_weight=0.0)
    if method not in METHODS:
        raise ValueError(f"unknown fusion method {method!r} (choose from {', '.join(METHODS)})")
    return METHODS[method](pivot, source, np.asarray(gold_ids), k, fallback)

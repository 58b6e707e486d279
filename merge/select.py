"""Element selection for the merge methods: SCE's top-τ by variance across task vectors and
TIES's top-density by magnitude, selecting exactly the elements mergekit 0.1.5 selects.

mergekit computes `torch.var(dim=0)` and sorts. Both are slow on CPU, and sorting allocates
N int64 indices (more memory than the tensor itself). Here scores are computed on demand,
slice by slice, never held for the whole tensor: a random sample of exact scores brackets the
k-th largest, one pass over cheap estimates (for the variance: pairwise differences in
float32, within a proven relative error) keeps the elements surely above the bracket and
collects the few inside it, and only those get exact scores (the variance computed with the
very arithmetic of torch's kernel, so bit-identical) to decide the cut. When the bracket
missed the cut (a check, practically never), an exact full selection takes over, so the
result is always the exact top k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from merge.parallel import each, spans

_SAMPLE = 1 << 16
_EPS32 = 2.0 ** -24


@dataclass
class Scores:
    """N per-element scores, on demand: `part(s, e)` estimates slice [s, e) times `scale` within
    a relative error `rel_err`; `exact(idx)` returns the exact scores at flat indices."""

    n: int
    part: Callable[[int, int], torch.Tensor]
    exact: Callable[[torch.Tensor], torch.Tensor]
    rel_err: float = 0.0
    full: Callable[[], torch.Tensor] | None = None  # all exact scores at once (default: exact(arange))
    scale: float = 1.0  # estimates come scaled (saves a division per element)

    @classmethod
    def of(cls, values: torch.Tensor) -> "Scores":
        v = values.reshape(-1)
        return cls(v.numel(), lambda s, e: v[s:e], lambda idx: v[idx], full=lambda: v)


def population_variance(deltas: torch.Tensor) -> torch.Tensor:
    """Variance over dim 0 of a (K, N) float32 tensor, (N,) float32, bit-identical to
    `torch.var(deltas, dim=0, unbiased=False)`: Welford's update in float64, as torch's CPU
    kernel does, but slice by slice (torch's kernel is ~10× slower over a short leading dim)."""
    k, n = deltas.shape
    out = torch.empty(n, dtype=torch.float32)

    def part(s: int, e: int) -> None:
        mean = deltas[0, s:e].double()
        m2 = torch.zeros_like(mean)
        for i in range(1, k):
            x = deltas[i, s:e].double()
            d = x - mean
            mean += d / (i + 1)
            m2 += d * (x - mean)
        out[s:e] = m2 / k

    each(part, n)
    return out


def variance_scores(k: int, n: int, tau: Callable[[int, int], torch.Tensor],
                    tau_at: Callable[[torch.Tensor], torch.Tensor]) -> Scores:
    """Variance across K task vectors as `Scores`, given their float32 slices `tau(s, e)` (K, c)
    and values at flat indices `tau_at(idx)` (K, m).

    The estimate K²·var = Σ_{i<j} (x_i − x_j)² has non-negative terms only, so float32 rounding
    keeps it within (pairs + 2) half-ulps of the true value; it is zero exactly when all K
    values are equal. For K > 8 (K²/2 passes) the exact variance is used directly.
    """
    exact = lambda idx: population_variance(tau_at(idx))  # noqa: E731
    if k > 8:
        return Scores(n, lambda s, e: population_variance(tau(s, e)), exact)

    def part(s: int, e: int) -> torch.Tensor:
        x = tau(s, e)
        acc = torch.zeros(e - s) if k < 2 else None
        for i in range(k):
            for j in range(i + 1, k):
                diff = x[i] - x[j]
                acc = diff.mul_(diff) if acc is None else acc.addcmul_(diff, diff)
        return acc

    pairs = k * (k - 1) // 2
    # + the exact variance's own rounding to float32, with a safety factor of 2
    return Scores(n, part, exact, 2 * (pairs + 4) * _EPS32, scale=float(k * k))


def _sort_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys that order like the float32 values `x` (negative floats get their magnitude bits flipped)."""
    bits = x.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _top_bin(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest element, number of elements in higher bins)."""
    from_top = hist.flip(0).cumsum(0)  # elements in bins >= 65535 - j
    j = int(torch.searchsorted(from_top, k))
    return 65535 - j, int(from_top[j - 1]) if j else 0


def radix_topk_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-k mask of a float32 tensor by a two-pass radix selection over the bit patterns
    (16 high bits, then 16 low bits); ties at the k-th value: lowest index first. 0 < k < N."""
    v = values.reshape(-1)
    n = v.numel()
    high = each(lambda s, e: torch.bincount((_sort_keys(v[s:e]) >> 16) + 32768, minlength=65536), n)
    hi, above = _top_bin(torch.stack(high).sum(0), k)

    def low_hist(s: int, e: int) -> torch.Tensor:
        key = _sort_keys(v[s:e])
        return torch.bincount(key[(key >> 16) + 32768 == hi] & 0xFFFF, minlength=65536)

    low = torch.stack(each(low_hist, n)).sum(0)
    lo, above_lo = _top_bin(low, k - above)
    threshold = ((hi - 32768) << 16) | lo  # the k-th largest value's key
    need = k - above - above_lo  # elements equal to it that complete the k
    mask = torch.empty(n, dtype=torch.bool)
    each(lambda s, e: torch.gt(_sort_keys(v[s:e]), threshold, out=mask[s:e]), n)
    for s, e in spans(n):  # ties across the cut: the lowest indices win
        idx = torch.nonzero(_sort_keys(v[s:e]) == threshold).view(-1)[:need]
        mask[s + idx] = True
        need -= idx.numel()
        if not need:
            break
    return mask


def topk_share(count: int, share: float) -> int:
    """mergekit's k for keeping `share` of `count` non-zero scores: `int(count_nonzero(var) * share)`,
    whose product is float32 (an int64 tensor times a Python float)."""
    return int(torch.tensor(count) * share)


def topk_mask(scores: Scores | torch.Tensor, k: int | None = None, share: float | None = None) -> torch.Tensor:
    """Flat bool mask of the `k` largest scores (ties at the k-th value: lowest index first).

    With `share` instead of `k`, k = `topk_share(number of non-zero scores, share)`, counted in
    the same pass (SCE's "top τ of the non-zero variances").
    """
    sc = scores if isinstance(scores, Scores) else Scores.of(scores)
    n = sc.n
    if k is not None and (k <= 0 or k >= n):
        return torch.full((n,), k > 0, dtype=torch.bool)
    # 1. exact scores of a fixed-seed random sample bracket the k-th largest score, with a
    # 6-sigma margin for the sample's binomial noise (and for the estimate of k from `share`)
    g = torch.Generator().manual_seed(0)
    m = min(n, max(4096, min(_SAMPLE, n // 32)))
    sample = sc.exact(torch.randint(0, n, (m,), generator=g)).sort(descending=True).values
    if k is None:
        nz = float((sample != 0).float().mean())
        q = min(1.0, max(0.0, nz * share))
        slack = share * math.sqrt(m * nz * (1 - nz))
    else:
        q, slack = k / n, 0.0
    pos, margin = q * m, 6 * (math.sqrt(m * q * (1 - q)) + slack) + 8
    hi_r, lo_r = int(pos - margin), int(pos + margin) + 1
    t_hi = float(sample[hi_r]) if hi_r >= 0 else math.inf
    t_lo = float(sample[lo_r]) if lo_r < m else -math.inf
    up = (t_hi + abs(t_hi) * 2 * sc.rel_err) * sc.scale if math.isfinite(t_hi) else t_hi
    down = (t_lo - abs(t_lo) * 2 * sc.rel_err) * sc.scale if math.isfinite(t_lo) else t_lo
    # 2. one pass: estimate > up means true score > t_hi (selected); estimates in [down, up] are candidates
    mask = torch.empty(n, dtype=torch.bool)

    def part(s: int, e: int) -> tuple[int, int, torch.Tensor]:
        c = sc.part(s, e)
        above = torch.gt(c, up, out=mask[s:e])
        inside = torch.logical_and(c >= down, c <= up)
        nonzero = int(torch.count_nonzero(c)) if k is None else 0
        # count_nonzero, not bool.sum(): the latter makes an int64 copy of the slice
        return int(torch.count_nonzero(above)), nonzero, torch.nonzero(inside).view(-1).add_(s)

    parts = each(part, n)
    if k is None:
        k = topk_share(sum(p[1] for p in parts), share)
        if k <= 0 or k >= n:
            return torch.full((n,), k > 0, dtype=torch.bool)
    need = k - sum(p[0] for p in parts)
    band = torch.cat([p[2] for p in parts])
    del parts
    if 0 < need <= band.numel():
        order = torch.sort(sc.exact(band), descending=True, stable=True)  # stable: ties keep index order
        cut = float(order.values[need - 1])
        # 3. valid when the cut lies inside the bracket: everything selected in step 2 is above
        # it, everything left out of the band below it
        if t_lo <= cut <= t_hi:
            mask[band[order.indices[:need]]] = True
            return mask
    del band, mask
    exact_all = sc.full() if sc.full else sc.exact(torch.arange(n))
    return radix_topk_mask(exact_all, k)  # the sample missed the cut: select exactly

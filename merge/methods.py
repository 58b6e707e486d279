"""Merge methods: pure functions over the tensors of ONE parameter, registered by name.

Every method takes `base` (float32, the parameter's shape), `models` (float32, (K, *shape):
the K models' values, a buffer the method may overwrite, e.g. with the task vectors
τ_k = θ_k − θ_base, so that no second (K, *shape) copy is ever made) and `MethodArgs`, and
returns a `MethodResult` with the merged float32 tensor and the per-model weights it used.
All maths is float32 (float64 for sums over a whole tensor and for the variance, which is
computed bit-for-bit as `torch.var(unbiased=False)` so top-τ selection matches mergekit).
Element-wise work runs over fixed slices of the flattened tensor: cache-friendly, and the
temporaries stay a few MB whatever the tensor size. Results equal the formulas exactly
(up to float rounding); tests compare each method with a plain whole-tensor reference and
with mergekit 0.1.5.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

CHUNK = 1 << 18  # elements per slice: a few K-row float64 slices stay in cache
_POOL: ThreadPoolExecutor | None = None


@dataclass(frozen=True)
class MethodArgs:
    """Options of one method call (see `merge.config.MergeConfig` for their meaning)."""

    weights: tuple[float, ...]
    select_topk: float = 0.1
    sce_mask: str = "mergekit"
    density: float = 1.0
    normalize: bool = True
    rescale: str = "inverse"
    scale: float = 1.0
    seed: int = 0
    key: str = ""  # the tensor's name: DARE seeds its masks with it, so reruns match


@dataclass
class MethodResult:
    tensor: torch.Tensor  # merged, float32, the base's shape
    weights: list[float]  # per-model weight used for this tensor
    kept: list[float] | None = None  # per-model share of elements that reached the merge (masking methods)


MergeFn = Callable[[torch.Tensor, torch.Tensor, MethodArgs], MethodResult]
METHODS: dict[str, MergeFn] = {}


def register(name: str) -> Callable[[MergeFn], MergeFn]:
    def deco(fn: MergeFn) -> MergeFn:
        METHODS[name] = fn
        return fn
    return deco


@contextmanager
def compute_threads(n: int) -> Iterator[None]:
    """Run the slice loops of the methods on `n` Python threads, each with single-threaded
    torch kernels. On a busy machine this is much faster than torch's OpenMP threads, whose
    barriers stall whenever one core is taken; results do not depend on `n`."""
    global _POOL
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    _POOL = ThreadPoolExecutor(n, thread_name_prefix="merge") if n > 1 else None
    try:
        yield
    finally:
        if _POOL is not None:
            _POOL.shutdown()
        _POOL = None
        torch.set_num_threads(old)


def _spans(n: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + CHUNK)) for s in range(0, n, CHUNK)]


def _each(fn: Callable[[int, int], Any], n: int) -> list[Any]:
    """[fn(start, end) for every slice of range(n)], in order (on the compute threads if any)."""
    spans = _spans(n)
    if _POOL is None or len(spans) < 2:
        return [fn(s, e) for s, e in spans]
    return list(_POOL.map(lambda se: fn(*se), spans))


def population_variance(deltas: torch.Tensor) -> torch.Tensor:
    """Variance over models (dim 0) of a (K, N) float32 tensor, (N,) float32.

    Welford's update in float64, the very arithmetic of torch's CPU `var(dim=0, unbiased=False)`
    (so results are bit-identical), but slice by slice: torch's own kernel is ~10× slower on
    a reduction over a short leading dimension.
    """
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

    _each(part, n)
    return out


def topk_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the `k` largest entries of a 1-D tensor (ties at the k-th value: lowest index first).

    A linear-time selection (`kthvalue`) instead of mergekit's sort: same set whenever the
    k-th value is unique.
    """
    n = values.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    threshold = torch.kthvalue(values, n - k + 1).values
    mask = values > threshold
    need = k - int(mask.sum())
    if need > 0:
        mask[(values == threshold).nonzero().view(-1)[:need]] = True
    return mask


def _mean_squares(deltas: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean(τ_k²) per model (float64 accumulation), optionally over masked elements only."""
    k, n = deltas.shape

    def part(s: int, e: int) -> torch.Tensor:
        x = deltas[:, s:e]
        if mask is not None:
            x = x * mask[s:e]
        return (x * x).sum(1, dtype=torch.float64)  # (K,)

    acc = torch.zeros(k, dtype=torch.float64)
    for p in _each(part, n):  # partial sums added in slice order: deterministic
        acc += p
    return acc / max(n, 1)


def _ratio_weights(ms: torch.Tensor, tiny: float) -> torch.Tensor:
    """w_k = ms_k / Σ ms_j as float32, uniform when Σ ms_j <= `tiny` (all task vectors ~zero)."""
    total = float(ms.sum())
    if abs(total) <= tiny:
        return torch.full_like(ms, 1.0 / ms.numel(), dtype=torch.float32)
    return (ms / total).float()


def _task_vectors(base: torch.Tensor, models: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten and turn the models buffer into task vectors τ_k = θ_k − base, in place: (N,), (K, N)."""
    b, d = base.reshape(-1), models.view(models.shape[0], -1)
    _each(lambda s, e: d[:, s:e].sub_(b[s:e]), b.numel())
    return b, d


def _mask_(d: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero the (K, N) task vectors where the (N,) bool mask is False, in place."""
    _each(lambda s, e: d[:, s:e].mul_(mask[s:e]), mask.numel())


def _kept_share(parts: list[torch.Tensor], n: int) -> list[float]:
    return (torch.stack(parts).sum(0).double() / max(n, 1)).tolist() if parts else []


def _majority_keep(x: torch.Tensor) -> torch.Tensor:
    """TIES sign election on a (K, c) slice: keep_k = sign(x_k) == sign(Σ_k x_k) (a zero sum counts as +)."""
    majority = (x.sum(0) >= 0).to(x.dtype) * 2 - 1  # (c,)
    return x.sign() == majority  # (K, c); zeros are never kept


@register("varm")
def varm(base: torch.Tensor, models: torch.Tensor, args: MethodArgs) -> MethodResult:
    """VaRM (FuseChat-1.0): w_k = mean(τ_k²) / Σ_j mean(τ_j²); merged = base + Σ_k w_k τ_k."""
    b, d = _task_vectors(base, models)
    w = _ratio_weights(_mean_squares(d), 0.0)
    out = torch.empty_like(b)
    wc = w.view(-1, 1)
    _each(lambda s, e: torch.add(b[s:e], (d[:, s:e] * wc).sum(0), out=out[s:e]), b.numel())
    return MethodResult(out.view(base.shape), w.tolist())


@register("sce")
def sce(base: torch.Tensor, models: torch.Tensor, args: MethodArgs) -> MethodResult:
    """SCE (FuseChat-2.0): select top-τ elements by variance across τ_k, calculate variance-ratio
    weights, erase elements against the majority sign, merge.

    `mergekit` mask semantics (mergekit 0.1.5 `sce`): unselected elements are zeroed in every
    τ_k, weights = normalised mean(τ_k²) of the masked τ (uniform when their sum < 1e-6),
    denominator clamped at 1e-6. `fusechat` (the FuseChat-2.0 fork): the selection shapes only
    the weights; the sign vote and the merge use the full τ_k; uniform weights only when the
    sum is 0; a zero denominator is replaced by 1.
    """
    b, d = _task_vectors(base, models)
    k, n = d.shape
    mask = None
    if args.select_topk < 1:
        var = population_variance(d)  # (N,)
        count = int(torch.count_nonzero(var) * args.select_topk)  # mergekit's own rounding (float32 product)
        mask = topk_mask(var, count)
        del var
    if args.sce_mask == "mergekit":
        if mask is not None:
            _mask_(d, mask)
        w = _ratio_weights(_mean_squares(d), 1e-6)
    elif args.sce_mask == "fusechat":
        w = _ratio_weights(_mean_squares(d, mask), 0.0)
    else:
        raise ValueError(f"sce_mask must be 'mergekit' or 'fusechat', got {args.sce_mask!r}")
    del mask
    out = torch.empty_like(b)
    wc = w.view(-1, 1)

    def part(s: int, e: int) -> torch.Tensor:
        x = d[:, s:e]
        keep = _majority_keep(x)
        ew = wc * keep  # (K, c) erased weights
        num = (x * ew).sum(0)
        den = ew.sum(0)
        if args.sce_mask == "mergekit":
            den.clamp_(min=1e-6)
        else:
            den[den == 0] = 1
        torch.add(b[s:e], num / den, out=out[s:e])
        return keep.sum(1)

    kept = _each(part, n)
    return MethodResult(out.view(base.shape), w.tolist(), _kept_share(kept, n))


@register("linear")
def linear(base: torch.Tensor, models: torch.Tensor, args: MethodArgs) -> MethodResult:
    """merged = Σ_k w_k θ_k (/ Σ_k w_k when normalising, the default). The base is not averaged in."""
    b, t = base.reshape(-1), models.view(models.shape[0], -1)
    w = torch.tensor(args.weights, dtype=torch.float32)
    out = torch.zeros_like(b)

    def part(s: int, e: int) -> None:
        for i in range(t.shape[0]):
            out[s:e].addcmul_(t[i, s:e], w[i])
        if args.normalize:
            out[s:e].div_(w.sum())

    _each(part, b.numel())
    return MethodResult(out.view(base.shape), w.tolist())


def _generator(seed: int, key: str, model: int, start: int) -> torch.Generator:
    """A generator per (seed, tensor name, model, slice): masks independent of order and threads."""
    digest = hashlib.sha256(f"{seed}:{key}:{model}:{start}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


def _dare_(d: torch.Tensor, args: MethodArgs) -> None:
    """DARE on (K, N) task vectors, in place: drop each element with probability 1 − density,
    then rescale the kept ones (by 1/density, or back to the row's L1 norm as mergekit does)."""
    k, n = d.shape
    before = d.abs().sum(1, dtype=torch.float64) if args.rescale == "l1" else None

    def part(s: int, e: int) -> None:
        for i in range(k):
            d[i, s:e].mul_(torch.rand(e - s, generator=_generator(args.seed, args.key, i, s)) < args.density)

    _each(part, n)
    if args.rescale == "inverse":
        _each(lambda s, e: d[:, s:e].div_(args.density), n)
    elif args.rescale == "l1":  # mergekit 0.1.5: match the original L1 norm (skipped for ~zero norms)
        after = d.abs().sum(1, dtype=torch.float64)
        for i in range(k):
            if before[i] >= 1e-7 and after[i] >= 1e-7:
                d[i].mul_(float(before[i] / after[i]))


def _task_arithmetic_family(base: torch.Tensor, models: torch.Tensor, args: MethodArgs,
                            sparsify: str | None, consensus: bool) -> MethodResult:
    """mergekit's generalized task arithmetic: sparsify each τ_k, weight it, optionally elect
    signs (TIES), sum, optionally divide by the sum of (kept) weights, scale, add to the base."""
    b, d = _task_vectors(base, models)
    k, n = d.shape
    if sparsify == "magnitude" and args.density < 1:
        top = max(1, int(args.density * n))
        for i in range(k):
            d[i].mul_(topk_mask(d[i].abs(), top))
    elif sparsify == "random" and args.density < 1:
        _dare_(d, args)
    w = torch.tensor(args.weights, dtype=torch.float32).view(-1, 1)  # (K, 1)
    _each(lambda s, e: d[:, s:e].mul_(w), n)
    total = w.sum(0)
    total[total.abs() < 1e-8] = 1
    out = torch.empty_like(b)

    def part(s: int, e: int) -> torch.Tensor | None:
        x = d[:, s:e]
        kept = None
        if consensus:
            keep = _majority_keep(x)
            mixed = (x * keep).sum(0)
            divisor = (w * keep).sum(0)
            divisor[divisor == 0] = 1
            kept = keep.sum(1)
        else:
            mixed = x.sum(0)
            divisor = total
            if sparsify:
                kept = (x != 0).sum(1)
        if args.normalize:
            mixed /= divisor
        if args.scale != 1:
            mixed *= args.scale
        torch.add(b[s:e], mixed, out=out[s:e])
        return kept

    parts = [p for p in _each(part, n) if p is not None]
    return MethodResult(out.view(base.shape), w.view(-1).tolist(), _kept_share(parts, n) or None)


@register("task_arithmetic")
def task_arithmetic(base: torch.Tensor, models: torch.Tensor, args: MethodArgs) -> MethodResult:
    """merged = base + λ Σ_k w_k τ_k."""
    return _task_arithmetic_family(base, models, args, None, consensus=False)


@register("ties")
def ties(base: torch.Tensor, models: torch.Tensor, args: MethodArgs) -> MethodResult:
    """TIES: keep the top-`density` |τ_k| of each model, elect signs by Σ_k w_k τ_k, average the agreeing."""
    return _task_arithmetic_family(base, models, args, "magnitude", consensus=True)


@register("dare_ties")
def dare_ties(base: torch.Tensor, models: torch.Tensor, args: MethodArgs) -> MethodResult:
    """DARE drop-and-rescale of each τ_k, then TIES sign election."""
    return _task_arithmetic_family(base, models, args, "random", consensus=True)


@register("dare_linear")
def dare_linear(base: torch.Tensor, models: torch.Tensor, args: MethodArgs) -> MethodResult:
    """DARE drop-and-rescale of each τ_k, then base + λ Σ_k w_k τ̃_k."""
    return _task_arithmetic_family(base, models, args, "random", consensus=False)

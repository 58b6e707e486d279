"""Merge methods: pure functions over the tensors of ONE parameter, registered by name.

Every method takes `base` (float32, the parameter's shape), `models` (float32, (K, *shape):
the K models' values) and `MethodArgs`, and returns a `MethodResult` with the merged float32
tensor and the per-model weights it used. To keep a merge's memory at a few tensors, both
input buffers are consumed: `models` becomes the task vectors τ_k = θ_k − θ_base and the
result is written into `base`'s memory. All maths is float32 (sums over a whole tensor add
float32 slice sums in float64). Results equal the formulas up to float rounding, and equal
mergekit 0.1.5 to ~1e-7 (tests compare each method with both).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch

from merge.parallel import each
from merge.select import Scores, count_nonzero, topk_mask, variance_scores


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
    tensor: torch.Tensor  # merged, float32, the base's shape (shares the base buffer's memory)
    weights: list[float]  # per-model weight used for this tensor
    kept: list[float] | None = None  # per-model share of elements that reached the merge (masking methods)


MergeFn = Callable[[torch.Tensor, torch.Tensor, MethodArgs], MethodResult]
METHODS: dict[str, MergeFn] = {}


def register(name: str) -> Callable[[MergeFn], MergeFn]:
    def deco(fn: MergeFn) -> MergeFn:
        METHODS[name] = fn
        return fn
    return deco


def _task_vectors(base: torch.Tensor, models: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten, and turn the models buffer into task vectors in place: (N,) base, (K, N) τ."""
    b, d = base.reshape(-1), models.view(models.shape[0], -1)
    each(lambda s, e: d[:, s:e].sub_(b[s:e]), b.numel())
    return b, d


def _mean_squares(d: torch.Tensor, mask: torch.Tensor | None = None, apply: bool = False) -> torch.Tensor:
    """mean(τ_k²) per model, float64, over `mask`ed elements; `apply` also zeroes the rest of τ in place."""
    k, n = d.shape

    def part(s: int, e: int) -> torch.Tensor:
        x = d[:, s:e]
        if mask is not None:
            if apply:
                x.mul_(mask[s:e])
            else:
                x = x * mask[s:e]
        return (x * x).sum(1).double()  # (K,)

    return torch.stack(each(part, n)).sum(0) / max(n, 1) if n else torch.zeros(k, dtype=torch.float64)


def _ratio_weights(ms: torch.Tensor, tiny: float) -> torch.Tensor:
    """w_k = ms_k / Σ ms_j as float32, uniform when Σ ms_j <= `tiny` (all task vectors ~zero)."""
    total = float(ms.sum())
    if abs(total) <= tiny:
        return torch.full(ms.shape, 1.0 / ms.numel(), dtype=torch.float32)
    return (ms / total).float()


def _elect(x: torch.Tensor, w_num: torch.Tensor | None, w_den: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """TIES sign election on a (K, c) slice: keep_k = sign(x_k) == sign(Σ_j x_j) (a zero sum
    counts as +; zeros are never kept).

    Returns (majority sign (c,), Σ_k keep_k·x_k·w_num_k, Σ_k keep_k·w_den_k, keep counts (K,)),
    computed without boolean tensors (slow on CPU): r = relu(x·sign) holds |x_k| where kept and
    0 elsewhere, so sign·Σ_k w_k·r_k equals mergekit's Σ_k (w_k·keep_k)·x_k term for term.
    """
    majority = torch.copysign(torch.ones((), dtype=x.dtype), x.sum(0))  # a -0 sum has only zeros to keep
    r = (x * majority).clamp_(min=0)  # (K, c)
    num = (r * w_num).sum(0) if w_num is not None else r.sum(0)
    keep = r.sign_()  # (K, c): 1 where kept
    return majority, num, (keep * w_den).sum(0), keep.sum(1)


@register("varm")
def varm(base: torch.Tensor, models: torch.Tensor, args: MethodArgs) -> MethodResult:
    """VaRM (FuseChat-1.0): w_k = mean(τ_k²) / Σ_j mean(τ_j²); merged = base + Σ_k w_k τ_k."""
    b, d = _task_vectors(base, models)
    w = _ratio_weights(_mean_squares(d), 0.0)
    wc = w.view(-1, 1)
    each(lambda s, e: b[s:e].add_((d[:, s:e] * wc).sum(0)), b.numel())
    return MethodResult(base, w.tolist())


def select_by_variance(d: torch.Tensor, topk: float) -> torch.Tensor:
    """SCE's selection: flat mask of the top `int(count_nonzero(var) * topk)` elements by
    variance across the (K, N) task vectors — exactly mergekit's set (see `merge.select`)."""
    scores = variance_scores(d)
    count = int(torch.tensor(count_nonzero(scores)) * topk)  # mergekit's own rounding (a float32 product)
    return topk_mask(scores, count)


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
    if args.sce_mask not in ("mergekit", "fusechat"):
        raise ValueError(f"sce_mask must be 'mergekit' or 'fusechat', got {args.sce_mask!r}")
    b, d = _task_vectors(base, models)
    k, n = d.shape
    mask = select_by_variance(d, args.select_topk) if args.select_topk < 1 else None
    upstream = args.sce_mask == "mergekit"
    w = _ratio_weights(_mean_squares(d, mask, apply=upstream), 1e-6 if upstream else 0.0)
    del mask
    wc = w.view(-1, 1)

    def part(s: int, e: int) -> torch.Tensor:
        majority, num, den, kept = _elect(d[:, s:e], wc, wc)
        if upstream:
            den.clamp_(min=1e-6)
        else:
            den.masked_fill_(den == 0, 1)
        b[s:e].addcdiv_(majority * num, den)
        return kept

    kept = torch.stack(each(part, n)).sum(0) if n else torch.zeros(k)
    return MethodResult(base, w.tolist(), (kept.double() / max(n, 1)).tolist())


@register("linear")
def linear(base: torch.Tensor, models: torch.Tensor, args: MethodArgs) -> MethodResult:
    """merged = Σ_k w_k θ_k (/ Σ_k w_k when normalising, the default). The base is not averaged in."""
    b, t = base.reshape(-1), models.view(models.shape[0], -1)
    w = torch.tensor(args.weights, dtype=torch.float32)

    def part(s: int, e: int) -> None:
        out = b[s:e].zero_()
        for i in range(t.shape[0]):
            out.addcmul_(t[i, s:e], w[i])
        if args.normalize:
            out.div_(w.sum())

    each(part, b.numel())
    return MethodResult(base, w.tolist())


def _generator(seed: int, key: str, model: int, start: int) -> torch.Generator:
    """A generator per (seed, tensor name, model, slice): masks independent of order and threads."""
    digest = hashlib.sha256(f"{seed}:{key}:{model}:{start}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


def _dare_(d: torch.Tensor, args: MethodArgs) -> None:
    """DARE on (K, N) task vectors, in place: drop each element with probability 1 − density,
    then rescale the kept ones (by 1/density, or back to the row's L1 norm as mergekit does)."""
    k, n = d.shape

    def part(s: int, e: int) -> torch.Tensor:
        before = d[:, s:e].abs().sum(1).double()
        for i in range(k):
            d[i, s:e].mul_(torch.rand(e - s, generator=_generator(args.seed, args.key, i, s)) < args.density)
        if args.rescale == "inverse":
            d[:, s:e].div_(args.density)
        return torch.stack([before, d[:, s:e].abs().sum(1).double()])  # (2, K) L1 before/after

    norms = torch.stack(each(part, n)).sum(0)
    if args.rescale == "l1":  # mergekit 0.1.5: match the original L1 norm (skipped for ~zero norms)
        for i in range(k):
            if norms[0, i] >= 1e-7 and norms[1, i] >= 1e-7:
                d[i].mul_(float(norms[0, i] / norms[1, i]))


def _task_arithmetic_family(base: torch.Tensor, models: torch.Tensor, args: MethodArgs,
                            sparsify: str | None, consensus: bool) -> MethodResult:
    """mergekit's generalized task arithmetic: sparsify each τ_k, weight it, optionally elect
    signs (TIES), sum, optionally divide by the sum of (kept) weights, scale, add to the base."""
    b, d = _task_vectors(base, models)
    k, n = d.shape
    if sparsify == "magnitude" and args.density < 1:
        top = max(1, int(args.density * n))
        for i in range(k):
            row = d[i]
            d[i].mul_(topk_mask(Scores(n, lambda s, e: row[s:e].abs(), lambda idx: row[idx].abs()), top))
    elif sparsify == "random" and args.density < 1:
        _dare_(d, args)
    w = torch.tensor(args.weights, dtype=torch.float32).view(-1, 1)  # (K, 1)
    total = w.sum(0)
    total[total.abs() < 1e-8] = 1

    def part(s: int, e: int) -> torch.Tensor | None:
        x = d[:, s:e].mul_(w)
        kept = None
        if consensus:
            majority, mixed, divisor, kept = _elect(x, None, w)
            mixed.mul_(majority)
            divisor.masked_fill_(divisor == 0, 1)
        else:
            mixed, divisor = x.sum(0), total
            if sparsify:
                kept = torch.count_nonzero(x, dim=1)
        if args.normalize:
            mixed /= divisor
        if args.scale != 1:
            mixed *= args.scale
        b[s:e].add_(mixed)
        return kept

    parts = [p for p in each(part, n) if p is not None]
    share = (torch.stack(parts).sum(0).double() / max(n, 1)).tolist() if parts else None
    return MethodResult(base, w.view(-1).tolist(), share)


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

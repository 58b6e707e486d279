"""Merge methods: pure functions over the tensors of ONE parameter, registered by name.

Every method takes `base` (the parameter, any float dtype), `models` ((K, *shape), the K
models' values), `MethodArgs` and an `out` buffer (default: `base` itself), writes the merged
tensor into `out` and returns a `MethodResult` with the per-model weights it used. To keep a
merge's memory at a few tensors the input buffers are consumed (float32 models become the
task vectors in place, see `merge.stack`) and the result may overwrite the base. All maths
is float32, slice by slice (sums over a whole tensor add float32 slice sums in float64).
Results equal the formulas up to float rounding, and equal mergekit 0.1.5 to ~1e-7 (tests
compare each method with both).
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from merge import registry
from merge.parallel import each
from merge.select import Scores, topk_mask, variance_scores
from merge.stack import Stack


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
    tensor: torch.Tensor  # the merged parameter: `out` with the base's shape
    weights: list[float]  # per-model weight used for this tensor
    kept: list[float] | None = None  # per-model share of elements that reached the merge (masking methods)


MergeFn = Callable[..., MethodResult]
Put = Callable[[int, int, torch.Tensor], None]  # put(start, end, values): write a slice of the merged tensor
METHODS: dict[str, MergeFn] = {}


# Inputs of one call that a kernel may take besides its options: the tensor's name (DARE seeds its
# masks with it, so reruns match).
CONTEXT = ("key",)


def register(name: str) -> Callable[[Callable], MergeFn]:
    """Register kernel `fn(stack, put, *, OPTIONS) -> (weights, kept)` as method `name` of
    `merge.registry`: its keyword-only parameters must be the options declared there (plus any of
    `CONTEXT`), and each call passes exactly those (see `_wrap`)."""
    spec = registry.METHODS[name]

    def deco(fn: Callable) -> MergeFn:
        params = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
        options = tuple(p for p in params if p not in CONTEXT)
        if options != spec.options:
            raise TypeError(f"merge method {name}: kernel options {options} differ from merge.registry's {spec.options}")
        METHODS[name] = _wrap(fn, spec, tuple(p for p in params if p in CONTEXT))
        return fn
    return deco


def _wrap(fn: Callable, spec: registry.Method, context: tuple[str, ...]) -> MergeFn:
    def method(base: torch.Tensor, models: torch.Tensor, args: MethodArgs,
               out: torch.Tensor | None = None) -> MethodResult:
        out = base if out is None else out
        flat = out.view(-1)
        stack = Stack(base, models, spec.task_vectors)

        def put(s: int, e: int, value: torch.Tensor) -> None:
            flat[s:e] = value  # converts to out's dtype; base[s:e] is not read after this

        weights, kept = fn(stack, put, **{k: getattr(args, k) for k in spec.options + context})
        return MethodResult(out.view(base.shape), weights, kept)
    method.__doc__ = fn.__doc__
    return method


def _share(parts: list[torch.Tensor], n: int) -> list[float] | None:
    return (torch.stack(parts).sum(0).double() / max(n, 1)).tolist() if parts else None


def _mean_squares(st: Stack, mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean(τ_k²) per model, float64, over the `mask`ed elements only if given."""
    def part(s: int, e: int) -> torch.Tensor:
        x = st.tau(s, e)
        if mask is not None:
            x = x * mask[s:e]
        return (x * x).sum(1).double()  # (K,)

    return torch.stack(each(part, st.n)).sum(0) / st.n if st.n else torch.zeros(st.k, dtype=torch.float64)


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
def varm(st: Stack, put: Put) -> tuple[list[float], None]:
    """VaRM (FuseChat-1.0): w_k = mean(τ_k²) / Σ_j mean(τ_j²); merged = base + Σ_k w_k τ_k."""
    w = _ratio_weights(_mean_squares(st), 0.0)
    wc = w.view(-1, 1)
    each(lambda s, e: put(s, e, st.base(s, e) + (st.tau(s, e) * wc).sum(0)), st.n)
    return w.tolist(), None


def select_by_variance(st: Stack, topk: float) -> torch.Tensor:
    """SCE's selection: flat mask of the top `int(count_nonzero(var) * topk)` elements by
    variance across the task vectors — exactly mergekit's set (see `merge.select`)."""
    return topk_mask(variance_scores(st.k, st.n, st.tau, st.tau_at), share=topk)


@register("sce")
def sce(st: Stack, put: Put, *, select_topk: float, sce_mask: str) -> tuple[list[float], list[float]]:
    """SCE (FuseChat-2.0): select top-τ elements by variance across τ_k, calculate variance-ratio
    weights, erase elements against the majority sign, merge.

    `mergekit` mask semantics (mergekit 0.1.5 `sce`): unselected elements are zeroed in every
    τ_k, weights = normalised mean(τ_k²) of the masked τ (uniform when their sum < 1e-6),
    denominator clamped at 1e-6. `fusechat` (the FuseChat-2.0 fork): the selection shapes only
    the weights; the sign vote and the merge use the full τ_k; uniform weights only when the
    sum is 0; a zero denominator is replaced by 1.
    """
    if sce_mask not in ("mergekit", "fusechat"):
        raise ValueError(f"sce_mask must be 'mergekit' or 'fusechat', got {sce_mask!r}")
    upstream = sce_mask == "mergekit"
    mask = select_by_variance(st, select_topk) if select_topk < 1 else None
    if upstream:
        if mask is not None:
            st.mask_(mask)
        w = _ratio_weights(_mean_squares(st), 1e-6)
    else:
        w = _ratio_weights(_mean_squares(st, mask), 0.0)
    del mask
    wc = w.view(-1, 1)

    def part(s: int, e: int) -> torch.Tensor:
        majority, num, den, kept = _elect(st.tau(s, e), wc, wc)
        if upstream:
            den.clamp_(min=1e-6)
        else:
            den.masked_fill_(den == 0, 1)
        put(s, e, torch.addcdiv(st.base(s, e), majority * num, den))
        return kept

    return w.tolist(), _share(each(part, st.n), st.n)


@register("linear")
def linear(st: Stack, put: Put, *, weights: tuple[float, ...], normalize: bool) -> tuple[list[float], None]:
    """merged = Σ_k w_k θ_k (/ Σ_k w_k when normalising, the default). The base is not averaged in."""
    w = torch.tensor(weights, dtype=torch.float32)

    def part(s: int, e: int) -> None:
        theta = st.theta(s, e)
        acc = torch.zeros(e - s)
        for i in range(st.k):
            acc.addcmul_(theta[i], w[i])
        put(s, e, acc.div_(w.sum()) if normalize else acc)

    each(part, st.n)
    return w.tolist(), None


def _dare_keep(seed: int, key: str, density: float, k: int, s: int, e: int) -> torch.Tensor:
    """(K, c) DARE keep-masks of slice [s, e): Bernoulli(density), from a generator per (seed,
    tensor name, model, slice), so the same mask comes back on every call, thread and rerun."""
    rows = []
    for i in range(k):
        digest = hashlib.sha256(f"{seed}:{key}:{i}:{s}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))
        rows.append(torch.rand(e - s, generator=g) < density)
    return torch.stack(rows)


def _l1_factors(st: Stack, keep: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """mergekit 0.1.5's DARE rescale: |τ_k|₁ / |dropped τ_k|₁ per model (1 for ~zero norms), (K, 1)."""
    def part(s: int, e: int) -> torch.Tensor:
        x = st.tau(s, e)
        return torch.stack([x.abs().sum(1), (x * keep(s, e)).abs().sum(1)]).double()

    before, after = torch.stack(each(part, st.n)).sum(0)
    ok = (before >= 1e-7) & (after >= 1e-7)
    return torch.where(ok, before / after.clamp(min=1e-300), 1.0).float().view(-1, 1)


def _task_arithmetic_family(st: Stack, put: Put, sparsify: str | None, consensus: bool, *,
                            weights: tuple[float, ...], normalize: bool, scale: float, density: float = 1.0,
                            rescale: str = "inverse", seed: int = 0, key: str = ""
                            ) -> tuple[list[float], list[float] | None]:
    """mergekit's generalized task arithmetic: sparsify each τ_k, weight it, optionally elect
    signs (TIES), sum, optionally divide by the sum of (kept) weights, scale, add to the base."""
    dare = sparsify == "random" and density < 1
    if sparsify == "magnitude" and density < 1:
        top = max(1, int(density * st.n))
        for i in range(st.k):
            scores = Scores(st.n, lambda s, e: st.tau_row(i, s, e).abs(), lambda idx: st.tau_at(idx)[i].abs())
            st.mask_(topk_mask(scores, top), row=i)
    def keep(s: int, e: int) -> torch.Tensor:
        return _dare_keep(seed, key, density, st.k, s, e)

    factors = _l1_factors(st, keep) if dare and rescale == "l1" else None
    w = torch.tensor(weights, dtype=torch.float32).view(-1, 1)  # (K, 1)
    total = w.sum(0)
    total[total.abs() < 1e-8] = 1

    def part(s: int, e: int) -> torch.Tensor | None:
        x = st.tau(s, e)
        if dare:
            x = x * keep(s, e)
            if rescale == "inverse":
                x /= density
            elif factors is not None:
                x *= factors
        x = x * w  # mergekit weights the sparsified task vectors
        kept = None
        if consensus:
            majority, mixed, divisor, kept = _elect(x, None, w)
            mixed.mul_(majority)
            divisor.masked_fill_(divisor == 0, 1)
        else:
            mixed, divisor = x.sum(0), total
            if sparsify:
                kept = torch.count_nonzero(x, dim=1)
        if normalize:
            mixed /= divisor
        if scale != 1:
            mixed *= scale
        put(s, e, st.base(s, e) + mixed)
        return kept

    parts = [p for p in each(part, st.n) if p is not None]
    return w.view(-1).tolist(), _share(parts, st.n)


@register("task_arithmetic")
def task_arithmetic(st: Stack, put: Put, *, weights: tuple[float, ...], normalize: bool, scale: float):
    """merged = base + λ Σ_k w_k τ_k."""
    return _task_arithmetic_family(st, put, None, False, weights=weights, normalize=normalize, scale=scale)


@register("ties")
def ties(st: Stack, put: Put, *, weights: tuple[float, ...], density: float, normalize: bool, scale: float):
    """TIES: keep the top-`density` |τ_k| of each model, elect signs by Σ_k w_k τ_k, average the agreeing."""
    return _task_arithmetic_family(st, put, "magnitude", True, weights=weights, normalize=normalize, scale=scale,
                                   density=density)


@register("dare_ties")
def dare_ties(st: Stack, put: Put, *, key: str, weights: tuple[float, ...], density: float, rescale: str,
              normalize: bool, scale: float, seed: int):
    """DARE drop-and-rescale of each τ_k, then TIES sign election."""
    return _task_arithmetic_family(st, put, "random", True, weights=weights, normalize=normalize, scale=scale,
                                   density=density, rescale=rescale, seed=seed, key=key)


@register("dare_linear")
def dare_linear(st: Stack, put: Put, *, key: str, weights: tuple[float, ...], density: float, rescale: str,
                normalize: bool, scale: float, seed: int):
    """DARE drop-and-rescale of each τ_k, then base + λ Σ_k w_k τ̃_k."""
    return _task_arithmetic_family(st, put, "random", False, weights=weights, normalize=normalize, scale=scale,
                                   density=density, rescale=rescale, seed=seed, key=key)

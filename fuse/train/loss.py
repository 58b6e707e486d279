"""The fusion loss over sparse top-k teacher targets.

    loss_t = λ·CE(gold_t) + (1−λ)·CE(target_t ‖ student_t)

with `target_t = softmax(logp_topk_t / T)` renormalised over the valid top-k entries and the
student term written sparsely:

    CE(target ‖ student) = −Σ_k p_k log softmax(z)[idx_k] = logsumexp(z) − Σ_k p_k z[idx_k]

(because Σ_k p_k = 1). The `logsumexp` is shared with the gold term, so a fusion step costs one
`logsumexp` over the vocabulary like plain cross-entropy plus a (k+1)-element gather: no
[B, L, V] target is ever built (FuseChat builds one in a Python loop, their issue #13).

`chunked_fusion_loss` is the same loss from the final hidden states and the LM head's weight: the
scored positions are projected onto the vocabulary a chunk of positions at a time, forward and
backward (`ChunkedFusionCE`), so an (N, V) logits tensor never exists at full precision; only the
(N,) log-normalisers are kept for the backward, which recomputes each chunk's logits.

Conventions: every tensor is *aligned at the prediction*: `logits[..., t, :]` scores `labels[..., t]`
and `target_ids[..., t, :]` (shift before calling). `labels == -100` marks positions without loss;
`target_ids == -1` marks padded top-k entries. A labelled position whose targets are all padding
uses the one-hot gold target (its KD term equals its CE term), so every labelled token carries
the same total weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100


@dataclass
class FusionLossOutput:
    """The loss to back-propagate and its parts (sums over the labelled tokens, detached)."""

    loss: torch.Tensor
    ce_sum: torch.Tensor  # Σ CE(gold) over labelled tokens
    kd_sum: torch.Tensor  # Σ CE(target ‖ student) over labelled tokens
    n_tokens: torch.Tensor  # number of labelled tokens
    n_targets: torch.Tensor  # labelled tokens that had at least one valid target entry


def valid_targets(target_ids: torch.Tensor, target_logprobs: torch.Tensor) -> torch.Tensor:
    """Entries that carry probability: a real id (≥ 0) with a finite log-prob (−inf = padding)."""
    return (target_ids >= 0) & torch.isfinite(target_logprobs)


def target_probs(target_ids: torch.Tensor, target_logprobs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Renormalised teacher probabilities `softmax(logp / T)` over the valid (id ≥ 0) entries.

    Padded entries (id −1 or a non-finite log-prob) get probability 0; a row with no valid
    entry is all zeros (not NaN).
    """
    valid = valid_targets(target_ids, target_logprobs)  # (..., k)
    lp = target_logprobs if target_logprobs.dtype == torch.float64 else target_logprobs.float()
    scaled = torch.where(valid, lp / temperature, float("-inf"))
    # A row of all −inf would give NaN from softmax: give it a finite dummy max and zero it after.
    has_any = valid.any(-1, keepdim=True)
    scaled = torch.where(has_any, scaled, 0.0)
    probs = torch.softmax(scaled, dim=-1)
    return torch.where(valid & has_any, probs, 0.0)


def fusion_loss(logits: torch.Tensor, labels: torch.Tensor, target_ids: torch.Tensor,
                target_logprobs: torch.Tensor, lam: float = 0.9, temperature: float = 1.0,
                num_items: torch.Tensor | int | None = None) -> FusionLossOutput:
    """λ·CE(gold) + (1−λ)·CE(target ‖ student), summed over labelled tokens / `num_items`.

    logits (..., V) float/bf16; labels (...) long with −100; target_ids (..., k) int with −1
    padding; target_logprobs (..., k) teacher log-probs (fp16/fp32). `num_items` defaults to
    the number of labelled tokens (Trainer passes the count over the whole accumulated batch).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    if target_ids.shape[:-1] != labels.shape or logits.shape[:-1] != labels.shape:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)}, labels {tuple(labels.shape)}, "
                         f"target_ids {tuple(target_ids.shape)}")
    mask = labels != IGNORE_INDEX
    # Score only labelled positions: selecting first keeps the fp32 upcast at (N, V), not (B, L, V).
    z = logits[mask]  # (N, V)
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    gold = labels[mask].long()  # (N,)
    ids = target_ids[mask].long()  # (N, k)
    logp = target_logprobs[mask]  # (N, k)
    valid = valid_targets(ids, logp)
    probs = target_probs(ids, logp, temperature).to(z.dtype)  # (N, k)

    lse = torch.logsumexp(z, dim=-1)  # (N,)
    z_gold = z.gather(-1, gold.unsqueeze(-1)).squeeze(-1)  # (N,)
    # Padded ids (−1) are gathered at 0 and then masked with where(): 0·(−inf) would be NaN
    # if z held −inf, so never multiply an unmasked padded entry.
    z_k = z.gather(-1, ids.clamp(min=0))  # (N, k)
    dot = torch.where(valid, probs * z_k, 0.0).sum(-1)  # (N,)
    has_target = valid.any(-1)
    ce = lse - z_gold
    kd = torch.where(has_target, lse - dot, ce)  # no target → one-hot gold
    per_token = lam * ce + (1.0 - lam) * kd
    n = mask.sum()
    denom = torch.as_tensor(num_items if num_items is not None else n).to(z.device).clamp(min=1)
    # A micro-batch with no labelled token gives an empty, still graph-connected sum: a zero
    # loss whose backward works (DDP needs every rank to run it).
    loss = per_token.sum() / denom
    return FusionLossOutput(loss=loss, ce_sum=ce.detach().sum(), kd_sum=kd.detach().sum(),
                            n_tokens=n.detach(), n_targets=(has_target.sum()).detach())


# Elements of one (chunk, V) float32 logits block: bounds the working set of the chunked loss
# (64 MiB; 512 positions at a 32k vocabulary, 110 at Qwen's 152k).
CHUNK_ELEMENTS = 1 << 24


def chunk_rows(vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Positions per chunk of the chunked loss for a vocabulary of `vocab` tokens."""
    return max(16, elements // max(vocab, 1))


def project(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, acc: torch.dtype, scale: float,
             softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softcap·tanh(scale·(h·weightᵀ + bias) / softcap) in the dtype `acc` (a fresh tensor, free to
    change in place), and the tanh(·) when there is a softcap (its derivative needs it)."""
    z = torch.nn.functional.linear(h, weight, bias)
    z = z.to(acc) if z.dtype != acc else z
    if scale != 1.0:
        z.mul_(scale)
    if softcap is None:
        return z, None
    t = z.div_(softcap).tanh_()
    return t * softcap, t


def _addmm_acc(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b in out's (float32) precision: on CUDA from half-precision operands directly
    (cuBLAS accumulates in float32), elsewhere after upcasting them."""
    if out.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16) and out.dtype == torch.float32:
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    else:
        out.addmm_(a.to(out.dtype), b.to(out.dtype))


class ChunkedFusionCE(torch.autograd.Function):
    """Per-position CE(gold) and CE(q ‖ softmax(z)) with z = head(hidden), a chunk of positions at a time.

    hidden (N, H); weight (V, H); bias (V,) or None; gold (N,) long; ids (N, k) long ≥ 0; probs
    (N, k) the target q over `ids` (0 at padding: q is one-hot gold where a position has no target);
    valid (N, k) bool. Returns (ce, kd), each (N,). The matmul runs in the autocast dtype when autocast
    is on (else the hidden states' dtype), the softmax maths in float32 (float64 for float64 inputs).
    Saved for the backward: the inputs and lse (N,); it recomputes each chunk's logits and turns them
    into the logits' gradient in place: dce/dz = p − onehot(gold), dkd/dz = p − q.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gold: torch.Tensor,
                ids: torch.Tensor, probs: torch.Tensor, valid: torch.Tensor, chunk: int, scale: float,
                softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        dev = hidden.device.type
        cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        n = hidden.shape[0]
        lse, ce, kd = (torch.empty(n, dtype=acc, device=hidden.device) for _ in range(3))
        with torch.autocast(dev, enabled=False):
            w = weight.to(cd)
            b = bias.to(cd) if bias is not None else None
            for lo in range(0, n, chunk):
                hi = min(lo + chunk, n)
                z, _ = project(hidden[lo:hi].to(cd), w, b, acc, scale, softcap)
                z_gold = z.gather(1, gold[lo:hi, None])[:, 0]
                dot = torch.where(valid[lo:hi], probs[lo:hi] * z.gather(1, ids[lo:hi]), 0.0).sum(-1)
                m = z.max(-1, keepdim=True).values
                lse[lo:hi] = (m + z.sub_(m).exp_().sum(-1, keepdim=True).log_())[:, 0]  # z is consumed
                ce[lo:hi] = lse[lo:hi] - z_gold
                kd[lo:hi] = lse[lo:hi] - dot
        ctx.save_for_backward(hidden, weight, bias, gold, ids, probs, lse)
        ctx.chunk, ctx.scale, ctx.softcap, ctx.cd, ctx.acc = chunk, scale, softcap, cd, acc
        return ce, kd

    @staticmethod
    def backward(ctx: Any, g_ce: torch.Tensor | None, g_kd: torch.Tensor | None):  # type: ignore[override]
        hidden, weight, bias, gold, ids, probs, lse = ctx.saved_tensors
        cd, acc, chunk = ctx.cd, ctx.acc, ctx.chunk
        n = hidden.shape[0]
        zeros = torch.zeros(n, dtype=acc, device=hidden.device)
        g_ce = zeros if g_ce is None else g_ce.to(acc)
        g_kd = zeros if g_kd is None else g_kd.to(acc)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b and bias is not None else None
        dev = hidden.device.type
        with torch.autocast(dev, enabled=False):
            w = weight.to(cd)
            b = bias.to(cd) if bias is not None else None
            for lo in range(0, n, chunk):
                hi = min(lo + chunk, n)
                h = hidden[lo:hi].to(cd)
                z, t = project(h, w, b, acc, ctx.scale, ctx.softcap)
                g = z.sub_(lse[lo:hi, None]).exp_().mul_((g_ce[lo:hi] + g_kd[lo:hi])[:, None])  # p·(g_ce + g_kd)
                g.scatter_add_(1, gold[lo:hi, None], -g_ce[lo:hi, None])
                g.scatter_add_(1, ids[lo:hi], -g_kd[lo:hi, None] * probs[lo:hi])
                if t is not None:  # d softcap·tanh(y / softcap) / dy = 1 − tanh²
                    g.mul_(t.square_().neg_().add_(1.0))
                if ctx.scale != 1.0:
                    g.mul_(ctx.scale)
                if grad_h is not None:
                    grad_h[lo:hi] = (g.to(cd) @ w).to(hidden.dtype)
                if grad_w is not None:
                    _addmm_acc(grad_w, g.to(cd).t() if cd != acc else g.t(), h)
                if grad_b is not None:
                    grad_b += g.sum(0)
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def chunked_fusion_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, target_ids: torch.Tensor,
                        target_logprobs: torch.Tensor, lam: float = 0.9, temperature: float = 1.0,
                        num_items: torch.Tensor | int | None = None, *, bias: torch.Tensor | None = None,
                        chunk_size: int | None = None, scale: float = 1.0,
                        softcap: float | None = None) -> FusionLossOutput:
    """`fusion_loss` of the logits softcap·tanh(scale·(hidden·weightᵀ + bias) / softcap) without
    materialising them: hidden (..., H) final hidden states aligned at the prediction like `logits`
    there; weight (V, H) the LM head's. `chunk_size` positions per chunk (default `chunk_rows(V)`)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    if target_ids.shape[:-1] != labels.shape or hidden.shape[:-1] != labels.shape:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, labels {tuple(labels.shape)}, "
                         f"target_ids {tuple(target_ids.shape)}")
    mask = labels != IGNORE_INDEX
    h = hidden[mask]  # (N, H)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    gold = labels[mask].long().to(h.device)
    ids = target_ids[mask].long().to(h.device)
    logp = target_logprobs[mask].to(h.device)
    valid = valid_targets(ids, logp)
    has_target = valid.any(-1)
    probs = target_probs(ids, logp, temperature).to(acc)
    # A position without a target takes the one-hot gold target (kd = ce, as in `fusion_loss`).
    ids = ids.clamp(min=0)
    none = ~has_target
    ids[none, 0], probs[none, 0], valid[none, 0] = gold[none], 1.0, True
    chunk = chunk_size or chunk_rows(weight.shape[0])
    ce, kd = ChunkedFusionCE.apply(h, weight, bias, gold, ids, probs, valid, chunk, float(scale), softcap)
    per_token = lam * ce + (1.0 - lam) * kd
    n = mask.sum()
    denom = torch.as_tensor(num_items if num_items is not None else n).to(h.device).clamp(min=1)
    loss = per_token.sum() / denom
    return FusionLossOutput(loss=loss, ce_sum=ce.detach().sum(), kd_sum=kd.detach().sum(),
                            n_tokens=n.detach(), n_targets=has_target.sum().detach())

"""The fusion loss over sparse top-k teacher targets.

    loss_t = λ·CE(gold_t) + (1−λ)·CE(target_t ‖ student_t)

with `target_t = softmax(logp_topk_t / T)` renormalised over the valid top-k entries and the
student term written sparsely:

    CE(target ‖ student) = −Σ_k p_k log softmax(z)[idx_k] = logsumexp(z) − Σ_k p_k z[idx_k]

(because Σ_k p_k = 1). The `logsumexp` is shared with the gold term, so a fusion step costs one
`logsumexp` over the vocabulary like plain cross-entropy plus a (k+1)-element gather: no
[B, L, V] target is ever built (FuseChat builds one in a Python loop, their issue #13).

Conventions: every tensor is *aligned at the prediction*: `logits[..., t, :]` scores `labels[..., t]`
and `target_ids[..., t, :]` (shift before calling). `labels == -100` marks positions without loss;
`target_ids == -1` marks padded top-k entries. A labelled position whose targets are all padding
uses the one-hot gold target (its KD term equals its CE term), so every labelled token carries
the same total weight.
"""

from __future__ import annotations

from dataclasses import dataclass

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

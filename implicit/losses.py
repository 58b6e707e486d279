"""The preference losses of implicit fusion, as pure functions of sequence log-probabilities.

Every argument `logp_*` is log π(y|x) summed over the answer's tokens, one value per example;
the implicit reward of an answer is r(y) = log π_θ(y|x) − log π_ref(y|x), divided by its token
count |y| in the length-normalised forms.

- DPO (sigmoid):            L = −log σ(β·(r(y_w) − r(y_l)))
- length-normalised DPO:    L = −log σ(β·(r(y_w)/|y_w| − r(y_l)/|y_l|))      (FuseChat-3.0 for Llama)
- WRPO:                     L = −log σ(β·(α·r(y_ws) + (1−α)·r(y_wt) − r(y_l)))
  with y_ws the source's best answer, y_wt the target's own best, y_l the rejected answer, and the
  fusion coefficient α raised linearly from 0 to α_max over training (`wrpo_alpha`).

TRL's `DPOTrainer` computes the first two itself (`loss_type` `sigmoid` and `sigmoid_norm`); the
tests check that its losses equal these. The WRPO trainer calls `wrpo_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def implicit_reward(logp_policy: torch.Tensor, logp_ref: torch.Tensor,
                    length: torch.Tensor | None = None) -> torch.Tensor:
    """r(y) = log π_θ(y|x) − log π_ref(y|x), per token when `length` (|y|, clamped to >= 1) is given."""
    r = logp_policy - logp_ref
    return r if length is None else r / length.clamp(min=1).to(r.dtype)


def dpo_loss(logp_chosen: torch.Tensor, logp_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, len_chosen: torch.Tensor | None = None,
             len_rejected: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example DPO loss; length-normalised when both lengths are given."""
    if (len_chosen is None) != (len_rejected is None):
        raise ValueError("dpo_loss: give both lengths (length-normalised) or neither")
    margin = implicit_reward(logp_chosen, ref_chosen, len_chosen) - implicit_reward(logp_rejected, ref_rejected,
                                                                                  len_rejected)
    return -F.logsigmoid(beta * margin)


def wrpo_loss(logp_source: torch.Tensor, logp_target: torch.Tensor, logp_rejected: torch.Tensor,
              ref_source: torch.Tensor, ref_target: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
              alpha: float, lengths: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-example WRPO loss: the chosen reward is α·r(y_ws) + (1−α)·r(y_wt); `lengths` =
    (|y_ws|, |y_wt|, |y_l|) for the length-normalised form."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"wrpo_loss: alpha must be in [0, 1], got {alpha}")
    n_ws, n_wt, n_l = lengths if lengths is not None else (None, None, None)
    chosen = alpha * implicit_reward(logp_source, ref_source, n_ws) + (1 - alpha) * implicit_reward(
        logp_target, ref_target, n_wt)
    return -F.logsigmoid(beta * (chosen - implicit_reward(logp_rejected, ref_rejected, n_l)))


def wrpo_alpha(step: int, total_steps: int, alpha_max: float) -> float:
    """α at optimizer step `step` (0-based, the steps already taken) of `total_steps`: 0 at the first
    step, α_max at the last, linear in between (α_max beyond; 0 before training, total_steps <= 0)."""
    if total_steps <= 0:
        return 0.0
    if total_steps == 1:
        return 0.0 if step < 1 else alpha_max
    return alpha_max * min(1.0, max(0.0, step / (total_steps - 1)))

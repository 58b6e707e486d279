"""The inputs of one parameter as the merge methods see them: a base (N,) and K models (K, N)
in their stored float dtype, served as float32 slices.

float32 inputs are turned into task vectors τ_k = θ_k − θ_base once, in place (no copy at
all); bfloat16/float16 inputs stay as stored (half the memory of a float32 copy) and each slice
is converted and subtracted when asked for. Masks that zero task-vector elements are applied
in place in the first case and remembered, then applied to every slice, in the second.
Slices handed out may be views of the buffers: callers treat them as read-only.
"""

from __future__ import annotations

import torch

from merge.parallel import each


class Stack:
    def __init__(self, base: torch.Tensor, models: torch.Tensor, task_vectors: bool = True) -> None:
        self.b = base.reshape(-1)
        self.t = models.reshape(models.shape[0], -1)
        self.k, self.n = self.t.shape
        self.in_place = task_vectors and base.dtype == models.dtype == torch.float32
        self._masks: list[torch.Tensor | None] = [None] * self.k
        if self.in_place:  # the models buffer now holds the task vectors
            each(lambda s, e: self.t[:, s:e].sub_(self.b[s:e]), self.n)

    def base(self, s: int, e: int) -> torch.Tensor:
        """(c,) float32 base slice."""
        return self.b[s:e].float()

    def theta(self, s: int, e: int) -> torch.Tensor:
        """(K, c) float32 model values (only for a stack made with task_vectors=False)."""
        assert not self.in_place, "the models buffer holds task vectors"
        return self.t[:, s:e].float()

    def tau(self, s: int, e: int) -> torch.Tensor:
        """(K, c) float32 task vectors, masked as `mask_` asked."""
        if self.in_place:
            return self.t[:, s:e]
        x = self.t[:, s:e].float() - self.b[s:e].float()
        for i, m in enumerate(self._masks):
            if m is not None:
                x[i].mul_(m[s:e])
        return x

    def tau_row(self, i: int, s: int, e: int) -> torch.Tensor:
        """(c,) float32 task vector of model i, unmasked unless masked in place."""
        return self.t[i, s:e] if self.in_place else self.t[i, s:e].float() - self.b[s:e].float()

    def tau_at(self, idx: torch.Tensor) -> torch.Tensor:
        """(K, m) float32 task vectors at flat indices (before any remembered mask)."""
        if self.in_place:
            return self.t[:, idx]
        return self.t[:, idx].float() - self.b[idx].float()

    def mask_(self, mask: torch.Tensor, row: int | None = None) -> None:
        """Zero the task vectors (of one model, or all) where the (N,) bool `mask` is False."""
        rows = range(self.k) if row is None else [row]
        if self.in_place:
            def part(s: int, e: int) -> None:
                for i in rows:
                    self.t[i, s:e].mul_(mask[s:e])

            each(part, self.n)
        else:
            for i in rows:
                self._masks[i] = mask

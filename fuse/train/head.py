"""The LM head of a model in training, for the chunked fusion loss (`fuse.train.loss.chunked_fusion_loss`).

The loss needs the final hidden states and the head's weight instead of the logits. The forward still
goes through the model's own `forward` (DDP, PEFT and accelerate wrap it; gradient checkpointing
lives inside it): a hook on the decoder keeps its output, and the model is asked for the logits of
the last position only (`logits_to_keep=1`). Those logits check, on a model's first step, that the
head applied to the hooked states gives the model's own logits (an architecture with other output
transforms, or a wrapped head, then trains through its logits instead).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from core.logits import accepts_logits_to_keep, head_transform
from fuse.train.loss import project

log = logging.getLogger(__name__)


@dataclass
class Head:
    """What the chunked loss needs of a model: its decoder (hooked), its linear head, the transforms."""

    model: torch.nn.Module  # the unwrapped causal LM
    decoder: torch.nn.Module
    linear: torch.nn.Linear
    scale: float
    softcap: float | None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM inside DDP (`.module`) and PEFT (`get_base_model()`) wrappers."""
    for _ in range(4):
        if isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        elif callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        else:
            break
    return model


def find_head(model: torch.nn.Module) -> Head | None:
    """The model's `Head`, or None when the chunked loss cannot stand in for its logits: no separable
    decoder, a head that is not a plain `nn.Linear` (LoRA on the head), a sharded weight (FSDP), no
    `logits_to_keep`, or a first-step check that failed."""
    base = unwrap(model)
    if base.__dict__.get("_pivotfuse_chunked_head") is False:
        return None
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or decoder is base or type(head) is not torch.nn.Linear or type(head.weight) is not torch.nn.Parameter:
        return None
    if not accepts_logits_to_keep(base):
        return None
    scale, softcap = head_transform(base)
    return Head(base, decoder, head, scale, softcap)


def forward_hidden(model: torch.nn.Module, head: Head, inputs: dict[str, Any]) -> tuple[torch.Tensor | None, Any]:
    """Run `model` (wrappers included) on `inputs`; the decoder's (B, L, H) output on the head's device
    and the model outputs. None instead of the states when the model's first-step check fails."""
    captured: list[Any] = []
    handle = head.decoder.register_forward_hook(lambda _m, _a, out: captured.append(out))
    try:
        outputs = model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    if not captured:
        head.model._pivotfuse_chunked_head = False
        return None, outputs
    out = captured[-1]
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    hidden = hidden.to(head.linear.weight.device)
    if head.model.__dict__.get("_pivotfuse_chunked_head") is None:
        head.model._pivotfuse_chunked_head = _same_logits(head, hidden[:, -1], outputs.logits[:, -1])
        if not head.model._pivotfuse_chunked_head:
            log.warning("%s: the LM head on the decoder's states does not give the model's logits; "
                        "training on the logits of the scored positions instead", type(head.model).__name__)
            return None, outputs
    return hidden, outputs


@torch.no_grad()
def _same_logits(head: Head, hidden: torch.Tensor, ref: torch.Tensor) -> bool:
    """Does the chunked loss's projection of `hidden` (B, H) give the model's logits `ref` (B, V)?"""
    try:
        dev = hidden.device.type
        cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        lin = head.linear
        with torch.autocast(dev, enabled=False):
            fast, _ = project(hidden.to(cd), lin.weight.to(cd), lin.bias.to(cd) if lin.bias is not None else None,
                              torch.float32, head.scale, head.softcap)
        ref = ref.float().to(fast.device)
        if fast.shape != ref.shape:
            return False
        rtol = 1e-4 if cd == torch.float32 else 2e-2
        return bool(torch.isclose(fast, ref, rtol=0, atol=rtol * (1 + float(ref.abs().max()))).all())
    except (RuntimeError, ValueError, TypeError):  # shapes or dtypes the head does not take: not this path
        return False

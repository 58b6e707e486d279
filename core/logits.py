"""Logits of the scored positions only: the LM head run on the rows that are scored, not on all.

A (batch, length, vocabulary) logits tensor dominates the time and memory of extraction,
evaluation and training with a large vocabulary, yet only the positions that predict assistant
tokens are used. Two ways to get just those rows, and how to tell whether a model allows them:

- the final hidden states of the model's decoder, gathered at the scored rows, through the LM
  head and the output transforms some architectures apply after it (`final_hidden`,
  `head_logits`), checked once per model against its own forward (`head_path_ok`): for scoring
  without gradients (extraction, held-out loss, the demo world's training);
- the model's `logits_to_keep` argument, with scored positions (`accepts_logits_to_keep`) or a
  boolean mask (`accepts_logits_mask`): for training, where the call must go through the model's
  own forward (DDP and PEFT wrap it).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def _text_config(model: Any) -> Any:
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The causal-LM head on final hidden states (N, H) -> (N, V), with the output transforms some
    architectures apply after it (Cohere's logit_scale, Granite's logits_scaling, Gemma's softcap)."""
    head = model.get_output_embeddings()
    logits = head(hidden.to(head.weight.device))
    cfg = _text_config(model)
    if getattr(cfg, "logit_scale", None):
        logits = logits * cfg.logit_scale
    if getattr(cfg, "logits_scaling", None):
        logits = logits / cfg.logits_scaling
    if getattr(cfg, "final_logit_softcapping", None):
        logits = torch.tanh(logits / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
    return logits


def head_transform(model: Any) -> tuple[float, float | None]:
    """The output transforms of `head_logits` as (scale, softcap): logits = softcap·tanh(scale·z / softcap)
    (softcap None: scale·z), for code that runs the LM head's matmul itself (the chunked fusion loss)."""
    cfg = _text_config(model)
    scale = 1.0
    if getattr(cfg, "logit_scale", None):
        scale *= cfg.logit_scale
    if getattr(cfg, "logits_scaling", None):
        scale /= cfg.logits_scaling
    return float(scale), (float(cfg.final_logit_softcapping) if getattr(cfg, "final_logit_softcapping", None) else None)


def final_hidden(model: Any, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor | None:
    """(B, T, H) final hidden states from the model's decoder, or None if it has no separable one."""
    try:
        decoder = model.get_decoder()
        if decoder is None or decoder is model or model.get_output_embeddings() is None:
            return None
        return decoder(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
    except Exception:  # noqa: BLE001 - any surprise in an architecture means: use the generic path
        return None


def accepts_logits_to_keep(model: Any) -> bool:
    """Does the model's forward take `logits_to_keep` (an int or 1-D positions)?"""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def head_path_ok(model: Any, ids: torch.Tensor, attn: torch.Tensor, hidden: torch.Tensor | None,
                 rows: Any, seq: int = 0) -> bool:
    """Does the LM head on the decoder's hidden states give the model's own logits? Checked once per
    model on up to 16 scored rows (logit positions `rows` of sequence `seq`), with one extra forward
    over their prefix; the answer is kept on the model."""
    cached = model.__dict__.get("_pivotfuse_hidden_path")
    if cached is not None:
        return cached
    ok = False
    if hidden is not None:
        try:
            pos = torch.as_tensor(rows[:16], device=ids.device)
            prefix = int(pos.max()) + 1
            one = slice(seq, seq + 1)
            if accepts_logits_to_keep(model):
                ref = model(input_ids=ids[one, :prefix], attention_mask=attn[one, :prefix], use_cache=False,
                            logits_to_keep=pos).logits[0]
            else:
                ref = model(input_ids=ids[one, :prefix], attention_mask=attn[one, :prefix], use_cache=False).logits[0, pos]
            fast = head_logits(model, hidden[seq, pos.to(hidden.device)]).float()
            ref = ref.float().to(fast.device)
            rtol = 1e-4 if hidden.dtype == torch.float32 else 2e-2
            tol = rtol * (1 + float(ref.nan_to_num().abs().max()))
            ok = bool(torch.isclose(fast, ref, rtol=0, atol=tol, equal_nan=True).all())
        except Exception:  # noqa: BLE001
            ok = False
    if not ok:
        log.warning("%s: logits of scored rows only are not available; computing all logits (slower, more memory)",
                    type(model).__name__)
    model._pivotfuse_hidden_path = ok
    return ok


def head_path_known_bad(model: Any) -> bool:
    """True once `head_path_ok` has said no for this model (then skip computing hidden states)."""
    return model.__dict__.get("_pivotfuse_hidden_path") is False


def accepts_logits_mask(model: torch.nn.Module) -> bool:
    """Does the model's forward take `logits_to_keep` as a boolean (B, L) mask? Models of recent
    transformers 5 releases slice with `slice_logits_to_keep`, which does; older ones index
    `hidden_states[:, logits_to_keep, :]`, which takes only an int or 1-D positions (then the
    step projects every position and keeps the scored ones)."""
    base = model
    for attr in ("module", "base_model", "model", None):  # DDP / PEFT wrappers
        forward = type(base).forward
        if "logits_to_keep" in inspect.signature(forward).parameters:
            try:
                return "slice_logits_to_keep" in inspect.getsource(forward)
            except (OSError, TypeError):  # no source (compiled, frozen): do not assume
                return False
        if attr is not None:
            base = getattr(base, attr, base)
    return False

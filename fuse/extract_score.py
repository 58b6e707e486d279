"""Score one padded batch: top-k next-token log-probs at the positions that predict assistant tokens.

Kept apart from the extraction loop (files, shards, processes) so the maths can be checked
against a plain full `log_softmax` in tests.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.errors import PivotfuseError

# Rows of float32 logits handled at once: bounds the (rows, V) temporaries to ~128 MB.
_CHUNK_ELEMENTS = 1 << 25


@dataclass
class SequenceScores:
    """Scores of one sequence's gold tokens (n of them)."""

    topk_ids: np.ndarray  # (n, k) int64
    topk_logprobs: np.ndarray  # (n, k) float32
    gold_logprobs: np.ndarray  # (n,) float32


def _accepts_logits_to_keep(model: Any) -> bool:
    cached = getattr(model, "_pivotfuse_logits_to_keep", None)
    if cached is None:
        cached = "logits_to_keep" in inspect.signature(model.forward).parameters
        model._pivotfuse_logits_to_keep = cached
    return cached


@torch.inference_mode()
def score_batch(model: Any, sequences: list[list[int]], gold_positions: list[np.ndarray], k: int,
                names: list[str], pad_id: int = 0) -> list[SequenceScores]:
    """Run `model` over right-padded `sequences` and score token t of sequence b for t in
    `gold_positions[b]` (each ≥ 1) with the logits at t − 1.

    Log-probs are `x − logsumexp(x)` on float32 logits (the model may run in bf16); only the
    logit rows that some sequence scores are computed (`logits_to_keep`), and the (rows, V)
    softmax work is done in chunks. Non-finite logits raise an error naming the sample.
    """
    device = model.get_input_embeddings().weight.device
    B, T = len(sequences), max(len(s) for s in sequences)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    for b, seq in enumerate(sequences):
        ids[b, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attn[b, : len(seq)] = 1
    rows_b = np.concatenate([np.full(len(p), b) for b, p in enumerate(gold_positions)])  # (N,)
    rows_t = np.concatenate([np.asarray(p) - 1 for p in gold_positions])  # (N,) logit positions
    gold = torch.as_tensor(np.concatenate([np.asarray(s)[np.asarray(p)] for s, p in zip(sequences, gold_positions)]))
    keep = np.unique(rows_t)  # (P,) positions whose logits are needed by any row
    kwargs: dict[str, Any] = {"use_cache": False}
    if _accepts_logits_to_keep(model) and len(keep) < T:
        kwargs["logits_to_keep"] = torch.as_tensor(keep, device=device)
        cols = np.searchsorted(keep, rows_t)
    else:
        cols = rows_t
    logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), **kwargs).logits  # (B, P, V)
    V = logits.shape[-1]
    if k > V:
        raise PivotfuseError(f"top-k {k} exceeds the vocabulary size {V}")
    chunk = max(1, _CHUNK_ELEMENTS // V)
    rb, rc = torch.as_tensor(rows_b, device=logits.device), torch.as_tensor(cols, device=logits.device)
    gold = gold.to(logits.device)
    top_ids, top_lp, gold_lp = [], [], []
    for lo in range(0, len(rows_b), chunk):
        x = logits[rb[lo:lo + chunk], rc[lo:lo + chunk]].float()  # (C, V) float32 before any softmax
        finite = torch.isfinite(x).all(dim=-1)
        if not bool(finite.all()):
            bad = int(rows_b[lo + int((~finite).nonzero()[0])])
            raise PivotfuseError(f"sample {names[bad]!r}: model produced NaN/inf logits "
                                 "(try --dtype float32 or check the weights)")
        lse = torch.logsumexp(x, dim=-1, keepdim=True)  # (C, 1)
        values, indices = x.topk(k, dim=-1)  # (C, k), sorted best first
        top_ids.append(indices)
        top_lp.append(values - lse)
        gold_lp.append((x.gather(1, gold[lo:lo + chunk, None]) - lse)[:, 0])
    all_ids = torch.cat(top_ids).cpu().numpy()
    all_lp = torch.cat(top_lp).cpu().numpy()
    all_gold = torch.cat(gold_lp).cpu().numpy()
    bounds = np.cumsum([0] + [len(p) for p in gold_positions])
    return [SequenceScores(all_ids[a:b], all_lp[a:b], all_gold[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

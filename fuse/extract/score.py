"""Score one padded batch: top-k next-token log-probs at the positions that predict assistant tokens.

Kept apart from the extraction loop (files, shards, processes) so the maths can be checked
against a plain full `log_softmax` in tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.errors import PivotfuseError
from core.logits import accepts_logits_to_keep, final_hidden, head_logits, head_path_known_bad, head_path_ok

# Rows of float32 logits handled at once: bounds the (rows, V) temporaries to ~128 MB.
_CHUNK_ELEMENTS = 1 << 25


@dataclass
class SequenceScores:
    """Scores of one sequence's gold tokens (n of them)."""

    topk_ids: np.ndarray  # (n, k) int64
    topk_logprobs: np.ndarray  # (n, k) float32
    gold_logprobs: np.ndarray  # (n,) float32


@dataclass
class LaunchedBatch:
    """A scored batch on its way to the host: `collect` gives its `SequenceScores`."""

    tensors: tuple[torch.Tensor, ...]  # (ok, top-k ids, top-k log-probs, gold log-probs): host copies
    # (pinned, filled asynchronously) on CUDA, else the device tensors
    copied: Any  # the CUDA event recorded after the copies, or None
    rows_b: np.ndarray  # (N,) sequence of each scored row
    bounds: np.ndarray  # (B + 1,) first row of each sequence
    names: list[str]


def score_batch(model: Any, sequences: list[list[int]], gold_positions: list[np.ndarray], k: int,
                names: list[str], pad_id: int = 0) -> list[SequenceScores]:
    """Run `model` over right-padded `sequences` and score token t of sequence b for t in
    `gold_positions[b]` (each ≥ 1) with the logits at t − 1.

    Log-probs are float32 `x − logsumexp(x)` (= `log_softmax`; the model may run in bf16), with x
    upcast before any softmax. Logits are made only for the scored rows, a chunk of rows at a time
    (the LM head on gathered final hidden states), so a (B, T, V) tensor never exists.
    NaN or +inf anywhere in a row, or −inf in a stored value, raises an error naming the sample.
    `launch_batch` + `collect` are the same in two steps, so the next batch's forward can be
    queued before this one's results are waited for.
    """
    return collect(launch_batch(model, sequences, gold_positions, k, names, pad_id))


@torch.inference_mode()
def launch_batch(model: Any, sequences: list[list[int]], gold_positions: list[np.ndarray], k: int,
                 names: list[str], pad_id: int = 0) -> LaunchedBatch:
    """`score_batch` up to the results on the device, their copy to the host queued (CUDA: pinned
    memory, `non_blocking`), without waiting for the device."""
    device = model.get_input_embeddings().weight.device
    B, T = len(sequences), max(len(s) for s in sequences)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    for b, seq in enumerate(sequences):
        ids[b, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attn[b, : len(seq)] = 1
    ids, attn = ids.to(device), attn.to(device)
    rows_b = np.concatenate([np.full(len(p), b) for b, p in enumerate(gold_positions)])  # (N,)
    rows_t = np.concatenate([np.asarray(p) - 1 for p in gold_positions])  # (N,) positions whose logits score
    gold = np.concatenate([np.asarray(s)[np.asarray(p)] for s, p in zip(sequences, gold_positions)])  # (N,)
    hidden = final_hidden(model, ids, attn) if not head_path_known_bad(model) else None
    if head_path_ok(model, ids, attn, hidden, np.asarray(gold_positions[0]) - 1):
        hidden = hidden[torch.as_tensor(rows_b, device=hidden.device), torch.as_tensor(rows_t, device=hidden.device)]
        rows_of = lambda lo, hi: head_logits(model, hidden[lo:hi])  # noqa: E731  (C, V)
    else:
        keep = np.unique(rows_t)  # (P,) positions needed by any sequence
        kwargs: dict[str, Any] = {}
        if accepts_logits_to_keep(model) and len(keep) < T:
            kwargs["logits_to_keep"] = torch.as_tensor(keep, device=device)
            cols = np.searchsorted(keep, rows_t)
        else:
            cols = rows_t
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False, **kwargs).logits  # (B, P, V)
        rb, rc = (torch.as_tensor(a, device=logits.device) for a in (rows_b, cols))
        rows_of = lambda lo, hi: logits[rb[lo:hi], rc[lo:hi]]  # noqa: E731  (C, V) a copy
    V = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    chunk = max(1, _CHUNK_ELEMENTS // (V or 1 << 17))
    top_ids, top_lp, gold_lp, ok = [], [], [], []
    for lo in range(0, len(rows_b), chunk):
        x = rows_of(lo, lo + chunk).float()  # (C, V) float32, a fresh tensor consumed in place below
        if k > x.shape[-1]:
            raise PivotfuseError(f"top-k {k} exceeds the vocabulary size {x.shape[-1]}")
        values, indices = x.topk(k, dim=-1, sorted=False)  # (C, k); sorting only k after is cheaper on CPU
        values, order = values.sort(dim=-1, descending=True, stable=True)
        indices = indices.gather(1, order)
        g = x.gather(1, torch.as_tensor(gold[lo:lo + chunk, None], device=x.device))[:, 0]  # (C,)
        m = values[:, :1]
        lse = m + x.sub_(m).exp_().sum(-1, keepdim=True).log_()  # (C, 1); in place: no (C, V) temporaries
        top_ids.append(indices)
        top_lp.append(values - lse)
        gold_lp.append(g - lse[:, 0])
        ok.append(torch.isfinite(lse[:, 0]) & torch.isfinite(values).all(-1) & torch.isfinite(g))
    tensors = tuple(torch.cat(t) for t in (ok, top_ids, top_lp, gold_lp))
    copied = None
    if tensors[0].device.type == "cuda":
        # Pinned host buffers filled on the stream that computed the results: the copies queue behind
        # the kernels, and the host waits once per batch, in `collect`, when it needs the numbers.
        tensors = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                        for t in tensors)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(device=ok[0].device))
    bounds = np.cumsum([0] + [len(p) for p in gold_positions])
    return LaunchedBatch(tensors, copied, rows_b, bounds, names)


def collect(batch: LaunchedBatch) -> list[SequenceScores]:
    """Wait for a launched batch's results (one device sync) and split them per sequence."""
    if batch.copied is not None:
        batch.copied.synchronize()
    ok, all_ids, all_lp, all_gold = (t.cpu().numpy() for t in batch.tensors)
    bad = np.flatnonzero(~ok)
    if len(bad):
        raise PivotfuseError(f"sample {batch.names[int(batch.rows_b[bad[0]])]!r}: model produced NaN/inf logits "
                             "(try --dtype float32 or check the weights)")
    b = batch.bounds
    return [SequenceScores(all_ids[a:z], all_lp[a:z], all_gold[a:z]) for a, z in zip(b[:-1], b[1:])]

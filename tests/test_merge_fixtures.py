"""Shared helpers of the merge tests: tiny fine-tune-like model families and plain reference
merges written straight from the formulas (whole tensors, no slicing, no threads).

(Imported by the other test_merge*.py files; it holds no tests itself.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

# "Equal to the formula": a couple of float32 ulps (summation order differs, nothing else).
ULPS = {"rtol": 3e-7, "atol": 1e-8}


def build_family(root: Path, k: int = 3, *, tied: bool = False, dtype: torch.dtype = torch.float32,
                 vocab: int = 96, hidden: int = 32, seed: int = 0, shard: str | None = None,
                 tokenizer=None) -> tuple[Path, list[Path]]:
    """A tiny Llama base and `k` "fine-tunes" of it: base + small per-model/per-tensor noise, with
    some task-vector elements exactly zero and one tensor left untouched by the first target."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tied,
                      max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    root.mkdir(parents=True, exist_ok=True)
    kw = {"max_shard_size": shard} if shard else {}

    def save(m, path: Path) -> Path:
        m.to(dtype).save_pretrained(path, **kw)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return path

    base_sd = {n: t.clone() for n, t in model.state_dict().items()}
    base = save(model, root / "base")
    targets = []
    for i in range(k):
        g = torch.Generator().manual_seed(1000 * seed + i + 1)
        sd = {}
        for j, (name, t) in enumerate(base_sd.items()):
            if i == 0 and "layers.1.input_layernorm" in name:
                sd[name] = t.clone()  # a tensor this fine-tune never moved
                continue
            scale = 0.002 * (1 + 3 * torch.rand((), generator=g).item())  # varied per model and tensor
            delta = scale * torch.randn(t.shape, generator=g)
            delta[torch.rand(t.shape, generator=g) < 0.05] = 0  # untouched elements
            sd[name] = t + delta
        model.load_state_dict(sd, strict=False)
        if tied:
            model.tie_weights()
        targets.append(save(model, root / f"t{i}"))
    return base, targets


def load_sd(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors folder."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        out = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(folder / shard))
        return out
    return load_file(folder / "model.safetensors")


# ---- plain references: the formulas, whole tensors, float32 ----

def ref_varm(b, ts):
    taus = [t - b for t in ts]
    ms = [float((tau * tau).mean()) for tau in taus]
    total = sum(ms)
    w = [m / total for m in ms] if total != 0 else [1 / len(ts)] * len(ts)
    return b + sum(wk * tau for wk, tau in zip(w, taus))


def ref_sce(b, ts, topk, semantics):
    taus = torch.stack([t - b for t in ts])
    mask = torch.ones_like(b)
    if topk < 1:
        var = taus.var(0, unbiased=False)
        k = int(torch.count_nonzero(var) * topk)
        mask = torch.zeros(var.numel())
        if k:
            mask[torch.topk(var.flatten(), k).indices] = 1
        mask = mask.view(var.shape)
    masked = taus * mask
    ms = torch.tensor([float((m * m).mean()) for m in masked])
    total = float(ms.sum())
    if semantics == "mergekit":
        w = ms / total if total >= 1e-6 else torch.full_like(ms, 1 / len(ts))
        taus = masked
    else:
        w = ms / total if total != 0 else torch.full_like(ms, 1 / len(ts))
    w = w.float().view(-1, *([1] * b.dim()))
    majority = torch.where(taus.sum(0) >= 0, 1.0, -1.0)
    keep = (taus.sign() == majority).float()
    num = (w * keep * taus).sum(0)
    den = (w * keep).sum(0)
    den = den.clamp(min=1e-6) if semantics == "mergekit" else torch.where(den == 0, 1.0, den)
    return b + num / den


def ref_linear(ts, w, normalize=True):
    out = sum(wk * t for wk, t in zip(w, ts))
    return out / sum(w) if normalize else out


def ref_task_arithmetic(b, ts, w, scale=1.0):
    return b + scale * sum(wk * (t - b) for wk, t in zip(w, ts))


def ref_ties(b, ts, w, density, normalize=True):
    trimmed = []
    for t in ts:
        tau = (t - b).flatten()
        if density < 1:
            keep = torch.zeros_like(tau)
            keep[torch.topk(tau.abs(), max(1, int(density * tau.numel()))).indices] = 1
            tau = tau * keep
        trimmed.append(tau.view(b.shape))
    wt = torch.stack([wk * tau for wk, tau in zip(w, trimmed)])
    majority = torch.where(wt.sum(0) >= 0, 1.0, -1.0)
    keep = (wt.sign() == majority).float()
    num = (wt * keep).sum(0)
    den = (torch.tensor(w).view(-1, *([1] * b.dim())) * keep).sum(0)
    den = torch.where(den == 0, 1.0, den)
    return b + (num / den if normalize else num)

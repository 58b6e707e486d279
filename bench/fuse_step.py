"""Time and memory of one fusion training step against a plain SFT step, same model and batches.

    python bench/fuse_step.py [--hidden 128] [--layers 2] [--vocab 32000] [--batch 4] [--length 192] [--steps 12]
    python bench/fuse_step.py --vocab 151936     # Qwen's vocabulary

Variants, each a full optimizer step (forward, loss, backward, AdamW) on its own copy of the same
model, interleaved step by step so machine noise hits them alike:

  sft        TRL 1.16 SFTTrainer's loss path (its fused LM head, `fused_lm_head=True`)
  sft_hf     transformers' own causal-LM loss (`model(labels=...)`, full logits)
  fuse       pivotfuse: λ·CE + (1−λ)·CE(sparse top-k target ‖ student) from the final hidden states,
             the scored positions projected a chunk at a time, forward and backward (no (N, V) logits)
  fuse_logits  the same loss on the logits of the scored positions ((N, V) at once: the previous path)
  dense      the same loss with a dense [B, L, V] target built per batch (FuseChat's way)

Peak memory: on CUDA the allocator's peak per step; on CPU the peak RSS of a child process that
runs only that variant, minus its RSS before the measured steps (after one warm-up step, so
model, optimizer state and batches are already allocated). Last line: `RESULT fuse_step vs_sft=<fuse/sft time> ...`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.offline import force_offline  # noqa: E402

force_offline()  # before transformers/trl are imported: no Hub, no telemetry, whatever the environment says

import torch  # noqa: E402

from fuse.train.loss import fusion_loss  # noqa: E402
from fuse.train.trainer import FusionCollator, fusion_step_loss  # noqa: E402

VARIANTS = ("sft", "sft_hf", "fuse", "fuse_logits", "dense")
LAM, T = 0.9, 1.0


def build(args: argparse.Namespace, device: torch.device, variants: tuple[str, ...] = VARIANTS):
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 2),
                      max_position_embeddings=max(args.length, 128), tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg).to(device)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        rows = []
        for _ in range(args.batch):
            n = int(torch.randint(args.length // 2, args.length + 1, (1,), generator=g))
            ids = torch.randint(0, args.vocab, (n,), generator=g)
            labels = ids.clone()
            labels[: n // 3] = -100  # the prompt: about a third of each conversation
            t_ids = torch.randint(0, args.vocab, (n, args.k), generator=g)
            t_ids[:, -2:] = -1  # some padded top-k entries, as after vocabulary mapping
            t_lp = torch.log_softmax(torch.randn(n, args.k, generator=g), -1)
            rows.append({"input_ids": ids, "labels": labels, "target_ids": t_ids, "target_logprobs": t_lp})
        batch = FusionCollator(pad_token_id=0)(rows)
        batches.append({k: v.to(device) for k, v in batch.items()})
    models = {}
    for name in variants:
        m = copy.deepcopy(base) if len(variants) > 1 else base
        if name == "sft":
            add_fused_lm_head(m, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer installs
        models[name] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4))
    return models, batches


def dense_loss(model, batch):
    """FuseChat-style: full logits and a dense [B, L, V] target tensor."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels, ids, lp = batch["labels"][:, 1:], batch["target_ids"][:, 1:].long(), batch["target_logprobs"][:, 1:]
    valid = ids >= 0
    p = torch.softmax(torch.where(valid, lp / T, -math.inf), -1)
    target = torch.zeros_like(logits).scatter_add_(-1, ids.clamp(min=0), torch.where(valid, p, 0.0))
    logp = torch.log_softmax(logits, -1)
    mask = labels != -100
    ce = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
    kd = -(target * logp).sum(-1)[mask].mean()
    return LAM * ce + (1 - LAM) * kd


def step(name, model, opt, batch):
    if name == "sft":
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    fused_lm_head=True)
        loss = out.loss
    elif name == "sft_hf":
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    elif name == "fuse":
        loss = fusion_step_loss(model, batch, LAM, T, chunked=True)[0].loss
    elif name == "fuse_logits":
        loss = fusion_step_loss(model, batch, LAM, T, chunked=False)[0].loss
    else:
        loss = dense_loss(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rss_mb(field: str = "VmRSS") -> float:
    """Current (VmRSS) or peak (VmHWM) resident memory of this process, MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace) -> None:
    """Run one variant alone and print its step memory (CPU peak-RSS method)."""
    device = torch.device("cpu")
    models, batches = build(args, device, (args.child,))
    model, opt = models[args.child]
    step(args.child, model, opt, batches[0])  # warm-up: allocates the optimizer state
    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak-RSS mark (VmHWM) to the current RSS
        fh.write("5")
    before = rss_mb()
    for i in range(1, 4):
        step(args.child, model, opt, batches[i % len(batches)])
    peak = rss_mb("VmHWM")
    print(json.dumps({"peak_mb": peak, "step_mb": peak - before}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary (32000 = Llama-2 / OpenChat-3.5)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=192)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per variant (after 2 warm-up steps)")
    ap.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (GPU)")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(torch.get_num_threads())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models, batches = build(args, device)
    times = {v: [] for v in VARIANTS}
    losses = {}
    peak = {}
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if args.bf16 and device.type == "cuda" else None
    for i in range(args.steps + 2):
        for name in VARIANTS:  # interleaved: each step of each variant sees the same machine state
            model, opt = models[name]
            batch = batches[i % len(batches)]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base_mem = torch.cuda.memory_allocated()
            sync(device)
            t0 = time.perf_counter()
            if ctx is not None:
                with ctx:
                    losses[name] = step(name, model, opt, batch)
            else:
                losses[name] = step(name, model, opt, batch)
            sync(device)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0.0), (torch.cuda.max_memory_allocated() - base_mem) / 2**20)
    if device.type == "cpu":
        for name in VARIANTS:
            cmd = [sys.executable, __file__, "--child", name] + [f"--{k}={getattr(args, k)}" for k in
                                                                  ("hidden", "layers", "vocab", "batch", "length", "k")]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            peak[name] = json.loads(out.stdout.strip().splitlines()[-1])["step_mb"]
    med = {v: statistics.median(t) for v, t in times.items()}
    n_params = sum(p.numel() for p in models["fuse"][0].parameters())
    print(f"device {device.type}{' bf16' if ctx else ''}; Llama {n_params / 1e6:.1f}M params, vocab {args.vocab}, "
          f"batch {args.batch}x<= {args.length} tokens, k {args.k}; median of {args.steps} interleaved steps")
    print(f"{'variant':<11} {'ms/step':>9} {'vs sft':>7} {'step MB':>9} {'vs sft':>7}  last loss")
    for v in VARIANTS:
        print(f"{v:<11} {med[v] * 1e3:9.1f} {med[v] / med['sft']:7.2f} {peak[v]:9.1f} "
              f"{peak[v] / max(peak['sft'], 1e-9):7.2f}  {losses[v]:.4f}")
    print(f"peak step memory: fuse {peak['fuse']:.1f} MB, TRL sft {peak['sft']:.1f} MB")
    print(f"RESULT fuse_step vs_sft={med['fuse'] / med['sft']:.3f} vs_sft_hf={med['fuse'] / med['sft_hf']:.3f} "
          f"vs_logits={med['fuse'] / med['fuse_logits']:.3f} vs_dense={med['fuse'] / med['dense']:.3f} "
          f"mem_vs_sft={peak['fuse'] / max(peak['sft'], 1e-9):.2f} "
          f"mem_vs_logits={peak['fuse'] / max(peak['fuse_logits'], 1e-9):.2f} "
          f"mem_vs_dense={peak['fuse'] / max(peak['dense'], 1e-9):.2f} fuse_mb={peak['fuse']:.1f} "
          f"sft_mb={peak['sft']:.1f} vocab={args.vocab} device={device.type}")


if __name__ == "__main__":
    main()

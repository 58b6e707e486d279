"""Teacher extraction throughput against a bare forward pass of the same model and batches, and store size.

    python bench/extract.py [--model DIR] [--data FILE] [--n 32] [--hidden 512] [--layers 8]
                            [--top-k 10] [--batch-size 8] [--max-length 1024] [--repeats 2]

Without --model it builds a Llama (real Llama-2 32k tokenizer, [INST] template) of the given size;
without --data a synthetic multi-turn chat corpus. Both variants see the same tokenised, length-sorted
batches and the same device/dtype:

  forward   `model(input_ids, attention_mask).logits` per batch (what any scoring script starts from)
  extract   the whole `pivotfuse extract` shard loop (`extract_shards`): render + tokenise, forward with
            the logits of scored positions only, float32 log-softmax / top-k / gold, fp16 records,
            Arrow write + fsync; with overlap (the default: the next shard tokenised ahead and the last
            one written in background threads, batch b's results taken after batch b + 1 is queued)
            and serial (`--no-overlap`)

Each round times the three over every shard (shards of two batches, rewritten in place), in turn,
`--repeats` rounds; the best time of each counts. The self-check of the first batch and model
loading are outside the timed loop.
Tokens/s counts the real (unpadded) tokens fed to the model. Bytes per scored token: the store's
shard files over the scored tokens, against FuseChat's layout (fp16 logits + int64 ids for every
position padded to the max length). Last line:
`RESULT extract vs_forward=<overlap ratio> vs_forward_serial=<serial ratio> bytes_per_token=<n>`.
"""

from __future__ import annotations

import argparse
from collections import Counter
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.offline import force_offline  # noqa: E402

force_offline()  # before transformers/trl are imported: no Hub, no telemetry, whatever the environment says

import numpy as np  # noqa: E402
import torch  # noqa: E402

import fuse.extract.extract as fx  # noqa: E402
from fuse.extract.config import DTYPES, ExtractJob  # noqa: E402
from core.assets import asset_dir  # noqa: E402
from core.chat import load_conversations  # noqa: E402
from core.loading import load_tokenizer  # noqa: E402
from fuse.extract.score import score_batch  # noqa: E402, F401  (imported before timing starts)
from fuse.extract.store import LogitStore, StoreWriter, read_manifest  # noqa: E402

INST = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
WORDS = ("the model reads every reply with its own template and keeps ten candidates per token while "
         "numbers like 17 42 and 1024 appear next to names such as Paris Tokyo and Lagos in plain prose "
         "with commas, full stops; questions? and answers!").split()


def build_model(out: Path, hidden: int, layers: int) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(asset_dir("llama2")))
    tok.chat_template = INST
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 2), max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)


def build_data(out: Path, n: int) -> None:
    rng = random.Random(0)
    words = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."  # noqa: E731
    with out.open("w") as fh:
        for i in range(n):
            msgs = []
            for _ in range(rng.randint(1, 3)):
                msgs += [{"role": "user", "content": words(10, 60)}, {"role": "assistant", "content": words(30, 200)}]
            fh.write(json.dumps({"id": f"c{i}", "messages": msgs}) + "\n")


def forward_pass(model, batches: list, pad_id: int) -> float:
    """Seconds for a plain forward over every batch (full logits), synchronised at the end."""
    device = model.get_input_embeddings().weight.device
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            T = max(len(p.ids) for p in batch)
            ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for b, p in enumerate(batch):
                ids[b, : len(p.ids)] = torch.tensor(p.ids)
                attn[b, : len(p.ids)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False).logits
            del logits
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model"), ap.add_argument("--data")
    ap.add_argument("--n", type=int, default=32, help="synthetic conversations")
    ap.add_argument("--hidden", type=int, default=512), ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=10), ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1024), ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="auto", choices=DTYPES)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        model_dir = Path(args.model) if args.model else tmp / "model"
        data = Path(args.data) if args.data else tmp / "data.jsonl"
        if not args.model:
            build_model(model_dir, args.hidden, args.layers)
        if not args.data:
            build_data(data, args.n)
        cfg = ExtractJob(model=str(model_dir), data=str(data), out=str(tmp / "store"), top_k=args.top_k,
                               batch_size=args.batch_size, max_length=args.max_length, dtype=args.dtype,
                               shard_size=2 * args.batch_size)  # timing units of two batches
        from accelerate import PartialState
        from tqdm import tqdm

        # The store as the command writes it (default shard size) gives the bytes; a store with small shards
        # gives the timing units (its shards are rewritten below).
        sized = ExtractJob(**{**cfg.__dict__, "out": str(tmp / "sized"), "shard_size": 256})
        fx.extract(sized)
        fx.extract(cfg)
        writer = StoreWriter(Path(cfg.out), read_manifest(Path(cfg.out)))
        tok = load_tokenizer(cfg.model, model=True, fast=True)
        template = fx.resolve_template(tok, cfg)
        convs = load_conversations(cfg.data)
        shards = []  # per shard: the exact batches the extraction loop forms, for the bare forward
        for s in range(writer.manifest["n_shards"]):
            items = [p for i in writer.shard_rows(s)
                     if (p := fx.prepare(i, convs[i], tok, template, cfg.max_length, Counter())) is not None]
            shards.append(fx.length_batches(items, cfg.batch_size))
        batches = [b for sh in shards for b in sh]
        tokens = sum(len(p.ids) for b in batches for p in b)
        padded = sum(len(b) * max(len(p.ids) for p in b) for b in batches)
        model = fx.load_model(cfg.model, fx.resolve_dtype(cfg.dtype), PartialState())
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        # Round by round: the bare forward, the serial loop and the overlapped loop over every shard,
        # in turn (adjacent timings share the machine's load); the best of each over the rounds.
        jobs = {overlap: ExtractJob(**{**cfg.__dict__, "overlap": overlap}) for overlap in (False, True)}
        times = {name: np.full(args.repeats, np.inf) for name in ("forward", "serial", "overlap")}
        quiet = tqdm(disable=True)
        forward_pass(model, shards[0][:1], pad_id)  # warm-up; and the scoring path's one-off self-check
        fx.extract_shards(writer, [0], convs, model, tok, template, jobs[False], quiet)
        every, written = list(range(len(shards))), {}
        for r in range(args.repeats):
            times["forward"][r] = forward_pass(model, batches, pad_id)
            for overlap, job in jobs.items():
                start = time.perf_counter()
                fx.extract_shards(writer, every, convs, model, tok, template, job, quiet)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times["overlap" if overlap else "serial"][r] = time.perf_counter() - start
                written[overlap] = {f.name: f.read_bytes() for f in sorted((Path(cfg.out) / "shards").iterdir())}
        if written[True] != written[False]:  # the two loops must write the same store, or the timing compares nothing
            raise SystemExit("extract bench: the overlapped loop wrote another store than the serial one")
        writer.finalize()
        store = LogitStore(sized.out)
        scored = store.stats["scored_tokens"]
        size = store.nbytes()
        table = store.dataset().data.table
        fusechat = len(store) * args.max_length * (2 + 8) * args.top_k
        fwd, ext, ser = (tokens / times[name].min() for name in ("forward", "overlap", "serial"))
        device = model.get_input_embeddings().weight.device
        print(f"model {model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
              f"vocab {len(tok)}, {next(model.parameters()).dtype}, {device}); {len(store)} conversations, "
              f"{tokens} tokens ({tokens / padded:.0%} of padded), {scored} scored; k={args.top_k}, "
              f"batch {args.batch_size}, {len(shards)} shards, threads {torch.get_num_threads()}, "
              f"best of {args.repeats}")
        print(f"\n| variant | tokens/s | vs forward |\n|---|---:|---:|\n| forward (full logits) | {fwd:,.0f} | 1.00 |\n"
              f"| extract, overlap (whole shard loop) | {ext:,.0f} | {ext / fwd:.2f} |\n"
              f"| extract, serial (`--no-overlap`) | {ser:,.0f} | {ser / fwd:.2f} |")
        print("\n| store part | bytes per scored token |\n|---|---:|")
        for name in table.column_names:
            print(f"| {name} | {table.column(name).nbytes / scored:.1f} |")
        print(f"| **shard files on disk** | **{size / scored:.1f}** |\n"
              f"| FuseChat layout (fp16 logits + int64 ids, every position padded to {args.max_length}) | "
              f"{fusechat / scored:.1f} |")
        print(f"\nstore: {size / 1e6:.2f} MB for {len(store)} conversations "
              f"(FuseChat layout {fusechat / 1e6:.1f} MB, {fusechat / size:.0f}x)")
        print(f"RESULT extract vs_forward={ext / fwd:.2f} vs_forward_serial={ser / fwd:.2f} "
              f"bytes_per_token={size / scored:.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

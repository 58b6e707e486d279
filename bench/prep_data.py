"""The inputs of bench/prep.py: its corpus, its tiny models, its stores (see bench/prep.py)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
K = 10  # top-k of the stores


def corpus(out: Path, tokens: int, pivot_dir: Path) -> dict:
    """Write the conversations (JSONL) until the pivot's rendering holds `tokens` tokens."""
    from core.assets import asset_dir
    from core.chat import render_chat
    from core.loading import load_tokenizer

    mt = asset_dir("mt_bench")
    questions = [t for line in (mt / "question.jsonl").open() for t in json.loads(line)["turns"]]
    answers = [t for line in (mt / "reference_answer" / "gpt-4.jsonl").open()
               for t in json.loads(line)["choices"][0]["turns"]]
    lines = [s.strip() for a in answers for s in a.split("\n") if s.strip()]
    world = REPO / ".cache" / "world" / "data"
    said = sorted({m["content"] for f in sorted(world.glob("*.jsonl")) for row in f.open()
                   for m in json.loads(row).get("messages", []) if m["role"] == "assistant"})
    asked = sorted({m["content"] for f in sorted(world.glob("*.jsonl")) for row in f.open()
                    for m in json.loads(row).get("messages", []) if m["role"] == "user"})
    tok = load_tokenizer(str(pivot_dir), model=True, fast=True)
    total, n = 0, 0
    with out.open("w") as fh:
        while total < tokens:
            rng = random.Random(n)
            msgs = [{"role": "system", "content": rng.choice(["You are a helpful assistant.",
                                                              "Answer carefully and show your work."])}] \
                if rng.random() < 0.25 else []
            for _ in range(rng.choice((1, 2, 2, 3))):
                q = rng.choice(questions) + ("" if rng.random() < 0.7 else " " + rng.choice(asked))
                reply, goal = [], rng.randint(500, 2400)  # characters: about 120–600 tokens
                while sum(len(p) for p in reply) < goal:
                    if rng.random() < 0.6:
                        start = rng.randrange(len(lines))
                        reply.append("\n".join(lines[start:start + rng.randint(1, 5)]))
                    else:
                        reply.append(" ".join(rng.choice(said) for _ in range(rng.randint(3, 12))))
                msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": "\n\n".join(reply)}]
            fh.write(json.dumps({"id": f"c{n}", "domain": "mix", "messages": msgs}, ensure_ascii=False) + "\n")
            total += len(tok(render_chat(tok, msgs).text, add_special_tokens=False)["input_ids"])
            n += 1
    return {"conversations": n, "pivot_tokens": total}


def models(work: Path) -> tuple[Path, Path]:
    """Tiny random Llama (Llama-2 tokenizer) and Qwen3 (Qwen3 tokenizer) model folders."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from core.assets import asset_dir
    from world.tokenizers import LLAMA2

    out = []
    for name, family, cfg_cls, model_cls in (("pivot", "llama2", LlamaConfig, LlamaForCausalLM),
                                             ("source", "qwen3", Qwen3Config, Qwen3ForCausalLM)):
        folder = work / "models" / name
        out.append(folder)
        if (folder / "config.json").is_file():
            continue
        tok = AutoTokenizer.from_pretrained(str(asset_dir(family)))
        if not tok.chat_template:
            tok.chat_template = LLAMA2
        if tok.pad_token is None:
            tok.pad_token = tok.unk_token or tok.eos_token
        torch.manual_seed(0)
        vocab = 151936 if family == "qwen3" else len(tok)
        cfg = cfg_cls(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=8192,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
        model_cls(cfg).save_pretrained(folder)
        tok.save_pretrained(folder)
    return out[0], out[1]


def synthetic_store(folder: Path, data: Path, store: Path, seed: int) -> None:
    """A store as `pivotfuse extract` writes it (its own render + tokenise + record code), with a
    seeded top-k in place of the model's: the gold token first in most rows (absent from some), its
    id neighbours, the end-of-turn token in some. Fast on CPU, where the 152k head of even a tiny
    model would make the forward pass what is measured."""
    from collections import Counter

    import numpy as np

    from core.chat import end_of_turn_tokens, iter_conversations
    from core.loading import load_tokenizer
    from fuse.extract.extract import prepare, to_record
    from fuse.extract.score import SequenceScores
    from fuse.extract.store import StoreWriter, int_type

    tok = load_tokenizer(str(folder), model=True, fast=True)
    template = tok.chat_template
    convs = list(iter_conversations(data))
    enders = end_of_turn_tokens(tok)
    eot = tok.convert_tokens_to_ids(enders[0]) if enders else int(tok.eos_token_id)
    rng = np.random.default_rng(seed)
    records, stats = [], Counter()
    for i, conv in enumerate(convs):
        p = prepare(i, conv, tok, template, 8192, stats)
        gold = np.asarray(p.ids, dtype=np.int64)[p.gold_pos]
        near = (gold[:, None] + rng.integers(-3, 4, (len(gold), K - 1))) % len(tok)
        topk = np.concatenate([gold[:, None], near], axis=1)
        topk[rng.random(len(gold)) < 0.2, 0] = eot
        lp = np.log(np.sort(rng.dirichlet(np.ones(K), len(gold)), axis=1)[:, ::-1]).astype(np.float32)
        gold_lp = np.where(topk[:, 0] == gold, lp[:, 0], np.float32(-7.0))
        records.append(to_record(p, SequenceScores(topk, lp, gold_lp), enders))
    w = StoreWriter.open(store, {"bench": "prep", "model": str(folder), "seed": seed, "data": data.stat().st_size},
                         top_k=K, n_rows=len(records), shard_size=128,
                         dtypes={"ids": int_type(len(tok) - 1), "spans": int_type(max(len(r.text) for r in records))},
                         info={"model": str(folder), "data": str(data)}, is_main=True)
    for shard in w.pending():
        rows = w.shard_rows(shard)
        w.write_shard(shard, [records[i] for i in rows], {"rows": len(rows), "stored": len(rows)})
    w.finalize()


def kind(real: bool) -> str:
    """The stores' folder: extracted or synthetic."""
    return "extract" if real else "synthetic"


def stores(work: Path, size: str, data: Path, pivot: Path, source: Path, real: bool) -> tuple[Path, Path]:
    """Both models' stores over `data` (reused when complete): extracted with the models (`real`),
    or synthetic records (`synthetic_store`)."""
    from fuse.extract.config import ExtractJob
    from fuse.extract.extract import extract
    from fuse.extract.store import read_manifest

    out = []
    for seed, folder in enumerate((pivot, source)):
        store = work / size / kind(real) / folder.name
        t0 = time.perf_counter()
        if real:
            extract(ExtractJob(model=str(folder), data=str(data), out=str(store), top_k=K, batch_size=16,
                               max_length=8192, shard_size=128, dtype="auto"))
        elif not (read_manifest(store) or {}).get("complete"):
            synthetic_store(folder, data, store, seed)
        print(f"store {size}/{folder.name}: {time.perf_counter() - t0:.1f} s ({'extracted' if real else 'synthetic'}; "
              "reused when complete)", flush=True)
        out.append(store)
    return out[0], out[1]

"""Throughput of `pivotfuse eval` against the plain way, same model, same chats, same results.

    python bench/eval_throughput.py [--chats 96] [--questions 16] [--new-tokens 16] [--hidden 64]

  loss      evals.loss.chat_losses: length-sorted padded batches, logits kept for assistant tokens
  loss_1x1  one chat at a time, full log_softmax over every position (the textbook loop)
  gen       LocalChatModel.chat: left-padded batches of 8, greedy
  gen_1x1   the same generate call one prompt at a time (FastChat's gen_model_answer loop)

Model: a random Llama with the real Qwen3 tokenizer (151k vocabulary) and its ChatML template;
chats: the demo world's corpus generator. Results must agree (the bench fails if not).
Last line: `RESULT eval_throughput loss_speedup=... gen_speedup=...`.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from core.chat import render_chat, tokenize_chat  # noqa: E402
from evals.backends import LocalChatModel, parse_spec  # noqa: E402
from evals.config import EvalConfig  # noqa: E402
from evals.loss import chat_losses  # noqa: E402
from world.corpus import DOMAINS, FactTable, make_conversation  # noqa: E402

from core.assets import asset_dir  # noqa: E402


def loss_one_by_one(model, tok, convs) -> list[float]:
    out = []
    for conv in convs:
        t = tokenize_chat(tok, render_chat(tok, conv.messages))
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([t.input_ids])).logits[0].float(), -1)  # (T, V)
        out.append(-sum(logp[i - 1, t.input_ids[i]].item() for i in range(1, len(t.input_ids)) if t.assistant[i]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chats", type=int, default=96)
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=64)
    args = ap.parse_args()
    qwen3 = asset_dir("qwen3")  # a one-line error when `make install` has not fetched it
    rng = random.Random(0)
    table = FactTable.make(random.Random("facts-0"))
    convs = [make_conversation(DOMAINS[i % 4], rng, table, str(i)) for i in range(args.chats)]
    with tempfile.TemporaryDirectory() as tmp:
        tok = AutoTokenizer.from_pretrained(qwen3)
        torch.manual_seed(3)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
        LlamaForCausalLM(cfg).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        times, check = {}, {}
        t0 = time.perf_counter()
        batched = [r["nats"] for r in chat_losses(model, tok, convs, max_length=2048, batch_size=16, desc="bench")]
        times["loss"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        plain = loss_one_by_one(model, tok, convs)
        times["loss_1x1"] = time.perf_counter() - t0
        check["loss"] = max(abs(a - b) / max(abs(b), 1e-9) for a, b in zip(batched, plain))

        chat = LocalChatModel(parse_spec(tmp), EvalConfig(batch_size=8, dtype="float32"))
        prompts = [[{"role": "user", "content": c.messages[0]["content"]}] for c in convs[: args.questions]]
        t0 = time.perf_counter()
        gen = chat.chat(prompts, 0.0, args.new_tokens)
        times["gen"] = time.perf_counter() - t0
        chat.cfg.batch_size = 1
        t0 = time.perf_counter()
        gen1 = chat.chat(prompts, 0.0, args.new_tokens)
        times["gen_1x1"] = time.perf_counter() - t0
        check["gen"] = sum(a != b for a, b in zip(gen, gen1))
    print(f"random Llama h={args.hidden}, Qwen3 tokenizer ({len(tok)} tokens); {args.chats} chats, "
          f"{args.questions} prompts x {args.new_tokens} new tokens, CPU threads {torch.get_num_threads()}")
    print(f"{'variant':<9} {'seconds':>8} {'items/s':>8} {'speedup':>8}")
    for name, base, n in (("loss", "loss_1x1", args.chats), ("gen", "gen_1x1", args.questions)):
        for v in (name, base):
            print(f"{v:<9} {times[v]:8.2f} {n / times[v]:8.1f} {times[base] / times[v]:8.2f}")
    print(f"loss max relative difference {check['loss']:.2e}; generations that differ {check['gen']}/{args.questions}")
    if check["loss"] > 1e-4 or not math.isfinite(check["loss"]) or check["gen"]:
        sys.exit("batched results disagree with the one-by-one reference")
    print(f"RESULT eval_throughput loss_speedup={times['loss_1x1'] / times['loss']:.2f} "
          f"gen_speedup={times['gen_1x1'] / times['gen']:.2f} loss_max_rel_diff={check['loss']:.1e}")


if __name__ == "__main__":
    main()

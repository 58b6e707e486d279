"""Bench: token alignment of 2k-token chats, pivotfuse vs the naive full DP (FuseLLM's MinED).

For every ordered pair of the four real tokenizers (Llama-2, Llama-3, Qwen3, Gemma-3): chats of
MT-Bench questions and GPT-4 reference answers, about 2,000 pivot tokens each, rendered with each
model's own chat template (Llama-2: its [INST] template). The naive baseline runs FuseLLM's
recurrence over the full n×m grid of the reply, one `editdistance.eval` call per cell; pivotfuse
runs `fuse.chat_align.align_chat` on the same chat. Both are timed in this run, in CPU seconds;
the naive DP on the first sample only (seconds per sample), pivotfuse on it cold (its
edit-distance cache emptied first) and warm (after the other samples, as in a corpus run), the
median of `--repeats` runs. The costs of both are compared.
Also reported per pair: the coverage of the pivot's reply tokens (exact 1:1 / through the
vocabulary map built over the samples / no source distribution).

    python bench/align.py [--samples 4] [--tokens 2000]

Last line: RESULT align speedup=<worst pair's cold ratio> ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import editdistance

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.chat import render_chat, tokenize_chat  # noqa: E402
from fuse import align as align_mod  # noqa: E402
from fuse.chat_align import ChatTokens, _content_end, align_chat  # noqa: E402
from fuse.coverage import Coverage  # noqa: E402
from fuse.surface import TokenText  # noqa: E402
from fuse.vocab import VocabMapBuilder  # noqa: E402

ASSETS = REPO.parent / "shared" / "assets"
NAMES = ("llama2", "llama3", "qwen3", "gemma3")


def naive_cost(a: list[str], b: list[str]) -> int:
    """FuseLLM's MinED: full n×m DP, one editdistance call per cell (the whole grid is computed)."""
    inf = float("inf")
    prev = [inf] * len(b)
    for i, x in enumerate(a):
        row = [0.0] * len(b)
        for j, y in enumerate(b):
            if i == 0 and j == 0:
                best = 0
            else:
                best = min(prev[j - 1] if j else inf, prev[j], row[j - 1] if j else inf)
            row[j] = editdistance.eval(x, y) + best
        prev = row
    return int(prev[-1])


def chats(tok: TokenText, n_samples: int, n_tokens: int) -> list[list[dict]]:
    """A question and one long reply made of GPT-4 reference answers, about n_tokens tokens in all:
    the full n×m grid of a 2k-token sample, as FuseLLM aligns it."""
    qs = {json.loads(l)["question_id"]: json.loads(l) for l in (ASSETS / "mt_bench" / "question.jsonl").open()}
    ans = [json.loads(l) for l in (ASSETS / "mt_bench" / "reference_answer" / "gpt-4.jsonl").open()]
    pairs = [(q, a) for r in ans for q, a in zip(qs[r["question_id"]]["turns"], r["choices"][0]["turns"])]
    out, k = [], 0
    for _ in range(n_samples):
        question, answers = pairs[k % len(pairs)][0], []
        while len(tok.tokenizer(question + "\n\n".join(answers))["input_ids"]) < n_tokens:
            answers.append(pairs[k % len(pairs)][1])
            k += 1
        out.append([{"role": "user", "content": question},
                    {"role": "assistant", "content": "\n\n".join(answers)}])
    return out


def reply_texts(view: ChatTokens, tt: TokenText) -> list[tuple[list[str], list]]:
    """Each reply's text tokenized alone (the unit both aligners work on)."""
    out = []
    for s, e in view.assistant_spans:
        reply = view.text[s:_content_end(view.text, s, e, tt.tokenizer.eos_token)]
        enc = tt.tokenizer(reply, add_special_tokens=False, return_offsets_mapping=True)
        out.append((tt.in_context(enc["input_ids"], enc["offset_mapping"], reply), enc["offset_mapping"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from world.tokenizers import LLAMA2

    toks = {}
    for n in NAMES:
        tok = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizers" / n))
        if not tok.chat_template:
            tok.chat_template = LLAMA2
        toks[n] = TokenText(tok)
    convs = chats(toks["llama3"], args.samples, args.tokens)
    views = {n: [] for n in NAMES}
    for n in NAMES:
        for msgs in convs:
            r = render_chat(toks[n].tokenizer, msgs)
            views[n].append(ChatTokens.from_tokenized(r, tokenize_chat(toks[n].tokenizer, r)))
    align_chat(views["llama3"][0], views["qwen3"][0], toks["llama3"], toks["qwen3"])  # warm-up (imports)
    print(f"{args.samples} chats of ~{args.tokens} tokens (Llama-3 count); CPU time per sample "
          f"(naive: one run of sample 1; pivotfuse: median of {args.repeats})")
    print(f"{'pivot':>7} {'source':>7} {'tokens':>11} {'naive s':>8} {'cold ms':>8} {'warm ms':>8} "
          f"{'ratio cold':>10} {'ratio warm':>10} {'cost=':>5} {'exact':>6} {'mapped':>6} {'none':>6}")
    ratios, warm_ratios = {}, {}
    for p in NAMES:
        for s in NAMES:
            if p == s:
                continue
            pv, sv = views[p], views[s]
            # naive: every reply of sample 0, full grid
            t0 = time.process_time()
            naive = sum(naive_cost(a, b) for (a, _), (b, _) in zip(reply_texts(pv[0], toks[p]), reply_texts(sv[0], toks[s])))
            t_naive = time.process_time() - t0
            ours = sum(align_mod.align_tokens(a, b, ao, bo).cost
                       for (a, ao), (b, bo) in zip(reply_texts(pv[0], toks[p]), reply_texts(sv[0], toks[s])))
            cold = []
            for _ in range(args.repeats):
                align_mod._CACHE.clear()
                t0 = time.process_time()
                align_chat(pv[0], sv[0], toks[p], toks[s])
                cold.append(time.process_time() - t0)
            builder, cov = VocabMapBuilder(toks[p], toks[s]), Coverage()
            for k in range(args.samples):  # every sample once (warms the cache), for coverage
                al = align_chat(pv[k], sv[k], toks[p], toks[s])
                builder.add(al, pv[k].ids, sv[k].ids)
                cov.add(al, pv[k].ids, sv[k].ids)
            warm = []
            for _ in range(args.repeats):
                t0 = time.process_time()
                align_chat(pv[0], sv[0], toks[p], toks[s])
                warm.append(time.process_time() - t0)
            t_cold, t_warm = statistics.median(cold), statistics.median(warm)
            rep = cov.report(builder.build().mapping)
            ratios[(p, s)], warm_ratios[(p, s)] = t_naive / t_cold, t_naive / t_warm
            print(f"{p:>7} {s:>7} {len(pv[0].ids):>5}×{len(sv[0].ids):<5} {t_naive:8.2f} {t_cold * 1e3:8.2f} "
                  f"{t_warm * 1e3:8.2f} {ratios[(p, s)]:9.0f}× {warm_ratios[(p, s)]:9.0f}× "
                  f"{'yes' if naive == ours else 'NO':>5} "
                  f"{rep['exact_share']:6.1%} {rep['mapped_share']:6.1%} {rep['none_share']:6.1%}", flush=True)
    worst = min(ratios, key=ratios.get)
    print(f"RESULT align speedup={ratios[worst]:.0f} worst_pair={worst[0]}->{worst[1]} "
          f"median_cold={sorted(ratios.values())[len(ratios) // 2]:.0f} "
          f"worst_warm={min(warm_ratios.values()):.0f} samples={args.samples} tokens={args.tokens}")


if __name__ == "__main__":
    main()

"""Bench: token alignment of 2k-token chats, pivotfuse vs the naive full DP (FuseLLM's MinED).

For every ordered pair of the four real tokenizers (Llama-2, Llama-3, Qwen3, Gemma-3): chats of
MT-Bench questions and GPT-4 reference answers, about 2,000 tokens each, rendered with each model's
own chat template (Llama-2: its [INST] template). Two naive baselines align the reply over the full
n×m grid, one `editdistance.eval` call per cell, and back-trace the path:

* `fusellm`: FuseLLM's DTW as published (`src/utils/others.py`, used by FuseChat): a numpy float
  table read and written cell by cell, a per-cell distance function that strips the tokenizers'
  space markers from the raw token spellings before `editdistance.eval`, an argmin back-trace;
* `lean`: the same recurrence written as tightly as plain Python allows: the normalised token
  texts pivotfuse uses, Python lists, the cost of a cell inlined. A stricter baseline than FuseLLM.

pivotfuse runs `fuse.align.chat.align_chat` on the whole chat (template handling included). All
times are CPU seconds measured in this run. The machine is shared and its speed drifts, so
pivotfuse is timed *between* blocks of rows of the naive DPs, and its time is the median of those
runs: both sides see the same conditions. Cold: its edit-distance cache emptied before each run;
each time is the second of two runs, the first re-warming the CPU caches that the naive DP's
tables evicted. No garbage collection runs inside timed code (as in `timeit`).
Also per pair: the total edit cost of pivotfuse's path equals the lean DP's (`cost=`), and the
coverage of the pivot's reply tokens (exact 1:1 / through the vocabulary map built over the
samples / no source distribution).

    python bench/align.py [--samples 4] [--tokens 2000] [--pairs llama3:qwen3 ...]

Last line: RESULT align speedup=<worst pair vs fusellm> speedup_lean=<worst pair vs lean> ...
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Generator

import editdistance
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.chat import render_chat, tokenize_chat  # noqa: E402
from fuse.align import dp as align_dp  # noqa: E402
from fuse.align.mined import align_tokens  # noqa: E402
from fuse.align.chat import ChatTokens, content_end, align_chat  # noqa: E402
from fuse.align.coverage import Coverage  # noqa: E402
from fuse.align.surface import TokenText  # noqa: E402
from fuse.align.vocab import VocabMapBuilder  # noqa: E402

from core.assets import asset_dir  # noqa: E402
NAMES = ("llama2", "llama3", "qwen3", "gemma3")
BLOCK = 100  # naive DP rows between two pivotfuse runs


def lean_dp(a: list[str], b: list[str]) -> Generator[None, None, int]:
    """Full-grid DP over normalised texts, back-traced; yields every BLOCK rows, returns the cost."""
    inf = float("inf")
    ed = editdistance.eval
    table: list[list[float]] = []
    prev = [inf] * len(b)
    for i, x in enumerate(a):
        row = [0.0] * len(b)
        for j, y in enumerate(b):
            if i == 0 and j == 0:
                best = 0.0
            else:
                best = min(prev[j - 1] if j else inf, prev[j], row[j - 1] if j else inf)
            row[j] = ed(x, y) + best
        table.append(row)
        prev = row
        if i % BLOCK == BLOCK - 1:
            yield
    i, j, path = len(a) - 1, len(b) - 1, [(len(a) - 1, len(b) - 1)]
    while i or j:
        options = [table[i - 1][j - 1] if i and j else inf, table[i - 1][j] if i else inf, table[i][j - 1] if j else inf]
        step = options.index(min(options))
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
        path.append((i, j))
    return int(table[-1][-1])


def fusellm_dtw(a: list[str], b: list[str], marker_a: str, marker_b: str) -> Generator[None, None, float]:
    """FuseLLM's DTW over raw token spellings, as published: numpy table, per-cell distance function."""

    def dist(x: str, y: str) -> int:
        return editdistance.eval(x.replace(marker_a, ""), y.replace(marker_b, ""))

    table = np.zeros((len(a) + 1, len(b) + 1))
    table[0, :] = np.inf
    table[:, 0] = np.inf
    table[0, 0] = 0
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1, j + 1] = dist(x, y) + min(table[i, j + 1], table[i + 1, j], table[i, j])
        if i % BLOCK == BLOCK - 1:
            yield
    table = table[1:, 1:]
    i, j, path = table.shape[0] - 1, table.shape[1] - 1, []
    while i > 0 or j > 0:
        path.append((i, j))
        diag = table[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        up = table[i - 1, j] if i > 0 else np.inf
        left = table[i, j - 1] if j > 0 else np.inf
        move = int(np.argmin([diag, up, left]))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    path.append((0, 0))
    return float(table[-1, -1])


def timed(blocks: Generator[None, None, Any], between: Callable[[], None]) -> tuple[float, Any]:
    """CPU seconds spent in `blocks` and its result, calling `between` (not counted) after each block."""
    total = 0.0
    while True:
        t0 = time.process_time()
        try:
            next(blocks)
        except StopIteration as done:
            return total + time.process_time() - t0, done.value
        total += time.process_time() - t0
        between()


def chats(tok: TokenText, n_samples: int, n_tokens: int) -> list[list[dict]]:
    """A question and one long reply made of GPT-4 reference answers, about n_tokens tokens in all:
    the full n×m grid of a 2k-token sample, as FuseLLM aligns it."""
    qs = {json.loads(l)["question_id"]: json.loads(l) for l in (asset_dir("mt_bench") / "question.jsonl").open()}
    ans = [json.loads(l) for l in (asset_dir("mt_bench") / "reference_answer" / "gpt-4.jsonl").open()]
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


def replies(view: ChatTokens, tt: TokenText) -> list[tuple[list[str], list[str], list]]:
    """Each reply's text tokenized alone (the unit both aligners work on): normalised texts, raw
    spellings, offsets."""
    out = []
    for s, e in view.assistant_spans:
        reply = view.text[s:content_end(view.text, s, e, tt.tokenizer.eos_token)]
        enc = tt.tokenizer(reply, add_special_tokens=False, return_offsets_mapping=True)
        out.append((tt.in_context(enc["input_ids"], enc["offset_mapping"], reply),
                    tt.tokenizer.convert_ids_to_tokens(enc["input_ids"]), enc["offset_mapping"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--pairs", nargs="*", help="pivot:source pairs (default: all 12)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from world.tokenizers import LLAMA2

    toks = {}
    for n in NAMES:
        tok = AutoTokenizer.from_pretrained(str(asset_dir(n)))
        if not tok.chat_template:
            tok.chat_template = LLAMA2
        toks[n] = TokenText(tok)
    marker = {n: "Ġ" if toks[n].kind == "byte_level" else "▁" for n in NAMES}
    convs = chats(toks["llama3"], args.samples, args.tokens)
    views = {n: [] for n in NAMES}
    for n in NAMES:
        for msgs in convs:
            r = render_chat(toks[n].tokenizer, msgs)
            views[n].append(ChatTokens.from_tokenized(r, tokenize_chat(toks[n].tokenizer, r)))
    align_chat(views["llama3"][0], views["qwen3"][0], toks["llama3"], toks["qwen3"])  # warm-up (imports)
    pairs = [tuple(x.split(":")) for x in args.pairs] if args.pairs else [(p, s) for p in NAMES for s in NAMES if p != s]
    print(f"{args.samples} chats of ~{args.tokens} tokens (Llama-3 count); CPU time per sample: naive DPs on "
          f"sample 1, pivotfuse cold = median of its runs between the naive DPs' blocks of {BLOCK} rows")
    print(f"{'pivot':>7} {'source':>7} {'tokens':>11} {'fusellm s':>9} {'lean s':>7} {'ms':>8} "
          f"{'vs fusellm':>10} {'vs lean':>8} {'cost=':>5} {'exact':>6} {'mapped':>6} {'none':>6}")
    ratios, lean_ratios = {}, {}
    for p, s in pairs:
        pv, sv = views[p], views[s]
        cold: list[float] = []

        def ours() -> None:
            for _ in range(2):  # the first run re-warms the CPU caches the naive DP's tables evicted
                align_dp.clear_cache()
                t0 = time.process_time()
                align_chat(pv[0], sv[0], toks[p], toks[s])
            cold.append(time.process_time() - t0)

        # As timeit does: no garbage collection inside timed code. A collection triggered by one
        # side would walk the other's objects (the naive tables hold millions).
        gc.collect()
        gc.disable()

        ours()
        t_fusellm = t_lean = 0.0
        naive = ours_cost = 0
        for (a, ra, ao), (b, rb, bo) in zip(replies(pv[0], toks[p]), replies(sv[0], toks[s])):
            t_fusellm += timed(fusellm_dtw(ra, rb, marker[p], marker[s]), ours)[0]
            t, cost = timed(lean_dp(a, b), ours)
            t_lean, naive = t_lean + t, naive + cost
            ours_cost += align_tokens(a, b, ao, bo).cost
        gc.enable()
        builder, cov = VocabMapBuilder(toks[p], toks[s]), Coverage()
        for k in range(args.samples):  # coverage over every sample
            al = align_chat(pv[k], sv[k], toks[p], toks[s])
            builder.add(al, pv[k].ids, sv[k].ids)
            cov.add(al, pv[k].ids, sv[k].ids)
        t_cold = statistics.median(cold)
        rep = cov.report(builder.build().mapping)
        ratios[(p, s)], lean_ratios[(p, s)] = t_fusellm / t_cold, t_lean / t_cold
        print(f"{p:>7} {s:>7} {len(pv[0].ids):>5}×{len(sv[0].ids):<5} {t_fusellm:9.2f} {t_lean:7.2f} "
              f"{t_cold * 1e3:8.2f} {ratios[(p, s)]:9.0f}× {lean_ratios[(p, s)]:7.0f}× "
              f"{'yes' if naive == ours_cost else 'NO':>5} "
              f"{rep['exact_share']:6.1%} {rep['mapped_share']:6.1%} {rep['none_share']:6.1%}", flush=True)
    worst = min(ratios, key=ratios.get)
    worst_lean = min(lean_ratios, key=lean_ratios.get)
    median = lambda d: statistics.median(d.values())  # noqa: E731
    print(f"RESULT align speedup={ratios[worst]:.0f} worst_pair={worst[0]}->{worst[1]} "
          f"speedup_lean={lean_ratios[worst_lean]:.0f} worst_pair_lean={worst_lean[0]}->{worst_lean[1]} "
          f"median={median(ratios):.0f} median_lean={median(lean_ratios):.0f} "
          f"samples={args.samples} tokens={args.tokens}")


if __name__ == "__main__":
    main()

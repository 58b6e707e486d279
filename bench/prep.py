"""CPU-side preparation of a FuseChat-sized corpus: per-phase throughput, scaling over processes, memory.

    python bench/prep.py [--tokens 1000000] [--repeats 3] [--work runs/bench-prep] [--no-reference]
                         [--no-memory] [--extract]

The corpus: multi-turn conversations (1–3 turns, a system turn in some) whose user turns are MT-Bench
questions and whose replies, hundreds of tokens each, are stitched from lines of the GPT-4 reference
answers and the demo world's replies (`world:` data), seeded, until the pivot's rendering holds
`--tokens` tokens; a second corpus, its first tenth, measures memory. Pivot: the real Llama-2
tokenizer (32k, its [INST] template); source: the real Qwen3 tokenizer (152k, its own template). The
models are tiny random Llama / Qwen3 networks of those vocabularies (hidden 16, one layer), so the
forward pass is not what is measured. The stores are made once and reused from `--work`: by default
synthetic records written by extraction's own record code (`synthetic_store`: on a 2-core CPU the
152k LM head and top-k of even this model take longer than everything measured here), or with
`--extract` by `pivotfuse extract` with the tiny models (on a GPU). Extraction itself is timed by
bench/extract.py.

Each run prepares one (pivot, source) pair as `pivotfuse fuse` does, after extraction:
`build_map` (render + tokenise both models, align every chat, count the 1:1 pairs, build the map)
and `build_rows` (re-tokenise, pair, span-translate, fuse, write the rows file). Runs with 1 and 2
processes alternate `--repeats` times; the phases' seconds are summed over the processes, so a
phase's throughput is per process; `scaling_2proc` is the median wall time with 1 process over that
with 2, and `machine_2proc` the same ratio for pure-Python work over the same process pool, timed
before and after the runs: what the machine granted (a shared VM whose scheduler shares the cores
by session grants one busy session about its share, whatever its process count). Peak RSS: one
fresh process per corpus size, 1 process (`ru_maxrss`); its wall time feeds the projection.
`--no-reference` skips the per-position rows implementation this path replaced (timed once, 1 process).

Projection for FuseChat-2.0 (its 5 sources, each fused with the pivot over FuseChat-Mixture: about
10^8 pivot tokens per source, assumed): the seconds per pivot token with one process (the walls of
the two corpus sizes: their difference over their tokens' difference; what is left of the small
one's wall is the fixed cost of a pair: tokenizers, tables), over 16 processes at the efficiency
of that per-token part from 1 to 2 processes (at most the whole wall's; assumed to hold to 16
cores), plus the fixed cost.
Last line: RESULT prep rows_positions_per_s=… align_tokens_per_s=… tokenize_tokens_per_s=… scaling_2proc=…
fusechat2_hours_16cores=…
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from core.offline import force_offline  # noqa: E402

force_offline()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per process: per-process figures stay honest
from prep_data import K, corpus, kind, models, stores  # noqa: E402  (beside this file)

FUSECHAT_TOKENS = 1e8  # pivot tokens per source in FuseChat-Mixture (assumed: ~95K conversations)
FUSECHAT_SOURCES = 5
CORES = 16


def prepare(work: Path, size: str, data: Path, pivot: Path, source: Path, workers: int, tag: str,
            real: bool) -> dict:
    """One pair's CPU-side preparation (map + rows) with `workers` processes; phase seconds and wall."""
    from core.chat import end_of_turn_tokens
    from core.loading import load_tokenizer
    from fuse.align.build import build_map
    from fuse.align.config import AlignConfig
    from fuse.extract.store import LogitStore
    from fuse.targets.rows import build_rows
    from fuse.targets.rows_arrow import rows_digest

    out = work / size / "runs" / tag
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*"):
        old.unlink()
    p_store, s_store = (LogitStore(work / size / kind(real) / f.name) for f in (pivot, source))
    t0 = time.perf_counter()
    timings: dict = {}
    vmap = build_map(str(pivot), str(source), str(data), out / "vocab_map.json", AlignConfig(workers=workers),
                     progress=False, timings=timings)
    t1 = time.perf_counter()
    eos = tuple(end_of_turn_tokens(load_tokenizer(str(f), model=True, fast=True, shared=True)) for f in (pivot, source))
    rows_t: dict = {}
    ds, stats = build_rows(p_store, s_store, str(pivot), str(source), vmap.mapping, method="mince", k=K,
                           fallback="gold", translate="span", eos=eos, workers=workers, out=out / "rows.arrow",
                           timings=rows_t, progress=False)
    t2 = time.perf_counter()
    return {"workers": workers, "map_wall": t1 - t0, "rows_wall": t2 - t1, "wall": t2 - t0, "map": timings,
            "rows": rows_t, "positions": stats["positions"], "conversations": stats["conversations"],
            "rows_digest": rows_digest(ds), "map_digest": hashlib.sha256((out / "vocab_map.json").read_bytes()).hexdigest(),
            "aligned_tokens": timings.get("pivot_tokens", 0), "tokenised": timings.get("tokens", 0)}


def reference_rows(work: Path, size: str, pivot: Path, source: Path, vmap_file: Path, real: bool) -> dict:
    """The per-position rows implementation this path replaced (tests/rows_reference.py), 1 process."""
    sys.path.insert(0, str(REPO / "tests"))
    import datasets
    from rows_reference import ref_fusion_rows

    from core.chat import end_of_turn_tokens
    from core.loading import load_tokenizer
    from fuse.align.surface import TokenText
    from fuse.align.vocab import VocabMap
    from fuse.extract.store import LogitStore
    from fuse.targets.rows import FusionStats, store_lookup
    from fuse.targets.rows_arrow import features, rows_digest
    from fuse.targets.translate import PivotProjector, SpanTranslator

    pt, st = (load_tokenizer(str(f), model=True, fast=True) for f in (pivot, source))
    eos = (end_of_turn_tokens(pt), end_of_turn_tokens(st))
    p_store, s_store = (LogitStore(work / size / kind(real) / f.name) for f in (pivot, source))
    span = SpanTranslator(PivotProjector(pt), TokenText(st), eos)
    stats = FusionStats()
    t0 = time.perf_counter()
    rows, chunks = [], []
    for row in ref_fusion_rows(p_store, store_lookup(s_store), pt, VocabMap.load(vmap_file).mapping, "mince", K,
                               "gold", eos, stats, span):
        rows.append(row)
        if len(rows) == 1024:
            chunks.append(datasets.Dataset.from_list(rows, features=features()))
            rows = []
    chunks.append(datasets.Dataset.from_list(rows, features=features()))
    ds = datasets.concatenate_datasets(chunks)
    return {"seconds": time.perf_counter() - t0, "positions": stats.positions, "rows_digest": rows_digest(ds)}


def _spin_setup() -> None:
    return None


def _spin(state: None, n: int) -> int:
    """Pure-Python CPU work with no I/O and no shared state: what 2 processes can gain here and now."""
    total = 0
    for i in range(n):
        total += i * i
    return total


def machine_scaling() -> float:
    """The 1 → 2 process speed-up the machine grants this moment, on `_spin` tasks over the same
    `ordered_map` (a loaded machine that shares its cores by session grants less than 2)."""
    from core.workers import ordered_map

    wall = {}
    for w in (1, 2):
        t0 = time.perf_counter()
        list(ordered_map(_spin, [4_000_000] * 16, w, _spin_setup))  # ~2 s of work: pool start-up is noise
        wall[w] = time.perf_counter() - t0
    return wall[1] / wall[2]


def child_memory(args: argparse.Namespace) -> None:
    """Run one preparation in this fresh process and print its peak RSS and wall time."""
    work = Path(args.work)
    pivot, source = work / "models" / "pivot", work / "models" / "source"
    res = prepare(work, args.child, work / args.child / "data.jsonl", pivot, source, args.workers, f"mem{args.workers}",
                  args.extract)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"self_mb": own, "workers_mb": kids, "positions": res["positions"], "wall": res["wall"],
                      "conversations": res["conversations"]}))


def phase_table(runs: list[dict]) -> list[tuple[str, str, float, float, str]]:
    """(phase, unit, per-process rate with 1 process, per-process rate with 2, seconds 1p) per phase."""
    def rate(secs: float, amount: float) -> float:
        return amount / secs if secs > 0 else float("nan")

    out = []
    for name, unit, secs, amount in (
            ("render + tokenise", "tokens/s", lambda r: r["map"]["render"] + r["map"]["tokenise"] + r["rows"]["tokenise"],
             lambda r: r["map"]["tokens"] + r["map"]["pivot_tokens"]),
            ("chat alignment", "pivot tokens/s", lambda r: r["map"]["align"], lambda r: r["map"]["pivot_tokens"]),
            ("vocabulary map", "pivot tokens/s", lambda r: r["map"]["count"] + r["map"]["build"],
             lambda r: r["map"]["pivot_tokens"]),
            ("fusion rows", "positions/s", lambda r: r["rows"]["read"] + r["rows"]["fuse"], lambda r: r["positions"]),
            ("dataset write", "positions/s", lambda r: r["rows"]["write"], lambda r: r["positions"])):
        by = {w: [rate(secs(r), amount(r)) for r in runs if r["workers"] == w] for w in (1, 2)}
        s1 = statistics.median(secs(r) for r in runs if r["workers"] == 1)
        out.append((name, unit, statistics.median(by[1]), statistics.median(by[2]), f"{s1:.2f}"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000, help="pivot tokens of the corpus (at least)")
    ap.add_argument("--repeats", type=int, default=3, help="runs with 1 and with 2 processes, alternating")
    ap.add_argument("--work", default=str(REPO / "runs" / "bench-prep"), help="corpora, models, stores (reused)")
    ap.add_argument("--no-reference", action="store_true", help="skip timing the per-position rows implementation")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS runs")
    ap.add_argument("--extract", action="store_true",
                    help="extract the stores with the tiny models (default: synthetic records; see synthetic_store)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_memory(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pivot, source = models(work)
    sizes = {}
    for size, tokens in (("big", args.tokens), ("small", args.tokens // 10)):
        data = work / size / "data.jsonl"
        info = work / size / "corpus.json"
        data.parent.mkdir(parents=True, exist_ok=True)
        if not info.is_file() or json.loads(info.read_text()).get("goal") != tokens:
            info.write_text(json.dumps({"goal": tokens, **corpus(data, tokens, pivot)}))
        sizes[size] = json.loads(info.read_text())
        stores(work, size, data, pivot, source, args.extract)
    print(f"corpus: {sizes['big']['conversations']} conversations, {sizes['big']['pivot_tokens']} pivot tokens "
          f"(small: {sizes['small']['conversations']}, {sizes['small']['pivot_tokens']})", flush=True)
    data = work / "big" / "data.jsonl"
    runs, control = [], []
    for rep in range(args.repeats):
        control.append(machine_scaling())
        for w in (1, 2):
            r = prepare(work, "big", data, pivot, source, w, f"w{w}", args.extract)
            runs.append(r)
            load = os.getloadavg()[0]
            print(f"run {rep + 1}/{args.repeats} workers {w}: {r['wall']:.1f} s (map {r['map_wall']:.1f}, rows "
                  f"{r['rows_wall']:.1f}); load {load:.1f}", flush=True)
    digests = {(r["rows_digest"], r["map_digest"]) for r in runs}
    assert len(digests) == 1, "rows or map differ between runs / process counts"
    ref = None
    if not args.no_reference:
        ref = reference_rows(work, "big", pivot, source, work / "big" / "runs" / "w1" / "vocab_map.json",
                             args.extract)
        assert ref["rows_digest"] == runs[0]["rows_digest"], "the fast rows differ from the per-position implementation"
    mem = {}
    if not args.no_memory:
        for size in ("small", "big"):
            cmd = [sys.executable, __file__, "--child", size, "--work", str(work), "--workers", "1"] + ["--extract"] * args.extract
            mem[size] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    wall = {w: [r["wall"] for r in runs if r["workers"] == w] for w in (1, 2)}
    pairs = [a / b for a, b in zip(wall[1], wall[2])]
    scaling = statistics.median(wall[1]) / statistics.median(wall[2])
    control.append(machine_scaling())
    machine = statistics.median(control)
    big = sizes["big"]
    print(f"\nCPU-side preparation of one pair, Llama-2 pivot ← Qwen3 source, {big['conversations']} conversations, "
          f"{big['pivot_tokens']} pivot tokens, {runs[0]['positions']} scored positions; medians of {args.repeats} "
          f"runs each, per process")
    print(f"{'phase':<20} {'unit':<16} {'1 process':>11} {'2 processes':>12} {'s (1p)':>8}")
    table = phase_table(runs)
    for name, unit, r1, r2, s1 in table:
        print(f"{name:<20} {unit:<16} {r1:11,.0f} {r2:12,.0f} {s1:>8}")
    print(f"wall, 1 process: {statistics.median(wall[1]):.1f} s; 2 processes: {statistics.median(wall[2]):.1f} s; "
          f"scaling {scaling:.2f}x (per pair of runs: {', '.join(f'{p:.2f}' for p in pairs)}); the machine granted "
          f"{machine:.2f}x to pure-Python work over the same ordered_map (before and after the runs: "
          f"{', '.join(f'{c:.2f}' for c in control)})")
    if ref is not None:
        fast = statistics.median(r["positions"] / (r["rows"]["read"] + r["rows"]["fuse"] + r["rows"]["tokenise"]
                                                  + r["rows"]["write"]) for r in runs if r["workers"] == 1)
        print(f"rows, per-position implementation (replaced): {ref['positions'] / ref['seconds']:,.0f} positions/s; "
              f"this one: {fast:,.0f} positions/s, identical rows ({ref['rows_digest'][:16]})")
    for size in mem:
        m = mem[size]
        print(f"peak RSS, {size} corpus ({sizes[size]['pivot_tokens']} pivot tokens, {m['conversations']} "
              f"conversations): {m['self_mb']:.0f} MB (1 process)")
    w1, w2 = statistics.median(wall[1]), statistics.median(wall[2])
    if mem:  # the per-token cost and the fixed one (tokenizers, tables) from the two sizes, 1 process each
        small = sizes["small"]
        per_token = (mem["big"]["wall"] - mem["small"]["wall"]) / (big["pivot_tokens"] - small["pivot_tokens"])
        fixed = max(0.0, mem["small"]["wall"] - per_token * small["pivot_tokens"])
        how = "the two sizes' difference"
    else:
        per_token, fixed, how = w1 / big["pivot_tokens"], 0.0, "wall over tokens, fixed costs included"
    # The per-token part's speed-up (fixed costs stay serial), but never above the whole wall's: the fixed
    # cost comes from fresh processes (imports included), so it can overstate a warm run's and inflate this.
    work_scaling = min(w1 / w2, (w1 - fixed) / max(w2 - fixed, 1e-9))
    eff = min(1.0, work_scaling / 2)
    per_source_h = (fixed + FUSECHAT_TOKENS * per_token / (CORES * eff)) / 3600
    hours = FUSECHAT_SOURCES * per_source_h
    print(f"FuseChat-2.0 projection: {FUSECHAT_TOKENS:.0e} pivot tokens per source (assumed: ~95K conversations of "
          f"FuseChat-Mixture), {per_token * 1e6:.1f} µs per pivot token with 1 process ({how}) + {fixed:.1f} s fixed; "
          f"{CORES} processes at {eff:.0%} efficiency (the per-token part's 1→2 speed-up, at most the wall's, "
          f"{work_scaling:.2f}x / 2, "
          f"assumed to hold to {CORES}): {per_source_h * 60:.1f} min per source, {hours:.2f} h for "
          f"{FUSECHAT_SOURCES} sources; at full efficiency {(fixed + FUSECHAT_TOKENS * per_token / CORES) / 60:.1f} "
          f"min per source")
    rows_rate = table[3][2]
    load = os.getloadavg()
    print(f"RESULT prep rows_positions_per_s={rows_rate:.0f} align_tokens_per_s={table[1][2]:.0f} "
          f"tokenize_tokens_per_s={table[0][2]:.0f} scaling_2proc={scaling:.2f} machine_2proc={machine:.2f} "
          f"fusechat2_hours_16cores={hours:.2f} per_source_min_16cores={per_source_h * 60:.1f} "
          + (f"rss_small_mb={mem['small']['self_mb']:.0f} rss_big_mb={mem['big']['self_mb']:.0f} " if mem else "")
          + f"load={load[0]:.1f}")


if __name__ == "__main__":
    main()

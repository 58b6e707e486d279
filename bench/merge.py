"""Benchmark: `pivotfuse merge --method sce` against `mergekit-yaml` (mergekit 0.1.5, sce) on the
same base + 3 fine-tune-like targets, float32 and bfloat16, in the same run.

The two tools run interleaved (mergekit, pivotfuse, mergekit, pivotfuse, ...; `--repeats` runs of
each per dtype) so that load from other jobs on a shared machine falls on both sides alike; the
report gives each tool's median wall time and peak RSS, the ratio of the medians, and the ratio
within each (mergekit run, the pivotfuse run right after it) pair with its min-max, which shows
how much the load moved the figure. Each run is its own process (wall time includes start-up);
peak RSS comes from `wait4` on that process, so this parent stays small (torch only loads in
helper processes: a forked child's peak RSS would otherwise start at its parent's).
pivotfuse's own split of its time into reading, computing and writing is parsed from its summary
line (threads overlap, so the three may add up to more than the wall time); medians are shown.

    python bench/merge.py [--hidden 512 --layers 8 --vocab 32000] [--repeats 3] [--workdir DIR]

Last line: `RESULT merge speedup=<fp32 ratio of median times> rss_ratio=<fp32 pivotfuse/mergekit
median peak RSS> speedup_bf16=... rss_ratio_bf16=... repeats=N ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_models(work: Path, hidden: int, layers: int, vocab: int, dtype: str) -> tuple[Path, list[Path], int]:
    """Base + 3 targets (base + small per-tensor noise, 5% of elements untouched); reused when present."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = work / f"h{hidden}-l{layers}-v{vocab}-{dtype}"
    paths = [folder / "base"] + [folder / f"t{i}" for i in range(3)]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, vocab_size=vocab, tie_word_embeddings=False)
    if not all((p / "model.safetensors").is_file() for p in paths):
        shutil.rmtree(folder, ignore_errors=True)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        base_sd = {n: t.clone() for n, t in model.state_dict().items()}
        model.to(getattr(torch, dtype)).save_pretrained(paths[0])
        for i, path in enumerate(paths[1:]):
            g = torch.Generator().manual_seed(i + 1)
            sd = {}
            for name, t in base_sd.items():
                delta = 1e-3 * (1 + torch.rand((), generator=g)) * torch.randn(t.shape, generator=g)
                delta[torch.rand(t.shape, generator=g) < 0.05] = 0
                sd[name] = t + delta
            model.load_state_dict(sd)
            model.save_pretrained(path)
    params = sum((p.numel() for p in LlamaForCausalLM(cfg).parameters()))
    return paths[0], paths[1:], params


def run(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stdout+stderr) of one process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}):\n{out[-3000:]}")
    # Linux starts a child's ru_maxrss at the spawning process's high-water mark (exec keeps it),
    # so the figure is the child's own peak only when it exceeds this process's peak.
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if usage.ru_maxrss <= own:
        raise SystemExit(f"peak RSS of {cmd[0]} not measurable: it is not above this process's own peak "
                         f"({own / 1024:.0f} MB); keep torch out of the parent")
    return wall, usage.ru_maxrss / 1024, out  # ru_maxrss is in KiB on Linux


def max_diff(a: Path, b: Path) -> float:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert set(x) == set(y), "outputs hold different tensors"
    return max(float((x[n].float() - y[n].float()).abs().max()) for n in x)


def helper(argv: list[str]) -> None:
    """Torch work in a child process: `build H L V DTYPE WORK` or `diff A B`; JSON on stdout."""
    if argv[0] == "build":
        base, targets, params = build_models(Path(argv[5]), int(argv[1]), int(argv[2]), int(argv[3]), argv[4])
        print(json.dumps({"base": str(base), "targets": [str(t) for t in targets], "params": params}))
    else:
        print(json.dumps({"diff": max_diff(Path(argv[1]), Path(argv[2]))}))


def call_helper(*argv: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--helper", *argv], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


SPLIT = re.compile(r"read ([\d.]+)s, compute ([\d.]+)s, write ([\d.]+)s")
DTYPE_KEYS = {"float32": "fp32", "bfloat16": "bf16"}


def summarise(pairs: list[tuple[tuple[float, float], tuple[float, float]]]) -> dict[str, float]:
    """Medians and ratios of interleaved runs: `pairs` holds ((mergekit s, MB), (pivotfuse s, MB)),
    one per repeat, the pivotfuse run being the one right after that mergekit run."""
    mk_wall, mk_rss = [m[0] for m, _ in pairs], [m[1] for m, _ in pairs]
    pf_wall, pf_rss = [p[0] for _, p in pairs], [p[1] for _, p in pairs]
    speed = [m[0] / p[0] for m, p in pairs]
    rss = [p[1] / m[1] for m, p in pairs]
    med = statistics.median
    return {
        "mk_wall": med(mk_wall), "mk_rss": med(mk_rss), "pf_wall": med(pf_wall), "pf_rss": med(pf_rss),
        "speedup": med(mk_wall) / med(pf_wall), "rss_ratio": med(pf_rss) / med(mk_rss),
        "pair_speedup": med(speed), "pair_speedup_min": min(speed), "pair_speedup_max": max(speed),
        "pair_rss": med(rss), "pair_rss_min": min(rss), "pair_rss_max": max(rss),
    }


def result_line(summaries: dict[str, dict[str, float]], repeats: int, params: int) -> str:
    """The RESULT line: the requested keys first (fp32 unsuffixed), then the older `fp32_speedup`-style keys."""
    head, legacy, pairs = [], [], []
    for dtype, s in summaries.items():
        key = DTYPE_KEYS.get(dtype, dtype)
        suffix = "" if key == "fp32" else f"_{key}"
        head += [f"speedup{suffix}={s['speedup']:.2f}", f"rss_ratio{suffix}={s['rss_ratio']:.2f}"]
        legacy += [f"{key}_speedup={s['speedup']:.2f}", f"{key}_rss_ratio={s['rss_ratio']:.2f}"]
        pairs += [f"speedup_pair_min{suffix}={s['pair_speedup_min']:.2f}",
                  f"speedup_pair_max{suffix}={s['pair_speedup_max']:.2f}"]
    return " ".join(["RESULT merge", *head, f"repeats={repeats}", *legacy, *pairs, f"params_m={params / 1e6:.1f}"])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--helper":
        return helper(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--topk", type=float, default=0.1, help="sce select_topk")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs per tool and dtype (medians reported)")
    ap.add_argument("--workdir", default=str(ROOT / ".cache" / "bench_merge"))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    work = Path(args.workdir).resolve()  # absolute: mergekit reads 'a/b' as a Hub repo id
    py, mk = sys.executable, str(Path(sys.executable).with_name("mergekit-yaml"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs, rows, summaries, loads = [], [], {}, []
    for dtype in args.dtypes:
        built = call_helper("build", str(args.hidden), str(args.layers), str(args.vocab), dtype, str(work))
        base, targets, params = Path(built["base"]), [Path(t) for t in built["targets"]], built["params"]
        cfg = work / f"mergekit-{dtype}.yaml"
        cfg.write_text("\n".join(["models:", f"  - model: {base}", *[f"  - model: {t}" for t in targets],
                                  "merge_method: sce", f"base_model: {base}",
                                  f"parameters:\n  select_topk: {args.topk}", f"dtype: {dtype}", ""]))
        out_mk, out_pf = work / f"out-mergekit-{dtype}", work / f"out-pivotfuse-{dtype}"
        cmds = {
            "mergekit": (out_mk, [mk, str(cfg), str(out_mk), "--no-copy-tokenizer", "--no-write-model-card",
                                  "--quiet"]),
            "pivotfuse": (out_pf, [py, str(ROOT / "cli.py"), "merge", "--base", str(base), "--models",
                                   *map(str, targets), "--method", "sce", "--select-topk", str(args.topk),
                                   "--sce-mask", "mergekit", "--out", str(out_pf), "--overwrite", "--quiet"]),
        }
        load_start = os.getloadavg()[0]
        pairs, splits = [], []
        for i in range(args.repeats):
            measured = {}
            for tool, (out, cmd) in cmds.items():  # mergekit then pivotfuse, every repeat: A B A B ...
                shutil.rmtree(out, ignore_errors=True)
                wall, rss, text = run(cmd, env=env)
                measured[tool] = (wall, rss)
                if tool == "pivotfuse":
                    split = SPLIT.search(text)
                    if split is None:
                        raise SystemExit(f"pivotfuse printed no read/compute/write summary:\n{text[-3000:]}")
                    splits.append([float(x) for x in split.groups()])
                print(f"{dtype} repeat {i + 1}/{args.repeats} {tool}: {wall:.1f} s, {rss:.0f} MB", flush=True)
            pairs.append((measured["mergekit"], measured["pivotfuse"]))
        loads.append((dtype, load_start, os.getloadavg()[0]))
        diff = call_helper("diff", str(out_mk), str(out_pf))["diff"]  # outputs of the last repeat
        for out in (out_mk, out_pf):  # the inputs stay cached for the next run; outputs go
            shutil.rmtree(out, ignore_errors=True)
        summaries[dtype] = s = summarise(pairs)
        runs += [(dtype, i + 1, m, p) for i, (m, p) in enumerate(pairs)]
        split_med = [statistics.median(col) for col in zip(*splits)]
        rows.append((dtype, "mergekit", s["mk_wall"], s["mk_rss"], None, None))
        rows.append((dtype, "pivotfuse", s["pf_wall"], s["pf_rss"], split_med, diff))
    print(f"\nsce select_topk={args.topk}, base + 3 targets of {params / 1e6:.1f}M parameters, "
          f"{os.cpu_count()} CPUs; {args.repeats} runs per tool and dtype, interleaved (mergekit, pivotfuse, "
          f"mergekit, ...), each a separate process; 1-min load average "
          + ", ".join(f"{d} {a:.1f} -> {b:.1f}" for d, a, b in loads) + "\n")
    print("| dtype | repeat | mergekit s | mergekit MB | pivotfuse s | pivotfuse MB | speed-up | peak RSS ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for dtype, i, (mw, mr), (pw, pr) in runs:
        print(f"| {dtype} | {i} | {mw:.1f} | {mr:.0f} | {pw:.1f} | {pr:.0f} | {mw / pw:.2f}x | {pr / mr:.2f} |")
    print(f"\nMedians of {args.repeats} interleaved runs:\n")
    print("| dtype | tool | wall s | peak RSS MB | read s | compute s | write s | max abs diff vs mergekit |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for dtype, tool, wall, rss, split, diff in rows:
        r, c, w = (f"{x:.1f}" for x in split) if split else ("", "", "")
        print(f"| {dtype} | {tool} | {wall:.1f} | {rss:.0f} | {r} | {c} | {w} | "
              f"{'' if diff is None else f'{diff:.1e}'} |")
    print("\n| dtype | speed-up (ratio of median times) | per-pair speed-up, median (min-max) "
          "| peak RSS pivotfuse / mergekit (ratio of medians) | per-pair RSS ratio, median (min-max) |")
    print("|---|---:|---:|---:|---:|")
    for dtype, s in summaries.items():
        print(f"| {dtype} | {s['speedup']:.2f}x | {s['pair_speedup']:.2f}x ({s['pair_speedup_min']:.2f}-"
              f"{s['pair_speedup_max']:.2f}) | {s['rss_ratio']:.2f} | {s['pair_rss']:.2f} "
              f"({s['pair_rss_min']:.2f}-{s['pair_rss_max']:.2f}) |")
    print(result_line(summaries, args.repeats, params))


if __name__ == "__main__":
    main()

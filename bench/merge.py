"""Benchmark: `pivotfuse merge --method sce` against `mergekit-yaml` (mergekit 0.1.5, sce) on the
same base + 3 fine-tune-like targets, float32 and bfloat16, in the same run.

Each tool runs as its own process (wall time includes start-up); peak RSS comes from
`wait4`, so this parent process stays small (torch only loads in helper processes: a forked
child's peak RSS would otherwise start at its parent's). pivotfuse's own split of its time into reading, computing and writing is parsed
from its summary line (threads overlap, so the three may add up to more than the wall time).

    python bench/merge.py [--hidden 512 --layers 8 --vocab 32000] [--repeats 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
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


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--helper":
        return helper(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--topk", type=float, default=0.1, help="sce select_topk")
    ap.add_argument("--repeats", type=int, default=2, help="runs per tool and dtype (best wall time kept)")
    ap.add_argument("--workdir", default=str(ROOT / ".cache" / "bench_merge"))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args()
    work = Path(args.workdir).resolve()  # absolute: mergekit reads 'a/b' as a Hub repo id
    py, mk = sys.executable, str(Path(sys.executable).with_name("mergekit-yaml"))
    rows, result = [], {}
    for dtype in args.dtypes:
        built = call_helper("build", str(args.hidden), str(args.layers), str(args.vocab), dtype, str(work))
        base, targets, params = Path(built["base"]), [Path(t) for t in built["targets"]], built["params"]
        cfg = work / f"mergekit-{dtype}.yaml"
        cfg.write_text("\n".join(["models:", f"  - model: {base}", *[f"  - model: {t}" for t in targets],
                                  "merge_method: sce", f"base_model: {base}",
                                  f"parameters:\n  select_topk: {args.topk}", f"dtype: {dtype}", ""]))
        out_mk, out_pf = work / f"out-mergekit-{dtype}", work / f"out-pivotfuse-{dtype}"
        cmds = {
            "mergekit": [mk, str(cfg), str(out_mk), "--no-copy-tokenizer", "--no-write-model-card", "--quiet"],
            "pivotfuse": [py, str(ROOT / "cli.py"), "merge", "--base", str(base), "--models", *map(str, targets),
                          "--method", "sce", "--select-topk", str(args.topk), "--sce-mask", "mergekit",
                          "--out", str(out_pf), "--overwrite", "--quiet"],
        }
        best: dict[str, tuple[float, float, str]] = {}
        for _ in range(args.repeats):
            for tool, cmd in cmds.items():  # alternate, so machine load hits both alike
                shutil.rmtree(out_mk if tool == "mergekit" else out_pf, ignore_errors=True)
                wall, rss, out = run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if tool not in best or wall < best[tool][0]:
                    best[tool] = (wall, rss, out)
        split = re.search(r"read ([\d.]+)s, compute ([\d.]+)s, write ([\d.]+)s", best["pivotfuse"][2])
        diff = call_helper("diff", str(out_mk), str(out_pf))["diff"]
        for out in (out_mk, out_pf):  # the inputs stay cached for the next run; outputs go
            shutil.rmtree(out, ignore_errors=True)
        rows.append((dtype, "mergekit", *best["mergekit"][:2], None, None))
        rows.append((dtype, "pivotfuse", *best["pivotfuse"][:2], split.groups() if split else None, diff))
        key = {"float32": "fp32", "bfloat16": "bf16"}.get(dtype, dtype)
        result[f"{key}_speedup"] = best["mergekit"][0] / best["pivotfuse"][0]
        result[f"{key}_rss_ratio"] = best["pivotfuse"][1] / best["mergekit"][1]
    print(f"\nsce select_topk={args.topk}, base + 3 targets of {params / 1e6:.1f}M parameters, "
          f"{os.cpu_count()} CPUs, best of {args.repeats}\n")
    print("| dtype | tool | wall s | peak RSS MB | read s | compute s | write s | max abs diff vs mergekit |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype, tool, wall, rss, split, diff in rows:
        r, c, w = split or ("", "", "")
        print(f"| {dtype} | {tool} | {wall:.1f} | {rss:.0f} | {r} | {c} | {w} | "
              f"{'' if diff is None else f'{diff:.1e}'} |")
    print("\n| dtype | speed-up (mergekit time / pivotfuse time) | peak RSS (pivotfuse / mergekit) |")
    print("|---|---|---|")
    for dtype in args.dtypes:
        key = {"float32": "fp32", "bfloat16": "bf16"}.get(dtype, dtype)
        print(f"| {dtype} | {result[key + '_speedup']:.2f}x | {result[key + '_rss_ratio']:.2f} |")
    print("RESULT merge " + " ".join(f"{k}={v:.2f}" for k, v in result.items()) + f" params_m={params / 1e6:.1f}")


if __name__ == "__main__":
    main()

"""Choose the demo's training settings on the world's VALID split (never on the held-out questions).

    python bench/tune_demo.py [--out runs/tune] [--recipe recipes/demo.yaml]

Two stages, each a small grid of `--set` overrides of the recipe, every model scored on
`world:valid_questions` (greedy exact-answer accuracy) and `world:valid` (bits per byte):

1. the optimiser (lr, epochs), chosen for the pivot-CLM baseline: the plain CE training on the
   fusion data that every target shares (λ = 1), so the baseline gets the settings that suit it
   best, not ones that handicap it. Criterion: its mean valid accuracy over the expert domains
   (ties: lower mean valid bits per byte).
2. the fusion settings (λ, temperature) at that optimiser (pivot-CLM is stage 1's: λ = 1 makes it
   the same model at every λ), chosen for the targets T_k: the mean
   over sources of T_k's valid accuracy on its source's domain (ties: lower mean bits per byte on
   those domains).

Each point trains with `cli.py fuse --recipe R --set ...` into its own run folder (the extraction
stores and vocabulary maps are shared: they do not depend on these settings, and their
fingerprints guard the sharing) and is scored with `cli.py eval accuracy` and `cli.py eval loss`.
Prints both tables and the choice, the overrides to put into the recipe, and writes OUT/tune.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.recipe import CLM_NAME, TARGET_PREFIX, load_recipe  # noqa: E402

OPTIMISERS = [{"fuse.lr": 1e-3, "fuse.epochs": 3}, {"fuse.lr": 1e-3, "fuse.epochs": 6},
              {"fuse.lr": 3e-3, "fuse.epochs": 3}, {"fuse.lr": 3e-3, "fuse.epochs": 6}]
FUSION = [{"fuse.lam": 0.9, "fuse.temperature": 1.0}, {"fuse.lam": 0.5, "fuse.temperature": 1.0},
          {"fuse.lam": 0.0, "fuse.temperature": 1.0}, {"fuse.lam": 0.0, "fuse.temperature": 2.0}]


def _cli(*args: str) -> None:
    cmd = [sys.executable, str(REPO / "cli.py"), *args]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"tune_demo: {' '.join(args[:3])} failed ({r.returncode}): {r.stderr.strip()[-1500:]}")


def _name(point: dict) -> str:
    return "_".join(f"{k.split('.')[-1]}{v:g}" for k, v in point.items())


class Tuner:
    """The grid's runs under one folder, with the extraction and alignment shared between them."""

    def __init__(self, recipe: Path, out: Path) -> None:
        self.recipe, self.out = recipe, out
        r = load_recipe(recipe)
        self.world = Path(r.world.out)
        self.pivot = r.models.pivot.name
        self.sources = {s.name: s.domain or s.name for s in r.models.sources}
        self.max_new_tokens = r.accuracy.max_new_tokens if r.accuracy else 96
        (out / "shared" / "extract").mkdir(parents=True, exist_ok=True)
        (out / "shared" / "align").mkdir(parents=True, exist_ok=True)

    def _run_dir(self, point: dict) -> Path:
        run = self.out / _name(point)
        run.mkdir(parents=True, exist_ok=True)
        for part in ("extract", "align"):
            link = run / part
            if not link.exists():
                link.symlink_to((self.out / "shared" / part).resolve(), target_is_directory=True)
        return run

    def train(self, point: dict, which: list[str]) -> Path:
        """Train `which` (source names, or CLM_NAME) at `point`; a finished target is skipped by fuse."""
        run = self._run_dir(point)
        sets = [f"out={run}", *(f"{k}={v}" for k, v in point.items())]
        for name in which:
            flag = ["--clm"] if name == CLM_NAME else ["--source", name]
            _cli("fuse", "--recipe", str(self.recipe), *flag, "--set", *sets)
        return run

    def score(self, models: dict[str, str], out: Path) -> dict[str, dict]:
        """{model: {accuracy: {domain: x}, bpb: {domain: x}}} on the valid split."""
        specs = [a for n, p in models.items() for a in ("--model", f"{n}={p}")]
        data = self.world / "data"
        _cli("eval", "accuracy", *specs, "--questions", str(data / "valid_questions.jsonl"),
             "--max-new-tokens", str(self.max_new_tokens), "--batch-size", "256", "--out", str(out))
        _cli("eval", "loss", *specs, "--data", str(data / "valid.jsonl"), "--max-length", "256", "--out", str(out))
        acc = json.loads((out / "accuracy.json").read_text())["models"]
        loss = json.loads((out / "loss.json").read_text())["models"]
        return {n: {"accuracy": {d: v["accuracy"] for d, v in acc[n].items() if d != "all"},
                    "bpb": {d: v["bits_per_byte"] for d, v in loss[n].items() if d != "all"}} for n in models}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "demo.yaml"))
    ap.add_argument("--out", default=str(REPO / "runs" / "tune"))
    ap.add_argument("--opt", nargs="+", metavar="LR:EPOCHS", help="stage 1 grid (default: 1e-3 and 3e-3 × 3 and 6 epochs)")
    ap.add_argument("--fusion", nargs="+", metavar="LAMBDA:T", help="stage 2 grid, in this order "
                    "(default: 0.9:1 0.5:1 0:1 0:2)")
    args = ap.parse_args()
    optimisers = [{"fuse.lr": float(a), "fuse.epochs": float(b)} for a, b in (o.split(":") for o in args.opt)] \
        if args.opt else OPTIMISERS
    fusion = [{"fuse.lam": float(a), "fuse.temperature": float(b)} for a, b in (f.split(":") for f in args.fusion)] \
        if args.fusion else FUSION
    t0 = time.time()
    tuner = Tuner(Path(args.recipe), Path(args.out).resolve())
    doms = list(dict.fromkeys(tuner.sources.values()))
    ref = tuner.score({n: str(tuner.world / "models" / n) for n in [tuner.pivot, *tuner.sources]},
                      tuner.out / "reference")
    print(f"valid split, reference models ({time.time() - t0:.0f} s):")
    for n, s in ref.items():
        print(f"  {n:10s} " + "  ".join(f"{d} {s['accuracy'][d]:.1%} / {s['bpb'][d]:.3f}" for d in doms), flush=True)

    stage1 = []
    for opt in optimisers:
        run = tuner.train(opt, [CLM_NAME])
        s = tuner.score({CLM_NAME: str(run / "targets" / CLM_NAME)}, run / "valid")[CLM_NAME]
        stage1.append({"point": opt, "accuracy": _mean([s["accuracy"][d] for d in doms]),
                       "bpb": _mean(list(s["bpb"].values())), "per_domain": s})
        print(f"stage 1 {_name(opt):22s} pivot-CLM accuracy {stage1[-1]['accuracy']:.1%} "
              f"bpb {stage1[-1]['bpb']:.4f} ({time.time() - t0:.0f} s)", flush=True)
    chosen1 = max(stage1, key=lambda r: (r["accuracy"], -r["bpb"]))
    best_opt, clm_scores = chosen1["point"], chosen1["per_domain"]

    stage2 = []
    for fus in fusion:
        point = best_opt | fus
        run = tuner.train(point, list(tuner.sources))  # pivot-CLM (λ = 1) is stage 1's at this optimiser
        s = tuner.score({TARGET_PREFIX + n: str(run / "targets" / n) for n in tuner.sources}, run / "valid")
        s[CLM_NAME] = clm_scores
        own = {n: (s[TARGET_PREFIX + n]["accuracy"][d], s[TARGET_PREFIX + n]["bpb"][d]) for n, d in tuner.sources.items()}
        clm = {n: (s[CLM_NAME]["accuracy"][d], s[CLM_NAME]["bpb"][d]) for n, d in tuner.sources.items()}
        stage2.append({"point": point, "accuracy": _mean([a for a, _ in own.values()]),
                       "bpb": _mean([b for _, b in own.values()]), "own": own, "pivot_clm": clm})
        print(f"stage 2 {_name(point):36s} T_k on own domain accuracy {stage2[-1]['accuracy']:.1%} "
              f"bpb {stage2[-1]['bpb']:.4f} ({time.time() - t0:.0f} s)", flush=True)
    best = max(stage2, key=lambda r: (r["accuracy"], -r["bpb"]))["point"]

    print("\nstage 1: optimiser, pivot-CLM on the valid split (mean over expert domains)\n")
    print("| lr | epochs | accuracy | bits/byte (mean over domains) |\n|---:|---:|---:|---:|")
    for r in stage1:
        mark = " **chosen**" if r["point"] == best_opt else ""
        print(f"| {r['point']['fuse.lr']:g} | {r['point']['fuse.epochs']:g} | {r['accuracy']:.1%}{mark} | {r['bpb']:.4f} |")
    print(f"\nstage 2: λ and temperature at lr {best_opt['fuse.lr']:g}, {best_opt['fuse.epochs']:g} epochs; "
          "each T_k on its source's domain (pivot-CLM of the same settings in brackets)\n")
    names = list(tuner.sources)
    print("| λ | T | " + " | ".join(f"T_{n} accuracy" for n in names) + " | mean accuracy | mean bits/byte |")
    print("|---:|---:|" + "---:|" * (len(names) + 2))
    for r in stage2:
        mark = " **chosen**" if r["point"] == best else ""
        cells = [f"{r['own'][n][0]:.1%} ({r['pivot_clm'][n][0]:.1%})" for n in names]
        print(f"| {r['point']['fuse.lam']:g} | {r['point']['fuse.temperature']:g} | " + " | ".join(cells)
              + f" | {r['accuracy']:.1%}{mark} | {r['bpb']:.4f} |")
    print("\nchosen: " + " ".join(f"{k}={v:g}" for k, v in best.items()) + f"  ({time.time() - t0:.0f} s)")
    (tuner.out / "tune.json").write_text(json.dumps({"reference": ref, "stage1": stage1, "stage2": stage2,
                                                     "chosen": best, "seconds": time.time() - t0}, indent=1))


if __name__ == "__main__":
    main()

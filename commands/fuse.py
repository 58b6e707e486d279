"""`pivotfuse fuse`: train target T_k = the pivot fused with source S_k (FuseChat phase 1), or one
target fused from the pivot and several sources at once (FuseLLM mode).

    python cli.py fuse --recipe recipes/demo.yaml --source arith       # OUT/targets/arith
    python cli.py fuse --recipe recipes/demo.yaml --clm                 # OUT/targets/pivot-clm (λ = 1)
    python cli.py fuse --recipe recipes/demo.yaml --sources arith facts strings   # OUT/targets/fusellm
    python cli.py fuse --recipe recipes/demo.yaml --fusellm             # the recipe's fusellm: section
    python cli.py fuse --pivot P --source S --data D --out OUT [--lam 0.9 --method mince ...]
    accelerate launch --num_processes 2 cli.py fuse ...                 # data-parallel (CPU: gloo)

Without a recipe, --pivot/--source/--sources are model folders and --data a chat corpus; with one,
--source/--sources name its sources and --pivot/--data/--out override the recipe. Every `fuse:`
setting is also a flag. FuseLLM mode uses the stores and vocabulary maps of pairwise fusion (made
if missing, else reused). Rerun the same command to resume an interrupted run.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from core.config import add_arguments as add_config_arguments
from core.config import given
from core.errors import PivotfuseError
from fuse.train.config import FuseConfig

if TYPE_CHECKING:  # for annotations only
    from pipeline.recipe import Recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="recipe YAML (its fuse:/extract: sections give the defaults)")
    parser.add_argument("--source", help="source to fuse: a name from the recipe, or a model folder without one")
    parser.add_argument("--clm", action="store_true",
                        help="train the pivot-CLM baseline instead: λ = 1, same data and steps, no source")
    parser.add_argument("--sources", nargs="+", metavar="NAME",
                        help="FuseLLM mode: fuse these sources (at least two) into one target in one run")
    parser.add_argument("--fusellm", action="store_true",
                        help="FuseLLM mode with the recipe's fusellm: section (its sources, else every source)")
    parser.add_argument("--pivot", help="pivot model folder (overrides the recipe's)")
    parser.add_argument("--data", help="fusion corpus: JSONL or datasets folder (overrides the recipe's)")
    parser.add_argument("--out", help="run folder: stores, work and targets/NAME go under it")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides (a.b=value)")
    add_config_arguments(parser, FuseConfig)


def run(args: argparse.Namespace) -> int:
    from pipeline.pairwise import fuse_target
    from pipeline.recipe import recipe_for_fuse

    modes = [flag for flag, on in (("--source", args.source), ("--clm", args.clm),
                                   ("--sources", args.sources is not None), ("--fusellm", args.fusellm)) if on]
    modes = [m for m in modes if m != "--fusellm"] if "--sources" in modes else modes  # --sources is FuseLLM mode
    if len(modes) > 1:
        raise PivotfuseError(f"fuse: give {modes[0]} or {modes[1]}, not both" if len(modes) == 2 else
                             f"fuse: give one of {', '.join(modes)}, not several")
    fusellm = args.fusellm or args.sources is not None
    recipe = recipe_for_fuse(args.recipe, args.set, pivot=args.pivot, source=args.source, data=args.data,
                             out=args.out, clm=args.clm, fuse_flags=given(FuseConfig, args), sources=args.sources,
                             fusellm=fusellm)
    if fusellm:
        return _run_fusellm(recipe)
    name = None if args.clm else (args.source if args.recipe else recipe.models.sources[0].name)
    target, report = fuse_target(recipe, name)
    if report is None:  # not the main process
        return 0
    b, a = report["loss_before"], report["loss_after"]
    print(f"fuse: {report['target']}: loss {b.get('loss', float('nan')):.4f} -> {a.get('loss', float('nan')):.4f} "
          f"in {report['steps']} steps; coverage {report['fusion']['coverage']:.1%}; "
          f"winners {report['fusion']['winners']} -> {target}")
    return 0


def _run_fusellm(recipe: Recipe) -> int:
    """Train the FuseLLM-mode target and print one line: losses, steps, each teacher's share."""
    from pipeline.fusellm import fuse_sources_target

    target, report = fuse_sources_target(recipe)
    if report is None:  # not the main process
        return 0
    b, a = report["loss_before"], report["loss_after"]
    total = report["contributions"]["total"] or {"teachers": {}}
    key = "mean_weight" if report["method"] == "avgce" else \
        "sequence_share" if report["method"] == "mince" else "position_share"
    shares = ", ".join(f"{n} {t[key]:.1%}" for n, t in total["teachers"].items())
    print(f"fuse: {report['target']}: loss {b.get('loss', float('nan')):.4f} -> {a.get('loss', float('nan')):.4f} "
          f"in {report['steps']} steps; {report['method']} over the pivot and {', '.join(report['sources'])}; "
          f"{key.replace('_', ' ')}: {shares} -> {target}")
    return 0

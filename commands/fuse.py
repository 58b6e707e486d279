"""`pivotfuse fuse`: train target T_k = the pivot fused with source S_k (FuseChat phase 1).

    python cli.py fuse --recipe recipes/demo.yaml --source arith       # OUT/targets/arith
    python cli.py fuse --recipe recipes/demo.yaml --clm                 # OUT/targets/pivot-clm (λ = 1)
    python cli.py fuse --pivot P --source S --data D --out OUT [--lam 0.9 --method mince ...]
    accelerate launch --num_processes 2 cli.py fuse ...                 # data-parallel (CPU: gloo)

Without a recipe, --pivot/--source are model folders and --data a chat corpus; with one, --source
names one of its sources and --pivot/--data/--out override the recipe. Every `fuse:` setting is
also a flag. Rerun the same command to resume an interrupted run.
"""

from __future__ import annotations

import argparse

from core.config import add_arguments as add_config_arguments
from core.config import given
from core.errors import PivotfuseError
from fuse.train.config import FuseConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="recipe YAML (its fuse:/extract: sections give the defaults)")
    parser.add_argument("--source", help="source to fuse: a name from the recipe, or a model folder without one")
    parser.add_argument("--clm", action="store_true",
                        help="train the pivot-CLM baseline instead: λ = 1, same data and steps, no source")
    parser.add_argument("--pivot", help="pivot model folder (overrides the recipe's)")
    parser.add_argument("--data", help="fusion corpus: JSONL or datasets folder (overrides the recipe's)")
    parser.add_argument("--out", help="run folder: stores, work and targets/NAME go under it")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides (a.b=value)")
    add_config_arguments(parser, FuseConfig)


def run(args: argparse.Namespace) -> int:
    from pipeline.pairwise import fuse_target
    from pipeline.recipe import recipe_for_fuse

    if args.clm and args.source:
        raise PivotfuseError("fuse: give --source or --clm, not both")
    recipe = recipe_for_fuse(args.recipe, args.set, pivot=args.pivot, source=args.source, data=args.data,
                             out=args.out, clm=args.clm, fuse_flags=given(FuseConfig, args))
    name = None if args.clm else (args.source if args.recipe else recipe.models.sources[0].name)
    target, report = fuse_target(recipe, name)
    if report is None:  # not the main process
        return 0
    b, a = report["loss_before"], report["loss_after"]
    print(f"fuse: {report['target']}: loss {b.get('loss', float('nan')):.4f} -> {a.get('loss', float('nan')):.4f} "
          f"in {report['steps']} steps; coverage {report['fusion']['coverage']:.1%}; "
          f"winners {report['fusion']['winners']} -> {target}")
    return 0

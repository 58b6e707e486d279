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
from pathlib import Path

from core.config import add_arguments as add_config_arguments
from core.config import apply_overrides, from_args, from_dict, load_yaml, to_dict
from core.errors import PivotfuseError
from core.loading import refuse_file_as_folder
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


def build_recipe(args: argparse.Namespace):
    """The recipe from --recipe (+ --set) with --pivot/--source/--data/--out and fuse flags applied."""
    from core.recipe import Recipe, load_recipe

    if args.recipe:
        data = apply_overrides(load_yaml(args.recipe), args.set, str(args.recipe))
        src = str(args.recipe)
    else:
        missing = [f"--{n}" for n in ("pivot", "data", "out") if getattr(args, n) is None]
        if not args.clm and args.source is None:
            missing.append("--source")
        if missing:
            raise PivotfuseError(f"fuse: without --recipe, {' '.join(missing)} required")
        data = apply_overrides({}, args.set, "--set")
        src = "command line"
    models = data.setdefault("models", {})
    if args.pivot:
        models["pivot"] = {"name": models.get("pivot", {}).get("name", "pivot"), "path": args.pivot}
    if args.source and not args.recipe:
        models["sources"] = [{"name": Path(args.source).name or "source", "path": args.source}]
    if args.data:
        data.setdefault("data", {})["fusion"] = args.data
    if args.out:
        data["out"] = args.out
    recipe = from_dict(Recipe, data, src=src)
    recipe.fuse = from_args(FuseConfig, args, to_dict(recipe.fuse), src=src)
    for spec in [recipe.models.pivot, *recipe.models.sources]:
        if spec.path.startswith("world:"):
            continue
        refuse_file_as_folder(spec.path, f"{src}: model {spec.name}")
        if not Path(spec.path).is_dir():
            raise PivotfuseError(f"{src}: model {spec.name}: {spec.path!r} is not a folder")
    fusion = recipe.world_path(recipe.data.fusion)
    if not Path(fusion).exists():
        raise PivotfuseError(f"{src}: fusion corpus {fusion!r} not found")
    return recipe


def run(args: argparse.Namespace) -> int:
    from fuse.pipeline import fuse_source

    if args.clm and args.source:
        raise PivotfuseError("fuse: give --source or --clm, not both")
    recipe = build_recipe(args)
    name = None if args.clm else (args.source if args.recipe else recipe.models.sources[0].name)
    target = fuse_source(recipe, name)
    from accelerate import PartialState

    from core.files import read_json

    if not PartialState().is_main_process:
        return 0
    report = read_json(target / "fusion_report.json")
    b, a = report["loss_before"], report["loss_after"]
    print(f"fuse: {report['target']}: loss {b.get('loss', float('nan')):.4f} -> {a.get('loss', float('nan')):.4f} "
          f"in {report['steps']} steps; coverage {report['fusion']['coverage']:.1%}; "
          f"winners {report['fusion']['winners']} -> {target}")
    return 0

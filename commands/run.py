"""`pivotfuse run RECIPE`: the whole fusion from one file (`pipeline.run`), then the report printed.

    python cli.py run recipes/demo.yaml [--set fuse.lr=1e-4 out=runs/x]

Each step is skipped when its output exists with the same fingerprint: rerun to resume.
"""

from __future__ import annotations

import argparse

from core.errors import PivotfuseError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override recipe values, e.g. --set fuse.lr=1e-4 out=runs/x")


def run(args: argparse.Namespace) -> int:
    from pipeline.recipe import load_recipe
    from pipeline.run import run_recipe

    recipe = load_recipe(args.recipe, args.set)
    if not recipe.models.sources:
        raise PivotfuseError(f"{args.recipe}: 'models.sources' is empty: nothing to fuse")
    report = run_recipe(recipe)
    print(report.read_text())
    return 0

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
    from pipeline.implicit_recipe import is_implicit_recipe
    from pipeline.recipe import load_recipe
    from pipeline.run import run_recipe

    if is_implicit_recipe(args.recipe):  # target + sources: implicit fusion (FuseChat-3.0 / WRPO)
        from pipeline.implicit_run import run_implicit_recipe

        print(run_implicit_recipe(args.recipe, args.set).read_text())
        return 0
    recipe = load_recipe(args.recipe, args.set)
    if not recipe.models.sources:
        raise PivotfuseError(f"{args.recipe}: 'models.sources' is empty: nothing to fuse")
    report = run_recipe(recipe)
    print(report.read_text())
    return 0

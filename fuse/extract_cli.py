"""`pivotfuse extract`: store a model's top-k next-token log-probs over a chat corpus.

    python cli.py extract --model M --data D --out STORE [--top-k 10] [--batch-size 8] [--max-length 2048]
    python cli.py extract --recipe R.yaml --model pivot       # settings, paths and output from a recipe
    accelerate launch --multi_gpu --num_processes 2 cli.py extract ...   # data-parallel (on CPU too: gloo)

Rerunning the same command resumes an interrupted store.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from core.config import add_arguments as add_config_arguments
from core.config import from_args, to_dict
from core.errors import PivotfuseError
from core.loading import refuse_file_as_folder
from fuse.extract.config import ExtractJob


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="recipe YAML: its `extract:` section gives defaults; --model may then name "
                                         "one of its models (pivot or a source), --data/--out default to the "
                                         "fusion corpus and OUT/extract/NAME")
    add_config_arguments(parser, ExtractJob)


def _from_recipe(args: argparse.Namespace) -> dict:
    from core.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    base = {k: v for k, v in to_dict(recipe.extract).items() if v is not None}
    specs = {s.name: s for s in [recipe.models.pivot, *recipe.models.sources]}
    if args.model in specs:
        spec = specs[args.model]
        base.update(model=recipe.world_path(spec.path), out=str(Path(recipe.out) / "extract" / spec.name))
        if spec.chat_template:
            base["chat_template"] = spec.chat_template
        args.model = None  # the flag named the model; the recipe gave its path
    elif args.model is not None:  # a folder of the user's own, or a misspelt name: say which, not "--out is required"
        if not Path(args.model).exists():
            raise PivotfuseError(f"{args.recipe}: no model named {args.model!r} in 'models' "
                                 f"({', '.join(specs)}), and no folder {args.model!r}")
        refuse_file_as_folder(args.model, "model")
        if args.out is None:
            raise PivotfuseError(f"extract: --model {args.model} is not one of the models of {args.recipe} "
                                 f"({', '.join(specs)}): give --out for its store")
    base.setdefault("data", recipe.world_path(recipe.data.fusion))
    return base


def run(args: argparse.Namespace) -> int:
    from fuse.extract.extract import extract

    base = _from_recipe(args) if args.recipe else {}
    cfg = from_args(ExtractJob, args, base)
    stats = extract(cfg)
    if stats:
        tokens = max(stats["scored_tokens"], 1)
        size = sum(f.stat().st_size for f in (Path(cfg.out) / "shards").glob("*.arrow"))
        print(f"extract: {stats['stored']}/{stats['rows']} conversations, {stats['scored_tokens']} scored tokens, "
              f"CE {stats['nll'] / tokens:.4f} nats/token ({stats['nll'] / max(stats['scored_chars'], 1):.4f}/char); "
              f"skipped {stats['skipped_no_assistant']} without an assistant reply, "
              f"{stats['skipped_template_error']} the template cannot render, "
              f"{stats['skipped_no_scored_tokens']} truncated to nothing; truncated {stats['truncated']}; "
              f"{size / 1e6:.1f} MB ({size / tokens:.1f} bytes/scored token) -> {cfg.out}")
    return 0

"""`pivotfuse extract`: store a model's top-k next-token log-probs over a chat corpus.

    python cli.py extract --model M --data D --out STORE [--top-k 10] [--batch-size 8] [--max-length 2048]
    python cli.py extract --recipe R.yaml --model pivot       # settings, paths and output from a recipe
    accelerate launch --multi_gpu --num_processes 2 cli.py extract ...   # data-parallel (on CPU too: gloo)

Rerunning the same command resumes an interrupted store.
"""

from __future__ import annotations

import argparse

from core.config import add_arguments as add_config_arguments
from core.config import from_args
from fuse.extract.config import ExtractJob


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="recipe YAML: its `extract:` section gives defaults; --model may then name "
                                         "one of its models (pivot or a source), --data/--out default to the "
                                         "fusion corpus and OUT/extract/NAME")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value (keys of the whole recipe, e.g. extract.top_k=5)")
    add_config_arguments(parser, ExtractJob)


def run(args: argparse.Namespace) -> int:
    from pipeline.tasks import extract, extract_job_from_recipe

    base: dict = {}
    if args.recipe:
        base, named = extract_job_from_recipe(args.recipe, args.set, args.model, args.out is not None)
        if named:
            args.model = None  # the flag named the model; the recipe gave its path
    job = from_args(ExtractJob, args, base)
    stats, size = extract(job)
    if stats:
        tokens = max(stats["scored_tokens"], 1)
        print(f"extract: {stats['stored']}/{stats['rows']} conversations, {stats['scored_tokens']} scored tokens, "
              f"CE {stats['nll'] / tokens:.4f} nats/token ({stats['nll'] / max(stats['scored_chars'], 1):.4f}/char); "
              f"skipped {stats['skipped_no_assistant']} without an assistant reply, "
              f"{stats['skipped_template_error']} the template cannot render, "
              f"{stats['skipped_no_scored_tokens']} truncated to nothing; truncated {stats['truncated']}; "
              f"{size / 1e6:.1f} MB ({size / tokens:.1f} bytes/scored token) -> {job.out}")
    return 0

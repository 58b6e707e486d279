"""`pivotfuse sample`: N answers per prompt from each model, FastChat answer files (resumable).

    python cli.py sample --prompts P.jsonl --model gemma=models/gemma-2-27b-it --model openai:qwen@http://h:8000/v1 \
        --out OUT [--n 5 --temperature 0.8 --top-p 0.95 --seed 0] [--recipe R.yaml --set n_by_category.code=8]

Each model answers with its own chat template into OUT/model_answer/<name>.jsonl; rerun to resume.
"""

from __future__ import annotations

import argparse
import time

from core.config import add_arguments as add_config_arguments
from core.config import apply_overrides, from_args, load_yaml
from core.errors import PivotfuseError
from implicit.sample import SampleConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", required=True, help="FastChat question.jsonl (single-turn) or chats JSONL/datasets "
                                                         "folder (the last assistant reply is the reference)")
    parser.add_argument("--model", action="append", required=True, metavar="SPEC",
                        help="[NAME=]FOLDER or [NAME=]openai:MODEL_ID[@BASE_URL] (repeat for several)")
    parser.add_argument("--chat-template", action="append", default=[], metavar="NAME=FILE",
                        help="jinja chat template for a model whose tokenizer has none")
    parser.add_argument("--out", required=True, help="output folder (model_answer/ goes under it)")
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    parser.add_argument("--recipe", help="YAML recipe: its 'sample' section gives defaults for the flags below")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a sample setting")
    add_config_arguments(parser, SampleConfig)


def section(args: argparse.Namespace, name: str, cls: type) -> object:
    """`cls` from the recipe's `name` section (if any), `--set` overrides, then the flags."""
    base, src = {}, "command line"
    if args.recipe:
        base = load_yaml(args.recipe).get(name) or {}
        if not isinstance(base, dict):
            raise PivotfuseError(f"{args.recipe}: '{name}' must be a mapping")
        src = args.recipe
    apply_overrides(base, args.set, "--set")
    return from_args(cls, args, base, src=src)


def run(args: argparse.Namespace) -> int:
    from evals.cli import _models
    from implicit.prompts import load_prompts
    from implicit.sample import sample_answers

    cfg = section(args, "sample", SampleConfig)
    models, templates = _models(args.model, args.chat_template)
    prompts = load_prompts(args.prompts, args.limit)
    for name, spec in models.items():
        t0 = time.perf_counter()
        path = sample_answers(prompts, spec, args.out, cfg, chat_template=templates.get(name), name=name)
        print(f"sample {name}: {len(prompts)} prompts -> {path} ({time.perf_counter() - t0:.1f} s)")
    return 0

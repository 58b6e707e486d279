"""`pivotfuse sample`: N answers per prompt from each model, FastChat answer files (resumable).

    python cli.py sample --prompts P.jsonl --model gemma=models/gemma-2-27b-it --model openai:qwen@http://h:8000/v1 \
        --out OUT [--n 5 --temperature 0.8 --top-p 0.95 --seed 0] [--recipe R.yaml --set n_by_category.code=8]

Each model answers with its own chat template into OUT/model_answer/<name>.jsonl; rerun to resume.
"""

from __future__ import annotations

import argparse

from core.config import add_arguments as add_config_arguments
from core.config import load_config
from implicit.config import SampleConfig


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


def run(args: argparse.Namespace) -> int:
    from pipeline.tasks import model_specs, sample

    cfg = load_config(SampleConfig, args.recipe, args.set, "sample", args)
    models, templates = model_specs(args.model, args.chat_template)
    sample(args.prompts, args.limit, models, templates, args.out, cfg)
    return 0

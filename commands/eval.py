"""`pivotfuse eval mtbench|loss|accuracy|report`: MT-Bench-style judging, held-out loss,
exact-answer accuracy, the report.

    eval mtbench --model pivot=PATH --model fused=PATH --judge openai:gpt-4 \\
                 --questions mt_bench/question.jsonl --judge-prompts mt_bench/judge_prompts.jsonl \\
                 --reference mt_bench/reference_answer/gpt-4.jsonl --out OUT
    eval loss    --model pivot=PATH --model fused=PATH --data heldout.jsonl --out OUT
    eval accuracy --model pivot=PATH --model fused=PATH --questions WORLD/data/heldout_questions.jsonl --out OUT
    eval report  --out OUT
"""

from __future__ import annotations

import argparse
import time

from core.config import add_arguments as add_config_arguments
from core.config import load_config
from evals.config import EvalConfig

_MTBENCH_ONLY = ("questions", "judge_prompts", "reference", "judge", "base_url", "api_key_env", "max_new_tokens",
                 "judge_max_tokens", "system_prompt", "concurrency", "retries", "backoff", "timeout", "seed",
                 "demo_facts")
_LOSS_ONLY = ("data", "max_length")
_ACCURACY_SKIP = ("judge_prompts", "reference", "judge", "judge_max_tokens", "seed", "demo_facts") + _LOSS_ONLY


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="YAML recipe: its 'eval' section gives defaults for the flags below")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an eval setting")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", required=True, metavar="{mtbench,loss,accuracy,report}")
    model_help = "a model: [NAME=]FOLDER or [NAME=]openai:MODEL_ID[@BASE_URL] (repeat for several)"
    p = sub.add_parser("mtbench", help="answer two-turn questions with each model, then grade them with a judge")
    p.add_argument("--model", action="append", required=True, metavar="SPEC", help=model_help)
    p.add_argument("--chat-template", action="append", default=[], metavar="NAME=FILE",
                   help="jinja chat template for a model (or the judge) whose tokenizer has none")
    p.add_argument("--answer-only", action="store_true", help="write answers, do not judge")
    _common(p)
    add_config_arguments(p, EvalConfig, skip=_LOSS_ONLY)
    p = sub.add_parser("loss", help="held-out loss per domain (bits per byte of assistant text)")
    p.add_argument("--model", action="append", required=True, metavar="SPEC", help="[NAME=]FOLDER (repeat)")
    p.add_argument("--chat-template", action="append", default=[], metavar="NAME=FILE",
                   help="jinja chat template for a model whose tokenizer has none")
    _common(p)
    add_config_arguments(p, EvalConfig, skip=_MTBENCH_ONLY)
    p = sub.add_parser("accuracy", help="exact-answer accuracy per domain (greedy replies checked against key answers)")
    p.add_argument("--model", action="append", required=True, metavar="SPEC", help=model_help)
    p.add_argument("--chat-template", action="append", default=[], metavar="NAME=FILE",
                   help="jinja chat template for a model whose tokenizer has none")
    _common(p)
    add_config_arguments(p, EvalConfig, skip=_ACCURACY_SKIP)
    p = sub.add_parser("report", help="markdown table + PNG chart of everything in OUT")
    p.add_argument("--model", action="append", metavar="NAME", help="models to show, in this order (default: all)")
    p.add_argument("--judge-name", help="which judge's scores, when OUT holds several")
    _common(p)
    add_config_arguments(p, EvalConfig, skip=tuple(f for f in EvalConfig.__dataclass_fields__ if f != "out"))


def run(args: argparse.Namespace) -> int:
    from pipeline import tasks

    cfg = load_config(EvalConfig, args.recipe, args.set, "eval", args)
    t0 = time.perf_counter()
    if args.eval_command == "mtbench":
        models, templates = tasks.model_specs(args.model, args.chat_template)
        info, table = tasks.eval_mtbench(models, templates, cfg, args.answer_only)
        for step, sec in info["seconds"].items():
            print(f"{step}: {sec:.1f} s")
        if table:
            print(table)  # this judge's, if OUT holds several
    elif args.eval_command == "loss":
        print(tasks.eval_loss(args.model, args.chat_template, cfg))
    elif args.eval_command == "accuracy":
        print(tasks.eval_accuracy(args.model, args.chat_template, cfg))
    else:
        md, png = tasks.eval_report(cfg.out, args.model, args.judge_name)
        print(md.read_text())
        print(f"wrote {md} and {png}")
    print(f"eval {args.eval_command}: {time.perf_counter() - t0:.1f} s")
    return 0

"""`pivotfuse eval mtbench|loss|report`: MT-Bench-style judging, held-out loss, the report.

    eval mtbench --model pivot=PATH --model fused=PATH --judge openai:gpt-4 \\
                 --questions mt_bench/question.jsonl --judge-prompts mt_bench/judge_prompts.jsonl \\
                 --reference mt_bench/reference_answer/gpt-4.jsonl --out OUT
    eval loss    --model pivot=PATH --model fused=PATH --data heldout.jsonl --out OUT
    eval report  --out OUT
"""

from __future__ import annotations

import argparse
import time

from core.config import add_arguments as add_config_arguments
from core.config import apply_overrides, from_args, load_yaml
from core.errors import PivotfuseError
from evals.config import EvalConfig

_MTBENCH_ONLY = ("questions", "judge_prompts", "reference", "judge", "base_url", "api_key_env", "max_new_tokens",
                 "judge_max_tokens", "system_prompt", "concurrency", "retries", "backoff", "timeout", "seed",
                 "demo_facts")
_LOSS_ONLY = ("data", "max_length")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="YAML recipe: its 'eval' section gives defaults for the flags below")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an eval setting")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", required=True, metavar="{mtbench,loss,report}")
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
    p = sub.add_parser("report", help="markdown table + PNG chart of everything in OUT")
    p.add_argument("--model", action="append", metavar="NAME", help="models to show, in this order (default: all)")
    p.add_argument("--judge-name", help="which judge's scores, when OUT holds several")
    _common(p)
    add_config_arguments(p, EvalConfig, skip=tuple(f for f in EvalConfig.__dataclass_fields__ if f != "out"))


def _config(args: argparse.Namespace) -> EvalConfig:
    base = {}
    src = "command line"
    if args.recipe:
        base = load_yaml(args.recipe).get("eval") or {}
        if not isinstance(base, dict):
            raise PivotfuseError(f"{args.recipe}: 'eval' must be a mapping")
        src = args.recipe
    apply_overrides(base, args.set, "--set")
    return from_args(EvalConfig, args, base, src=src)


def _models(specs: list[str], templates: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    from evals.backends import parse_spec

    models: dict[str, str] = {}
    for spec in specs:
        name = parse_spec(spec).name
        if name in models:
            raise PivotfuseError(f"--model: two models named {name!r}: prefix one with NAME=")
        models[name] = spec  # parse_spec reads the NAME= prefix again
    chat_templates = {}
    for item in templates:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise PivotfuseError(f"--chat-template: expected NAME=FILE, got {item!r}")
        chat_templates[name] = path
    return models, chat_templates


def run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    t0 = time.perf_counter()
    if args.eval_command == "mtbench":
        from evals.report import build_table
        from evals.run import run_mtbench

        models, templates = _models(args.model, args.chat_template)
        info = run_mtbench(models, cfg, templates, answer_only=args.answer_only)
        for step, sec in info["seconds"].items():
            print(f"{step}: {sec:.1f} s")
        if "judgments" in info:
            print(build_table(cfg.out, list(models), info["judge"])[0])  # this judge's, if OUT holds several
    elif args.eval_command == "loss":
        from evals.loss import heldout_loss
        from evals.report import build_table

        if not cfg.data:
            raise PivotfuseError("eval loss: pass --data FILE (held-out chats)")
        models, templates = _models(args.model, args.chat_template)
        heldout_loss(models, cfg.data, cfg, templates, out=cfg.out)
        print(build_table(cfg.out, list(models))[0])
    else:
        from evals.report import write_report

        md, png = write_report(cfg.out, args.model, args.judge_name)
        print(md.read_text())
        print(f"wrote {md} and {png}")
    print(f"eval {args.eval_command}: {time.perf_counter() - t0:.1f} s")
    return 0

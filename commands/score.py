"""`pivotfuse score`: a reward per sampled answer, stored beside the answers (resumable).

    python cli.py score --prompts P.jsonl --out OUT --scorer reward_model --reward-model rm=models/ArmoRM-Llama3-8B-v0.1 \
        --trust-remote-code
    python cli.py score --prompts P.jsonl --out OUT --scorer judge --judge openai:gpt-4o [--judge-prompts F]
    python cli.py score --prompts world/data/fusion.jsonl --out OUT --scorer verifier --checker world --world-seed 0

Scores every OUT/model_answer/<model>.jsonl (or the --model names) into OUT/model_score/<scorer>/.
"""

from __future__ import annotations

import argparse
import time

from core.config import add_arguments as add_config_arguments
from core.config import load_config
from implicit.config import ScoreConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", required=True, help="the prompts the answers were sampled for")
    parser.add_argument("--out", required=True, help="the sampling output folder (holds model_answer/)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME",
                        help="score these models' answers (default: every file in OUT/model_answer)")
    parser.add_argument("--chat-template", metavar="FILE", help="chat template for a judge or reward model without one")
    parser.add_argument("--recipe", help="YAML recipe: its 'score' section gives defaults for the flags below")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a score setting")
    add_config_arguments(parser, ScoreConfig)


def run(args: argparse.Namespace) -> int:
    from pipeline.tasks import score

    cfg = load_config(ScoreConfig, args.recipe, args.set, "score", args)
    t0 = time.perf_counter()
    for name, (path, scores) in score(args.prompts, args.out, args.model, cfg, args.chat_template).items():
        known = [s for s in scores if s is not None]
        mean = f"{sum(known) / len(known):.4f}" if known else "n/a"
        print(f"score {name}: {len(scores)} answers, mean {mean}, {len(scores) - len(known)} unscored -> {path}")
    print(f"score: {time.perf_counter() - t0:.1f} s")
    return 0

"""`pivotfuse world`: build the offline demo world and print its tables."""

from __future__ import annotations

import argparse

from core import config
from world.config import WorldConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="take the 'world' section of this recipe (flags override it)")
    config.add_arguments(parser, WorldConfig)


def run(args: argparse.Namespace) -> int:
    from world.build import build_world, format_table

    base, src = {}, "command line"
    if args.recipe:
        base, src = config.load_yaml(args.recipe).get("world") or {}, args.recipe
    cfg = config.from_args(WorldConfig, args, base, src=src)
    meta = build_world(cfg)
    print(format_table(meta))
    print(f"world: {cfg.out}")
    return 0

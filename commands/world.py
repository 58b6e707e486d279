"""`pivotfuse world`: build the offline demo world and print its tables."""

from __future__ import annotations

import argparse

from core.config import add_arguments as add_config_arguments
from core.config import load_config
from world.config import WorldConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="take the 'world' section of this recipe (flags override it)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a world setting (keys of the 'world' section)")
    add_config_arguments(parser, WorldConfig)


def run(args: argparse.Namespace) -> int:
    from pipeline.tasks import build_world

    cfg = load_config(WorldConfig, args.recipe, args.set, "world", args)
    print(build_world(cfg))
    print(f"world: {cfg.out}")
    return 0

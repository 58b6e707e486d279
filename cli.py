"""pivotfuse command line: a thin table from command names to the modules that implement them.

Each command is one adapter in `commands/` exposing `add_arguments(parser)` and
`run(args) -> int | None`; it is imported only when its command runs, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from core.offline import force_offline

# command -> (module, one-line help). Only commands that work are listed.
COMMANDS: dict[str, tuple[str, str]] = {
    "world": ("commands.world", "build the offline demo world: corpus + pivot + source chat models"),
    "merge": ("commands.merge", "merge models in parameter space: varm, sce, ties, dare, task arithmetic, linear"),
    "extract": ("commands.extract", "store a model's top-k next-token log-probs over a chat corpus (resumable)"),
    "run": ("commands.run", "run a whole recipe: world → extract/align/fuse per source → merges → eval → report"),
    "eval": ("commands.eval", "evaluate chat models: MT-Bench-style judging, held-out loss, report"),
    "align": ("commands.align", "map a source model's vocabulary onto the pivot's over a chat corpus (MinED alignment)"),
    "fuse": ("commands.fuse", "train target T_k: the pivot fused with one source (extract, align, MinCE targets, train), "
                              "or with several in one run (--sources: FuseLLM mode)"),
    "sample": ("commands.sample", "sample N answers per prompt from each source model (FastChat answer files, resumable)"),
    "score": ("commands.score", "reward each sampled answer: reward model, LLM judge or verifier (resumable)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    force_offline()  # never reach for the Hub at run time, whatever the environment says
    # Build only the sub-parser that is asked for: importing every command's module
    # (torch, transformers, trl) for one `--help` would cost seconds.
    if argv and argv[0] in COMMANDS:
        module = COMMANDS[argv[0]][0]
        parser = argparse.ArgumentParser(prog=f"pivotfuse {argv[0]}", description=COMMANDS[argv[0]][1])
        importlib.import_module(module).add_arguments(parser)
        args = parser.parse_args(argv[1:])
    else:
        parser = argparse.ArgumentParser(prog="pivotfuse", description=__doc__.splitlines()[0])
        sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
        for name, (_, help_) in COMMANDS.items():
            sub.add_parser(name, help=help_, add_help=False)
        parser.parse_args(argv)  # prints usage / the unknown-command error and exits
        return 2
    from core.errors import PivotfuseError

    try:
        return int(importlib.import_module(module).run(args) or 0)
    except PivotfuseError as e:
        print(f"pivotfuse {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pivotfuse {argv[0]}: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

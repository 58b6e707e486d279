"""`pivotfuse align`: build the vocabulary map of a source model onto the pivot over a chat corpus.

    python cli.py align --pivot P --source S --data D --out F [--limit N] [--max-length L]

The map, its statistics and the pair's coverage go to F as JSON (`fuse.align.build`). Progress is
saved every `checkpoint_every` conversations to `F.partial`; rerunning the same command resumes
there, and a finished map whose fingerprint (tokenizers, templates, corpus, settings) matches is
reused as is.
"""

from __future__ import annotations

import argparse

from core.config import add_arguments as add_config_arguments
from core.config import load_config
from fuse.align.config import AlignConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pivot", required=True, help="pivot model folder (its tokenizer and chat template)")
    parser.add_argument("--source", required=True, help="source model folder")
    parser.add_argument("--data", required=True, help="chat corpus: JSONL or a saved datasets folder")
    parser.add_argument("--out", required=True, help="output JSON file of the vocabulary map")
    parser.add_argument("--pivot-chat-template", default=None, help="jinja file overriding the pivot's chat template")
    parser.add_argument("--source-chat-template", default=None, help="jinja file overriding the source's chat template")
    add_config_arguments(parser, AlignConfig)


def run(args: argparse.Namespace) -> int:
    from pipeline.tasks import vocab_map

    cfg = load_config(AlignConfig, args=args)
    vmap = vocab_map(args.pivot, args.source, args.data, args.out, cfg, args.pivot_chat_template,
                     args.source_chat_template)
    s, c = vmap.stats, vmap.stats["coverage"]
    print(f"vocabulary map {args.out}: {s['source_vocab']} source ids — exact {s['exact']}, statistical "
          f"{s['statistical']}, special {s['special']}, unmapped {s['unmapped']} "
          f"({s['conversations']} conversations, {s['aligned_pairs']} 1:1 pairs)")
    print(f"coverage of {c['positions']} pivot reply tokens: exact {c['exact_share']:.1%}, through the map "
          f"{c['mapped_share']:.1%}, no source distribution {c['none_share']:.1%}")
    return 0

"""`pivotfuse merge`: merge models in parameter space, from flags or a YAML merge file.

    python cli.py merge --base PIVOT --models T1 T2 T3 --method sce --select-topk 0.1 --out merged/
    python cli.py merge --config merge.yaml [--flags override the file]
"""

from __future__ import annotations

import argparse

from core.config import add_arguments as add_config_arguments
from core.config import load_config
from merge.config import MergeJob


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="merge file with the same keys as these flags "
                                                         "(base, models, method, out, ...); flags override it")
    add_config_arguments(parser, MergeJob)
    parser.add_argument("--threads", type=int, default=None,
                        help="compute threads (default: torch's thread count)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pipeline.tasks import merge  # torch is imported only when a merge runs

    job = load_config(MergeJob, args.config, args=args)
    s = merge(job, progress=not args.quiet, threads=args.threads)
    sec = s["seconds"]
    resumed = f", {s['resumed']} resumed" if s["resumed"] else ""
    print(f"merged {len(job.models)} models with {s['method']} into {s['out']}: {s['tensors']} tensors, "
          f"{s['params'] / 1e6:.1f}M parameters{resumed} in {sec['total']:.1f}s "
          f"(read {sec['read']:.1f}s, compute {sec['compute']:.1f}s, write {sec['write']:.1f}s)")
    return 0

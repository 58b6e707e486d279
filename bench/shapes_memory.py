"""Peak RSS and time of extraction, the vocabulary map and the held-out loss at real vocabulary
sizes, on two corpus sizes: memory must not grow with the corpus.

    python bench/shapes_memory.py WORLD [--model gemma3] [--pivot pivot] [--loss-model qwen3] [--out DIR]

WORLD is a spec world (`world.shapes`, e.g. .cache/real-shapes-world). Each (phase, corpus) runs in
a fresh process, and each phase's peak is its own (`core.measure`: VmHWM reset at its start), so
neither the other runs nor this script's memory reach a figure. Corpora: the world's fusion split
and the source-training + general splits (about ten times as many chats). Last line:
`RESULT shapes_memory growth=<largest peak ratio, large corpus / small> ...`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys
sys.path.insert(0, {repo!r})
from core.offline import force_offline
force_offline()
import torch
from core.measure import RECORDS, phase
from core.loading import vocab_size
kind, world, model, pivot, data, out = {args!r}
m, p = f"{{world}}/models/{{model}}", f"{{world}}/models/{{pivot}}"
if kind == "extract":
    from fuse.extract.config import ExtractJob
    from fuse.extract.extract import extract
    with phase("extract", model, vocab=vocab_size(m)):
        extract(ExtractJob(model=m, data=data, out=out, top_k=10, batch_size=16, max_length=192))
elif kind == "vocab map":
    from fuse.align.build import build_map
    from fuse.align.config import AlignConfig
    with phase("vocab map", model, vocab=vocab_size(m), pivot_vocab=vocab_size(p)):
        build_map(p, m, data, out + "/map.json", AlignConfig(), progress=False)
else:
    from evals.config import EvalConfig
    from evals.loss import heldout_loss
    heldout_loss({{model: m}}, data, EvalConfig(max_length=192, batch_size=16, dtype="float32", device_map=None))
print("RECORD " + json.dumps([r for r in RECORDS if r["phase"] in ("extract", "vocab map", "loss")][-1]))
"""


def measure(kind: str, world: Path, model: str, pivot: str, data: Path) -> dict:
    """One phase on one corpus in a fresh process: its record (seconds, peak RSS...)."""
    with tempfile.TemporaryDirectory() as tmp:
        code = CHILD.format(repo=str(REPO), args=(kind, str(world), model, pivot, str(data), str(Path(tmp) / "o")))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RECORD ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{kind} on {data} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RECORD "):])


def run(world: Path, model: str, pivot: str, loss_model: str, out: Path) -> list[dict]:
    from core.chat import load_conversations, write_conversations

    out.mkdir(parents=True, exist_ok=True)
    small = world / "data" / "fusion.jsonl"
    large = out / "large.jsonl"  # source_train + general: about ten times the fusion corpus
    write_conversations(load_conversations(world / "data" / "source_train.jsonl")
                        + load_conversations(world / "data" / "general.jsonl"), large)
    rows = []
    for kind, who in (("extract", model), ("vocab map", model), ("loss", loss_model)):
        for data in (small, large):
            rec = measure(kind, world, who, pivot, data)
            rec["chats"] = len(load_conversations(data))
            rows.append(rec)
            print(f"{kind:9} {who:8} {rec['chats']:5} chats: {rec['seconds']:7.1f} s, peak RSS {rec['peak_rss_mb']:6.0f} MB "
                  f"(at start {rec['rss_start_mb']:.0f} MB)", flush=True)
    (out / "shapes_memory.json").write_text(json.dumps(rows, indent=1))
    return rows


def growth(rows: list[dict]) -> dict[str, float]:
    """Peak RSS on the large corpus over the small one, per phase."""
    by = {}
    for r in rows:
        by.setdefault(r["phase"], []).append(r)
    return {k: v[1]["peak_rss_mb"] / v[0]["peak_rss_mb"] for k, v in by.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("world", type=Path)
    ap.add_argument("--model", default="gemma3", help="source whose extraction and vocabulary map are measured")
    ap.add_argument("--pivot", default="pivot")
    ap.add_argument("--loss-model", default="qwen3", help="model whose held-out loss is measured")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-shapes-memory")
    args = ap.parse_args()
    rows = run(args.world, args.model, args.pivot, args.loss_model, args.out)
    g = growth(rows)
    print("RESULT shapes_memory growth=%.3f " % max(g.values())
          + " ".join(f"{k.replace(' ', '_')}={v:.3f}" for k, v in g.items())
          + f" chats={rows[0]['chats']}/{rows[1]['chats']}")


if __name__ == "__main__":
    main()

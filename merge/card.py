"""Model card of a merged model: README.md (method, options, inputs, per-layer weights), the
merge file that reproduces it (`pivotfuse_merge.yaml`) and, for the weight-deriving methods
(varm, sce), a PNG plot of the per-layer weights (`merge_weights.png`).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from merge.config import MergeConfig
from merge.registry import METHODS

_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
PLOT_NAME = "merge_weights.png"
CONFIG_NAME = "pivotfuse_merge.yaml"


def layer_group(name: str) -> str:
    """'3' for a tensor of transformer block 3, else 'embed', 'head' or 'other'."""
    m = _LAYER.search(name)
    if m:
        return m.group(1)
    if re.search(r"embed_tokens|wte|wpe|embed_in|word_embeddings", name):
        return "embed"
    if re.search(r"lm_head|embed_out", name):
        return "head"
    return "other"


def per_layer(per_tensor: dict[str, dict], key: str = "weights") -> dict[str, list[float]]:
    """Mean per-model `weights` (or `kept`) over the tensors of each group, in layer order."""
    groups: dict[str, list[list[float]]] = {}
    for name, rec in per_tensor.items():
        if rec.get(key):
            groups.setdefault(layer_group(name), []).append(rec[key])
    order = sorted((g for g in groups if g.isdigit()), key=int) + [g for g in ("embed", "head", "other") if g in groups]
    return {g: [sum(col) / len(col) for col in zip(*groups[g])] for g in order}


def _plot(path: Path, layers: dict[str, list[float]], names: list[str], title: str) -> bool:
    numbered = [(int(g), w) for g, w in layers.items() if g.isdigit()]
    if not numbered:
        return False
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    xs = [x for x, _ in numbered]
    for i, name in enumerate(names):
        ax.plot(xs, [w[i] for _, w in numbered], marker="o", label=name)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("mean merge weight")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _table(rows: dict[str, list[float]], names: list[str]) -> list[str]:
    lines = ["| layer | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {g} | " + " | ".join(f"{v:.4f}" for v in vals) + " |" for g, vals in rows.items()]
    return lines


def write_card(folder: str | Path, summary: dict) -> None:
    """Write README.md, pivotfuse_merge.yaml and (varm/sce) merge_weights.png into `folder`."""
    folder = Path(folder)
    cfg, method = summary["config"], summary["method"]
    names = [Path(m).name for m in summary["models"]]
    fields = {f.name for f in dataclasses.fields(MergeConfig)}
    job = {"base": summary["base"], "models": summary["models"], "out": summary["out"],
           **{k: v for k, v in cfg.items() if v is not None and k in fields}}
    (folder / CONFIG_NAME).write_text(yaml.safe_dump(job, sort_keys=False))
    weights = per_layer(summary["per_tensor"], "weights")
    kept = per_layer(summary["per_tensor"], "kept")
    spec = METHODS[method]
    plotted = spec.self_weighted and _plot(folder / PLOT_NAME, weights, names, f"{method}: per-layer merge weights")
    opts = {k: cfg[k] for k in spec.options}
    if "normalize" in opts and opts["normalize"] is None:
        opts["normalize"] = f"default ({spec.normalize})"
    lines = ["---", yaml.safe_dump({"base_model": summary["base"], "library_name": "transformers",
                                    "tags": ["merge", "pivotfuse", method]}, sort_keys=False).strip(), "---", "",
             f"# {Path(summary['out']).name}", "",
             f"Merged with `pivotfuse merge` using **{method}**"
             + (f" ({cfg['sce_mask']} mask semantics)" if method == "sce" else "") + ".", "",
             "## Inputs", "", f"- base: `{summary['base']}`"]
    lines += [f"- model {i + 1}: `{m}`" for i, m in enumerate(summary["models"])]
    lines += ["", "## Options", ""] + ([f"- {k}: `{v}`" for k, v in opts.items()] or ["- (none)"])
    lines += [f"- output dtype: `{cfg['dtype'] or 'as the base'}`", "",
              f"{summary['tensors']} tensors, {summary['params']:,} parameters; "
              f"reproduce with `python cli.py merge --config {CONFIG_NAME}`.", ""]
    if weights:
        lines += ["## Per-layer merge weights", "",
                  "Mean over each layer's tensors of the weight each model's task vector got.", ""]
        lines += _table(weights, names) + [""]
    if plotted:
        lines += [f"![per-layer merge weights]({PLOT_NAME})", ""]
    if kept:
        lines += ["## Share of task-vector elements merged", "",
                  "Mean over each layer's tensors of the share of elements that survived selection/erasing.", ""]
        lines += _table(kept, names) + [""]
    (folder / "README.md").write_text("\n".join(lines))

"""Side-by-side report: one markdown table (MT-Bench turn 1 / turn 2 / average, unparseable
judgments, held-out bits per byte per domain) and a PNG bar chart, for every evaluated model."""

from __future__ import annotations

import math
from pathlib import Path

from core.atomic import write_text, write_with
from core.errors import PivotfuseError
from evals.loss import read_loss_file
from evals.mtbench import load_judgments


def mtbench_scores(judgment_file: str | Path) -> dict[str, dict[str, float]]:
    """FastChat's `show_result --mode single`: -1 scores are dropped, then the mean per turn and
    over all judgments of a model; `unparseable` counts the dropped ones."""
    table: dict[str, dict[str, float]] = {}
    for r in load_judgments(Path(judgment_file)):
        stats = table.setdefault(r["model"], {"s1": 0.0, "n1": 0, "s2": 0.0, "n2": 0, "unparseable": 0})
        if r["score"] == -1:
            stats["unparseable"] += 1
            continue
        stats[f"s{r['turn']}"] += r["score"]
        stats[f"n{r['turn']}"] += 1
    out = {}
    for model, s in table.items():
        n = s["n1"] + s["n2"]
        out[model] = {"turn1": s["s1"] / s["n1"] if s["n1"] else math.nan,
                      "turn2": s["s2"] / s["n2"] if s["n2"] else math.nan,
                      "average": (s["s1"] + s["s2"]) / n if n else math.nan,
                      "judged": n, "unparseable": s["unparseable"]}
    return out


def _judgment_file(out: Path, judge: str | None) -> Path | None:
    files = sorted((out / "model_judgment").glob("*_single.jsonl"))
    if judge:
        path = out / "model_judgment" / f"{judge}_single.jsonl"
        if not path.is_file():
            raise PivotfuseError(f"{path}: no judgments by {judge!r} (have {[f.name for f in files]})")
        return path
    if len(files) > 1:
        raise PivotfuseError(f"{out / 'model_judgment'}: judgments by several judges "
                             f"{[f.name for f in files]}: pass --judge NAME")
    return files[0] if files else None


def _fmt(x: float, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def build_table(out: str | Path, models: list[str] | None = None, judge: str | None = None) -> tuple[str, dict]:
    """(markdown, data) from `OUT/model_judgment/<judge>_single.jsonl` and `OUT/loss.json`."""
    out = Path(out)
    jfile = _judgment_file(out, judge)
    scores = mtbench_scores(jfile) if jfile else {}
    loss = read_loss_file(out / "loss.json")["models"] if (out / "loss.json").is_file() else {}
    if not scores and not loss:
        raise PivotfuseError(f"{out}: nothing to report (no model_judgment/*_single.jsonl, no loss.json)")
    names = models or list(dict.fromkeys([*loss, *scores]))  # loss.json keeps the order models were given
    domains = list(dict.fromkeys(d for m in loss.values() for d in m))
    domains = [d for d in domains if d != "all"] + (["all"] if "all" in domains else [])
    head = ["model"]
    if scores:
        head += ["MT turn 1", "MT turn 2", "MT average", "unparseable"]
    head += [f"{d} bits/byte" for d in domains]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        cells = [name]
        if scores:
            s = scores.get(name, {})
            cells += [_fmt(s.get("turn1", math.nan)), _fmt(s.get("turn2", math.nan)),
                      _fmt(s.get("average", math.nan)), str(s.get("unparseable", "–"))]
        cells += [_fmt(loss.get(name, {}).get(d, {}).get("bits_per_byte", math.nan), 3) for d in domains]
        lines.append("| " + " | ".join(cells) + " |")
    note = []
    if jfile:
        note.append(f"MT-Bench-style scores (1–10) from `{jfile.name}`; unparseable judgments are left out of the means.")
    if loss:
        note.append("Held-out loss in bits per byte of assistant text (lower is better; comparable across tokenizers).")
    md = "\n".join(lines) + "\n\n" + " ".join(note) + "\n"
    return md, {"models": names, "scores": scores, "loss": loss, "domains": domains}


def plot(data: dict, path: str | Path) -> None:
    """Grouped bars: MT-Bench turn 1 / turn 2 / average, and bits per byte per domain."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers / CI
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [(k, t) for k, t in (("scores", "MT-Bench score (higher is better)"),
                                  ("loss", "held-out bits per byte (lower is better)")) if data[k]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    names = data["models"]
    x = np.arange(len(names))
    for ax, (kind, title) in zip(axes[0], panels):
        series = ([("turn 1", "turn1"), ("turn 2", "turn2"), ("average", "average")] if kind == "scores"
                  else [(d, d) for d in data["domains"]])
        width = 0.8 / len(series)
        for k, (label, key) in enumerate(series):
            if kind == "scores":
                vals = [data["scores"].get(n, {}).get(key, math.nan) for n in names]
            else:
                vals = [data["loss"].get(n, {}).get(key, {}).get("bits_per_byte", math.nan) for n in names]
            ax.bar(x + (k - (len(series) - 1) / 2) * width, vals, width, label=label)
        if kind == "scores":
            ax.set_ylim(0, 10)
            for xi, n in zip(x, names):  # say how many judgments could not be read
                bad = data["scores"].get(n, {}).get("unparseable", 0)
                if bad:
                    ax.text(xi, 0.2, f"{bad} unparseable", ha="center", fontsize=7, rotation=90)
        ax.set_xticks(x, names, rotation=20)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    write_with(path, lambda fh: fig.savefig(fh, format="png", dpi=100))
    plt.close(fig)


def write_report(out: str | Path, models: list[str] | None = None, judge: str | None = None) -> tuple[Path, Path]:
    """Write `OUT/report.md` and `OUT/report.png`; returns their paths."""
    out = Path(out)
    md, data = build_table(out, models, judge)
    md_path, png_path = out / "report.md", out / "report.png"
    write_text(md_path, "# pivotfuse evaluation\n\n" + md)
    plot(data, png_path)
    return md_path, png_path

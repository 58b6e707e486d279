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


# --- the run's report: accuracy first, then bits per byte, then the judge's scores -----------------

def mean_of(row: dict[str, float], domains: list[str]) -> float:
    """Unweighted mean of a model's figures over `domains`; NaN when it lacks one of them."""
    vals = [row.get(d, math.nan) for d in domains]
    return sum(vals) / len(vals) if vals and not any(math.isnan(v) for v in vals) else math.nan


def accuracy_table(acc: dict[str, dict[str, dict]], models: list[str], domains: list[str],
                   expert: list[str]) -> list[str]:
    """Markdown rows: accuracy (%) with correct/total per domain, and the mean over `expert` domains."""
    lines = ["| model | " + " | ".join(domains) + " | mean over expert domains |", "|---|" + "---:|" * (len(domains) + 1)]
    for name in models:
        row = acc.get(name)
        if row is None:
            continue
        cells = [f"{100 * row[d]['accuracy']:.1f}% ({row[d]['correct']}/{row[d]['total']})" if d in row else "–"
                 for d in domains]
        mean = mean_of({d: v["accuracy"] for d, v in row.items()}, expert)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(100 * mean, 1)}% |")
    return lines if len(lines) > 2 else []  # no model with figures: no table


def loss_table(bpb: dict[str, dict[str, float]], models: list[str], domains: list[str]) -> list[str]:
    """Markdown rows: bits per byte per domain and the mean over the domains."""
    lines = ["| model | " + " | ".join(domains) + " | mean over domains |", "|---|" + "---:|" * (len(domains) + 1)]
    lines += [f"| {n} | " + " | ".join(_fmt(bpb[n].get(d, math.nan), 3) for d in domains)
              + f" | {_fmt(mean_of(bpb[n], domains), 4)} |" for n in models if n in bpb]
    return lines if len(lines) > 2 else []


def score_table(scores: dict[str, dict[str, float]], models: list[str]) -> list[str]:
    """Markdown rows: judge scores per turn, their average, and the unparseable judgments."""
    lines = ["| model | turn 1 | turn 2 | average | judged | unparseable |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {n} | {_fmt(s['turn1'])} | {_fmt(s['turn2'])} | {_fmt(s['average'])} | {s['judged']} | "
              f"{s['unparseable']} |" for n in models if (s := scores.get(n))]
    return lines if len(lines) > 2 else []  # no judge: no table


def _short(name: str) -> str:
    return name if len(name) <= 14 else name[:13] + "…"


def plot_run(data: dict, path: str | Path) -> None:
    """Two panels: accuracy per domain grouped by model; bits per byte relative to `baseline` per
    domain (bpb / baseline's bpb, bars drawn from 1). The relative panel's axis is fitted to the
    models other than the sources, and a bar beyond it is cut at the edge with its value written on
    it, so the sources' large losses off their own domains do not flatten everything else. A domain
    has one colour in both panels."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers / CI
    import matplotlib.pyplot as plt
    import numpy as np

    names = data["models"]
    x = np.arange(len(names))
    colour = {d: f"C{i}" for i, d in enumerate(dict.fromkeys([*data["accuracy_domains"], *data["loss_domains"]]))}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8.0, 0.7 * len(names) + 3), 9))
    doms = data["accuracy_domains"]
    width = 0.8 / max(1, len(doms))
    for k, d in enumerate(doms):
        vals = [100 * data["accuracy"].get(n, {}).get(d, math.nan) for n in names]
        top.bar(x + (k - (len(doms) - 1) / 2) * width, vals, width, label=d, color=colour[d])
    top.set_ylim(0, 100)
    top.set_ylabel("exact answers, %")
    top.set_title("held-out accuracy per domain (greedy, key answer; higher is better)")
    base = data["baseline"]
    doms = data["loss_domains"]
    width = 0.8 / max(1, len(doms))
    bpb = data["bits_per_byte"]
    rel = {n: {d: bpb[n][d] / bpb[base][d] for d in doms if d in bpb[n] and bpb[base].get(d)}
           for n in names if n in bpb and base in bpb}
    near = [v for n, r in rel.items() if n not in data.get("sources", ()) for v in r.values() if math.isfinite(v)]
    lo, hi = (min(near + [1.0]), max(near + [1.0])) if near else (0.5, 1.5)
    pad = max(0.01, 0.15 * (hi - lo))
    lo, hi = lo - pad, hi + pad
    for k, d in enumerate(doms):
        xs = x + (k - (len(doms) - 1) / 2) * width
        vals = [rel.get(n, {}).get(d, math.nan) for n in names]
        shown = [min(max(v, lo), hi) if math.isfinite(v) else math.nan for v in vals]
        bottom.bar(xs, [v - 1.0 for v in shown], width, bottom=1.0, label=d, color=colour[d])
        for xi, v in zip(xs, vals):
            if math.isfinite(v) and not lo <= v <= hi:  # cut at the edge: say how far it goes
                text = f"{v:.0f}×" if v >= 10 else f"{v:.2g}×"
                bottom.text(xi, hi if v > hi else lo, text, ha="center", va="top" if v > hi else "bottom",
                            fontsize=6, rotation=90, color="white")
    bottom.axhline(1.0, color="black", lw=0.8)
    bottom.set_ylim(lo, hi)
    bottom.set_ylabel(f"bits/byte ÷ {base}'s")
    bottom.set_title(f"held-out bits per byte relative to {base} (lower is better; bars from 1 = {base}; "
                     "cut bars carry their value)", fontsize=10)
    for ax in (top, bottom):
        ax.set_xticks(x, [_short(n) for n in names], rotation=40, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), title="domain", title_fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    write_with(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)

"""The report of an implicit-fusion run: `OUT/report.md`, `OUT/report.json`, `OUT/report.png`.

One table of exact accuracy per domain (greedy answers to the held-out questions) and held-out
bits per byte for the target, the SFT-gold baseline, SFT-best, DPO, WRPO and the explicit merge;
the claims as they came out; what the data kept and dropped; the time of each phase.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from core.atomic import write_text
from pipeline.implicit_recipe import DPO_NAME, GOLD_NAME, SFT_NAME, WRPO_NAME, ImplicitRunRecipe

SMALL_TALK = "chat"  # the world's checker passes any reply to small talk: left out of the skill mean


def skill_mean(row: dict[str, dict]) -> float:
    """Mean accuracy over the domains with a checkable answer (not `all`, not small talk); NaN without any."""
    vals = [v["accuracy"] for d, v in row.items() if d not in ("all", SMALL_TALK)]
    return sum(vals) / len(vals) if vals else math.nan


def bpb_mean(row: dict[str, dict]) -> float:
    """Mean bits per byte over the domains (the pooled `all` row left out)."""
    vals = [v["bits_per_byte"] for d, v in row.items() if d != "all"]
    return sum(vals) / len(vals) if vals else math.nan


COMPARISONS = ((SFT_NAME, None), (SFT_NAME, GOLD_NAME), (GOLD_NAME, None), (DPO_NAME, SFT_NAME),
               (WRPO_NAME, SFT_NAME), (WRPO_NAME, DPO_NAME))  # None: the target itself


def claims(target: str, acc: dict, loss: dict) -> list[dict]:
    """Each comparison on exact accuracy (higher is better) and bits per byte (lower is better)."""
    rows = []
    for a, b in COMPARISONS:
        b = b or target
        if a in acc and b in acc:
            x, y = skill_mean(acc[a]), skill_mean(acc[b])
            rows.append({"claim": f"{a} > {b} on exact accuracy (mean of the skill domains)", "holds": x > y,
                         "numbers": f"{100 * x:.2f}% vs {100 * y:.2f}%"})
        if a in loss and b in loss:
            x, y = bpb_mean(loss[a]), bpb_mean(loss[b])
            rows.append({"claim": f"{a} < {b} on bits per byte (mean over domains)", "holds": x < y,
                         "numbers": f"{x:.4f} vs {y:.4f}"})
    return rows


def _pct(row: dict, d: str) -> str:
    return f"{100 * row[d]['accuracy']:.0f}%" if d in row else "-"


def tables(models: list[str], acc: dict, loss: dict, missing: str | None) -> list[str]:
    """The accuracy + mean bits/byte table, then bits per byte per domain."""
    doms = sorted({d for r in acc.values() for d in r if d != "all"}, key=lambda d: (d == SMALL_TALK, d))
    ldoms = sorted({d for r in loss.values() for d in r if d != "all"}, key=lambda d: (d == SMALL_TALK, d))
    lines = ["| model | " + " | ".join(f"{d} acc" for d in doms) + " | skills mean | bits/byte (mean) |",
             "|---|" + "---:|" * (len(doms) + 2)]
    for m in models:
        a, lo = acc.get(m, {}), loss.get(m)
        mean = f"{100 * skill_mean(a):.1f}%" if a else "-"
        bpb = f"{bpb_mean(lo):.4f}" if lo else "-"
        lines.append(f"| {m} | " + " | ".join(_pct(a, d) for d in doms) + f" | {mean} | {bpb} |")
    if missing:
        lines.append(f"| {missing} |" + " |" * (len(doms) + 2))
    lines += ["", "Held-out bits per byte per domain:", "",
              "| model | " + " | ".join(ldoms) + " | mean |", "|---|" + "---:|" * (len(ldoms) + 1)]
    for m in models:
        if m in loss:
            lines.append(f"| {m} | " + " | ".join(f"{loss[m][d]['bits_per_byte']:.3f}" for d in ldoms) +
                         f" | {bpb_mean(loss[m]):.4f} |")
    return lines


def data_lines(build: dict) -> list[str]:
    """Rows kept and dropped (by reason) for SFT, DPO and WRPO."""
    lines = ["| data | rows | by source | dropped (reason: count) |", "|---|---:|---|---|"]
    for part in ("sft", "dpo", "wrpo"):
        if part in build:
            sec = build[part]
            src = ", ".join(f"{k} {v}" for k, v in sec["by_source"].items()) or "-"
            drop = ", ".join(f"{k}: {v}" for k, v in sec["dropped"].items()) or "none"
            lines.append(f"| {part} | {sec['rows']} | {src} | {drop} |")
    return lines


def plot(models: list[str], acc: dict, loss: dict, path: Path) -> None:
    """Accuracy per domain (grouped bars) and mean bits per byte, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doms = sorted({d for r in acc.values() for d in r if d != "all"}, key=lambda d: (d == SMALL_TALK, d))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    shown = [m for m in models if m in acc]
    width = 0.8 / max(1, len(shown))
    for i, m in enumerate(shown):
        ax1.bar([j + i * width for j in range(len(doms))], [100 * acc[m][d]["accuracy"] for d in doms], width,
                label=m)
    ax1.set_xticks([j + width * (len(shown) - 1) / 2 for j in range(len(doms))], doms)
    ax1.set_ylabel("exact accuracy (%), held-out questions, greedy")
    ax1.legend(fontsize=8)
    lm = [m for m in models if m in loss]
    ax2.bar(lm, [bpb_mean(loss[m]) for m in lm], color="tab:gray")
    ax2.set_ylabel("held-out bits per byte (mean over domains)")
    ax2.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def write_report(recipe: ImplicitRunRecipe, out: Path, acc: dict, loss: dict, build: dict,
                 seconds: dict[str, float], explicit: Path | None, n_prompts: int) -> Path:
    """Write the three report files; returns the markdown's path."""
    order = [recipe.target.name, GOLD_NAME, SFT_NAME, DPO_NAME, WRPO_NAME, recipe.explicit_name]
    models = [m for m in order if m in acc or m in loss]
    missing = None
    if explicit is not None and recipe.explicit_name not in models:
        missing = (f"{recipe.explicit_name}: not in the table, {explicit} is absent (run the explicit recipe "
                   "first, e.g. `python cli.py run recipes/demo.yaml`)")
    checks = claims(recipe.target.name, acc, loss)
    lines = [f"# pivotfuse implicit fusion: {out}", "",
             f"{n_prompts} prompts from {recipe.data.prompts}, answered {recipe.sample.n} times by each of "
             f"{', '.join(s.name for s in recipe.sources)} and scored by {recipe.score.scorer}; "
             f"{recipe.target.name} SFT-trained on the best answers ({SFT_NAME}) and on the gold answers of the "
             f"same prompts ({GOLD_NAME}, same steps and optimiser), then DPO and WRPO from {SFT_NAME}. "
             f"Accuracy: greedy answers to {recipe.data.questions}; bits per byte: {recipe.data.heldout}.", ""]
    lines += tables(models, acc, loss, missing)
    if checks:
        lines += ["", "| claim | holds | numbers |", "|---|---|---|"]
        lines += [f"| {c['claim']} | {'yes' if c['holds'] else '**no**'} | {c['numbers']} |" for c in checks]
    lines += ["", "Training data (from data/build_report.json):", ""] + data_lines(build)
    lines += ["", "Time of each phase (this invocation; a phase that was up to date takes ~0 s):", "",
              "| phase | seconds |", "|---|---:|"] + [f"| {k} | {v:.1f} |" for k, v in seconds.items()]
    md = out / "report.md"
    write_text(md, "\n".join(lines) + "\n")
    summary = {"models": models, "accuracy": acc, "bits_per_byte": loss, "claims": checks,
               "explicit": {"name": recipe.explicit_name, "path": str(explicit) if explicit else None,
                            "present": missing is None and explicit is not None},
               "data": build, "seconds": seconds, "prompts": n_prompts}
    write_text(out / "report.json", json.dumps(summary, indent=1) + "\n")
    plot(models, acc, loss, out / "report.png")
    return md

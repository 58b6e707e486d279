"""The run's report: the evaluation table, each model's mean held-out loss over the domains, and the
paper's claims in miniature checked on those means (`OUT/report.md`, `OUT/report.png`)."""

from __future__ import annotations

import math
from pathlib import Path

from core.atomic import write_text
from pipeline.fusellm_report import comparison_table, contribution_section, fusellm_claims
from pipeline.recipe import CLM_NAME, TARGET_PREFIX, Recipe


def mean_over_domains(row: dict[str, dict]) -> float:
    """Mean bits/byte over a model's domains (the pooled `all` row left out); NaN without any."""
    vals = [v["bits_per_byte"] for d, v in row.items() if d != "all"]
    return sum(vals) / len(vals) if vals else math.nan


def claims(recipe: Recipe, loss: dict[str, dict], merged: list[str]) -> list[tuple[str, bool, str]]:
    """The paper's claims in miniature, checked on mean held-out loss over the domains."""
    def mean(name: str) -> float:
        return mean_over_domains(loss[name])

    pivot = recipe.models.pivot.name
    rows: list[tuple[str, bool, str]] = []
    clm = CLM_NAME
    have_clm = clm in loss
    for m in merged:
        if have_clm:
            rows.append((f"{m} < {clm} < {pivot} (mean over domains)", mean(m) < mean(clm) < mean(pivot),
                         f"{mean(m):.4f} < {mean(clm):.4f} < {mean(pivot):.4f}"))
        for s in recipe.models.sources:
            rows.append((f"{m} < source {s.name} (mean)", mean(m) < mean(s.name), f"{mean(m):.4f} < {mean(s.name):.4f}"))
    if have_clm:
        for s in recipe.models.sources:
            dom, t = s.domain or s.name, TARGET_PREFIX + s.name
            if dom in loss.get(t, {}) and dom in loss[clm]:
                a, b = loss[t][dom]["bits_per_byte"], loss[clm][dom]["bits_per_byte"]
                rows.append((f"{t} < {clm} on {dom}", a < b, f"{a:.4f} < {b:.4f}"))
    return rows


def _section(lines: list[str]) -> list[str]:
    """A report section after a blank line; nothing when it is empty."""
    return ["", *lines] if lines else []


def write_run_report(recipe: Recipe, eval_dir: Path, models: dict[str, str], merged: list[str]) -> Path:
    """OUT/report.md (+ report.png): the eval table, mean loss over domains, and the claims."""
    from evals.report import build_table, plot

    out = Path(recipe.out)
    spec = recipe.eval.judge
    judge = spec.split("=", 1)[0] if spec and "=" in spec else ("reference" if spec == "reference" else None)
    md, data = build_table(eval_dir, list(models), judge=judge)
    lines = [f"# pivotfuse run: {out}", "", md]
    loss = data["loss"]
    if loss:
        lines += ["| model | mean bits/byte over domains |", "|---|---:|"]
        lines += [f"| {name} | {mean_over_domains(loss[name]):.4f} |" for name in models if name in loss]
        means = {name: mean_over_domains(row) for name, row in loss.items()}
        checks = claims(recipe, loss, merged) + fusellm_claims(recipe, loss, means)
        if checks:
            lines += ["", "| claim | holds | numbers |", "|---|---|---|"]
            lines += [f"| {c} | {'yes' if ok else '**no**'} | {n} |" for c, ok, n in checks]
        lines += _section(comparison_table(recipe, loss, means, merged))
    lines += _section(contribution_section(recipe, models))
    md_path = out / "report.md"
    write_text(md_path, "\n".join(lines) + "\n")
    plot(data, out / "report.png")
    return md_path

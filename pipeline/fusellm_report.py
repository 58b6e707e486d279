"""The FuseLLM-mode parts of the run's report, kept apart from the pairwise ones (`claims`):

* `fusellm_claims`: the FuseLLM paper's comparison in miniature, checked on held-out loss: the
  FuseLLM-mode target against pivot-CLM, the pivot and the sources on the mean over domains, and
  against pivot-CLM and the best single source on every domain;
* `fusellm_accuracy_claims`: the same comparison on exact-answer accuracy (higher is better);
* `comparison_table`: those models per domain beside FuseChat's pairwise-then-merge results;
* `contribution_table`: how much each teacher's distribution made the targets, per domain (the
  `contributions` of the target's fusion_report.json).
"""

from __future__ import annotations

from pathlib import Path

from core.errors import PivotfuseError
from core.files import need, read_json
from evals.report import mean_of
from pipeline.recipe import CLM_NAME, Recipe

Loss = dict[str, dict[str, dict]]  # model → domain → {bits_per_byte, ...}


def _name(recipe: Recipe, loss: Loss) -> str | None:
    """The FuseLLM-mode target's table name when the run made and evaluated it."""
    return recipe.fusellm.name if recipe.fusellm is not None and recipe.fusellm.name in loss else None


def _domains(loss: Loss, name: str) -> list[str]:
    return [d for d in loss[name] if d != "all"]


def _best_source(recipe: Recipe, loss: Loss, domain: str) -> str | None:
    """The fused source with the lowest loss on `domain` (first one on a tie), None without any."""
    have = [s.name for s in recipe.fusellm_sources() if domain in loss.get(s.name, {})]
    return min(have, key=lambda s: loss[s][domain]["bits_per_byte"]) if have else None


def fusellm_claims(recipe: Recipe, loss: Loss, means: dict[str, float]) -> list[tuple[str, bool, str]]:
    """(claim, holds, numbers) for the FuseLLM-mode target; none when the run has no such target."""
    name = _name(recipe, loss)
    if name is None:
        return []
    pivot, m = recipe.models.pivot.name, means[name]
    rows: list[tuple[str, bool, str]] = []
    have_clm = CLM_NAME in loss
    if have_clm:
        rows.append((f"{name} < {CLM_NAME} < {pivot} (mean over domains)", m < means[CLM_NAME] < means[pivot],
                     f"{m:.4f} < {means[CLM_NAME]:.4f} < {means[pivot]:.4f}"))
    for s in recipe.fusellm_sources():
        if s.name in means:
            rows.append((f"{name} < source {s.name} (mean)", m < means[s.name], f"{m:.4f} < {means[s.name]:.4f}"))
    for d in _domains(loss, name):
        a = loss[name][d]["bits_per_byte"]
        if have_clm and d in loss[CLM_NAME]:
            b = loss[CLM_NAME][d]["bits_per_byte"]
            rows.append((f"{name} < {CLM_NAME} on {d}", a < b, f"{a:.4f} < {b:.4f}"))
        best = _best_source(recipe, loss, d)
        if best is not None:
            b = loss[best][d]["bits_per_byte"]
            rows.append((f"{name} < best single source on {d} ({best})", a < b, f"{a:.4f} < {b:.4f}"))
    return rows


def fusellm_accuracy_claims(recipe: Recipe, acc: dict[str, dict[str, float]]) -> list[tuple[str, bool, str]]:
    """(claim, holds, numbers) on accuracy (higher is better; a tie fails) for the FuseLLM-mode target:
    above pivot-CLM above the pivot on the mean over its sources' domains, and on each of those
    domains above pivot-CLM and against the best single source there."""
    name = recipe.fusellm.name if recipe.fusellm is not None and recipe.fusellm.name in acc else None
    pivot = recipe.models.pivot.name
    if name is None or CLM_NAME not in acc or pivot not in acc:
        return []
    doms = list(dict.fromkeys(d for s in recipe.fusellm_sources() if (d := s.domain or s.name) in acc[name]))
    if not doms:
        return []

    def mean(model: str) -> float:
        return mean_of(acc[model], doms)  # NaN when a domain is missing: every comparison then fails

    m, c, p = mean(name), mean(CLM_NAME), mean(pivot)
    rows = [(f"{name} > {CLM_NAME} > {pivot} (accuracy, mean over expert domains)", m > c > p,
             f"{m:.1%} > {c:.1%} > {p:.1%}")]
    for d in doms:
        a = acc[name][d]
        if d in acc[CLM_NAME]:
            rows.append((f"{name} > {CLM_NAME} on {d} (accuracy)", a > acc[CLM_NAME][d], f"{a:.1%} > {acc[CLM_NAME][d]:.1%}"))
        have = [s.name for s in recipe.fusellm_sources() if d in acc.get(s.name, {})]
        if have:
            best = max(have, key=lambda s: acc[s][d])  # first one on a tie
            rows.append((f"{name} ≥ best single source on {d} ({best}) (accuracy)", a >= acc[best][d],
                         f"{a:.1%} ≥ {acc[best][d]:.1%}"))
    return rows


def comparison_table(recipe: Recipe, loss: Loss, means: dict[str, float], merged: list[str],
                     acc_means: dict[str, float] | None = None) -> list[str]:
    """Markdown: pivot, pivot-CLM, the best single source per domain, the FuseLLM-mode target and each
    merge of the pairwise targets, bits per byte per domain and the mean over domains (and, given
    `acc_means`, each one's accuracy over the expert domains)."""
    name = _name(recipe, loss)
    if name is None:
        return []
    domains = _domains(loss, name)
    acc_means = acc_means or {}
    acc_col = " | accuracy, mean over expert domains" if acc_means else ""
    lines = ["## FuseLLM mode beside FuseChat", "",
             f"One target from the pivot and {', '.join(s.name for s in recipe.fusellm_sources())} in one run "
             f"(`{name}`, method `{recipe.fuse.method}`) against the pivot, pivot-CLM, the best single source on "
             "each domain, and the merges of the pairwise targets; the same fusion data, `fuse:` settings and "
             "steps. Held-out bits per byte (lower is better)" + (" and exact-answer accuracy (higher is better)"
                                                                  if acc_means else "") + ".", "",
             "| model | " + " | ".join(domains) + f" | mean over domains{acc_col} |",
             "|---|" + "---:|" * (len(domains) + 1 + bool(acc_means))]

    def row(label: str, model: str) -> str:
        cells = [f"{loss[model][d]['bits_per_byte']:.3f}" if d in loss[model] else "–" for d in domains]
        extra = (f" | {acc_means[model]:.1%}" if model in acc_means else " | –") if acc_means else ""
        return f"| {label} | " + " | ".join(cells) + f" | {means[model]:.4f}{extra} |"

    for label, model in ((recipe.models.pivot.name, recipe.models.pivot.name), (CLM_NAME, CLM_NAME)):
        if model in loss:
            lines.append(row(label, model))
    best = {d: _best_source(recipe, loss, d) for d in domains}
    if all(best.values()):
        vals = [loss[best[d]][d]["bits_per_byte"] for d in domains]
        lines.append("| best single source per domain | " + " | ".join(f"{v:.3f} ({best[d]})" for v, d in
                                                                      zip(vals, domains))
                     + f" | {sum(vals) / len(vals):.4f}" + (" | –" if acc_means else "") + " |")
    lines.append(row(f"**{name}** (FuseLLM mode)", name))
    lines += [row(f"{m} (pairwise, then merged)", m) for m in merged if m in loss]
    return lines


def _cell(t: dict, method: str) -> str:
    """One teacher's share in one domain: what the method defines (see `Contributions`)."""
    if method == "avgce":
        text = f"w {t['mean_weight']:.3f}"
    elif method == "mince":
        text = f"seq {t['sequence_share']:.1%} · pos {t['position_share']:.1%}"
    else:
        text = f"pos {t['position_share']:.1%}"
    return text + (f" (present {t['present_share']:.0%})" if t["present_share"] < 1 else "")


def contribution_table(contributions: dict, method: str) -> list[str]:
    """Markdown: per domain (and all), each teacher's share of the targets and the fallback's."""
    rows = [*contributions["by_domain"].items()] + ([("all", contributions["total"])] if contributions["total"] else [])
    if not rows:
        return ["(no conversations)"]
    names = list(rows[0][1]["teachers"])
    legend = {"mince": "seq: share of conversations whose MinCE winner it was; pos: share of pivot positions whose "
                       "target is its distribution",
              "avgce": "w: its mean AvgCE weight per conversation",
              "mince_token": "pos: share of pivot positions whose target is its distribution (per-token MinCE)"}
    lines = ["| domain | conversations | " + " | ".join(names) + " | fallback |", "|---|---:|" + "---|" * len(names)
             + "---:|"]
    for domain, c in rows:
        lines.append(f"| {domain} | {c['sequences']} | " + " | ".join(_cell(c["teachers"][n], method) for n in names)
                     + f" | {c['fallback_share']:.1%} |")
    lines += ["", f"{legend.get(method, '')}; fallback: share of positions where a chosen source had no "
              "aligned distribution; present: share of conversations its store holds (shown when not all)."]
    return lines


def contribution_section(recipe: Recipe, models: dict[str, str]) -> list[str]:
    """The contribution table of the run's FuseLLM-mode target, from its fusion_report.json."""
    if recipe.fusellm is None or recipe.fusellm.name not in models:
        return []
    path = Path(models[recipe.fusellm.name]) / "fusion_report.json"
    if not path.is_file():
        raise PivotfuseError(f"{path}: not found (the FuseLLM-mode target has no fusion report); rerun the recipe")
    report = read_json(path)
    contributions = need(report, "contributions", lambda v: isinstance(v, dict) and "by_domain" in v,
                         "a mapping with by_domain", str(path))
    method = need(report, "method", lambda v: isinstance(v, str), "a method name", str(path))
    return ["## How much each source contributed to the FuseLLM-mode target", ""] + \
        contribution_table(contributions, method)

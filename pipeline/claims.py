"""The run's report (`OUT/report.md`, `OUT/report.png`, `OUT/report.json`): exact-answer accuracy per
domain first, the transfer ratio of each target, held-out bits per byte, the judge's scores, and
the paper's claims in miniature checked on accuracy and on bits per byte, each as it came out."""

from __future__ import annotations

import json
import math
from pathlib import Path

from core.atomic import write_text
from core.files import read_json
from pipeline.fusellm_report import comparison_table, contribution_section, fusellm_accuracy_claims, fusellm_claims
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


def transfer_ratio(target: float, clm: float, source: float) -> float | None:
    """(target − clm) / (source − clm): the share of the source's lead over pivot-CLM on its domain
    that the target took over (1: all of it, 0: none, < 0: the target fell behind pivot-CLM). The
    same reading for accuracy and for bits per byte (both differences change sign together). None
    when the source does not differ from pivot-CLM (no lead to take) or a figure is missing."""
    if any(v is None or math.isnan(v) for v in (target, clm, source)) or source == clm:
        return None
    return (target - clm) / (source - clm)


def transfers(recipe: Recipe, acc: dict[str, dict[str, float]], bpb: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Per target T_k: its source, domain and, in accuracy and in bits per byte, the three figures on
    that domain and their transfer ratio (a metric is left out when a figure is missing)."""
    out: dict[str, dict] = {}
    for s in recipe.models.sources:
        t, dom = TARGET_PREFIX + s.name, s.domain or s.name
        entry: dict = {"source": s.name, "domain": dom}
        for metric, table in (("accuracy", acc), ("bits_per_byte", bpb)):
            vals = [table.get(m, {}).get(dom) for m in (t, CLM_NAME, s.name)]
            if all(v is not None for v in vals):
                entry[metric] = {"target": vals[0], "pivot_clm": vals[1], "source": vals[2],
                                 "ratio": transfer_ratio(*vals)}
        if len(entry) > 2:
            out[t] = entry
    return out


def expert_domains(recipe: Recipe, acc: dict[str, dict[str, float]]) -> list[str]:
    """The sources' domains that the accuracy table has, in source order, each once."""
    have = {d for row in acc.values() for d in row}
    return list(dict.fromkeys(d for s in recipe.models.sources if (d := s.domain or s.name) in have))


def accuracy_claims(recipe: Recipe, acc: dict[str, dict[str, float]], merged: list[str]) -> list[tuple[str, bool, str]]:
    """The claims on accuracy (higher is better): each merge above pivot-CLM above the pivot on the
    mean over the expert domains, and each T_k above pivot-CLM on its source's domain. A tie fails."""
    from evals.report import mean_of

    pivot, clm = recipe.models.pivot.name, CLM_NAME
    if clm not in acc or pivot not in acc:
        return []
    experts = expert_domains(recipe, acc)
    rows: list[tuple[str, bool, str]] = []

    def mean(name: str) -> float:
        return mean_of(acc[name], experts)

    for m in merged:
        if m in acc:
            rows.append((f"{m} > {clm} > {pivot} (accuracy, mean over expert domains)",
                         mean(m) > mean(clm) > mean(pivot), f"{mean(m):.1%} > {mean(clm):.1%} > {mean(pivot):.1%}"))
    for s in recipe.models.sources:
        dom, t = s.domain or s.name, TARGET_PREFIX + s.name
        if dom in acc.get(t, {}) and dom in acc[clm]:
            a, b = acc[t][dom], acc[clm][dom]
            rows.append((f"{t} > {clm} on {dom} (accuracy)", a > b, f"{a:.1%} > {b:.1%}"))
    return rows


def _section(title: str, lines: list[str], note: str = "") -> list[str]:
    """A report section: a heading, an optional note, its lines; nothing when it has no lines."""
    return ["", f"## {title}", "", *([note, ""] if note else []), *lines] if lines else []


def _blank(lines: list[str]) -> list[str]:
    """A section that brings its own heading, after a blank line; nothing when it is empty."""
    return ["", *lines] if lines else []


def _roles(recipe: Recipe, models: dict[str, str], merged: list[str]) -> dict[str, str]:
    """Each evaluated model's role: pivot, source, pivot-clm, target, fusellm or merge."""
    roles = {recipe.models.pivot.name: "pivot"} | {s.name: "source" for s in recipe.models.sources}
    roles |= {CLM_NAME: "pivot-clm"} | {TARGET_PREFIX + s.name: "target" for s in recipe.models.sources}
    if recipe.fusellm is not None:
        roles[recipe.fusellm.name] = "fusellm"
    roles |= {m: "merge" for m in merged}
    return {n: roles.get(n, "model") for n in models}


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _transfer_lines(table: dict[str, dict]) -> list[str]:
    if not table:
        return []
    lines = ["| target | domain | accuracy: source / pivot-clm / target | ratio | "
             "bits/byte: source / pivot-clm / target | ratio |", "|---|---|---:|---:|---:|---:|"]
    for t, e in table.items():
        a, b = e.get("accuracy"), e.get("bits_per_byte")
        acc = f"{a['source']:.1%} / {a['pivot_clm']:.1%} / {a['target']:.1%}" if a else "–"
        bpb = f"{b['source']:.3f} / {b['pivot_clm']:.3f} / {b['target']:.3f}" if b else "–"
        lines.append(f"| {t} | {e['domain']} | {acc} | {_ratio(a and a['ratio'])} | {bpb} | "
                     f"{_ratio(b and b['ratio'])} |")
    return lines


def write_run_report(recipe: Recipe, eval_dir: Path, models: dict[str, str], merged: list[str],
                     accuracy: Path | None = None) -> Path:
    """OUT/report.md, OUT/report.png and OUT/report.json (every figure; keys in the README)."""
    from evals.report import accuracy_table, build_table, loss_table, mean_of, plot_run, score_table

    out = Path(recipe.out)
    spec = recipe.eval.judge
    judge = spec.split("=", 1)[0] if spec and "=" in spec else ("reference" if spec == "reference" else None)
    _, data = build_table(eval_dir, list(models), judge=judge)
    names = list(models)
    loss, scores = data["loss"], data["scores"]
    loss_domains = [d for d in data["domains"] if d != "all"]
    bpb = {n: {d: v["bits_per_byte"] for d, v in loss[n].items() if d != "all"} for n in names if n in loss}
    acc_full = read_json(accuracy)["models"] if accuracy is not None else {}
    acc_full = {n: acc_full[n] for n in names if n in acc_full}
    acc = {n: {d: v["accuracy"] for d, v in row.items() if d != "all"} for n, row in acc_full.items()}
    experts = expert_domains(recipe, acc)
    acc_domains = experts + sorted({d for row in acc.values() for d in row} - set(experts))
    loss_domains = sorted(loss_domains, key=lambda d: acc_domains.index(d) if d in acc_domains else len(acc_domains))
    means = {n: mean_over_domains(loss[n]) for n in loss}
    acc_means = {n: mean_of(row, experts) for n, row in acc.items()}
    transfer = transfers(recipe, acc, bpb)
    checks = [("accuracy", c) for c in accuracy_claims(recipe, acc, merged) + fusellm_accuracy_claims(recipe, acc)]
    if loss:
        checks += [("bits_per_byte", c) for c in claims(recipe, loss, merged) + fusellm_claims(recipe, loss, means)]

    lines = [f"# pivotfuse run: {out}"]
    if accuracy is not None:
        lines += _section(
            "Exact-answer accuracy per domain", accuracy_table(acc_full, names, acc_domains, experts),
            f"Greedy replies to `{Path(recipe.world_path(recipe.accuracy.questions)).name}`, every turn checked "
            "against its key answer (`evals/accuracy.py`); the share of turns right (right/checked). Expert domains: "
            f"{', '.join(experts)}.")
        lines += _section(
            "Transfer ratio of each target on its source's domain", _transfer_lines(transfer),
            "(T_k − pivot-CLM) / (source − pivot-CLM): the share of the source's lead over pivot-CLM that T_k took "
            "over; 1 = all of it, 0 = none, below 0 = behind pivot-CLM; – where the source has no lead.")
    lines += _section("Held-out bits per byte", loss_table(bpb, names, loss_domains),
                      "Held-out loss in bits per byte of assistant text (lower is better; comparable across "
                      "tokenizers).")
    lines += _section(f"Scores of the {judge} judge on the question set" if judge else "Judge scores on the question set",
                      score_table(scores, names), "MT-Bench-style scores (1–10); unparseable judgments are left "
                      "out of the means.")
    lines += _section("Claims", ["| claim | metric | holds | numbers |", "|---|---|---|---|"]
                      + [f"| {c} | {metric.replace('_', ' ')} | {'yes' if ok else '**no**'} | {n} |"
                         for metric, (c, ok, n) in checks] if checks else [],
                      "Each claim as it came out (a tie is a **no**).")
    if loss:
        lines += _blank(comparison_table(recipe, loss, means, merged, acc_means))
    lines += _blank(contribution_section(recipe, models))
    md_path = out / "report.md"
    write_text(md_path, "\n".join(lines) + "\n")

    report = {
        "run": str(out), "models": names, "roles": _roles(recipe, models, merged),
        "pivot": recipe.models.pivot.name, "pivot_clm": CLM_NAME if CLM_NAME in models else None,
        "accuracy": {"questions": recipe.world_path(recipe.accuracy.questions) if accuracy is not None else None,
                     "domains": acc_domains, "expert_domains": experts,
                     "models": {n: {"domains": acc_full[n], "mean_expert": _num(acc_means[n])} for n in acc_full}},
        "bits_per_byte": {"data": recipe.world_path(recipe.data.heldout) if recipe.data.heldout else None,
                          "domains": loss_domains,
                          "models": {n: {"domains": bpb[n], "mean": _num(means[n])} for n in bpb}},
        "judge": {"name": judge, "scores": {n: {k: _num(v) for k, v in scores[n].items()} for n in names
                                            if n in scores}} if scores else None,
        "transfer": transfer,
        "claims": [{"metric": metric, "claim": c, "holds": ok, "numbers": n} for metric, (c, ok, n) in checks],
    }
    write_text(out / "report.json", json.dumps(report, indent=1, ensure_ascii=False))
    if acc or bpb:
        plot_run({"models": names, "accuracy": acc, "accuracy_domains": acc_domains, "bits_per_byte": bpb,
                  "loss_domains": loss_domains, "baseline": CLM_NAME if CLM_NAME in bpb else recipe.models.pivot.name,
                  "sources": [s.name for s in recipe.models.sources]}, out / "report.png")
    return md_path


def _num(x: float) -> float | None:
    """A figure for JSON: NaN (no value) is null."""
    return None if isinstance(x, float) and math.isnan(x) else x

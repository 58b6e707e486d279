"""`pivotfuse run RECIPE`: the whole fusion from one file.

setup (world) → phase 1 per source (extract → align → fuse → train T_k) and the pivot-CLM
baseline → phase 2 merges of the targets → evaluation (held-out loss per domain, question set
with a judge) → one report (markdown + PNG) in the run folder. Each step is skipped when its
output exists with the same fingerprint, so a stopped run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import yaml

from core.atomic import write_text
from core.errors import PivotfuseError
from core.files import brief, read_json
from core.fingerprint import folder_stamp, json_sha
from core.recipe import CLM_NAME, TARGET_PREFIX, Recipe, load_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override recipe values, e.g. --set fuse.lr=1e-4 out=runs/x")


class Steps:
    """`OUT/steps.json`: the fingerprint each finished step was made with."""

    def __init__(self, out: Path) -> None:
        self.path = out / "steps.json"
        self.done: dict[str, str] = {}
        if self.path.is_file():
            self.done = read_json(self.path, "a mapping of steps to fingerprints")
        for step, fp in self.done.items():
            if not isinstance(fp, str):
                raise PivotfuseError(f"{self.path}: step {step!r} must map to a fingerprint string, got {brief(fp)}; "
                                     "delete the file to redo every step")

    def fresh(self, step: str, fp: str, output: Path) -> bool:
        return self.done.get(step) == fp and output.exists()

    def mark(self, step: str, fp: str) -> None:
        self.done[step] = fp
        write_text(self.path, json.dumps(self.done, indent=1))


def _log(msg: str) -> None:
    print(f"[pivotfuse run {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _phase1(recipe: Recipe) -> tuple[dict[str, Path], Path | None]:
    """Targets T_k for every source (and the pivot-CLM baseline); fuse_source skips finished ones."""
    from fuse.pipeline import fuse_source

    targets = {}
    for spec in recipe.models.sources:
        _log(f"phase 1: fuse source {spec.name} (extract → align → fuse → train)")
        targets[spec.name] = fuse_source(recipe, spec.name)
    clm = None
    if recipe.pivot_clm:
        _log("phase 1: pivot-CLM baseline (λ = 1, same data and steps)")
        clm = fuse_source(recipe, None)
    return targets, clm


def _phase2(recipe: Recipe, targets: dict[str, Path], steps: Steps) -> dict[str, Path]:
    """Every merge of the recipe over all targets, relative to the pivot."""
    from merge.merger import merge_models

    pivot = Path(recipe.world_path(recipe.models.pivot.path))
    merged = {}
    for spec in recipe.merge:
        out = Path(recipe.out) / "merged" / spec.name
        fp = json_sha({"spec": asdict(spec), "pivot": folder_stamp(pivot),
                   "targets": {k: folder_stamp(v) for k, v in targets.items()}})
        if steps.fresh(f"merge:{spec.name}", fp, out):
            _log(f"phase 2: merge {spec.name} is up to date")
        else:
            _log(f"phase 2: merge {spec.name} ({spec.method})")
            merge_models(str(pivot), [str(t) for t in targets.values()], spec, str(out), overwrite=True)
            steps.mark(f"merge:{spec.name}", fp)
        merged[spec.name] = out
    return merged


def _models_to_eval(recipe: Recipe, targets: dict[str, Path], clm: Path | None,
                    merged: dict[str, Path]) -> dict[str, str]:
    models = {recipe.models.pivot.name: recipe.world_path(recipe.models.pivot.path)}
    models |= {s.name: recipe.world_path(s.path) for s in recipe.models.sources}
    if clm is not None:
        models[CLM_NAME] = str(clm)
    models |= {TARGET_PREFIX + k: str(v) for k, v in targets.items()}
    models |= {k: str(v) for k, v in merged.items()}
    return models


def _evaluate(recipe: Recipe, models: dict[str, str], steps: Steps) -> Path:
    """Held-out loss per domain and, with a judge, the question set; results under OUT/eval."""
    from evals.loss import heldout_loss
    from evals.run import run_mtbench

    cfg = recipe.eval
    out = Path(recipe.out) / "eval"
    cfg = replace(cfg, out=str(out), demo_facts=recipe.world_path(cfg.demo_facts) if cfg.demo_facts else None)
    templates = {s.name: s.chat_template for s in [recipe.models.pivot, *recipe.models.sources] if s.chat_template}
    # a model rewritten since its last evaluation must not keep its old numbers
    fp = json_sha({"models": {k: folder_stamp(Path(v)) for k, v in models.items()}, "eval": asdict(cfg)})
    if not steps.fresh("eval", fp, out):
        for stale in ("loss.json", "model_answer", "model_judgment"):
            p = out / stale
            if p.is_file():
                p.unlink()
            elif p.is_dir():
                for f in p.glob("*.jsonl"):
                    f.unlink()
    if recipe.data.heldout:
        _log(f"eval: held-out loss per domain for {len(models)} models")
        heldout_loss(models, recipe.world_path(recipe.data.heldout), cfg, chat_templates=templates, out=out)
    if cfg.judge:
        _log(f"eval: question set {cfg.questions!r}, judge {cfg.judge}")
        run_mtbench(models, cfg, chat_templates=templates)
    steps.mark("eval", fp)
    return out


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
        checks = claims(recipe, loss, merged)
        if checks:
            lines += ["", "| claim | holds | numbers |", "|---|---|---|"]
            lines += [f"| {c} | {'yes' if ok else '**no**'} | {n} |" for c, ok, n in checks]
    md_path = out / "report.md"
    write_text(md_path, "\n".join(lines) + "\n")
    plot(data, out / "report.png")
    return md_path


def run_recipe(recipe: Recipe) -> Path:
    """Run every step of `recipe`; returns the report path."""
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=torch.accelerator.current_accelerator() is None)
    t0 = time.time()
    out = Path(recipe.out)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "recipe.yaml", yaml.safe_dump(asdict(recipe), sort_keys=False))
    steps = Steps(out)
    if recipe.world is not None:
        from world.build import build_world

        _log(f"setup: demo world in {recipe.world.out}")
        with state.main_process_first():  # one builder; the others then find it finished
            build_world(recipe.world, progress=state.is_main_process)
    targets, clm = _phase1(recipe)  # every process takes part (data-parallel under accelerate launch)
    report = out / "report.md"
    if state.is_main_process:  # merging and evaluating are single-process jobs
        merged = _phase2(recipe, targets, steps)
        models = _models_to_eval(recipe, targets, clm, merged)
        eval_dir = _evaluate(recipe, models, steps)
        report = write_run_report(recipe, eval_dir, models, list(merged))
        _log(f"done in {time.time() - t0:.0f} s: {report}")
    state.wait_for_everyone()
    return report


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.set)
    if not recipe.models.sources:
        raise PivotfuseError(f"{args.recipe}: 'models.sources' is empty: nothing to fuse")
    report = run_recipe(recipe)
    print(report.read_text())
    return 0

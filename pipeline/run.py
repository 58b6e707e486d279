"""Run a whole recipe: the orchestration of `pivotfuse run RECIPE`.

setup (world) → phase 1 per source (extract → align → fuse → train T_k), the pivot-CLM
baseline and, with a `fusellm:` section, the FuseLLM-mode target (all sources in one run, on the
same stores and maps) → phase 2 merges of the pairwise targets → evaluation (held-out loss per
domain, exact-answer accuracy per domain on questions with key answers, question set with a judge)
→ one report (markdown, PNG, JSON) in the run folder. Each step is
skipped when its output exists with the same fingerprint, so a stopped run continues where it
stopped.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

import yaml

from core.atomic import write_text
from core.measure import phase
from core.fingerprint import file_stamp, folder_stamp, json_sha
from pipeline.claims import write_run_report
from pipeline.phases import append_phase_table, start_phases
from pipeline.recipe import CLM_NAME, TARGET_PREFIX, Recipe
from pipeline.steps import Steps


def _log(msg: str) -> None:
    print(f"[pivotfuse run {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _phase1(recipe: Recipe) -> tuple[dict[str, Path], Path | None]:
    """Targets T_k for every source (and the pivot-CLM baseline); fuse_source skips finished ones."""
    from pipeline.pairwise import fuse_source

    targets = {}
    for spec in recipe.models.sources:
        _log(f"phase 1: fuse source {spec.name} (extract → align → fuse → train)")
        targets[spec.name] = fuse_source(recipe, spec.name)
    clm = None
    if recipe.pivot_clm:
        _log("phase 1: pivot-CLM baseline (λ = 1, same data and steps)")
        clm = fuse_source(recipe, None)
    return targets, clm


def _fusellm(recipe: Recipe) -> Path | None:
    """The FuseLLM-mode target of the recipe's `fusellm:` section (on the stores and maps of phase 1)."""
    from pipeline.fusellm import fuse_sources

    if recipe.fusellm is None:
        return None
    names = ", ".join(s.name for s in recipe.fusellm_sources())
    _log(f"phase 1: FuseLLM mode, {recipe.fusellm.name} from the pivot and {names} in one run")
    return fuse_sources(recipe)


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
            with phase("merge", spec.name, method=spec.method, models=len(targets)):
                merge_models(str(pivot), [str(t) for t in targets.values()], spec, str(out), overwrite=True)
            steps.mark(f"merge:{spec.name}", fp)
        merged[spec.name] = out
    return merged


def _models_to_eval(recipe: Recipe, targets: dict[str, Path], clm: Path | None,
                    merged: dict[str, Path], fusellm: Path | None = None) -> dict[str, str]:
    models = {recipe.models.pivot.name: recipe.world_path(recipe.models.pivot.path)}
    models |= {s.name: recipe.world_path(s.path) for s in recipe.models.sources}
    if clm is not None:
        models[CLM_NAME] = str(clm)
    models |= {TARGET_PREFIX + k: str(v) for k, v in targets.items()}
    if fusellm is not None and recipe.fusellm is not None:
        models[recipe.fusellm.name] = str(fusellm)
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


def _world_answers(recipe: Recipe, questions: Path, max_new_tokens: int) -> dict[str, Path]:
    """The demo world's own greedy answers to its held-out questions, per run model name, for the
    world models of the recipe: the world wrote them with the same questions and reply limit."""
    if recipe.world is None or questions != Path(recipe.world_path("world:heldout_questions")):
        return {}
    from world.build import ANSWER_TOKENS

    if max_new_tokens != ANSWER_TOKENS:
        return {}
    found = {}
    for spec in [recipe.models.pivot, *recipe.models.sources]:
        if spec.path.startswith("world:"):
            f = Path(recipe.world.out) / "answers" / "model_answer" / f"{spec.path.split(':', 1)[1]}.jsonl"
            if f.is_file():
                found[spec.name] = f
    return found


def _accuracy(recipe: Recipe, models: dict[str, str], steps: Steps) -> Path | None:
    """Greedy exact-answer accuracy per domain of every model (OUT/eval/accuracy/accuracy.json).

    The ledger holds, per model, the fingerprint its answer file was made with (model weights,
    questions, reply limit), written before answering: a changed model's answers are dropped, an
    answer file without an entry (the world's own, or one put there by hand) is reused."""
    from evals.accuracy import answer_accuracy

    acc = recipe.accuracy
    if acc is None:
        return None
    questions = Path(recipe.world_path(acc.questions))
    out = Path(recipe.out) / "eval" / "accuracy"
    cfg = replace(recipe.eval, out=str(out), batch_size=acc.batch_size, max_new_tokens=acc.max_new_tokens)
    templates = {s.name: s.chat_template for s in [recipe.models.pivot, *recipe.models.sources] if s.chat_template}
    world = _world_answers(recipe, questions, acc.max_new_tokens)
    for name, path in models.items():
        answers = out / "model_answer" / f"{name}.jsonl"
        fp = json_sha({"model": folder_stamp(Path(path)), "questions": file_stamp(questions, questions.name),
                       "max_new_tokens": acc.max_new_tokens, "template": templates.get(name),
                       "system_prompt": recipe.eval.system_prompt})
        made = steps.done.get(f"accuracy:{name}")
        if made is not None and made != fp and answers.is_file():
            answers.unlink()
        if not answers.is_file() and name in world:
            answers.parent.mkdir(parents=True, exist_ok=True)
            write_text(answers, world[name].read_text(encoding="utf-8"))
        steps.mark(f"accuracy:{name}", fp)
    _log(f"eval: exact-answer accuracy of {len(models)} models on {questions.name}")
    answer_accuracy(models, questions, cfg, chat_templates=templates)
    return out / "accuracy.json"


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
    phases = start_phases(out) if state.is_main_process else None
    if recipe.world is not None:
        from world.build import build_world

        _log(f"setup: demo world in {recipe.world.out}")
        with state.main_process_first():  # one builder; the others then find it finished
            build_world(recipe.world, progress=state.is_main_process)
    if recipe.world_spec is not None:
        from world.shapes import build_spec_world

        _log(f"setup: the world of {recipe.world_spec.spec} in {recipe.world_spec.out}")
        with state.main_process_first():
            build_spec_world(recipe.world_spec.spec, recipe.world_spec.out, progress=state.is_main_process)
    targets, clm = _phase1(recipe)  # every process takes part (data-parallel under accelerate launch)
    fusellm = _fusellm(recipe)
    report = out / "report.md"
    if state.is_main_process:  # merging and evaluating are single-process jobs
        merged = _phase2(recipe, targets, steps)  # FuseChat merges the pairwise targets only
        models = _models_to_eval(recipe, targets, clm, merged, fusellm)
        eval_dir = _evaluate(recipe, models, steps)
        accuracy = _accuracy(recipe, models, steps)
        report = write_run_report(recipe, eval_dir, models, list(merged), accuracy)
        append_phase_table(report, phases)  # time and peak RSS of each phase per model
        _log(f"done in {time.time() - t0:.0f} s: {report}")
    state.wait_for_everyone()
    return report

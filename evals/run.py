"""Whole evaluations as plain functions (used by `eval mtbench` and by the `run` command)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from core.errors import PivotfuseError
from evals.backends import ModelRef, load_backend, parse_spec
from evals.config import EvalConfig
from evals.demo import demo_questions
from evals.mtbench import check_references, generate_answers, judge_answers
from evals.questions import builtin_judge_prompts, load_judge_prompts, load_questions, load_reference_answers
from evals.reference_judge import JUDGE_NAME as REFERENCE_JUDGE
from evals.reference_judge import check_reference_judge, judge_by_reference


def question_set(cfg: EvalConfig) -> list[dict]:
    """`cfg.questions`: a FastChat question file, or 'demo' (facts questions from `cfg.demo_facts`)."""
    if cfg.questions == "demo":
        return demo_questions(cfg.demo_facts)
    return load_questions(cfg.questions)


def run_mtbench(models: dict[str, str], cfg: EvalConfig, chat_templates: dict[str, str] | None = None,
                answer_only: bool = False) -> dict[str, Any]:
    """Answer with every model (one loaded at a time), then judge all answers with `cfg.judge`
    (a model spec, or 'reference': the built-in check against reference answers).

    `models` maps names to specs (folder or openai:MODEL[@URL]). Returns paths and timings.
    """
    questions = question_set(cfg)
    refs: list[ModelRef] = []
    for name, spec in models.items():
        ref = parse_spec(spec, cfg.base_url)
        ref.name = name
        refs.append(ref)
    judge_ref = None
    by_reference = not answer_only and cfg.judge == REFERENCE_JUDGE  # the built-in check, no model
    if by_reference:
        references = load_reference_answers(cfg.reference, REFERENCE_JUDGE) if cfg.reference else None
        check_reference_judge(questions, references)  # before answering, not after
    elif not answer_only:
        if not cfg.judge:
            raise PivotfuseError("no judge: pass --judge FOLDER, --judge openai:MODEL[@BASE_URL] or "
                                 "--judge reference (or --answer-only)")
        judge_ref = parse_spec(cfg.judge, cfg.base_url)
        if judge_ref.name == REFERENCE_JUDGE:
            raise PivotfuseError(f"--judge {cfg.judge}: the name 'reference' belongs to the built-in reference "
                                 "judge: prefix NAME= to name this judge")
        prompts = load_judge_prompts(cfg.judge_prompts) if cfg.judge_prompts else builtin_judge_prompts()
        references = load_reference_answers(cfg.reference, judge_ref.name) if cfg.reference else None
        check_references(questions, references)  # before hours of answering, not after
    info: dict[str, Any] = {"questions": len(questions), "answers": {}, "seconds": {}}
    for ref in refs:
        t0 = time.perf_counter()
        backend = load_backend(ref, cfg, (chat_templates or {}).get(ref.name))
        info["answers"][ref.name] = str(generate_answers(questions, backend, cfg.out, cfg))
        if getattr(backend, "truncated", 0):
            print(f"{ref.name}: {backend.truncated} prompts were cut on the left to fit the context")
        backend.close()
        info["seconds"][f"answer {ref.name}"] = time.perf_counter() - t0
    if by_reference:
        t0 = time.perf_counter()
        path, stats = judge_by_reference(questions, [r.name for r in refs], cfg.out, references)
        info["judgments"], info["judge"] = str(path), REFERENCE_JUDGE
        if stats["skipped"]:
            cats = ", ".join(f"{c}: {n}" for c, n in stats["skipped"].items())
            print(f"reference judge: {sum(stats['skipped'].values())} answer turns have no reference answer "
                  f"and were not scored ({cats})")
        info["skipped"] = stats["skipped"]
        info["seconds"][f"judge {REFERENCE_JUDGE}"] = time.perf_counter() - t0
    if judge_ref is not None:
        info["judge"] = judge_ref.name
        t0 = time.perf_counter()
        judge = load_backend(judge_ref, cfg, (chat_templates or {}).get(judge_ref.name))
        info["judgments"] = str(judge_answers(questions, [r.name for r in refs], judge, cfg.out, cfg,
                                              prompts, references))
        judge.close()
        info["seconds"][f"judge {judge_ref.name}"] = time.perf_counter() - t0
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    return info

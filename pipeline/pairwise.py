"""Pairwise fusion, end to end: extract → align → fuse → train → target folder T_k.

    fuse_source(recipe, "arith")   # → OUT/targets/arith  (a copy of the pivot fused with source arith)
    fuse_source(recipe, None)      # → OUT/targets/pivot-clm (λ = 1: the pivot trained on the same
                                   #   fusion data for the same steps, without the fusion term)

Layout under the recipe's `out`: `extract/NAME` (logit stores, shared with `pivotfuse extract`),
`align/SOURCE` (vocabulary map), `fuse/TARGET` (training rows, checkpoints: the resumable work) and
`targets/TARGET` (the result: HF folder + recipe.yaml, train_log.jsonl, fusion_report.json,
README.md). A target whose report carries the same fingerprint is reused as is; an interrupted
run resumes (stores by shard, training from the last checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from core.atomic import write_text
from core.config import to_dict
from core.errors import PivotfuseError
from core.files import read_json
from core.fingerprint import json_sha
from core.loading import load_tokenizer, vocab_size
from core.measure import phase
from pipeline.recipe import CLM_NAME, ModelSpec, Recipe

TARGET_SETTINGS = ("method", "top_k", "fallback", "translate", "temperature")  # `fuse:` keys of the fusion term
CADENCE = ("save_steps", "save_total_limit", "logging_steps", "workers")  # `fuse:` keys that never change a target


def teacher_store(recipe: Recipe, spec: ModelSpec, data: str):
    """Extract (or reuse, or resume) the logit store of one model over the fusion corpus."""
    from fuse.extract.config import ExtractJob
    from fuse.extract.extract import extract
    from fuse.extract.store import LogitStore

    cfg = ExtractJob.of(recipe.extract, model=recipe.world_path(spec.path), data=data,
                        out=str(Path(recipe.out) / "extract" / spec.name),
                        chat_template=spec.chat_template or recipe.extract.chat_template)
    with phase("extract", spec.name, vocab=vocab_size(cfg.model)):
        extract(cfg)  # collective under accelerate; a complete store with the same fingerprint is kept
    return LogitStore(cfg.out)


def source_vocab_map(recipe: Recipe, pivot: ModelSpec, source: ModelSpec, data: str) -> tuple[Any, dict]:
    """Source id → pivot id (−1 = unmapped) and the map's statistics + fingerprint + path, built over
    the fusion corpus in `OUT/align/SOURCE/vocab_map.json` with the recipe's `align:` settings (they
    are in the map's fingerprint: a changed one rebuilds it)."""
    from fuse.align.build import build_map

    out = Path(recipe.out) / "align" / source.name / "vocab_map.json"
    p_path, s_path = recipe.world_path(pivot.path), recipe.world_path(source.path)
    with phase("vocab map", source.name, vocab=vocab_size(s_path), pivot_vocab=vocab_size(p_path)):
        vmap = build_map(p_path, s_path, data, out, recipe.align,
                         pivot_template=pivot.chat_template, source_template=source.chat_template)
    return vmap.mapping, {**vmap.stats, "fingerprint": vmap.fingerprint, "path": str(out)}


def reset_work(work: Path, fingerprint: str, is_main: bool) -> None:
    """Checkpoints and the before-training loss belong to one fingerprint: other settings start over."""
    stamp = work / "fingerprint.json"
    if is_main:
        work.mkdir(parents=True, exist_ok=True)
        if not stamp.is_file() or read_json(stamp).get("fingerprint") != fingerprint:
            shutil.rmtree(work / "checkpoints", ignore_errors=True)
            (work / "loss_before.json").unlink(missing_ok=True)
            write_text(stamp, json.dumps({"fingerprint": fingerprint}) + "\n")


def turn_enders(path: str) -> list[str]:
    """The tokens that end an assistant turn under this model's template (as core.chat finds them)."""
    from core.chat import end_of_turn_tokens

    return end_of_turn_tokens(load_tokenizer(path, model=True, fast=True, shared=True))


def write_target_files(folder: Path, report: dict, result: dict, recipe: Any, card: str) -> None:
    """A trained target's own files beside its weights (pairwise and FuseLLM mode alike): the fusion
    report, the training log, the recipe it came from and its model card."""
    (folder / "fusion_report.json").write_text(json.dumps(report, indent=1) + "\n")
    with (folder / "train_log.jsonl").open("w") as fh:
        for entry in result["log_history"]:
            fh.write(json.dumps(entry) + "\n")
    (folder / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    (folder / "README.md").write_text(card)


def fuse_source(recipe: Recipe, source_name: str | None, *, report_samples: int = 256) -> Path:
    """Train and save target T_k for `source_name` (None: the pivot-CLM baseline with λ = 1).

    Returns the target folder. Works under `accelerate launch` (every process calls it).
    """
    import torch
    from accelerate import PartialState

    from fuse.targets.rows import ROWS_FILE, ROWS_VERSION, build_rows, cached_rows
    from fuse.train.trainer import train_target

    state = PartialState(cpu=torch.accelerator.current_accelerator() is None)
    cfg = recipe.fuse
    specs = {s.name: s for s in recipe.models.sources}
    if source_name is not None and source_name not in specs:
        raise PivotfuseError(f"source {source_name!r} is not in the recipe's models.sources "
                             f"({', '.join(specs) or 'none'})")
    source = specs.get(source_name) if source_name else None
    if source is None:
        cfg = dataclasses.replace(cfg, lam=1.0)  # pivot-CLM: the same path without the fusion term
    name = source.name if source else CLM_NAME
    out, work = Path(recipe.out), Path(recipe.out) / "fuse" / name
    target = out / "targets" / name
    pivot = recipe.models.pivot
    pivot_path = recipe.world_path(pivot.path)
    data = recipe.world_path(recipe.data.fusion)

    p_store = teacher_store(recipe, pivot, data)
    s_store = teacher_store(recipe, source, data) if source and cfg.lam < 1.0 else None
    vmap, vmap_info = (None, {})
    if s_store is not None:
        with state.main_process_first():  # the main process builds the map, the others read it
            vmap, vmap_info = source_vocab_map(recipe, pivot, source, data)
    # Fingerprints hold what changes the result: not logging/saving cadence, and for pivot-CLM
    # (λ = 1) not the settings of the fusion term either.
    target_only = TARGET_SETTINGS
    settings = {k: getattr(cfg, k) for k in target_only} if s_store is not None else {}
    rows_fp = json_sha({"version": ROWS_VERSION, "pivot": p_store.manifest["fingerprint"],
                    "source": s_store.manifest["fingerprint"] if s_store else None,
                    "vocab": vmap_info.get("fingerprint"), **settings})
    ignore = set(CADENCE) | (set(target_only) if s_store is None else set())
    fingerprint = json_sha({"rows": rows_fp, "samples": report_samples,
                        "fuse": {k: v for k, v in to_dict(cfg).items() if k not in ignore}})
    report_file = target / "fusion_report.json"
    if report_file.is_file() and read_json(report_file).get("fingerprint") == fingerprint:
        return target  # already trained with these inputs and settings
    with state.main_process_first():
        reset_work(work, fingerprint, state.is_main_process)
    eos = (turn_enders(pivot_path), turn_enders(recipe.world_path(source.path)) if s_store is not None else None)
    source_path = recipe.world_path(source.path) if source else None
    with state.main_process_first():
        ds, fuse_stats = cached_rows(work, rows_fp, lambda folder: build_rows(
            p_store, s_store, pivot_path, source_path, vmap, method=cfg.method, k=cfg.top_k, fallback=cfg.fallback,
            translate=cfg.translate, eos=eos, workers=cfg.workers, out=folder / ROWS_FILE), writes=True)
    train = ds.remove_columns(["id", "domain"])
    sample = train.select(range(min(report_samples, len(train))))

    def write_extra(folder: Path, result: dict) -> None:
        report = {"fingerprint": fingerprint, "target": name, "pivot": pivot.name,
                  "source": source.name if source else None, "lambda": cfg.lam, "method": cfg.method,
                  "temperature": cfg.temperature, "top_k": cfg.top_k, "fallback": cfg.fallback,
                  "fusion": fuse_stats, "vocab_map": {k: v for k, v in vmap_info.items() if k != "fingerprint"},
                  "loss_before": result["loss_before"], "loss_after": result["loss_after"],
                  "steps": result["steps"], "report_samples": len(sample)}
        write_target_files(folder, report, result, recipe, model_card(report))

    with phase("train target", name, vocab=vocab_size(pivot_path), rows=len(train)):
        train_target(cfg, pivot_path, train, str(target), str(work), eval_dataset=sample, write_extra=write_extra)
    return target


def fuse_target(recipe: Recipe, source_name: str | None) -> tuple[Path, dict | None]:
    """`fuse_source` for one command: the target folder and, on the main process, its fusion report."""
    from accelerate import PartialState

    target = fuse_source(recipe, source_name)
    return target, read_json(target / "fusion_report.json") if PartialState().is_main_process else None


def model_card(report: dict) -> str:
    """A short README.md for a target folder."""
    f, b, a = report["fusion"], report["loss_before"], report["loss_after"]
    src = report["source"] or "none (pivot-CLM baseline)"
    lines = [f"# {report['target']}: pivot `{report['pivot']}` fused with source `{src}`", "",
             f"pivotfuse pairwise fusion (FuseChat phase 1): loss = λ·CE(gold) + (1−λ)·CE(fused ‖ student), "
             f"λ = {report['lambda']}, method `{report['method']}`, top-{report['top_k']}, T = {report['temperature']}, "
             f"fallback `{report['fallback']}`; {report['steps']} optimizer steps.", "",
             "| | before | after |", "|---|---|---|",
             f"| fusion loss | {b.get('loss', float('nan')):.4f} | {a.get('loss', float('nan')):.4f} |",
             f"| CE(gold) | {b.get('ce_gold', float('nan')):.4f} | {a.get('ce_gold', float('nan')):.4f} |",
             f"| CE(fused target) | {b.get('ce_fused', float('nan')):.4f} | {a.get('ce_fused', float('nan')):.4f} |",
             "", f"(mean over {report['report_samples']} fusion-corpus conversations, nats per token)", ""]
    if report["source"]:
        lines += [f"Alignment coverage: {f['coverage']:.1%} of {f['positions']} pivot positions paired with a source "
                  f"distribution ({f['same_text_share']:.1%} with the same token text); "
                  f"{f['from_source_share']:.1%} of the targets came from the source; "
                  f"{f['fallback']} positions fell back to `{report['fallback']}`.", "",
                  f"Winners per conversation: {f['winners']}; mean CE per character: pivot "
                  f"{f['mean_pivot_ce_per_char']:.4f}, source {f['mean_source_ce_per_char']:.4f}.", ""]
    lines += ["Files: `fusion_report.json` (all numbers), `train_log.jsonl`, `recipe.yaml` (the recipe that made it)."]
    return "\n".join(lines) + "\n"

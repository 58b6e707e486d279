"""FuseLLM mode, end to end: one target fused from the pivot and K sources in one training run.

    fuse_sources(recipe)   # → OUT/targets/fusellm (recipe.fusellm: its name and sources)

Per conversation the pivot's and every present source's aligned distributions compete (MinCE /
AvgCE / per-token MinCE over K + 1 teachers, `fuse.targets.fusion_multi`), with the `fuse:`
settings of the pairwise targets: the same loss, optimiser and number of steps. Nothing is
extracted or aligned twice: the stores (`OUT/extract/NAME`) and vocabulary maps
(`OUT/align/SOURCE`) are those of pairwise fusion, found by the same calls and fingerprints. The
resumable work goes to `OUT/fuse/NAME`; the target folder holds the recipe, the training log, a
fusion report with each source's contribution per domain, and a model card.
"""

from __future__ import annotations

from pathlib import Path

from core.config import to_dict
from core.errors import PivotfuseError
from core.files import read_json
from core.fingerprint import json_sha
from fuse.train.config import FuseLLMConfig
from pipeline.fusellm_report import contribution_table
from pipeline.pairwise import (CADENCE, TARGET_SETTINGS, reset_work, source_vocab_map, teacher_store, turn_enders,
                               write_target_files)
from pipeline.recipe import Recipe


def fusellm_name(recipe: Recipe) -> str:
    """The FuseLLM-mode target's name (its folder and table row)."""
    return (recipe.fusellm or FuseLLMConfig()).name


def fuse_sources(recipe: Recipe, *, report_samples: int = 256) -> Path:
    """Train and save the FuseLLM-mode target of `recipe` (its `fusellm:` section, or every source
    under the default name). Returns the target folder. Works under `accelerate launch`."""
    import torch
    from accelerate import PartialState

    from fuse.targets.rows import ROWS_VERSION, cached_rows
    from fuse.targets.rows_arrow import ROWS_FILE
    from fuse.targets.rows_multi import ROWS_MULTI_VERSION, build_rows_multi
    from fuse.train.trainer import train_target

    try:
        sources = recipe.fusellm_sources()
    except ValueError as e:
        raise PivotfuseError(str(e)) from None
    cfg = recipe.fuse
    if cfg.lam >= 1.0:
        raise PivotfuseError("fuse.lam: FuseLLM mode needs λ < 1 (λ = 1 leaves no fusion term: that is the "
                             "pivot-CLM baseline, fuse --clm)")
    state = PartialState(cpu=torch.accelerator.current_accelerator() is None)
    name = fusellm_name(recipe)
    out, work = Path(recipe.out), Path(recipe.out) / "fuse" / name
    target = out / "targets" / name
    pivot = recipe.models.pivot
    pivot_path = recipe.world_path(pivot.path)
    data = recipe.world_path(recipe.data.fusion)

    p_store = teacher_store(recipe, pivot, data)  # the pairwise stores and maps: reused when made already
    s_stores = [teacher_store(recipe, s, data) for s in sources]
    with state.main_process_first():  # the main process builds a missing map, the others read it
        maps = [source_vocab_map(recipe, pivot, s, data) for s in sources]
    rows_fp = json_sha({"version": ROWS_VERSION, "multi": ROWS_MULTI_VERSION, "pivot": p_store.manifest["fingerprint"],
                        "sources": [{"name": s.name, "store": st.manifest["fingerprint"], "vocab": info["fingerprint"]}
                                    for s, st, (_, info) in zip(sources, s_stores, maps)],
                        **{k: getattr(cfg, k) for k in TARGET_SETTINGS}})
    fingerprint = json_sha({"rows": rows_fp, "samples": report_samples,
                            "fuse": {k: v for k, v in to_dict(cfg).items() if k not in CADENCE}})
    report_file = target / "fusion_report.json"
    if report_file.is_file() and read_json(report_file).get("fingerprint") == fingerprint:
        return target  # already trained with these inputs and settings
    with state.main_process_first():
        reset_work(work, fingerprint, state.is_main_process)
    inputs = [(s.name, st, recipe.world_path(s.path), vmap, turn_enders(recipe.world_path(s.path)))
              for s, st, (vmap, _) in zip(sources, s_stores, maps)]
    with state.main_process_first():
        ds, stats = cached_rows(work, rows_fp, lambda folder: build_rows_multi(
            p_store, pivot_path, inputs, method=cfg.method, k=cfg.top_k, fallback=cfg.fallback,
            translate=cfg.translate, pivot_eos=turn_enders(pivot_path), pivot_name=pivot.name,
            workers=cfg.workers, out=folder / ROWS_FILE), writes=True)
    train = ds.remove_columns(["id", "domain"])
    sample = train.select(range(min(report_samples, len(train))))

    def write_extra(folder: Path, result: dict) -> None:
        report = {"fingerprint": fingerprint, "target": name, "mode": "fusellm", "pivot": pivot.name,
                  "sources": [s.name for s in sources], "lambda": cfg.lam, "method": cfg.method,
                  "temperature": cfg.temperature, "top_k": cfg.top_k, "fallback": cfg.fallback,
                  "translate": cfg.translate, "fusion": {k: v for k, v in stats.items() if k != "contributions"},
                  "contributions": stats["contributions"],
                  "vocab_maps": {s.name: {k: v for k, v in info.items() if k != "fingerprint"}
                                 for s, (_, info) in zip(sources, maps)},
                  "loss_before": result["loss_before"], "loss_after": result["loss_after"],
                  "steps": result["steps"], "report_samples": len(sample)}
        write_target_files(folder, report, result, recipe, model_card(report))

    train_target(cfg, pivot_path, train, str(target), str(work), eval_dataset=sample, write_extra=write_extra)
    return target


def fuse_sources_target(recipe: Recipe) -> tuple[Path, dict | None]:
    """`fuse_sources` for one command: the target folder and, on the main process, its fusion report."""
    from accelerate import PartialState

    target = fuse_sources(recipe)
    return target, read_json(target / "fusion_report.json") if PartialState().is_main_process else None


def model_card(report: dict) -> str:
    """A short README.md for a FuseLLM-mode target folder."""
    f, b, a = report["fusion"], report["loss_before"], report["loss_after"]
    nan = float("nan")
    lines = [f"# {report['target']}: pivot `{report['pivot']}` fused with "
             f"{', '.join(f'`{s}`' for s in report['sources'])} in one run (FuseLLM mode)", "",
             f"loss = λ·CE(gold) + (1−λ)·CE(fused ‖ student), λ = {report['lambda']}, method `{report['method']}` "
             f"over the pivot and {len(report['sources'])} sources per conversation, top-{report['top_k']}, "
             f"T = {report['temperature']}, fallback `{report['fallback']}`; {report['steps']} optimizer steps.", "",
             "| | before | after |", "|---|---|---|",
             f"| fusion loss | {b.get('loss', nan):.4f} | {a.get('loss', nan):.4f} |",
             f"| CE(gold) | {b.get('ce_gold', nan):.4f} | {a.get('ce_gold', nan):.4f} |",
             f"| CE(fused target) | {b.get('ce_fused', nan):.4f} | {a.get('ce_fused', nan):.4f} |",
             "", f"(mean over {report['report_samples']} fusion-corpus conversations, nats per token)", "",
             "| source | conversations missing | alignment coverage | mean CE per character (pivot's) |",
             "|---|---:|---:|---:|"]
    lines += [f"| {n} | {s['missing']} | {s['coverage']:.1%} | {s['mean_ce_per_char']:.4f} "
              f"({s['mean_pivot_ce_per_char']:.4f}) |" for n, s in f["sources"].items()]
    lines += ["", f"Contributions ({f['positions']} pivot positions in {f['conversations']} conversations; "
              f"{f['fallback']} positions fell back to `{report['fallback']}`):", ""]
    lines += contribution_table(report["contributions"], report["method"])
    lines += ["", "Files: `fusion_report.json` (all numbers), `train_log.jsonl`, `recipe.yaml` (the recipe that made it)."]
    return "\n".join(lines) + "\n"

"""Single steps, for the commands that run one: build the world, extract one store, build one
vocabulary map, merge, evaluate, sample, score. Each takes validated settings and explicit paths
(a recipe only where the command was given one), runs the library, and returns what the command
prints. Libraries are imported when a step runs, so `--help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from core.errors import PivotfuseError
from core.loading import refuse_file_as_folder
from pipeline.recipe import load_recipe

if TYPE_CHECKING:  # the sections' schemas, for the annotations only
    from evals.config import EvalConfig
    from fuse.align.config import AlignConfig
    from fuse.align.vocab import VocabMap
    from fuse.extract.config import ExtractJob
    from implicit.config import SampleConfig, ScoreConfig
    from merge.config import MergeJob
    from world.config import WorldConfig


def build_world(cfg: WorldConfig) -> str:
    """Build (or reuse) the demo world of `cfg`; its tables as markdown."""
    from world.build import build_world as build, format_table

    return format_table(build(cfg))


def extract_job_from_recipe(recipe_path: str, overrides: list[str], model: str | None,
                            out_given: bool) -> tuple[dict, bool]:
    """The extraction settings of a recipe, and which model, corpus and store it gives `model`:
    (ExtractJob fields, whether `model` named one of the recipe's models). `model` may name a
    model of the recipe (pivot or a source: its folder, template and `OUT/extract/NAME`) or be a
    folder of the user's own, which then needs its own --out."""
    from dataclasses import asdict

    recipe = load_recipe(recipe_path, overrides)
    base = {k: v for k, v in asdict(recipe.extract).items() if v is not None}
    specs = {s.name: s for s in [recipe.models.pivot, *recipe.models.sources]}
    named = model in specs
    if named:
        spec = specs[model]
        base.update(model=recipe.world_path(spec.path), out=str(Path(recipe.out) / "extract" / spec.name))
        if spec.chat_template:
            base["chat_template"] = spec.chat_template
    elif model is not None:  # a folder of the user's own, or a misspelt name: say which, not "--out is required"
        if not Path(model).exists():
            raise PivotfuseError(f"{recipe_path}: no model named {model!r} in 'models' "
                                 f"({', '.join(specs)}), and no folder {model!r}")
        refuse_file_as_folder(model, "model")
        if not out_given:
            raise PivotfuseError(f"extract: --model {model} is not one of the models of {recipe_path} "
                                 f"({', '.join(specs)}): give --out for its store")
    base.setdefault("data", recipe.world_path(recipe.data.fusion))
    return base, named


def extract(job: ExtractJob) -> tuple[dict, int]:
    """Write (or finish, or reuse) the store of `job`: its statistics and the bytes
    of its shard files ({} and 0 on processes other than the main one)."""
    from fuse.extract.extract import extract as run

    stats = run(job)
    size = sum(f.stat().st_size for f in (Path(job.out) / "shards").glob("*.arrow")) if stats else 0
    return stats, size


def vocab_map(pivot: str, source: str, data: str, out: str, cfg: AlignConfig, pivot_template: str | None,
              source_template: str | None) -> VocabMap:
    """Build (or reuse, or resume) the vocabulary map of `source` onto `pivot`."""
    from fuse.align.build import build_map

    return build_map(pivot, source, data, out, cfg, pivot_template=pivot_template, source_template=source_template)


def merge(job: MergeJob, *, progress: bool, threads: int | None) -> dict:
    """Run the merge of `job`; its summary."""
    from merge.merger import merge_models

    return merge_models(job.base, job.models, job.method_config(), job.out, overwrite=job.overwrite,
                        progress=progress, threads=threads)


def model_specs(specs: list[str], templates: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """({name: spec}, {name: template file}) from `--model [NAME=]SPEC` and `--chat-template NAME=FILE`."""
    from evals.backends import parse_spec

    models: dict[str, str] = {}
    for spec in specs:
        name = parse_spec(spec).name
        if name in models:
            raise PivotfuseError(f"--model: two models named {name!r}: prefix one with NAME=")
        models[name] = spec  # parse_spec reads the NAME= prefix again
    chat_templates = {}
    for item in templates:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise PivotfuseError(f"--chat-template: expected NAME=FILE, got {item!r}")
        chat_templates[name] = path
    return models, chat_templates


def eval_mtbench(models: dict[str, str], templates: dict[str, str], cfg: EvalConfig,
                 answer_only: bool) -> tuple[dict, str]:
    """Answer (and unless `answer_only`, judge) the question set with every model: the run's info and,
    when judged, the table of this judge's scores."""
    from evals.report import build_table
    from evals.run import run_mtbench

    info = run_mtbench(models, cfg, templates, answer_only=answer_only)
    table = build_table(cfg.out, list(models), info["judge"])[0] if "judgments" in info else ""
    return info, table


def eval_loss(specs: list[str], template_flags: list[str], cfg: EvalConfig) -> str:
    """Held-out loss per domain of every model (`--model`, `--chat-template` as `model_specs` reads
    them) on `cfg.data`, into `cfg.out`: the table."""
    from evals.loss import heldout_loss
    from evals.report import build_table

    if not cfg.data:
        raise PivotfuseError("eval loss: pass --data FILE (held-out chats)")
    models, templates = model_specs(specs, template_flags)
    heldout_loss(models, cfg.data, cfg, templates, out=cfg.out)
    return build_table(cfg.out, list(models))[0]


def eval_accuracy(specs: list[str], template_flags: list[str], cfg: EvalConfig) -> str:
    """Exact-answer accuracy per domain of every model on `cfg.questions` (questions with key
    `answers`), into `cfg.out`: the table."""
    from evals.accuracy import answer_accuracy, format_table

    if cfg.questions == "demo":
        raise PivotfuseError("eval accuracy: pass --questions FILE, questions with key 'answers' "
                             "(e.g. WORLD/data/heldout_questions.jsonl)")
    models, templates = model_specs(specs, template_flags)
    return format_table(answer_accuracy(models, cfg.questions, cfg, templates))


def eval_report(out: str, models: list[str] | None, judge: str | None) -> tuple[Path, Path]:
    """`OUT/report.md` and `OUT/report.png` of everything evaluated in `out`."""
    from evals.report import write_report

    return write_report(out, models, judge)


def sample(prompts_file: str, limit: int | None, models: dict[str, str], templates: dict[str, str], out: str,
           cfg: SampleConfig, log: Callable[[str], None] = print) -> None:
    """Sample every model's answers to the prompts into `out`, telling `log` where each went."""
    import time

    from implicit.prompts import load_prompts
    from implicit.sample import sample_answers

    prompts = load_prompts(prompts_file, limit)
    for name, spec in models.items():
        t0 = time.perf_counter()
        path = sample_answers(prompts, spec, out, cfg, chat_template=templates.get(name), name=name)
        log(f"sample {name}: {len(prompts)} prompts -> {path} ({time.perf_counter() - t0:.1f} s)")


def score(prompts_file: str, out: str, models: list[str], cfg: ScoreConfig,
          chat_template: str | None) -> dict[str, tuple[Path, list[float | None]]]:
    """Score the sampled answers of `models` (default: every answer file in `out`) with `cfg`'s
    scorer: {model: every answer's score (None: unscored)}, with the score file of each."""
    from implicit.files import ANSWER_DIR, score_rows
    from implicit.prompts import load_prompts
    from implicit.score import score_answers

    models = models or sorted(p.stem for p in (Path(out) / ANSWER_DIR).glob("*.jsonl"))
    if not models:
        raise PivotfuseError(f"{Path(out) / ANSWER_DIR}: no answer files to score (run `sample` first)")
    paths = score_answers(load_prompts(prompts_file), out, models, cfg, chat_template=chat_template)
    return {name: (path, [s for r in score_rows(path) for s in r["scores"]]) for name, path in paths.items()}

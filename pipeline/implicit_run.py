"""Run a whole implicit fusion (FuseChat-3.0 / WRPO): `pivotfuse run` on an implicit-fusion recipe.

world (optional) → sample N answers per prompt from every source → score them → SFT rows and DPO
pairs → SFT the target on the best answers (and, the baseline, on the gold answers of the same
prompts) → sample and score the SFT model → WRPO triples → DPO and WRPO from the SFT model →
exact accuracy and held-out bits per byte of every model → the report (`pipeline.implicit_report`).

Sampling and scoring resume row by row; a training phase resumes from its last checkpoint while its
inputs are unchanged (`work/NAME/fingerprint`), and is skipped when its output was made from the
same inputs (`steps.json`). A model made again takes its samples, scores and evaluation with it.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from dataclasses import asdict, replace
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import yaml

from core.atomic import write_text
from core.chat import load_conversations
from core.fingerprint import folder_stamp, json_sha, sha256_hex
from core.files import read_jsonl
from pipeline.implicit_recipe import (DPO_NAME, GOLD_NAME, SFT_NAME, WRPO_NAME, ImplicitRunRecipe, check_paths,
                                      load_run_recipe, settings_of)
from pipeline.steps import Steps


def _log(msg: str) -> None:
    print(f"[pivotfuse run {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Phases:
    """Wall time of each phase of this invocation (a phase that was up to date takes ~0 s)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 1)


def select_prompts(prompts: list, per_domain: int | None) -> list:
    """The first `per_domain` prompts of each category, in file order (all when None)."""
    if per_domain is None:
        return prompts
    seen: Counter = Counter()
    kept = []
    for p in prompts:
        seen[p.category] += 1
        if seen[p.category] <= per_domain:
            kept.append(p)
    return kept


def gold_rows(sft_file: Path, prompts: list, src: str) -> list[dict]:
    """The baseline's rows: the prompts of the SFT rows, each with its gold answer (the chat's own reply)."""
    from core.errors import PivotfuseError

    by_key = {p.key: p for p in prompts}
    rows = []
    for _, row in read_jsonl(sft_file):
        p = by_key[json.dumps(row["id"])]
        if not p.reference:
            raise PivotfuseError(f"{src}: 'gold_baseline': prompt {p.id!r} has no gold answer (its chat ends with "
                                 "a user turn, or a question has no reference); set gold_baseline: false")
        rows.append({"id": p.id, "prompt": p.messages, "completion": [{"role": "assistant", "content": p.reference}],
                     "source": "gold", "score": None})
    return rows


def _file_sha(path: Path) -> str:
    return sha256_hex(path.read_bytes())


def _forget_samples(samples: Path, name: str) -> None:
    """Drop a model's answers, their manifest and every score of them (the model was made again)."""
    for f in [samples / "model_answer" / f"{name}.jsonl", samples / "model_answer" / f"{name}.settings.json",
              *(samples / "model_score").glob(f"*/{name}.jsonl")]:
        f.unlink(missing_ok=True)


def _train(steps: Steps, kind: str, name: str, model: Path, data: Path, out: Path, cfg: Any,
           chat_template: str | None) -> Path:
    """Train `out` from `model` on `data` unless it was made from the same inputs; resumes a cut run."""
    from implicit.train import train_dpo, train_sft, train_wrpo

    fp = json_sha({"kind": kind, "model": folder_stamp(model), "data": _file_sha(data), "cfg": asdict(cfg),
                   "template": chat_template})
    if steps.fresh(f"train:{name}", fp, out):
        _log(f"train {name}: up to date")
        return out
    work = out.parent.parent / "work" / name
    stamp = work / "fingerprint"
    if work.exists() and (not stamp.is_file() or stamp.read_text() != fp):  # checkpoints of other inputs
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_text(stamp, fp)
    _log(f"train {name} ({kind}) from {model.name} on {data.name}")
    trainer = {"sft": train_sft, "dpo": train_dpo, "wrpo": train_wrpo}[kind]
    res = trainer(str(model), data, out, cfg, work=work, chat_template=chat_template)
    _log(f"train {name}: {res['steps']} steps, loss {res['loss_before']:.4f} -> {res['loss_after']:.4f}")
    steps.mark(f"train:{name}", fp)
    return out


def _sample_model(steps: Steps, prompts: list, name: str, model: Path, samples: Path, cfg: Any,
                  chat_template: str | None) -> None:
    """Sample a trained model (WRPO's own answers); answers of an earlier version of it are dropped."""
    from implicit.sample import sample_answers

    fp = json_sha(folder_stamp(model))
    if steps.done.get(f"sample:{name}") != fp:
        _forget_samples(samples, name)
        steps.mark(f"sample:{name}", fp)
    sample_answers(prompts, str(model), samples, cfg, chat_template=chat_template, name=name)


def _evaluate(recipe: ImplicitRunRecipe, models: dict[str, str], out: Path, phases: Phases) -> tuple[dict, dict]:
    """({model: accuracy per domain}, {model: bits per byte per domain}); each model in OUT/eval/NAME,
    done again when its weights changed."""
    from evals.accuracy import answer_accuracy
    from evals.loss import heldout_loss

    acc, loss = {}, {}
    for name, folder in models.items():
        where = out / "eval" / name
        stamp = json_sha({"model": folder_stamp(Path(folder)), "eval": settings_of(recipe, "eval"),
                          "questions": recipe.data.questions, "heldout": recipe.data.heldout})
        stamp_file = where / "stamp"
        if where.exists() and (not stamp_file.is_file() or stamp_file.read_text() != stamp):
            shutil.rmtree(where)
        where.mkdir(parents=True, exist_ok=True)
        write_text(stamp_file, stamp)
        cfg = replace(recipe.eval, out=str(where))
        # every model here is the target's or a merge of its copies: one chat template for all
        tmpl = {name: recipe.target.chat_template} if recipe.target.chat_template else {}
        if recipe.data.questions:
            acc[name] = phases.run("eval: accuracy", lambda: answer_accuracy(
                {name: folder}, recipe.path(recipe.data.questions), cfg, tmpl))[name]
        if recipe.data.heldout:
            loss[name] = phases.run("eval: bits per byte", lambda: heldout_loss(
                {name: folder}, recipe.path(recipe.data.heldout), cfg, tmpl, out=where))[name]
    return acc, loss


def run_implicit(recipe: ImplicitRunRecipe, src: str) -> Path:
    """Run every phase of `recipe`; returns the report path."""
    from implicit.config import with_overrides
    from implicit.pairs import build_preference_data
    from implicit.prompts import load_prompts
    from implicit.sample import sample_answers
    from implicit.score import score_answers
    from pipeline.implicit_report import write_report

    t0 = time.time()
    use = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = use.ru_utime + use.ru_stime
    phases = Phases()
    out = Path(recipe.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "recipe.yaml", yaml.safe_dump(json.loads(json.dumps(asdict(recipe))), sort_keys=False))
    steps = Steps(out)
    if recipe.world is not None:
        from world.build import build_world

        _log(f"setup: demo world in {recipe.world.out}")
        phases.run("world", lambda: build_world(recipe.world))
    check_paths(recipe, src)
    prompts = select_prompts(load_prompts(recipe.path(recipe.data.prompts)), recipe.data.per_domain)
    _check_apart(recipe, prompts, src)
    samples, data, models_dir = out / "samples", out / "data", out / "models"
    names = [s.name for s in recipe.sources]
    for s in recipe.sources:
        cfg = with_overrides(recipe.sample, temperature=s.temperature, top_p=s.top_p, n=s.n)
        _log(f"sample {s.name}: {len(prompts)} prompts x {cfg.n}")
        phases.run("sample sources", lambda: sample_answers(prompts, recipe.path(s.path), samples, cfg,
                                                            chat_template=s.chat_template, name=s.name))
    _log(f"score the sources' answers ({recipe.score.scorer})")
    paths = phases.run("score sources", lambda: score_answers(prompts, samples, names, recipe.score))
    scorer = next(iter(paths.values())).parent.name
    phases.run("build SFT/DPO data", lambda: build_preference_data(prompts, samples, scorer, names, data,
                                                                   recipe.pairs))
    target = Path(recipe.path(recipe.target.path))
    tmpl = recipe.target.chat_template
    sft = phases.run("train SFT-best", lambda: _train(steps, "sft", SFT_NAME, target, data / "sft.jsonl",
                                                      models_dir / SFT_NAME, recipe.sft, tmpl))
    trained = {SFT_NAME: sft}
    if recipe.gold_baseline:
        gold = data / "sft_gold.jsonl"
        write_text(gold, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in gold_rows(data / "sft.jsonl",
                                                                                            prompts, src)))
        trained[GOLD_NAME] = phases.run("train SFT-gold", lambda: _train(
            steps, "sft", GOLD_NAME, target, gold, models_dir / GOLD_NAME, recipe.sft, tmpl))
    _log(f"sample and score {SFT_NAME} (WRPO's own answers)")
    phases.run("sample SFT-best", lambda: _sample_model(steps, prompts, SFT_NAME, sft, samples, recipe.sample, tmpl))
    phases.run("score SFT-best", lambda: score_answers(prompts, samples, [SFT_NAME], recipe.score))
    build = phases.run("build WRPO data", lambda: build_preference_data(prompts, samples, scorer, names, data,
                                                                        recipe.pairs, target=SFT_NAME))
    for name, kind, cfg, rows in ((DPO_NAME, "dpo", recipe.dpo, "dpo"), (WRPO_NAME, "wrpo", recipe.wrpo, "wrpo")):
        if build[rows]["rows"] == 0:
            _log(f"train {name}: no {rows} rows (see data/build_report.json); skipped")
            continue
        trained[name] = phases.run(f"train {name.upper()}", lambda: _train(
            steps, kind, name, sft, data / f"{rows}.jsonl", models_dir / name, cfg, tmpl))
    models = {recipe.target.name: str(target)}
    models |= {n: str(trained[n]) for n in (GOLD_NAME, SFT_NAME, DPO_NAME, WRPO_NAME) if n in trained}
    explicit = Path(recipe.explicit) if recipe.explicit else None
    if explicit is not None and (explicit / "config.json").is_file():
        models[recipe.explicit_name] = str(explicit)
    _log(f"eval: exact accuracy and bits per byte of {len(models)} models")
    acc, loss = _evaluate(recipe, models, out, phases)
    phases.seconds["total"] = round(time.time() - t0, 1)
    # CPU seconds of this process: what the run costs whatever else the machine is doing
    use = resource.getrusage(resource.RUSAGE_SELF)
    phases.seconds["cpu (user + sys) of the run"] = round(use.ru_utime + use.ru_stime - cpu0, 1)
    report = write_report(recipe, out, acc, loss, build, phases.seconds, explicit, len(prompts))
    _log(f"done in {time.time() - t0:.0f} s: {report}")
    return report


def _check_apart(recipe: ImplicitRunRecipe, prompts: list, src: str) -> None:
    """No prompt is one of the chats or questions the table is measured on (ids and texts)."""
    from core.errors import PivotfuseError

    held: set[str] = set()
    if recipe.data.heldout:
        held |= {c.id for c in load_conversations(recipe.path(recipe.data.heldout))}
    if recipe.data.questions:
        held |= {str(r.get("question_id")) for _, r in read_jsonl(recipe.path(recipe.data.questions))}
    clash = [p.id for p in prompts if str(p.id) in held]
    if clash:
        raise PivotfuseError(f"{src}: 'data.prompts': prompt {clash[0]!r} is also in the evaluation data; sample "
                             "another split")


def run_implicit_recipe(path: str, overrides: list[str]) -> Path:
    """`pivotfuse run` on an implicit-fusion recipe file."""
    return run_implicit(load_run_recipe(path, overrides), str(path))

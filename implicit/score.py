"""Scoring: one reward per sampled answer, from a reward model, an LLM judge or a verifier.

- `reward_model`: a local HF sequence-classification folder (`implicit.reward_model`; FuseChat-3.0
  uses ArmoRM-Llama3-8B).
- `judge`: FastChat single-answer grading through the eval backends: FastChat's prompts
  (`judge_prompts.jsonl`, or pivotfuse's own with the same semantics), reference-based for the
  reference categories, the first `[[x]]` (else `[x]`) of the judgment as the score; a judgment
  without a rating scores None (such answers take no part in the data).
- `verifier`: `checker(prompt, answer)` (`implicit.verify`) gives 1.0 or 0.0.

Output beside the answers: `OUT/model_score/<scorer>/<model>.jsonl`, one row per answer row:
`question_id`, `model_id`, `answer_id`, `scorer`, `scores` (one per choice), `details` (the
judgment, the verdict, or null), `tstamp`. Rows whose `answer_id` matches the answers on disk are
kept on a rerun (resume); answers that changed are scored again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from core.errors import PivotfuseError
from evals.config import REFERENCE_CATEGORIES
from evals.mtbench import append_rows, judge_messages, parse_rating
from evals.questions import builtin_judge_prompts, load_judge_prompts
from implicit.backend import open_backend
from implicit.config import ScoreConfig
from implicit.files import (answer_path, check_answer_row, check_name, check_score_row, check_settings, finish,
                            read_rows, score_path, score_rows)
from implicit.prompts import Prompt, key
from implicit.verify import Checker, make_checker

class Scorer(Protocol):
    name: str
    settings: dict[str, Any]

    def score(self, items: list[tuple[Prompt, str]]) -> list[tuple[float | None, str | None]]: ...

    def close(self) -> None: ...


class VerifierScorer:
    """1.0 when `checker(prompt, answer)` holds, else 0.0."""

    def __init__(self, checker: Checker, name: str, settings: dict[str, Any]) -> None:
        self.checker, self.name, self.settings = checker, name, settings

    def score(self, items: list[tuple[Prompt, str]]) -> list[tuple[float | None, str | None]]:
        return [(1.0, "right") if self.checker(p, a) else (0.0, "wrong") for p, a in items]

    def close(self) -> None:
        pass


def judge_request(prompt: Prompt, answer: str, prompts: dict[str, dict]) -> tuple[str, list[dict[str, str]]]:
    """FastChat's single-answer grading of `answer`: (user prompt, judge messages). A prompt with one
    earlier exchange is graded as FastChat grades a second turn (the context's reply is answer 1)."""
    turns = prompt.user_turns()
    if len(turns) > 2:
        raise PivotfuseError(f"prompt {prompt.id!r}: the judge grades prompts of at most two user turns, "
                             f"this one has {len(turns)}")
    with_ref = (prompt.category or "") in REFERENCE_CATEGORIES
    if with_ref and prompt.reference is None:
        raise PivotfuseError(f"prompt {prompt.id!r} ({prompt.category}) needs a reference answer for the judge")
    question = {"question_id": prompt.id, "turns": turns}
    replies = [m["content"] for m in prompt.messages if m["role"] == "assistant"] + [answer]
    reference = replies[:-1] + [prompt.reference] if with_ref else None
    role = ("math" if with_ref else "default") + ("-mt" if len(turns) == 2 else "")
    return judge_messages(prompts[role], question, replies, reference, multi_turn=len(turns) == 2)


class JudgeScorer:
    """An LLM judge through the eval backends; its rating of each answer is the reward."""

    def __init__(self, cfg: ScoreConfig, chat_template: str | None = None, backend: Any = None) -> None:
        """The judge is `cfg.judge` (loaded here), or `backend`: an object with `name` and `chat`."""
        self.prompts = load_judge_prompts(cfg.judge_prompts) if cfg.judge_prompts else builtin_judge_prompts()
        self.backend, _, target = open_backend(backend if backend is not None else cfg.judge, cfg, chat_template)
        self.name, self.max_tokens = self.backend.name, cfg.judge_max_tokens
        self.settings = {"kind": "judge", "model": target, "prompts": sorted(p["name"] for p in self.prompts.values()),
                         "judge_max_tokens": cfg.judge_max_tokens}

    def score(self, items: list[tuple[Prompt, str]]) -> list[tuple[float | None, str | None]]:
        built = [judge_request(p, a, self.prompts) for p, a in items]
        judgments = self.backend.chat([msgs for _, msgs in built], 0.0, self.max_tokens)
        out = []
        for judgment in judgments:
            rating = parse_rating(judgment)
            out.append((None if rating == -1 else float(rating), judgment))
        return out

    def close(self) -> None:
        self.backend.close()


def make_scorer(cfg: ScoreConfig, chat_template: str | None = None) -> Scorer:
    """The scorer `cfg` describes (models are loaded now)."""
    if cfg.scorer == "verifier":
        name = f"verifier-{cfg.checker}"
        return VerifierScorer(make_checker(cfg.checker, cfg.world_seed), name,
                              {"kind": "verifier", "checker": cfg.checker, "world_seed": cfg.world_seed})
    if cfg.scorer == "judge":
        return JudgeScorer(cfg, chat_template)
    from implicit.reward_model import RewardModelScorer

    return RewardModelScorer(cfg.reward_model, batch_size=cfg.batch_size, max_length=cfg.max_length, dtype=cfg.dtype,
                             device_map=cfg.device_map, label_index=cfg.label_index,
                             trust_remote_code=cfg.trust_remote_code, chat_template=chat_template)


def score_model(prompts: dict[str, Prompt], out: Path, model: str, scorer: Scorer, chunk_prompts: int) -> Path:
    """Score every answer row of `model` not yet scored (for its current answers)."""
    answers = read_rows(answer_path(out, model), f"answers of {model}", check_answer_row)
    unknown = [r["question_id"] for r in answers if key(r["question_id"]) not in prompts]
    if unknown:
        raise PivotfuseError(f"{answer_path(out, model)}: question_id {unknown[0]!r} is not among the prompts")
    path = score_path(out, scorer.name, model)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = {key(r["question_id"]): r["answer_id"] for r in score_rows(path)}
    todo = [r for r in answers if done.get(key(r["question_id"])) != r["answer_id"]]
    with tqdm(total=len(todo), desc=f"score {model} ({scorer.name})", unit="prompt", disable=not todo) as bar:
        for start in range(0, len(todo), chunk_prompts):
            rows = todo[start:start + chunk_prompts]
            items = [(prompts[key(r["question_id"])], c["turns"][0]) for r in rows for c in r["choices"]]
            results = iter(scorer.score(items))
            scored = []
            for r in rows:
                got = [next(results) for _ in r["choices"]]
                scored.append({"question_id": r["question_id"], "model_id": model, "answer_id": r["answer_id"],
                               "scorer": scorer.name, "scores": [s for s, _ in got], "details": [d for _, d in got],
                               "tstamp": time.time()})
            append_rows(path, scored)
            bar.update(len(rows))
    finish(path, [key(r["question_id"]) for r in answers], lambda r: key(r["question_id"]), check_score_row)
    return path


def score_answers(prompts: list[Prompt], out: str | Path, models: list[str], cfg: ScoreConfig,
                  scorer: Scorer | None = None, chat_template: str | None = None) -> dict[str, Path]:
    """Score the answers of each model in `models` (names under `OUT/model_answer/`) with the scorer
    `cfg` describes (or `scorer`, already made); returns {model: score file}. Resumable."""
    out = Path(out)
    for m in models:
        check_name(m, "model")
    by_key = {p.key: p for p in prompts}
    made = scorer is None
    scorer = make_scorer(cfg, chat_template) if made else scorer
    try:
        check_name(scorer.name, "scorer")
        base = out / "model_score" / scorer.name
        check_settings(base / "settings.json", scorer.settings, f"scores of {scorer.name}")
        paths = {m: score_model(by_key, out, m, scorer, cfg.chunk_prompts) for m in models}
        truncated = getattr(scorer, "truncated", 0)
        if truncated:
            print(f"{scorer.name}: {truncated} chats were cut to max_length={cfg.max_length} tokens")
        return paths
    finally:
        if made:
            scorer.close()


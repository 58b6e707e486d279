"""Training data from scored answers, as FuseChat-3.0 builds it, and WRPO's triples.

Rules (each drop is counted, by reason, in the build report):

- An answer takes part when it has a score and non-blank text (else: `unscored`, `empty`).
- The best answer of a set has the highest score; ties go to the source listed first, then to
  the lowest sample index. The worst has the lowest score, ties broken the same way. So the
  choice never depends on file order or on float noise, only on the given source order.
- SFT row of a prompt: the best answer over all sources, kept when its score is at least
  `min_sft_score` (when set; FuseChat-3.0 keeps only correct answers for math and code).
- DPO pair of one source: its best and its worst answer. The pair is kept when
  `min_gap <= best - worst <= max_gap` (both ends included, to 1e-9; FuseChat-3.0: 0.01 to 0.1 on
  ArmoRM's scale). A zero gap is a `tie` (the scorer did not tell them apart) and is never kept; nor
  is a pair of two identical texts. Pairs never mix sources. `pair_sources: best` keeps one pair per
  prompt, the kept pair whose chosen answer scores highest (ties: source order), as FuseChat-3.0's
  one pair per prompt; `all` keeps every source's kept pair.
- WRPO triple: y_ws = the best source answer (the SFT rule), y_wt and y_l = the best and the worst
  of the target's own samples (the SFT model's: WRPO's rejected answer is on-policy). Kept when
  r(y_wt) > r(y_l), their texts differ, and r(y_ws) > r(y_l).
- Split: with `sft_fraction`, each prompt goes to SFT or to preference data by a hash of
  `split_seed` and its id (FuseChat-3.0: 4:6); without it every prompt serves both.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.atomic import write_text
from core.config import field
from core.errors import PivotfuseError
from implicit.files import answer_path, check_answer_row, check_score_row, read_rows, score_path
from implicit.prompts import Prompt, key

GAP_TOLERANCE = 1e-9  # the window's ends are included despite float noise (0.31 - 0.21 != 0.1)


@dataclass
class PairConfig:
    """How SFT rows, DPO pairs and WRPO triples are chosen from the scored answers."""

    min_gap: float = field(0.01, help="DPO: smallest reward gap best − worst kept (FuseChat-3.0: 0.01, ArmoRM scale)")
    max_gap: float = field(0.1, help="DPO: largest reward gap kept (FuseChat-3.0: 0.1); larger gaps are dropped")
    pair_sources: str = field("best", choices=("best", "all"),
                              help="DPO: best = one pair per prompt, from the source whose chosen answer scores "
                                   "highest among the pairs in the window; all = one pair per source in the window")
    min_sft_score: float | None = field(None, help="SFT/WRPO: the best answer must score at least this "
                                                   "(e.g. 1.0 with a verifier: only right answers)")
    sft_fraction: float | None = field(None, help="share of prompts used for SFT, the rest for preference data "
                                                  "(FuseChat-3.0: 0.4); unset = every prompt for both")
    split_seed: int = field(0, help="seed of the SFT/preference split")

    def __post_init__(self) -> None:
        if self.min_gap < 0:
            raise ValueError(f"min_gap: must be >= 0, got {self.min_gap}")
        if self.max_gap < self.min_gap:
            raise ValueError(f"max_gap: must be >= min_gap ({self.min_gap}), got {self.max_gap}")
        if self.sft_fraction is not None and not 0.0 < self.sft_fraction < 1.0:
            raise ValueError(f"sft_fraction: must be in (0, 1), got {self.sft_fraction}")


@dataclass(frozen=True)
class Candidate:
    """One usable answer: its source, sample index, text and score."""

    source: str
    index: int
    text: str
    score: float


def usable(source: str, texts: list[str], scores: list[float | None]) -> tuple[list[Candidate], Counter]:
    """The answers that take part, and counts of those that do not (`unscored`, `empty`)."""
    kept, dropped = [], Counter()
    for i, (text, score) in enumerate(zip(texts, scores)):
        if score is None:
            dropped["unscored"] += 1
        elif not text.strip():
            dropped["empty"] += 1
        else:
            kept.append(Candidate(source, i, text, float(score)))
    return kept, dropped


def best(cands: list[Candidate], order: list[str]) -> Candidate | None:
    rank = {s: i for i, s in enumerate(order)}
    return min(cands, key=lambda c: (-c.score, rank[c.source], c.index), default=None)


def worst(cands: list[Candidate], order: list[str]) -> Candidate | None:
    rank = {s: i for i, s in enumerate(order)}
    return min(cands, key=lambda c: (c.score, rank[c.source], c.index), default=None)


def in_window(gap: float, lo: float, hi: float) -> bool:
    return lo - GAP_TOLERANCE <= gap <= hi + GAP_TOLERANCE


def source_pair(cands: list[Candidate], cfg: PairConfig) -> tuple[tuple[Candidate, Candidate] | None, str]:
    """(chosen, rejected) of one source's answers to one prompt, or None and the reason."""
    if len(cands) < 2:
        return None, "fewer_than_two_answers"
    order = [cands[0].source]
    hi, lo = best(cands, order), worst(cands, order)
    gap = hi.score - lo.score
    if gap <= 0:
        return None, "tie"
    if hi.text == lo.text:
        return None, "identical_text"
    if not in_window(gap, cfg.min_gap, cfg.max_gap):
        return None, "gap_below_window" if gap < cfg.min_gap else "gap_above_window"
    return (hi, lo), "kept"


def sft_choice(cands: list[Candidate], order: list[str], cfg: PairConfig) -> tuple[Candidate | None, str]:
    top = best(cands, order)
    if top is None:
        return None, "no_usable_answer"
    if cfg.min_sft_score is not None and top.score < cfg.min_sft_score:
        return None, "below_min_score"
    return top, "kept"


def dpo_choice(by_source: dict[str, list[Candidate]], order: list[str],
               cfg: PairConfig) -> tuple[list[tuple[Candidate, Candidate]], Counter]:
    """The DPO pairs of one prompt and the outcome of every source (`kept` or the reason)."""
    kept, outcome = [], Counter()
    for source in order:
        pair, reason = source_pair(by_source.get(source, []), cfg)
        outcome[reason] += 1
        if pair is not None:
            kept.append(pair)
    if cfg.pair_sources == "best" and len(kept) > 1:
        rank = {s: i for i, s in enumerate(order)}
        top = min(kept, key=lambda p: (-p[0].score, rank[p[0].source]))
        outcome["kept"] -= len(kept) - 1
        outcome["not_best_source"] += len(kept) - 1
        kept = [top]
    return kept, outcome


def wrpo_choice(source_cands: list[Candidate], target_cands: list[Candidate], order: list[str],
                cfg: PairConfig) -> tuple[tuple[Candidate, Candidate, Candidate] | None, str]:
    """(y_ws, y_wt, y_l) of one prompt, or None and the reason."""
    ws, reason = sft_choice(source_cands, order, cfg)
    if ws is None:
        return None, f"source_{reason}"
    if len(target_cands) < 2:
        return None, "fewer_than_two_target_answers"
    t_order = [target_cands[0].source]
    wt, lo = best(target_cands, t_order), worst(target_cands, t_order)
    if wt.score <= lo.score:
        return None, "target_tie"
    if wt.text == lo.text:
        return None, "identical_text"
    if ws.score <= lo.score:
        return None, "source_not_above_rejected"
    return (ws, wt, lo), "kept"


def split_of(prompt_key: str, fraction: float | None, seed: int) -> str:
    """'both', or 'sft' / 'preference' by a stable hash of the seed and the prompt id."""
    if fraction is None:
        return "both"
    u = int.from_bytes(hashlib.sha256(f"{seed}\0{prompt_key}".encode()).digest()[:8], "big") / 2 ** 64
    return "sft" if u < fraction else "preference"


def _reply(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def build_rows(prompts: list[Prompt], cands: dict[str, dict[str, list[Candidate]]], sources: list[str],
               cfg: PairConfig, target_cands: dict[str, list[Candidate]] | None = None) -> dict[str, Any]:
    """SFT rows, DPO pairs and (with `target_cands`) WRPO triples, plus the counts of what was
    dropped and why. `cands[prompt key][source]` are a prompt's usable answers (see `usable`)."""
    sft, dpo, wrpo = [], [], []
    counts: dict[str, Counter] = {"split": Counter(), "sft": Counter(), "dpo": Counter(), "wrpo": Counter(),
                                  "sft_by_source": Counter(), "dpo_by_source": Counter(),
                                  "wrpo_by_source": Counter()}
    for p in prompts:
        part = split_of(p.key, cfg.sft_fraction, cfg.split_seed)
        counts["split"][part] += 1
        by_source = cands.get(p.key, {})
        everything = [c for s in sources for c in by_source.get(s, [])]
        if part in ("both", "sft"):
            top, reason = sft_choice(everything, sources, cfg)
            counts["sft"][reason] += 1
            if top is not None:
                counts["sft_by_source"][top.source] += 1
                sft.append({"id": p.id, "prompt": p.messages, "completion": _reply(top.text), "source": top.source,
                            "score": top.score})
        if part == "sft":
            continue
        pairs, outcome = dpo_choice(by_source, sources, cfg)
        counts["dpo"].update(outcome)
        if not pairs:
            counts["dpo"]["prompts_without_pair"] += 1
        for hi, lo in pairs:
            counts["dpo_by_source"][hi.source] += 1
            dpo.append({"id": p.id, "prompt": p.messages, "chosen": _reply(hi.text), "rejected": _reply(lo.text),
                        "source": hi.source, "chosen_score": hi.score, "rejected_score": lo.score})
        if target_cands is not None:
            triple, reason = wrpo_choice(everything, target_cands.get(p.key, []), sources, cfg)
            counts["wrpo"][reason] += 1
            if triple is not None:
                ws, wt, lo = triple
                counts["wrpo_by_source"][ws.source] += 1
                wrpo.append({"id": p.id, "prompt": p.messages, "chosen": _reply(ws.text),
                             "chosen_target": _reply(wt.text), "rejected": _reply(lo.text), "source": ws.source,
                             "chosen_score": ws.score, "chosen_target_score": wt.score, "rejected_score": lo.score})
    report = {"prompts": len(prompts), "split": dict(counts["split"]),
              "sft": _section(len(sft), counts["sft"], counts["sft_by_source"]),
              "dpo": _section(len(dpo), counts["dpo"], counts["dpo_by_source"])}
    if target_cands is not None:
        report["wrpo"] = _section(len(wrpo), counts["wrpo"], counts["wrpo_by_source"])
    return {"sft": sft, "dpo": dpo, "wrpo": wrpo if target_cands is not None else None, "report": report}


def _section(rows: int, outcome: Counter, by_source: Counter) -> dict[str, Any]:
    return {"rows": rows, "by_source": dict(by_source),
            "dropped": {k: v for k, v in sorted(outcome.items()) if k != "kept" and v}}


def load_candidates(out: str | Path, scorer: str, model: str) -> tuple[dict[str, list[Candidate]], Counter]:
    """A model's usable answers per prompt key, from its answer and score files, and the counts of
    answers that take no part. Scores must be for the answers on disk (else: score again)."""
    answers = read_rows(answer_path(out, model), f"answers of {model}", check_answer_row)
    spath = score_path(out, scorer, model)
    scores = {key(r["question_id"]): r for r in read_rows(spath, f"scores of {model} by {scorer}", check_score_row)}
    cands, counts = {}, Counter()
    for row in answers:
        k = key(row["question_id"])
        s = scores.get(k)
        if s is None or s.get("answer_id") != row["answer_id"]:
            raise PivotfuseError(f"{spath}: no score for the current answers to question {row['question_id']!r} "
                                 f"of {model}; run the scoring again")
        texts = [c["turns"][0] for c in row["choices"]]
        if len(s["scores"]) != len(texts):
            raise PivotfuseError(f"{spath}: question {row['question_id']!r} has {len(s['scores'])} scores for "
                                 f"{len(texts)} answers")
        kept, dropped = usable(model, texts, s["scores"])
        cands[k] = kept
        counts.update(dropped)
        counts["answers"] += len(texts)
    return cands, counts


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def build_preference_data(prompts: list[Prompt], samples: str | Path, scorer: str, sources: list[str],
                          out: str | Path, cfg: PairConfig, target: str | None = None) -> dict[str, Any]:
    """Write `OUT/sft.jsonl` and `OUT/dpo.jsonl` (and, with `target`, the model whose own samples
    give WRPO's y_wt / y_l, `OUT/wrpo.jsonl`) from the answers under `samples` scored by `scorer`,
    plus `OUT/build_report.json` (rows kept, drops by reason, answers that took no part)."""
    if not sources:
        raise PivotfuseError("build: no sources given")
    if len(set(sources)) != len(sources) or target in sources:
        raise PivotfuseError(f"build: sources {sources} and target {target!r} must be distinct names")
    cands: dict[str, dict[str, list[Candidate]]] = {}
    answers: dict[str, dict[str, int]] = {}
    for s in sources:
        per_prompt, counts = load_candidates(samples, scorer, s)
        answers[s] = dict(counts)
        for k, cs in per_prompt.items():
            cands.setdefault(k, {})[s] = cs
    target_cands = None
    if target is not None:
        per_prompt, counts = load_candidates(samples, scorer, target)
        answers[target] = dict(counts)
        target_cands = per_prompt
    built = build_rows(prompts, cands, sources, cfg, target_cands)
    report = {"scorer": scorer, "sources": sources, "target": target, "answers": answers, **built["report"]}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "sft.jsonl", built["sft"])
    _write_jsonl(out / "dpo.jsonl", built["dpo"])
    if built["wrpo"] is not None:
        _write_jsonl(out / "wrpo.jsonl", built["wrpo"])
    write_text(out / "build_report.json", json.dumps(report, indent=1) + "\n")
    return report

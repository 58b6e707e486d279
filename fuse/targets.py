"""Training rows for one (pivot, source) pair: the pivot's tokens, labels and fused sparse targets.

For each conversation of the pivot's logit store: the pivot's full token sequence is rebuilt from
the stored text (same tokenizer call as extraction, same truncation), its scored tokens become
the labels, and the fused top-k target of each scored token is stored *compactly*: row i of
`target_ids`/`target_logprobs` belongs to the i-th labelled position (the collator scatters
them back), so prompts cost nothing and log-probs stay float16.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from core.errors import PivotfuseError
from fuse.fusion import FusedTargets, TeacherView, fuse_sequence, translate_topk
from fuse.positions import END, Enders, content_ranges, pair_positions, reply_keys, token_chars, token_replies
from fuse.project import PivotProjector, span_translate
from fuse.surface import TokenText
from fuse.store import LogitStore, TeacherRecord


@dataclass
class FusionStats:
    """Counts for the fusion report (summed over conversations)."""

    conversations: int = 0
    source_missing: int = 0  # conversations the source store skipped: pivot-only targets
    compared: int = 0  # conversations scored by both models
    positions: int = 0  # pivot scored tokens
    paired: int = 0  # ... with a source distribution at the same character boundary
    same_text: int = 0  # ... whose source gold token has the same text as the pivot's
    from_source: int = 0  # positions whose target used the source's distribution
    fallback: int = 0  # positions where the source was chosen but had no distribution
    winners: Counter = field(default_factory=Counter)  # per conversation: pivot / source / mixed
    source_weight: float = 0.0  # summed per-conversation share of the source
    pivot_ce: float = 0.0  # summed per-conversation CE per character
    source_ce: float = 0.0
    by_domain: dict = field(default_factory=dict)  # domain -> Counter(conversations, source_wins)

    def as_dict(self) -> dict[str, Any]:
        n, p, c = max(self.conversations, 1), max(self.positions, 1), max(self.compared, 1)
        return {"conversations": self.conversations, "source_missing": self.source_missing, "compared": self.compared,
                "positions": self.positions, "paired": self.paired, "coverage": self.paired / p,
                "same_text": self.same_text, "same_text_share": self.same_text / p,
                "from_source": self.from_source, "from_source_share": self.from_source / p,
                "fallback": self.fallback, "winners": dict(self.winners),
                "mean_source_weight": self.source_weight / n, "mean_pivot_ce_per_char": self.pivot_ce / c,
                "mean_source_ce_per_char": self.source_ce / c,
                "by_domain": {d: dict(c) for d, c in sorted(self.by_domain.items())}}


def seq_ce(rec: TeacherRecord) -> float:
    """NLL per character of reply text (ce is per token, from float32 log-probs)."""
    return float(rec.ce) * rec.n_tokens / max(rec.n_chars, 1)


def pivot_view(rec: TeacherRecord, chars: np.ndarray) -> TeacherView:
    return TeacherView(ids=rec.topk_ids.astype(np.int32), logprobs=rec.topk_logprobs.astype(np.float32),
                       token_ce=(-rec.gold_logprobs.astype(np.float32) / chars).astype(np.float32),
                       seq_ce=seq_ce(rec), aligned=np.ones(rec.n_tokens, dtype=bool))


def source_view(rec: TeacherRecord, src_index: np.ndarray, chars: np.ndarray, vocab_map: np.ndarray) -> TeacherView:
    """The source at the pivot's positions, FuseChat's way: its top-k at the paired position
    (`src_index[t]`, −1 = none) mapped id by id through the vocabulary map."""
    aligned = src_index >= 0
    rows = np.clip(src_index, 0, None)
    ids, lp = translate_topk(rec.topk_ids[rows], rec.topk_logprobs[rows].astype(np.float32), vocab_map)
    aligned &= (ids >= 0).any(axis=1)  # nothing of the row maps into the pivot vocabulary
    ce = np.where(aligned, -rec.gold_logprobs[rows].astype(np.float32) / chars[rows], np.nan)
    return TeacherView(ids=ids, logprobs=lp, token_ce=ce.astype(np.float32), seq_ce=seq_ce(rec), aligned=aligned)


@dataclass
class SpanTranslator:
    """What span translation needs besides the records (see `fuse.project`)."""

    projector: PivotProjector  # text → pivot id
    source_text: TokenText  # source id → text
    eos: tuple[Enders, Enders]  # end-of-turn tokens of the pivot's and the source's template

    def view(self, p_rec: TeacherRecord, s_rec: TeacherRecord, pair: np.ndarray, p_chars: np.ndarray,
             vocab_map: np.ndarray, k: int) -> TeacherView:
        """The source's distribution over pivot tokens at each paired pivot position; its per-token
        CE is −log of the probability it gives the pivot's gold token, per character."""
        p_keys = reply_keys(p_rec.text, p_rec.spans, p_rec.assistant_spans, self.eos[0])
        p_end = np.array([key is not None and key[1] == END for key in p_keys], dtype=bool)
        ids, lp = span_translate(
            p_rec.text, p_rec.spans, content_ranges(p_rec.text, p_rec.assistant_spans, self.eos[0]),
            token_replies(p_rec.spans, p_rec.assistant_spans), p_end,
            s_rec.text, s_rec.spans, content_ranges(s_rec.text, s_rec.assistant_spans, self.eos[1]),
            token_replies(s_rec.spans, s_rec.assistant_spans), s_rec.topk_ids,
            s_rec.topk_logprobs.astype(np.float32), s_rec.token_ids, s_rec.gold_logprobs.astype(np.float32),
            pair, self.source_text, self.projector, vocab_map, k)
        aligned = (pair >= 0) & (ids >= 0).any(axis=1)
        gold_lp = np.where(ids == p_rec.token_ids[:, None], lp, -np.inf).max(axis=1)  # (n,)
        ce = np.where(aligned, -gold_lp / p_chars, np.nan).astype(np.float32)
        return TeacherView(ids=ids, logprobs=lp, token_ce=ce, seq_ce=seq_ce(s_rec), aligned=aligned)


def scored_positions(rec: TeacherRecord, input_ids: list[int], offsets: list[tuple[int, int]]) -> np.ndarray:
    """(n,) positions of the record's scored tokens in the re-tokenised sequence."""
    out = np.empty(rec.n_tokens, dtype=np.int64)
    t, L = 1, len(input_ids)
    for j in range(rec.n_tokens):
        s, e = int(rec.spans[j, 0]), int(rec.spans[j, 1])
        while t < L and (input_ids[t] != rec.token_ids[j] or tuple(offsets[t]) != (s, e)):
            t += 1
        if t >= L:
            raise PivotfuseError(f"conversation {rec.id}: the pivot tokenizer does not reproduce the stored tokens "
                                 "(store made with another tokenizer?); re-extract the pivot")
        out[j] = t
        t += 1
    return out


def make_row(rec: TeacherRecord, tokenizer: Any, fused: FusedTargets) -> dict[str, Any]:
    enc = tokenizer(rec.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"][: rec.seq_len])
    pos = scored_positions(rec, ids, enc["offset_mapping"][: rec.seq_len])
    labels = np.full(len(ids), -100, dtype=np.int64)
    labels[pos] = rec.token_ids
    return {"id": rec.id, "domain": rec.domain or "", "input_ids": ids, "labels": labels.tolist(),
            "target_ids": fused.ids.astype(np.int32), "target_logprobs": fused.logprobs.astype(np.float16)}


def store_lookup(store: LogitStore) -> Callable[[int], TeacherRecord | None]:
    """Corpus row → that conversation's record in `store` (None when the store skipped it)."""
    by_index = {int(i): r for r, i in enumerate(store.dataset().data.column("index").to_pylist())}
    return lambda index: store[by_index[index]] if index in by_index else None


def fusion_rows(pivot: Iterable[TeacherRecord], source: Callable[[int], TeacherRecord | None] | None,
                tokenizer: Any, vocab_map: np.ndarray | None, method: str, k: int, fallback: str,
                eos: tuple[Enders, Enders], stats: FusionStats,
                span: SpanTranslator | None = None) -> Iterator[dict[str, Any]]:
    """Training rows for the pivot's records; `source(index)` gives the source's record of the same
    conversation (None: skipped by the source). `source=None`: the pivot's own targets. With
    `span`, the source's distributions are span-translated (`fuse.project`), else mapped id by id."""
    if source is not None and vocab_map is None:
        raise ValueError("a source needs a vocabulary map")
    for p_rec in pivot:
        stats.conversations += 1
        stats.positions += p_rec.n_tokens
        p_chars = token_chars(p_rec.text, p_rec.spans, p_rec.assistant_spans, eos[0])
        p_view = pivot_view(p_rec, p_chars)
        s_view = None
        if source is not None:
            s_rec = source(p_rec.index)
            if s_rec is None:
                stats.source_missing += 1
            else:
                s_chars = token_chars(s_rec.text, s_rec.spans, s_rec.assistant_spans, eos[1])
                pair = pair_positions(reply_keys(p_rec.text, p_rec.spans, p_rec.assistant_spans, eos[0]),
                                      reply_keys(s_rec.text, s_rec.spans, s_rec.assistant_spans, eos[1]))
                s_view = span.view(p_rec, s_rec, pair, p_chars, vocab_map, k) if span is not None \
                    else source_view(s_rec, pair, s_chars, vocab_map)
                stats.paired += int(s_view.aligned.sum())
                stats.same_text += sum(
                    p_rec.text[p_rec.spans[j, 0]:p_rec.spans[j, 1]] == s_rec.text[s_rec.spans[i, 0]:s_rec.spans[i, 1]]
                    for j, i in enumerate(pair.tolist()) if i >= 0)
                stats.compared += 1
                stats.pivot_ce += p_view.seq_ce
                stats.source_ce += s_view.seq_ce
        fused = fuse_sequence(method, p_view, s_view, p_rec.token_ids, k, fallback)
        stats.from_source += int(fused.from_source.sum())
        stats.fallback += int(fused.fallback.sum())
        stats.winners[fused.winner] += 1
        stats.source_weight += fused.source_weight
        dom = stats.by_domain.setdefault(p_rec.domain or "-", Counter())
        dom["conversations"] += 1
        dom["source_wins"] += int(fused.winner == "source")
        dom["from_source_positions"] += int(fused.from_source.sum())
        dom["positions"] += p_rec.n_tokens
        yield make_row(p_rec, tokenizer, fused)

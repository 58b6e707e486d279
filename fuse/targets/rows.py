"""Training rows for one (pivot, source) pair: the pivot's tokens, labels and fused sparse targets.

For each conversation of the pivot's logit store: the pivot's full token sequence is rebuilt from
the stored text (same tokenizer call as extraction, same truncation), its scored tokens become
the labels, and the fused top-k target of each scored token is stored *compactly*: row i of
`target_ids`/`target_logprobs` belongs to the i-th labelled position (the collator scatters
them back), so prompts cost nothing and log-probs stay float16.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from core.atomic import publish_folder
from core.errors import PivotfuseError
from core.files import need, read_json
from core.loading import load_tokenizer
from fuse.align.surface import TokenText
from fuse.extract.store import LogitStore, TeacherRecord
from fuse.targets.fusion import FusedTargets, TeacherView, fuse_sequence, seq_ce, translate_topk
from fuse.targets.fusion_multi import MultiFused
from fuse.targets.pairing import Enders, pair_positions, reply_keys, token_chars
from fuse.targets.translate import PivotProjector, SpanTranslator

ROWS_VERSION = 3  # bump when the training rows change meaning (it is in their fingerprint)


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


def make_row(rec: TeacherRecord, tokenizer: Any, fused: FusedTargets | MultiFused) -> dict[str, Any]:
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
    `span`, the source's distributions are span-translated (`fuse.targets.translate`), else mapped id by id."""
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


def cached_rows(work: Path, fingerprint: str, build: Callable[[], tuple[Any, dict]]) -> tuple[Any, dict]:
    """The training rows, cached in `work/rows` under their fingerprint (built by the main process)."""
    import datasets

    folder = work / "rows"
    meta = folder / "pivotfuse_rows.json"
    saved = read_json(meta) if meta.is_file() else {}
    if saved.get("fingerprint") == fingerprint:
        return datasets.load_from_disk(str(folder)), need(saved, "stats", lambda v: isinstance(v, dict), "a mapping",
                                                          str(meta))
    ds, stats = build()
    tmp = work / "rows.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(str(tmp))
    (tmp / "pivotfuse_rows.json").write_text(json.dumps({"fingerprint": fingerprint, "stats": stats}, indent=1))
    publish_folder(tmp, folder)
    return datasets.load_from_disk(str(folder)), stats


def build_rows(pivot_store: LogitStore, source_store: LogitStore | None, pivot_path: str, source_path: str | None,
               vocab_map: np.ndarray | None, *, method: str, k: int, fallback: str, translate: str,
               eos: tuple[Enders, Enders]) -> tuple[Any, dict]:
    """The dataset of training rows (`fusion_rows` over the pivot's store, in chunks of 1024 rows)
    and the fusion statistics. `translate`: 'span' (span translation) or 'vocab' (the map, id by id)."""
    import datasets
    from tqdm.auto import tqdm

    tok = load_tokenizer(pivot_path, model=True, fast=True)
    stats = FusionStats()
    features = datasets.Features({
        "id": datasets.Value("string"), "domain": datasets.Value("string"),
        "input_ids": datasets.Sequence(datasets.Value("int32")), "labels": datasets.Sequence(datasets.Value("int32")),
        "target_ids": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
        "target_logprobs": datasets.Sequence(datasets.Sequence(datasets.Value("float16")))})
    chunks, chunk = [], []
    lookup = store_lookup(source_store) if source_store is not None else None
    span = None
    if source_store is not None and translate == "span":
        span = SpanTranslator(PivotProjector(tok), TokenText(load_tokenizer(source_path, model=True, fast=True)), eos)
    rows = fusion_rows(pivot_store, lookup, tok, vocab_map, method, k, fallback, eos, stats, span)
    for row in tqdm(rows, total=len(pivot_store), desc="fuse targets", unit="conv"):
        chunk.append(row)
        if len(chunk) == 1024:  # bounded memory: a chunk of rows at a time
            chunks.append(datasets.Dataset.from_list(chunk, features=features))
            chunk = []
    if chunk or not chunks:
        chunks.append(datasets.Dataset.from_list(chunk, features=features))
    return datasets.concatenate_datasets(chunks), stats.as_dict()

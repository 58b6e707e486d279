"""Training rows for FuseLLM mode: the pivot's tokens and labels (as `fuse.targets.rows` makes them)
with one target per position fused from the pivot and K sources at once (`fusion_multi`).

Each source is seen exactly as pairwise fusion sees it: its record of the conversation from its own
store, paired with the pivot's positions (`pair_positions`) and carried onto pivot tokens by its
`SpanTranslator` or id by id through its vocabulary map (`rows.source_view`). A source whose store
skipped a conversation is None there and drops out of that conversation's choice. The pairwise
path (`rows.fusion_rows`, `rows.build_rows`) is not used here and not changed by this module.

`build_rows_multi` works as `rows.build_rows` does: fixed shards of `rows.ROWS_SHARD` conversations
over worker processes (`core.workers.ordered_map`), each shard's rows one Arrow batch appended to the
rows file in corpus order, each shard's statistics merged in the same order, so the rows and the
statistics are the same for any number of processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from core.loading import load_tokenizer
from fuse.align.surface import TokenText
from fuse.extract.store import LogitStore, TeacherRecord
from fuse.targets.fusion_multi import Contributions, MultiFused, fuse_multi
from fuse.targets.pairing import Enders, pair_positions, reply_keys, token_chars
from fuse.targets.rows import encode, make_row, pivot_view, row_tokens, run_row_shards, source_view, store_lookup
from fuse.targets.rows_arrow import batch_bytes, rows_batch
from fuse.targets.translate import PivotProjector, SpanTranslator

ROWS_MULTI_VERSION = 1  # bump when FuseLLM-mode rows change meaning (in their fingerprint, beside rows.ROWS_VERSION)


@dataclass
class SourceInput:
    """One source of a FuseLLM-mode build: its records by corpus row and how to carry them over."""

    name: str
    lookup: Callable[[int], TeacherRecord | None]  # corpus row → its record (None: the store skipped it)
    vocab_map: np.ndarray  # source id → pivot id, −1 = unmapped
    eos: Enders  # end-of-turn tokens of the source's template
    span: SpanTranslator | None = None  # span translation; None: the map, id by id


@dataclass
class SourceCounts:
    """Per source, summed over conversations (the pairwise `FusionStats` fields that apply)."""

    missing: int = 0  # conversations its store skipped: it took no part in them
    compared: int = 0  # conversations it has a record of
    paired: int = 0  # pivot positions where it has an aligned distribution
    positions: int = 0  # pivot positions of the conversations it has a record of
    ce: float = 0.0  # summed per-conversation CE per character
    pivot_ce: float = 0.0  # the pivot's, over the same conversations

    def merge(self, other: "SourceCounts") -> None:
        """Add `other`'s counts (the next shard's); the CE sums add as floats (see `MultiFusionStats.merge`)."""
        self.missing += other.missing
        self.compared += other.compared
        self.paired += other.paired
        self.positions += other.positions
        self.ce += other.ce
        self.pivot_ce += other.pivot_ce

    def as_dict(self) -> dict[str, Any]:
        c = max(self.compared, 1)
        return {"missing": self.missing, "compared": self.compared, "paired": self.paired,
                "coverage": self.paired / max(self.positions, 1), "mean_ce_per_char": self.ce / c,
                "mean_pivot_ce_per_char": self.pivot_ce / c}


@dataclass
class MultiFusionStats:
    """Counts for the FuseLLM-mode fusion report; `contributions` per domain (`fusion_multi`)."""

    names: tuple[str, ...]  # the pivot, then the sources in their order
    conversations: int = 0
    positions: int = 0
    fallback: int = 0  # positions where the fallback stood in for a source without a distribution
    sources: dict[str, SourceCounts] = field(init=False)
    contributions: Contributions = field(init=False)

    def __post_init__(self) -> None:
        self.sources = {n: SourceCounts() for n in self.names[1:]}
        self.contributions = Contributions(self.names)

    def merge(self, other: "MultiFusionStats") -> None:
        """Add the statistics of the next shard of the corpus to these.

        Counts add exactly; the float sums (CE, weights) add a shard's partial sum at a time, so the
        result depends on where the shards are cut (fixed: `rows.ROWS_SHARD`) and on their order
        (the corpus order), never on how many processes made them.
        """
        if other.names != self.names:
            raise ValueError(f"statistics of {list(other.names)} cannot merge into {list(self.names)}")
        self.conversations += other.conversations
        self.positions += other.positions
        self.fallback += other.fallback
        for name, counts in other.sources.items():
            self.sources[name].merge(counts)
        self.contributions.merge(other.contributions)

    def as_dict(self) -> dict[str, Any]:
        return {"conversations": self.conversations, "positions": self.positions, "fallback": self.fallback,
                "sources": {n: c.as_dict() for n, c in self.sources.items()},
                "contributions": self.contributions.as_dict()}


def fuse_conversation_multi(p_rec: TeacherRecord, s_recs: list[TeacherRecord | None], sources: list[SourceInput],
                            method: str, k: int, fallback: str, pivot_eos: Enders,
                            stats: MultiFusionStats) -> MultiFused:
    """The fused target of one conversation over the pivot and every present source (`s_recs[j]`:
    source j's record of it, None when its store skipped it); its counts are added to `stats`."""
    stats.conversations += 1
    stats.positions += p_rec.n_tokens
    p_chars = token_chars(p_rec.text, p_rec.spans, p_rec.assistant_spans, pivot_eos)
    p_view = pivot_view(p_rec, p_chars)
    p_keys = reply_keys(p_rec.text, p_rec.spans, p_rec.assistant_spans, pivot_eos)  # one per conversation
    views = []
    for src, s_rec in zip(sources, s_recs):
        counts = stats.sources[src.name]
        if s_rec is None:
            counts.missing += 1
            views.append(None)
            continue
        pair = pair_positions(p_keys, reply_keys(s_rec.text, s_rec.spans, s_rec.assistant_spans, src.eos))
        if src.span is not None:
            view = src.span.view(p_rec, s_rec, pair, p_chars, src.vocab_map, k)
        else:
            s_chars = token_chars(s_rec.text, s_rec.spans, s_rec.assistant_spans, src.eos)
            view = source_view(s_rec, pair, s_chars, src.vocab_map)
        counts.compared += 1
        counts.paired += int(view.aligned.sum())
        counts.positions += p_rec.n_tokens
        counts.ce += view.seq_ce
        counts.pivot_ce += p_view.seq_ce
        views.append(view)
    fused = fuse_multi(method, p_view, views, p_rec.token_ids, k, fallback)
    stats.fallback += int(fused.fallback.sum())
    stats.contributions.add(p_rec.domain or "-", fused)
    return fused


def fusion_rows_multi(pivot: Iterable[TeacherRecord], sources: list[SourceInput], tokenizer: Any, method: str,
                      k: int, fallback: str, pivot_eos: Enders, stats: MultiFusionStats) -> Iterator[dict[str, Any]]:
    """Training rows for the pivot's records, targets fused over the pivot and every source present."""
    if not sources:
        raise ValueError("FuseLLM mode needs at least one source")
    for p_rec in pivot:
        s_recs = [src.lookup(p_rec.index) for src in sources]
        fused = fuse_conversation_multi(p_rec, s_recs, sources, method, k, fallback, pivot_eos, stats)
        yield make_row(p_rec, tokenizer, fused)


@dataclass
class _MultiWork:
    """A FuseLLM-mode rows worker's state: the stores (memory-mapped), tokenizers, translators, settings."""

    pivot: LogitStore
    sources: list[SourceInput]
    tokenizer: Any
    names: tuple[str, ...]
    method: str
    k: int
    fallback: str
    pivot_eos: Enders


def _multi_setup(pivot_store: str, pivot_path: str, sources: list[tuple[str, str, str, np.ndarray, Enders]],
                 translate: str, pivot_eos: Enders, pivot_name: str, method: str, k: int,
                 fallback: str) -> _MultiWork:
    tok = load_tokenizer(pivot_path, model=True, fast=True, shared=True)  # read only: one load per process
    projector = PivotProjector(tok) if translate == "span" else None  # text → pivot id: the same for every source
    inputs = []
    for name, store, path, vmap, eos in sources:
        span = SpanTranslator(projector, TokenText(load_tokenizer(path, model=True, fast=True, shared=True)),
                              (pivot_eos, eos)) if projector is not None else None
        inputs.append(SourceInput(name, store_lookup(LogitStore(store)), vmap, eos, span))
    names = (pivot_name,) + tuple(s[0] for s in sources)
    return _MultiWork(LogitStore(pivot_store), inputs, tok, names, method, k, fallback, pivot_eos)


def _multi_shard(work: _MultiWork, task: tuple[int, int]) -> tuple[bytes, MultiFusionStats, dict[str, float]]:
    """The rows of pivot records lo..hi as one Arrow batch (IPC bytes), their statistics, phase seconds."""
    lo, hi = task
    t0 = time.perf_counter()
    recs = [work.pivot[i] for i in range(lo, hi)]
    s_recs = [[src.lookup(r.index) for src in work.sources] for r in recs]
    t1 = time.perf_counter()
    stats = MultiFusionStats(work.names)
    fused = [fuse_conversation_multi(r, s, work.sources, work.method, work.k, work.fallback, work.pivot_eos, stats)
             for r, s in zip(recs, s_recs)]
    t2 = time.perf_counter()
    toks = [row_tokens(r, ids, off) for r, (ids, off) in zip(recs, encode(work.tokenizer, [r.text for r in recs]))]
    t3 = time.perf_counter()
    batch = rows_batch([r.id for r in recs], [r.domain or "" for r in recs], [t[0] for t in toks],
                       [t[1] for t in toks], [f.ids for f in fused], [f.logprobs for f in fused])
    data = batch_bytes(batch)
    t4 = time.perf_counter()
    return data, stats, {"read": t1 - t0, "fuse": t2 - t1, "tokenise": t3 - t2, "write": t4 - t3}


def build_rows_multi(pivot_store: LogitStore, pivot_path: str,
                     sources: list[tuple[str, LogitStore, str, np.ndarray, Enders]], *, method: str, k: int,
                     fallback: str, translate: str, pivot_eos: Enders, pivot_name: str = "pivot",
                     workers: int | None = 1, out: Path | None = None, timings: dict[str, float] | None = None,
                     progress: bool = True, shard_size: int = 0) -> tuple[Any, dict]:
    """The dataset of FuseLLM-mode training rows and their statistics. `sources`: per source (name,
    store, model folder, vocabulary map, end-of-turn tokens); `translate` as in `rows.build_rows`;
    `pivot_name` names teacher 0 in the contributions. `workers`, `out`, `timings`, `shard_size` as
    in `rows.build_rows`: shards of `shard_size` conversations (default `rows.ROWS_SHARD`) over
    `workers` processes, written to the Arrow file `out` in corpus order (None: kept in memory)."""
    if not sources:
        raise ValueError("FuseLLM mode needs at least one source")
    stats = MultiFusionStats((pivot_name,) + tuple(s[0] for s in sources))
    args = (str(pivot_store.path), pivot_path, [(name, str(store.path), path, vmap, eos)
                                                for name, store, path, vmap, eos in sources],
            translate, pivot_eos, pivot_name, method, k, fallback)
    # stats.merge in shard order: the float sums do not depend on the worker count
    ds = run_row_shards(len(pivot_store), _multi_shard, _multi_setup, args, stats.merge, workers=workers, out=out,
                        timings=timings, progress=progress, shard_size=shard_size, desc="fuse targets (FuseLLM mode)")
    return ds, stats.as_dict()

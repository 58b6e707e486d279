"""Training rows for FuseLLM mode: the pivot's tokens and labels (as `fuse.targets.rows` makes them)
with one target per position fused from the pivot and K sources at once (`fusion_multi`).

Each source is seen exactly as pairwise fusion sees it: its record of the conversation from its own
store, paired with the pivot's positions (`pair_positions`) and carried onto pivot tokens by its
`SpanTranslator` or id by id through its vocabulary map (`rows.source_view`). A source whose store
skipped a conversation is None there and drops out of that conversation's choice. The pairwise
path (`rows.fusion_rows`, `rows.build_rows`) is not used here and not changed by this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from core.loading import load_tokenizer
from fuse.align.surface import TokenText
from fuse.extract.store import LogitStore, TeacherRecord
from fuse.targets.fusion_multi import Contributions, fuse_multi
from fuse.targets.pairing import Enders, pair_positions, reply_keys, token_chars
from fuse.targets.rows import make_row, pivot_view, source_view, store_lookup
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

    def as_dict(self) -> dict[str, Any]:
        return {"conversations": self.conversations, "positions": self.positions, "fallback": self.fallback,
                "sources": {n: c.as_dict() for n, c in self.sources.items()},
                "contributions": self.contributions.as_dict()}


def fusion_rows_multi(pivot: Iterable[TeacherRecord], sources: list[SourceInput], tokenizer: Any, method: str,
                      k: int, fallback: str, pivot_eos: Enders, stats: MultiFusionStats) -> Iterator[dict[str, Any]]:
    """Training rows for the pivot's records, targets fused over the pivot and every source present."""
    if not sources:
        raise ValueError("FuseLLM mode needs at least one source")
    for p_rec in pivot:
        stats.conversations += 1
        stats.positions += p_rec.n_tokens
        p_chars = token_chars(p_rec.text, p_rec.spans, p_rec.assistant_spans, pivot_eos)
        p_view = pivot_view(p_rec, p_chars)
        p_keys = reply_keys(p_rec.text, p_rec.spans, p_rec.assistant_spans, pivot_eos)  # one per conversation
        views = []
        for src in sources:
            counts = stats.sources[src.name]
            s_rec = src.lookup(p_rec.index)
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
        yield make_row(p_rec, tokenizer, fused)


def build_rows_multi(pivot_store: LogitStore, pivot_path: str,
                     sources: list[tuple[str, LogitStore, str, np.ndarray, Enders]], *, method: str, k: int,
                     fallback: str, translate: str, pivot_eos: Enders, pivot_name: str = "pivot") -> tuple[Any, dict]:
    """The dataset of FuseLLM-mode training rows and their statistics. `sources`: per source (name,
    store, model folder, vocabulary map, end-of-turn tokens); `translate` as in `rows.build_rows`;
    `pivot_name` names teacher 0 in the contributions."""
    import datasets
    from tqdm.auto import tqdm

    tok = load_tokenizer(pivot_path, model=True, fast=True)
    projector = PivotProjector(tok) if translate == "span" else None  # text → pivot id: the same for every source
    inputs = []
    for name, store, path, vmap, eos in sources:
        span = SpanTranslator(projector, TokenText(load_tokenizer(path, model=True, fast=True)), (pivot_eos, eos)) \
            if projector is not None else None
        inputs.append(SourceInput(name, store_lookup(store), vmap, eos, span))
    stats = MultiFusionStats((pivot_name,) + tuple(s[0] for s in sources))
    # the features of `rows.build_rows`: the trainer reads both kinds of rows the same way
    features = datasets.Features({
        "id": datasets.Value("string"), "domain": datasets.Value("string"),
        "input_ids": datasets.Sequence(datasets.Value("int32")), "labels": datasets.Sequence(datasets.Value("int32")),
        "target_ids": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
        "target_logprobs": datasets.Sequence(datasets.Sequence(datasets.Value("float16")))})
    chunks, chunk = [], []
    rows = fusion_rows_multi(pivot_store, inputs, tok, method, k, fallback, pivot_eos, stats)
    for row in tqdm(rows, total=len(pivot_store), desc="fuse targets (FuseLLM mode)", unit="conv"):
        chunk.append(row)
        if len(chunk) == 1024:  # bounded memory: a chunk of rows at a time
            chunks.append(datasets.Dataset.from_list(chunk, features=features))
            chunk = []
    if chunk or not chunks:
        chunks.append(datasets.Dataset.from_list(chunk, features=features))
    return datasets.concatenate_datasets(chunks), stats.as_dict()

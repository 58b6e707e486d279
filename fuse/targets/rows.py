"""Training rows for one (pivot, source) pair: the pivot's tokens, labels and fused sparse targets.

For each conversation of the pivot's logit store: the pivot's full token sequence is rebuilt from
the stored text (same tokenizer call as extraction, same truncation), its scored tokens become
the labels, and the fused top-k target of each scored token is stored *compactly*: row i of
`target_ids`/`target_logprobs` belongs to the i-th labelled position (the collator scatters
them back), so prompts cost nothing and log-probs stay float16.

`build_rows` works a shard of conversations at a time over worker processes (`core.workers`):
each shard is fused with whole-array operations per conversation, its texts tokenised in one call,
and its rows assembled as one Arrow record batch (`fuse.targets.rows_arrow`); the batches are
appended to one file in shard order, so memory stays bounded and the rows (and the statistics,
summed conversation by conversation in corpus order) are the same for any number of processes.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from core.atomic import publish_folder
from core.errors import PivotfuseError
from core.files import need, read_json
from core.loading import load_tokenizer
from core.workers import ordered_map, resolve_workers
from fuse.align.surface import TokenText
from fuse.extract.store import LogitStore, TeacherRecord
from fuse.targets.fusion import FusedTargets, TeacherView, fuse_sequence, seq_ce, translate_topk
from fuse.targets.fusion_multi import MultiFused
from fuse.targets.pairing import Enders, key_codes, pair_codes, token_chars
from fuse.targets.rows_arrow import ROWS_FILE, RowsWriter, batch_bytes, load_rows, read_batches, rows_batch
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

    def add(self, c: "ConvStats") -> None:
        """One conversation's counts, summed in the order the per-conversation loop always used."""
        self.conversations += 1
        self.positions += c.positions
        if c.missing:
            self.source_missing += 1
        if c.compared:
            self.paired += c.paired
            self.same_text += c.same_text
            self.compared += 1
            self.pivot_ce += c.pivot_ce
            self.source_ce += c.source_ce
        self.from_source += c.from_source
        self.fallback += c.fallback
        self.winners[c.winner] += 1
        self.source_weight += c.source_weight
        dom = self.by_domain.setdefault(c.domain or "-", Counter())
        dom["conversations"] += 1
        dom["source_wins"] += int(c.winner == "source")
        dom["from_source_positions"] += c.from_source
        dom["positions"] += c.positions

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


@dataclass
class ConvStats:
    """What one conversation adds to `FusionStats` (workers hand these back in corpus order)."""

    domain: str | None
    positions: int
    missing: bool = False  # the source skipped it
    compared: bool = False  # both models scored it
    paired: int = 0
    same_text: int = 0
    pivot_ce: float = 0.0
    source_ce: float = 0.0
    from_source: int = 0
    fallback: int = 0
    winner: str = "pivot"
    source_weight: float = 0.0


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


def scored_positions(rec: TeacherRecord, input_ids: Any, offsets: Any) -> np.ndarray:
    """(n,) positions of the record's scored tokens in the re-tokenised sequence: for each scored
    token in order, the next position (from 1) with its id and character span."""
    ids = np.asarray(input_ids, dtype=np.int64)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    n, L = rec.n_tokens, len(ids)
    if n and L > 1 and ids.max() < 1 << 21 and off.max(initial=0) < 1 << 21 and rec.spans.max(initial=0) < 1 << 21:
        # The first position of each (id, span) key: when these increase along the record they are
        # exactly the positions the scan below finds (each the first match after the previous one).
        seq = (ids[1:] << 42) | (off[1:, 0] << 21) | off[1:, 1]
        want = (rec.token_ids.astype(np.int64) << 42) | (rec.spans[:, 0].astype(np.int64) << 21) | rec.spans[:, 1]
        keys, first = np.unique(seq, return_index=True)
        at = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
        if (keys[at] == want).all():
            pos = first[at] + 1
            if n == 1 or (np.diff(pos) > 0).all():
                return pos
    out = np.empty(n, dtype=np.int64)
    t = 1
    for j in range(n):
        s, e = int(rec.spans[j, 0]), int(rec.spans[j, 1])
        while t < L and (ids[t] != rec.token_ids[j] or off[t, 0] != s or off[t, 1] != e):
            t += 1
        if t >= L:
            raise PivotfuseError(f"conversation {rec.id}: the pivot tokenizer does not reproduce the stored tokens "
                                 "(store made with another tokenizer?); re-extract the pivot")
        out[j] = t
        t += 1
    return out


def encode(tokenizer: Any, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, offsets (L, 2)) of each text, as `tokenizer(text, add_special_tokens=False)` gives them,
    the texts tokenised in one call."""
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    encodings = getattr(enc, "encodings", None)
    if encodings:
        return [(np.asarray(e.ids, dtype=np.int64), np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2))
                for e in encodings]
    return [(np.asarray(i, dtype=np.int64), np.asarray(o, dtype=np.int64).reshape(-1, 2))
            for i, o in zip(enc["input_ids"], enc["offset_mapping"])]


def row_tokens(rec: TeacherRecord, ids: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(input ids, labels) of a record's row from its text's tokenisation: truncated as extraction
    truncated, −100 but at the scored tokens."""
    ids, offsets = ids[: rec.seq_len], offsets[: rec.seq_len]
    labels = np.full(len(ids), -100, dtype=np.int64)
    labels[scored_positions(rec, ids, offsets)] = rec.token_ids
    return ids, labels


def make_row(rec: TeacherRecord, tokenizer: Any, fused: FusedTargets | MultiFused) -> dict[str, Any]:
    (ids, offsets), = encode(tokenizer, [rec.text])
    ids, labels = row_tokens(rec, ids, offsets)
    return {"id": rec.id, "domain": rec.domain or "", "input_ids": ids.tolist(), "labels": labels.tolist(),
            "target_ids": fused.ids.astype(np.int32), "target_logprobs": fused.logprobs.astype(np.float16)}


def store_lookup(store: LogitStore) -> Callable[[int], TeacherRecord | None]:
    """Corpus row → that conversation's record in `store` (None when the store skipped it)."""
    by_index = {int(i): r for r, i in enumerate(store.dataset().data.column("index").to_pylist())}
    return lambda index: store[by_index[index]] if index in by_index else None


@dataclass
class RowSettings:
    """How the rows of one pair are made, besides the records."""

    vocab_map: np.ndarray | None
    method: str
    k: int
    fallback: str
    eos: tuple[Enders, Enders]
    span: SpanTranslator | None = None


def fuse_conversation(p_rec: TeacherRecord, s_rec: TeacherRecord | None, with_source: bool,
                      cfg: RowSettings) -> tuple[FusedTargets, ConvStats]:
    """The fused targets of one conversation and its statistics (`with_source`: a source run, whose
    record of this conversation is `s_rec`, None when the source skipped it)."""
    eos = cfg.eos
    c = ConvStats(domain=p_rec.domain, positions=p_rec.n_tokens)
    p_chars = token_chars(p_rec.text, p_rec.spans, p_rec.assistant_spans, eos[0])
    p_view = pivot_view(p_rec, p_chars)
    s_view = None
    if with_source and s_rec is None:
        c.missing = True
    elif with_source:
        pair = pair_codes(key_codes(p_rec.text, p_rec.spans, p_rec.assistant_spans, eos[0]),
                          key_codes(s_rec.text, s_rec.spans, s_rec.assistant_spans, eos[1]))
        if cfg.span is not None:
            s_view = cfg.span.view(p_rec, s_rec, pair, p_chars, cfg.vocab_map, cfg.k)
        else:
            s_chars = token_chars(s_rec.text, s_rec.spans, s_rec.assistant_spans, eos[1])
            s_view = source_view(s_rec, pair, s_chars, cfg.vocab_map)
        j = np.flatnonzero(pair >= 0)
        p_text, s_text, ps, ss = p_rec.text, s_rec.text, p_rec.spans[j].tolist(), s_rec.spans[pair[j]].tolist()
        c.compared, c.paired, c.pivot_ce, c.source_ce = True, int(s_view.aligned.sum()), p_view.seq_ce, s_view.seq_ce
        c.same_text = sum(p_text[a:b] == s_text[x:y] for (a, b), (x, y) in zip(ps, ss))
    fused = fuse_sequence(cfg.method, p_view, s_view, p_rec.token_ids, cfg.k, cfg.fallback)
    c.from_source, c.fallback = int(fused.from_source.sum()), int(fused.fallback.sum())
    c.winner, c.source_weight = fused.winner, fused.source_weight
    return fused, c


def fusion_rows(pivot: Iterable[TeacherRecord], source: Callable[[int], TeacherRecord | None] | None,
                tokenizer: Any, vocab_map: np.ndarray | None, method: str, k: int, fallback: str,
                eos: tuple[Enders, Enders], stats: FusionStats,
                span: SpanTranslator | None = None) -> Iterator[dict[str, Any]]:
    """Training rows for the pivot's records; `source(index)` gives the source's record of the same
    conversation (None: skipped by the source). `source=None`: the pivot's own targets. With
    `span`, the source's distributions are span-translated (`fuse.targets.translate`), else mapped id by id."""
    if source is not None and vocab_map is None:
        raise ValueError("a source needs a vocabulary map")
    cfg = RowSettings(vocab_map, method, k, fallback, eos, span)
    for p_rec in pivot:
        fused, c = fuse_conversation(p_rec, source(p_rec.index) if source is not None else None,
                                     source is not None, cfg)
        stats.add(c)
        yield make_row(p_rec, tokenizer, fused)


@dataclass
class _RowsWork:
    """A rows worker's state: the stores (memory-mapped), the pivot tokenizer and the settings."""

    pivot: LogitStore
    source: Callable[[int], TeacherRecord | None] | None
    tokenizer: Any
    cfg: RowSettings


def _rows_setup(pivot_store: str, source_store: str | None, pivot_path: str, source_path: str | None,
                vocab_map: np.ndarray | None, method: str, k: int, fallback: str, translate: str,
                eos: tuple[Enders, Enders]) -> _RowsWork:
    tok = load_tokenizer(pivot_path, model=True, fast=True, shared=True)
    source = store_lookup(LogitStore(source_store)) if source_store is not None else None
    span = None
    if source is not None and translate == "span":
        source_tok = load_tokenizer(source_path, model=True, fast=True, shared=True)
        span = SpanTranslator(PivotProjector(tok), TokenText(source_tok), eos)
    return _RowsWork(LogitStore(pivot_store), source, tok, RowSettings(vocab_map, method, k, fallback, eos, span))


def _rows_shard(work: _RowsWork, task: tuple[int, int]) -> tuple[bytes, list[ConvStats], dict[str, float]]:
    """The rows of pivot records lo..hi as one Arrow batch (IPC bytes), their statistics, phase seconds."""
    lo, hi = task
    t0 = time.perf_counter()
    recs = [work.pivot[i] for i in range(lo, hi)]
    sources = [work.source(r.index) for r in recs] if work.source is not None else [None] * len(recs)
    t1 = time.perf_counter()
    done = [fuse_conversation(p, s, work.source is not None, work.cfg) for p, s in zip(recs, sources)]
    t2 = time.perf_counter()
    encoded = encode(work.tokenizer, [r.text for r in recs])
    toks = [row_tokens(r, ids, off) for r, (ids, off) in zip(recs, encoded)]
    t3 = time.perf_counter()
    batch = rows_batch([r.id for r in recs], [r.domain or "" for r in recs], [t[0] for t in toks],
                       [t[1] for t in toks], [f.ids for f, _ in done], [f.logprobs for f, _ in done])
    data = batch_bytes(batch)
    t4 = time.perf_counter()
    return data, [c for _, c in done], {"read": t1 - t0, "fuse": t2 - t1, "tokenise": t3 - t2, "write": t4 - t3}


ROWS_SHARD = 64  # conversations per task: the unit of work per process (not of the result)


def cached_rows(work: Path, fingerprint: str, build: Callable[..., tuple[Any, dict]], *,
                writes: bool = False) -> tuple[Any, dict]:
    """The training rows, cached in `work/rows` under their fingerprint (built by the main process).

    `build()` returns (dataset, stats) and the dataset is saved; with `writes`, `build(folder)`
    writes the rows file into `folder` itself (`build_rows(..., out=folder / ROWS_FILE)`: streamed,
    never whole in memory). The folder is published when complete.
    """
    folder = work / "rows"
    meta = folder / "pivotfuse_rows.json"
    saved = read_json(meta) if meta.is_file() else {}
    if saved.get("fingerprint") == fingerprint:
        return load_rows(folder), need(saved, "stats", lambda v: isinstance(v, dict), "a mapping", str(meta))
    tmp = work / "rows.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if writes:
        tmp.mkdir(parents=True)
        _, stats = build(tmp)
    else:
        ds, stats = build()
        ds.save_to_disk(str(tmp))
    (tmp / "pivotfuse_rows.json").write_text(json.dumps({"fingerprint": fingerprint, "stats": stats}, indent=1))
    publish_folder(tmp, folder)
    return load_rows(folder), stats


def build_rows(pivot_store: LogitStore, source_store: LogitStore | None, pivot_path: str, source_path: str | None,
               vocab_map: np.ndarray | None, *, method: str, k: int, fallback: str, translate: str,
               eos: tuple[Enders, Enders], workers: int | None = 1, out: Path | None = None,
               timings: dict[str, float] | None = None, progress: bool = True,
               shard_size: int = 0) -> tuple[Any, dict]:
    """The dataset of training rows over the pivot's store and the fusion statistics.

    `translate`: 'span' (span translation) or 'vocab' (the map, id by id). Shards of `shard_size`
    conversations (default `ROWS_SHARD`) run over `workers` processes (0/None: one per core); their
    batches go to the Arrow file `out` in order (None: kept in memory): the same rows for any count.
    `timings` (if given) gains the seconds of each phase, summed over the processes.
    """
    if source_store is not None and vocab_map is None:
        raise ValueError("a source needs a vocabulary map")
    stats = FusionStats()

    def absorb(convs: list) -> None:
        for c in convs:
            stats.add(c)

    args = (str(pivot_store.path), str(source_store.path) if source_store is not None else None, pivot_path,
            source_path, vocab_map, method, k, fallback, translate, eos)
    ds = run_row_shards(len(pivot_store), _rows_shard, _rows_setup, args, absorb, workers=workers, out=out,
                        timings=timings, progress=progress, shard_size=shard_size, desc="fuse targets")
    return ds, stats.as_dict()


def run_row_shards(n: int, shard: Callable[[Any, tuple[int, int]], tuple[bytes, Any, dict[str, float]]],
                   setup: Callable[..., Any], args: tuple, absorb: Callable[[Any], None], *, workers: int | None,
                   out: Path | None, timings: dict[str, float] | None, progress: bool, shard_size: int,
                   desc: str) -> Any:
    """Rows of corpus rows 0..n in fixed shards over `workers` processes: `shard(state, (lo, hi))` gives
    a shard's rows (Arrow IPC bytes), its statistics (handed to `absorb` in shard order, so sums do not
    depend on the worker count) and phase seconds; the rows go to the Arrow file `out` in order (None:
    kept in memory). Returns the dataset; `timings` as in `build_rows`."""
    from tqdm.auto import tqdm

    size = shard_size or ROWS_SHARD
    tasks = [(lo, min(lo + size, n)) for lo in range(0, n, size)]
    workers = resolve_workers(workers, len(tasks))
    times: dict[str, float] = Counter()
    writer = RowsWriter(Path(out) if out is not None else None)
    t_start = time.perf_counter()
    with tqdm(total=n, desc=desc, unit="conv", disable=not progress) as bar:
        for i, (data, part, spent) in enumerate(ordered_map(shard, tasks, workers, setup, args)):
            lo, hi = tasks[i]
            t0 = time.perf_counter()
            for batch in read_batches(data):
                writer.write(batch)
            absorb(part)
            times.update(spent)
            times["write"] += time.perf_counter() - t0
            bar.update(hi - lo)
        t0 = time.perf_counter()
        ds = writer.close()
        times["write"] += time.perf_counter() - t0
    if timings is not None:
        for key, value in times.items():
            timings[key] = timings.get(key, 0.0) + value
        timings["wall"] = timings.get("wall", 0.0) + time.perf_counter() - t_start
        timings["workers"] = workers
    return ds

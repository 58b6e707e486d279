"""Teacher extraction: run one chat model over the corpus and store its top-k next-token log-probs.

Every model reads the conversations rendered with its OWN chat template; only positions whose
gold next token is an assistant token are scored. The corpus is cut into fixed shards; under
`accelerate launch` / `torchrun` each process scores its share of the pending shards, so a
killed run resumes where it stopped. Batches are formed inside a shard, so the process count
changes no batch: on CPU with the same kernels (same machine and torch build, same threads per
process) any process count gives the same store bit for bit. Other threads per process (the
launchers default to one per process on CPU) or another machine sum floats in another order:
token ids, spans and counts stay the same, log-probs and CE agree up to float rounding, and top-k
ids differ only where two candidates tie within it (tests/test_extract.py bounds each).
Within a process the host work overlaps the forward pass (`ExtractJob.overlap`, `extract_shards`):
threads tokenise the next shard and write the last one; the store is the same byte for byte.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from core.chat import Conversation, end_of_turn_tokens, load_conversations, render_chat, reply_end, tokenize_chat
from core.errors import PivotfuseError
from core.fingerprint import conversations_sha, model_fingerprint, sha256_hex
from core.loading import chat_template, load_causal_lm, load_tokenizer, refuse_inside, vocab_size
from fuse.extract.config import ExtractJob
from fuse.extract.overlap import Behind, ahead
from fuse.extract.store import StoreWriter, TeacherRecord, int_type

if TYPE_CHECKING:  # score imports torch: loaded when scoring starts, not with this module
    from fuse.extract.score import LaunchedBatch, SequenceScores

log = logging.getLogger(__name__)

# Shards rendered and tokenised ahead of the one being scored (with overlap): one hides the
# tokenisation wherever preparing a shard takes less time than scoring one, and memory stays at a
# few shards whatever the corpus size.
PREPARE_AHEAD = 1


def resolve_template(tok: Any, cfg: ExtractJob) -> str:
    """The template the model reads the corpus with: the given file's, else its tokenizer's."""
    return chat_template(tok, cfg.chat_template, f"{cfg.model}: tokenizer")


def resolve_dtype(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def load_model(path: str, dtype: Any, state: Any) -> Any:
    # One process and a GPU: let accelerate place (and if needed split) the model; data-parallel
    # runs put a whole copy on each process's device.
    device_map: Any = "auto" if state.num_processes == 1 and state.device.type == "cuda" else {"": state.device}
    return load_causal_lm(path, dtype=dtype, device_map=device_map)


@dataclass
class Prepared:
    index: int
    conv: Conversation
    ids: list[int]
    offsets: np.ndarray  # (T, 2)
    gold_pos: np.ndarray  # (n,) positions t >= 1 whose token is an assistant token
    assistant_spans: list[tuple[int, int]]
    text: str
    truncated: bool


def prepare(index: int, conv: Conversation, tok: Any, template: str, max_length: int,
            stats: Counter) -> Prepared | None:
    """Render + tokenise one conversation; None (and a counted reason) when it cannot be scored."""
    try:
        rendered = render_chat(tok, conv.messages, template)
    except PivotfuseError as e:
        stats["skipped_template_error"] += 1
        stats.setdefault("first_template_error", f"{conv.id}: {e}")  # type: ignore[arg-type]
        return None
    if not rendered.assistant_spans:
        stats["skipped_no_assistant"] += 1
        return None
    tc = tokenize_chat(tok, rendered, max_length)
    stats["truncated"] += int(tc.truncated)
    gold_pos = np.flatnonzero(np.asarray(tc.assistant, dtype=bool))
    gold_pos = gold_pos[gold_pos >= 1]  # token 0 has no context to be predicted from
    if len(gold_pos) == 0:
        stats["skipped_no_scored_tokens"] += 1
        return None
    return Prepared(index, conv, tc.input_ids, np.asarray(tc.offsets, dtype=np.int64).reshape(-1, 2), gold_pos,
                     rendered.assistant_spans, rendered.text, tc.truncated)


def _covered(text: str, spans: np.ndarray, within: np.ndarray) -> tuple[int, int]:
    """(characters, UTF-8 bytes) of `text` inside both the union of `spans` and of `within`."""
    def mask(ranges: np.ndarray) -> np.ndarray:
        edges = np.zeros(len(text) + 1, dtype=np.int32)
        np.add.at(edges, ranges[:, 0], 1)
        np.add.at(edges, ranges[:, 1], -1)
        return np.cumsum(edges)[:-1] > 0

    covered = mask(spans) & mask(within)
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)[covered]
    return int(covered.sum()), int(covered.sum() + (codes >= 0x80).sum() + (codes >= 0x800).sum()
                                   + (codes >= 0x10000).sum())  # UTF-8 length of each code point


def to_record(p: Prepared, scores: Any, enders: Sequence[str]) -> TeacherRecord:
    gold_ids = np.asarray(p.ids)[p.gold_pos]
    spans = p.offsets[p.gold_pos]
    replies = np.asarray([(s, reply_end(p.text, s, e, enders)) for s, e in p.assistant_spans], dtype=np.int64)
    n_chars, n_bytes = _covered(p.text, spans, replies.reshape(-1, 2))
    return TeacherRecord(
        index=p.index, id=p.conv.id, domain=p.conv.domain, text=p.text,
        assistant_spans=np.asarray(p.assistant_spans, dtype=np.int32).reshape(-1, 2),
        token_ids=gold_ids.astype(np.int32), spans=spans.astype(np.int32),
        topk_ids=scores.topk_ids.astype(np.int32), topk_logprobs=scores.topk_logprobs.astype(np.float16),
        gold_logprobs=scores.gold_logprobs.astype(np.float16),
        ce=float(-scores.gold_logprobs.astype(np.float64).mean()),
        n_chars=n_chars, n_bytes=n_bytes, seq_len=len(p.ids), truncated=p.truncated)


def _scan(convs: list[Conversation], tok: Any, template: str, data: str) -> int:
    """Render every conversation once before loading a model: fails early on a corpus with nothing
    to score, and returns the longest text (it fixes the store's span dtype)."""
    longest, usable, first_error = 0, 0, None
    for c in convs:
        try:
            r = render_chat(tok, c.messages, template)
        except PivotfuseError as e:
            first_error = first_error or f"{c.id}: {e}"
            continue
        longest, usable = max(longest, len(r.text)), usable + bool(r.assistant_spans)
    if not usable:
        raise PivotfuseError(f"{data}: no conversation has an assistant reply to score"
                             + (f" (first template error: {first_error})" if first_error else ""))
    return longest


def length_batches(items: list[Prepared], batch_size: int) -> list[list[Prepared]]:
    """Longest first, `batch_size` at a time: similar lengths share a batch, so little padding."""
    items = sorted(items, key=lambda p: -len(p.ids))
    return [items[lo:lo + batch_size] for lo in range(0, len(items), batch_size)]


@dataclass
class PreparedShard:
    """A shard's conversations rendered and tokenised, ready to score (the scorable ones), and its counts."""

    shard: int
    items: list[Prepared]
    stats: Counter


def prepare_shard(writer: StoreWriter, shard: int, convs: list[Conversation], tok: Any, template: str,
                  max_length: int) -> PreparedShard:
    """Render + tokenise the conversations of one shard (host work only: it may run in a thread)."""
    stats: Counter = Counter()
    items = []
    for i in writer.shard_rows(shard):
        stats["rows"] += 1
        p = prepare(i, convs[i], tok, template, max_length, stats)
        if p is not None:
            items.append(p)
    return PreparedShard(shard, items, stats)


def score_shard(model: Any, shard: PreparedShard, cfg: ExtractJob, pad_id: int,
                bar: Any) -> list[tuple[Prepared, SequenceScores]]:
    """Score a prepared shard batch by batch. With `cfg.overlap` the host waits for batch b's
    results only after batch b + 1's forward is queued, so the device is not idle meanwhile
    (on CPU the two steps run one after the other: the same numbers either way)."""
    from fuse.extract.score import collect, launch_batch

    out: list[tuple[Prepared, SequenceScores]] = []
    waiting: tuple[list[Prepared], LaunchedBatch] | None = None

    def take(batch: list[Prepared], launched: LaunchedBatch) -> None:
        out.extend(zip(batch, collect(launched)))
        bar.update(len(batch))

    for batch in length_batches(shard.items, cfg.batch_size):
        try:
            launched = launch_batch(model, [p.ids for p in batch], [p.gold_pos for p in batch], cfg.top_k,
                                    [f"{p.conv.id} ({cfg.data})" for p in batch], pad_id)
        except BaseException:
            if waiting is not None:  # the earlier batch's own error (NaN logits) comes first, as in order
                take(*waiting)
            raise
        if waiting is not None:
            take(*waiting)
        waiting = (batch, launched)
        if not cfg.overlap:
            take(*waiting)
            waiting = None
    if waiting is not None:
        take(*waiting)
    return out


def write_scored(writer: StoreWriter, shard: PreparedShard, scored: list[tuple[Prepared, SequenceScores]],
                 enders: Sequence[str], cfg: ExtractJob) -> None:
    """Records and statistics of a scored shard, written to the store (host work only: it may run in a thread)."""
    stats = shard.stats
    records = [to_record(p, s, enders) for p, s in scored]
    stats.update(stored=len(records), scored_tokens=sum(r.n_tokens for r in records),
                 scored_chars=sum(r.n_chars for r in records), scored_bytes=sum(r.n_bytes for r in records))
    stats["nll"] = float(sum(r.ce * r.n_tokens for r in records))
    if "first_template_error" in stats:
        log.warning("%s: skipped conversations the template cannot render, e.g. %s", cfg.model,
                    stats.pop("first_template_error"))
    writer.write_shard(shard.shard, records, dict(stats))


def extract_shards(writer: StoreWriter, shards: list[int], convs: list[Conversation], model: Any, tok: Any,
                   template: str, cfg: ExtractJob, bar: Any, on_shard: Callable[[int], None] | None = None) -> None:
    """Score and write `shards`, in order; `on_shard(shard)` after each is on disk, in that order.

    With `cfg.overlap` the host work runs beside the forward pass: the next shards are rendered and
    tokenised ahead (`PREPARE_AHEAD` of them) and each scored shard is written behind, while the next
    one is scored (one write at a time). The store is the same byte for byte either way.
    """
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    enders = end_of_turn_tokens(tok)  # reply text ends before these: CE per character compares templates

    def prep(shard: int) -> PreparedShard:
        return prepare_shard(writer, shard, convs, tok, template, cfg.max_length)

    prepared = ahead(prep, shards, PREPARE_AHEAD if cfg.overlap else 0,
                     lambda s: f"preparing shard {s} of {writer.path}")
    with closing(prepared), Behind(cfg.overlap, on_shard or (lambda s: None),
                                   lambda s: f"writing shard {s} of {writer.path}") as writes:
        for shard in prepared:
            bar.update(shard.stats["rows"] - len(shard.items))
            scored = score_shard(model, shard, cfg, pad_id, bar)
            writes.submit(shard.shard, write_scored, writer, shard, scored, enders, cfg)


def extract(cfg: ExtractJob, on_shard: Callable[[int], None] | None = None) -> dict:
    """Write (or finish) the store `cfg.out`; returns its summed statistics (on the main process, {} elsewhere).

    Under several processes each scores a share of the pending shards; the main process
    validates/creates the manifest first and marks the store complete last.
    `on_shard(shard)` is called after each shard is on disk (progress hooks, tests).
    """
    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm

    for name in ("model", "data", "out"):
        if getattr(cfg, name) is None:
            raise PivotfuseError(f"extract: --{name} is required")
    # Every option is checked before anything is read or written: a bad one must not cost a model load.
    try:
        cfg.validate()
    except ValueError as e:
        raise PivotfuseError(f"extract: {e}") from None
    refuse_inside(cfg.out, cfg.model, "out")
    # Force the CPU backend (gloo) when there is no accelerator, so torchrun/accelerate CPU runs split work.
    state = PartialState(cpu=torch.accelerator.current_accelerator() is None)
    tok = load_tokenizer(cfg.model, model=True, fast=True)
    vocab = vocab_size(cfg.model)
    if vocab is not None and cfg.top_k > vocab:
        raise PivotfuseError(f"top_k: {cfg.top_k} exceeds the vocabulary size {vocab} of {cfg.model} (config.json)")
    template = resolve_template(tok, cfg)
    convs = load_conversations(cfg.data)
    longest = _scan(convs, tok, template, cfg.data)
    dtype = resolve_dtype(cfg.dtype)
    fingerprint = {
        "model": model_fingerprint(Path(cfg.model)), "tokenizer": sha256_hex(tok.backend_tokenizer.to_str()),
        "template": sha256_hex(template), "data": conversations_sha(convs),
        "settings": {"top_k": cfg.top_k, "max_length": cfg.max_length, "shard_size": cfg.shard_size,
                     "dtype": str(dtype).replace("torch.", "")},
    }
    kwargs = dict(top_k=cfg.top_k, n_rows=len(convs), shard_size=cfg.shard_size,
                  dtypes={"ids": int_type(len(tok) - 1), "spans": int_type(longest)},
                  info={"model": str(cfg.model), "data": str(cfg.data)})
    with state.main_process_first():  # the main process creates the manifest, the others then check it
        writer = StoreWriter.open(cfg.out, fingerprint, is_main=state.is_main_process, **kwargs)
    pending = writer.pending()
    state.wait_for_everyone()  # every process has listed the pending shards before any is written
    mine = pending[state.process_index::state.num_processes]
    if state.num_processes > 1:
        print(f"extract: process {state.process_index}/{state.num_processes} scores shards {mine}", file=sys.stderr)
    if mine:
        model = load_model(cfg.model, dtype, state)
        with tqdm(total=sum(len(writer.shard_rows(s)) for s in mine), unit="conv", desc=f"extract {cfg.model}",
                  disable=not state.is_main_process) as bar:
            extract_shards(writer, mine, convs, model, tok, template, cfg, bar, on_shard)
    if not state.is_main_process:
        return {}
    # The main process waits for the others' shards by polling, not with a collective barrier: a
    # barrier would time out (NCCL/gloo default 10–30 min) while a slower process is still scoring.
    while writer.pending():
        time.sleep(1.0)
    return writer.finalize()

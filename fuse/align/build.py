"""Build the vocabulary map of a source model onto the pivot over a chat corpus (resumable).

`build_map` loads the two tokenizers from the model folders, renders every conversation with each
model's own chat template (`core.chat`), aligns the replies token by token (`fuse.align.chat`),
counts the 1:1 pairs (`fuse.align.vocab`) with a progress bar, and writes the map with its
statistics and the pair's coverage (`fuse.align.coverage`) as JSON, atomically. The corpus is read
lazily and worked in shards over processes (`core.workers`; the counts are sums, added in corpus
order: the same map for any process count). Progress is saved every `checkpoint_every`
conversations (at the end of the shard that reaches them) to `F.partial`; rerunning the same command
resumes there, and a finished map whose fingerprint (tokenizers, templates, corpus, settings) matches
is reused as is.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from core.atomic import write_text
from core.chat import Conversation, iter_conversations
from core.errors import PivotfuseError
from core.files import is_int, need, read_json
from core.fingerprint import StreamDigest, source_bytes, tokenizer_files
from core.loading import check_tokenizer_folder, load_tokenizer, read_chat_template, refuse_inside
from core.workers import ordered_map, resolve_workers
from fuse.align.config import AlignConfig

# The alignment code a map depends on: a change to it rebuilds the maps (in the map's fingerprint).
CODE = ("mined.py", "dp.py", "chat.py", "surface.py", "vocab.py", "coverage.py")


def _check_out(out: Path, inputs: tuple[str, ...]) -> None:
    """Refuse an output the map cannot be written to before any work, not after it, and any file
    but a map (the corpus given as --out, say): only a map is ever replaced."""
    from fuse.align.vocab import FORMAT

    for folder in inputs:
        refuse_inside(out, folder, "out")
    if out.is_dir():
        raise PivotfuseError(f"out: {out} is a folder, not a file for the map's JSON")
    if out.is_file():
        with out.open("rb") as fh:  # VocabMap.save writes the format first: the head tells a map
            head = fh.read(64)
        if not head.startswith(json.dumps({"format": FORMAT})[:-1].encode()):
            raise PivotfuseError(f"out: {out} exists and is not a vocabulary map; use another --out")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise PivotfuseError(f"out: {parent} is a file, so {out} cannot be written")
            break


@dataclass
class _AlignWork:
    """An alignment worker's state: both tokenizers, their texts and templates, the settings."""

    p_tok: Any
    s_tok: Any
    p_tt: Any
    s_tt: Any
    p_tpl: str | None
    s_tpl: str | None
    markers: tuple[dict, dict]
    max_length: int | None
    halo: int | None
    theta: int


def _align_setup(pivot: str, source: str, p_tpl: str | None, s_tpl: str | None, max_length: int | None,
                 halo: int | None, theta: int) -> _AlignWork:
    from fuse.align.surface import TokenText
    from fuse.align.vocab import template_markers

    p_tok, s_tok = load_tokenizer(pivot, shared=True), load_tokenizer(source, shared=True)  # read only
    return _AlignWork(p_tok, s_tok, TokenText(p_tok), TokenText(s_tok), p_tpl, s_tpl,
                      (template_markers(p_tok, p_tpl), template_markers(s_tok, s_tpl)), max_length, halo, theta)


@dataclass
class _ShardCounts:
    """What one shard of conversations adds to the map's counts and coverage."""

    builder: dict  # counts (source id → {pivot id: n}), pairs, conversations of a VocabMapBuilder
    coverage: Any  # Coverage
    skipped: int
    truncated: int
    seconds: dict  # render / tokenise / align / count
    tokens: int  # tokens of both renderings
    pivot_tokens: int


def _align_shard(w: _AlignWork, convs: list[Conversation]) -> _ShardCounts:
    """Render, tokenise and align a shard of conversations; their 1:1 counts and coverage."""
    from core.chat import render_chat, tokenize_chat
    from fuse.align.chat import ChatTokens, align_chat
    from fuse.align.coverage import Coverage
    from fuse.align.vocab import VocabMapBuilder

    builder = VocabMapBuilder(w.p_tt, w.s_tt, *w.markers)
    cov = Coverage()
    skipped = truncated = tokens = pivot_tokens = 0
    spent = dict.fromkeys(("render", "tokenise", "align", "count"), 0.0)
    clock = time.perf_counter
    for conv in convs:
        t0 = clock()
        try:
            p_r, s_r = render_chat(w.p_tok, conv.messages, w.p_tpl), render_chat(w.s_tok, conv.messages, w.s_tpl)
        except PivotfuseError:
            skipped += 1  # a template that refuses this conversation (e.g. no system role)
            spent["render"] += clock() - t0
            continue
        t1 = clock()
        p_t, s_t = tokenize_chat(w.p_tok, p_r, w.max_length), tokenize_chat(w.s_tok, s_r, w.max_length)
        t2 = clock()
        truncated += int(p_t.truncated or s_t.truncated)
        al = align_chat(ChatTokens.from_tokenized(p_r, p_t), ChatTokens.from_tokenized(s_r, s_t), w.p_tt, w.s_tt,
                        halo=w.halo, theta=w.theta)
        t3 = clock()
        builder.add(al, p_t.input_ids, s_t.input_ids)
        cov.add(al, p_t.input_ids, s_t.input_ids)
        t4 = clock()
        for key, a, b in (("render", t0, t1), ("tokenise", t1, t2), ("align", t2, t3), ("count", t3, t4)):
            spent[key] += b - a
        tokens += len(p_t.input_ids) + len(s_t.input_ids)
        pivot_tokens += len(p_t.input_ids)
    return _ShardCounts({"counts": builder.counts, "pairs": builder.pairs, "conversations": builder.conversations},
                        cov, skipped, truncated, spent, tokens, pivot_tokens)


ALIGN_SHARD = 32  # conversations per task: the unit of work per process (not of the result)


def _shards(data: str, limit: int | None, start: int, size: int) -> Iterator[list[Conversation]]:
    """The corpus from conversation `start` on, read lazily, `size` conversations at a time."""
    shard: list[Conversation] = []
    for i, conv in enumerate(iter_conversations(data, limit=limit)):
        if i < start:
            continue
        shard.append(conv)
        if len(shard) == size:
            yield shard
            shard = []
    if shard:
        yield shard


def build_map(pivot: str, source: str, data: str, out: str | Path, cfg: AlignConfig, *,
              pivot_template: str | None = None, source_template: str | None = None, progress: bool = True,
              timings: dict[str, float] | None = None):
    """Build (or reuse, or resume) the vocabulary map of `source` onto `pivot` over `data`.

    The corpus is read twice, lazily (its fingerprint, then the work), in shards of `ALIGN_SHARD`
    conversations (at most `checkpoint_every`) aligned over `cfg.workers` processes; their counts are added in corpus order, so
    any process count gives the same map. `timings` (if given) gains each phase's seconds, summed
    over the processes, and the tokens aligned.
    """
    from tqdm.auto import tqdm

    from fuse.align.coverage import Coverage
    from fuse.align.vocab import VocabMap, VocabMapBuilder

    out = Path(out)
    for label, folder in (("pivot", pivot), ("source", source)):
        check_tokenizer_folder(folder, label)
    _check_out(out, (pivot, source))
    p_tpl, s_tpl = read_chat_template(pivot_template), read_chat_template(source_template)
    t_start = time.perf_counter()
    code = source_bytes(Path(__file__).parent, CODE)
    fp = StreamDigest()
    for part in (code, tokenizer_files(pivot), tokenizer_files(source), p_tpl, s_tpl):
        fp.part(part)
    n = fp.items((c.id, c.messages) for c in iter_conversations(data, limit=cfg.limit))
    if not n:
        raise PivotfuseError(f"{data}: no conversations found")
    fp.part({k: v for k, v in asdict(cfg).items() if k != "workers"} | {"checkpoint_every": None})
    fingerprint = fp.hexdigest()
    if out.is_file():
        try:
            old = VocabMap.load(out)
        except PivotfuseError:
            old = None
        if old is not None and old.fingerprint == fingerprint:
            return old
    out.parent.mkdir(parents=True, exist_ok=True)
    args = (pivot, source, p_tpl, s_tpl, cfg.max_length, cfg.halo, cfg.theta)
    work = _align_setup(*args)  # the tokenizers once: for the builder here, inherited by forked workers
    builder = VocabMapBuilder(work.p_tt, work.s_tt, *work.markers)
    cov = Coverage()
    skipped = truncated = start = 0
    partial = out.with_name(out.name + ".partial")
    if partial.is_file():  # written whole (temp + rename): a damaged one was changed by hand
        state = read_json(partial, "an alignment checkpoint (JSON object)")
        if state.get("fingerprint") == fingerprint:
            where = f"{partial} (delete it to align from the start)"
            start = need(state, "done", lambda v: is_int(v) and 0 <= v <= n, f"0..{n}", where)
            skipped, truncated = (need(state, k, lambda v: is_int(v) and 0 <= v <= start, f"0..{start}", where)
                                  for k in ("skipped", "truncated"))
            parts = {k: need(state, k, lambda v: isinstance(v, dict), "a mapping", where)
                     for k in ("builder", "coverage")}
            try:
                builder.restore(parts["builder"])
                cov = Coverage.from_state(parts["coverage"])
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise PivotfuseError(f"{where}: damaged 'builder' or 'coverage' counts "
                                     f"({type(e).__name__}: {e})") from None

    def save_partial(done: int) -> None:
        write_text(partial, json.dumps({"fingerprint": fingerprint, "done": done, "skipped": skipped,
                                        "truncated": truncated, "builder": builder.state(), "coverage": cov.state()}))

    size = min(ALIGN_SHARD, cfg.checkpoint_every)  # a checkpoint is due at most once per shard
    workers = resolve_workers(cfg.workers, -(-(n - start) // size))
    spent: dict[str, float] = dict.fromkeys(("render", "tokenise", "align", "count", "merge", "build"), 0.0)
    tokens = pivot_tokens = 0
    done = start
    shards = ordered_map(_align_shard, _shards(data, cfg.limit, start, size), workers, _align_setup, args,
                         state=work)
    with tqdm(total=n, initial=start, desc=f"align {Path(source).name} → {Path(pivot).name}", unit="conv",
              disable=not progress) as bar:
        for part in shards:
            t0 = time.perf_counter()
            builder.merge(**part.builder)
            cov.merge(part.coverage)
            skipped, truncated = skipped + part.skipped, truncated + part.truncated
            tokens, pivot_tokens = tokens + part.tokens, pivot_tokens + part.pivot_tokens
            for key, value in part.seconds.items():
                spent[key] += value
            size = part.builder["conversations"] + part.skipped
            bar.update(size)
            before, done = done, done + size
            if done // cfg.checkpoint_every > before // cfg.checkpoint_every and done < n:
                save_partial(done)
            spent["merge"] += time.perf_counter() - t0
    if skipped == n:
        raise PivotfuseError(f"{data}: no conversation renders with both chat templates")
    t0 = time.perf_counter()
    vmap = builder.build()
    vmap.fingerprint = fingerprint
    vmap.stats["skipped_conversations"] = skipped
    vmap.stats["truncated_conversations"] = truncated
    vmap.stats["coverage"] = cov.report(vmap.mapping)
    vmap.save(out)
    partial.unlink(missing_ok=True)
    spent["build"] += time.perf_counter() - t0
    if timings is not None:
        for key, value in spent.items():
            timings[key] = timings.get(key, 0.0) + value
        timings["count"] = timings["count"] + spent["merge"]  # merging the shards' counts is counting too
        timings["tokens"] = timings.get("tokens", 0) + tokens
        timings["pivot_tokens"] = timings.get("pivot_tokens", 0) + pivot_tokens
        timings["wall"] = timings.get("wall", 0.0) + time.perf_counter() - t_start
        timings["workers"] = workers
    return vmap

"""Build the vocabulary map of a source model onto the pivot over a chat corpus (resumable).

`build_map` loads the two tokenizers from the model folders, renders every conversation with each
model's own chat template (`core.chat`), aligns the replies token by token (`fuse.align.chat`),
counts the 1:1 pairs (`fuse.align.vocab`) with a progress bar, and writes the map with its
statistics and the pair's coverage (`fuse.align.coverage`) as JSON, atomically. Progress is saved every `checkpoint_every`
conversations to `F.partial`; rerunning the same command resumes there, and a finished map whose
fingerprint (tokenizers, templates, corpus, settings) matches is reused as is.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from core.atomic import write_text
from core.errors import PivotfuseError
from core.files import is_int, need, read_json
from core.fingerprint import digest, source_bytes, tokenizer_files
from core.loading import check_tokenizer_folder, load_tokenizer, read_chat_template, refuse_inside
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


def build_map(pivot: str, source: str, data: str, out: str | Path, cfg: AlignConfig, *,
              pivot_template: str | None = None, source_template: str | None = None, progress: bool = True):
    """Build (or reuse, or resume) the vocabulary map of `source` onto `pivot` over `data`."""
    from tqdm.auto import tqdm

    from core.chat import load_conversations, render_chat, tokenize_chat
    from fuse.align.chat import ChatTokens, align_chat
    from fuse.align.coverage import Coverage
    from fuse.align.surface import TokenText
    from fuse.align.vocab import VocabMap, VocabMapBuilder, template_markers

    out = Path(out)
    for label, folder in (("pivot", pivot), ("source", source)):
        check_tokenizer_folder(folder, label)
    _check_out(out, (pivot, source))
    p_tpl, s_tpl = read_chat_template(pivot_template), read_chat_template(source_template)
    convs = load_conversations(data, limit=cfg.limit)
    code = source_bytes(Path(__file__).parent, CODE)
    fingerprint = digest(code, tokenizer_files(pivot), tokenizer_files(source), p_tpl, s_tpl,
                         [(c.id, c.messages) for c in convs],
                         {k: v for k, v in asdict(cfg).items() if k != "workers"} | {"checkpoint_every": None})
    if out.is_file():
        try:
            old = VocabMap.load(out)
        except PivotfuseError:
            old = None
        if old is not None and old.fingerprint == fingerprint:
            return old
    out.parent.mkdir(parents=True, exist_ok=True)
    p_tok, s_tok = load_tokenizer(pivot), load_tokenizer(source)
    p_tt, s_tt = TokenText(p_tok), TokenText(s_tok)
    builder = VocabMapBuilder(p_tt, s_tt, template_markers(p_tok, p_tpl), template_markers(s_tok, s_tpl))
    cov = Coverage()
    skipped = truncated = start = 0
    partial = out.with_name(out.name + ".partial")
    if partial.is_file():  # written whole (temp + rename): a damaged one was changed by hand
        state = read_json(partial, "an alignment checkpoint (JSON object)")
        if state.get("fingerprint") == fingerprint:
            where = f"{partial} (delete it to align from the start)"
            start = need(state, "done", lambda v: is_int(v) and 0 <= v <= len(convs), f"0..{len(convs)}", where)
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

    bar = tqdm(total=len(convs), initial=start, desc=f"align {Path(source).name} → {Path(pivot).name}",
               unit="conv", disable=not progress)
    for i in range(start, len(convs)):
        conv = convs[i]
        try:
            p_r, s_r = render_chat(p_tok, conv.messages, p_tpl), render_chat(s_tok, conv.messages, s_tpl)
        except PivotfuseError:
            skipped += 1  # a template that refuses this conversation (e.g. no system role)
        else:
            p_t, s_t = tokenize_chat(p_tok, p_r, cfg.max_length), tokenize_chat(s_tok, s_r, cfg.max_length)
            truncated += int(p_t.truncated or s_t.truncated)
            al = align_chat(ChatTokens.from_tokenized(p_r, p_t), ChatTokens.from_tokenized(s_r, s_t), p_tt, s_tt,
                            halo=cfg.halo, theta=cfg.theta)
            builder.add(al, p_t.input_ids, s_t.input_ids)
            cov.add(al, p_t.input_ids, s_t.input_ids)
        bar.update(1)
        if (i + 1) % cfg.checkpoint_every == 0 and i + 1 < len(convs):
            save_partial(i + 1)
    bar.close()
    if skipped == len(convs):
        raise PivotfuseError(f"{data}: no conversation renders with both chat templates")
    vmap = builder.build()
    vmap.fingerprint = fingerprint
    vmap.stats["skipped_conversations"] = skipped
    vmap.stats["truncated_conversations"] = truncated
    vmap.stats["coverage"] = cov.report(vmap.mapping)
    vmap.save(out)
    partial.unlink(missing_ok=True)
    return vmap

"""Chat data: load conversations, render them with a model's own chat template, and find
which characters / tokens belong to the assistant (the only ones scored or trained on).

Shared by extraction, alignment, training, evaluation and the demo world, so every step
sees the same text and the same assistant mask.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from core.atomic import write_with
from core.errors import PivotfuseError
from core.files import read_jsonl

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system"}


@dataclass
class Conversation:
    """One chat: `messages` = [{role, content}], plus an id and an optional domain tag."""

    id: str
    messages: list[dict[str, str]]
    domain: str | None = None


@dataclass
class RenderedChat:
    """A conversation rendered to text with a chat template.

    `assistant_spans` are [start, end) character ranges of the text the model must produce:
    each assistant reply and the end-of-turn token that follows it.
    """

    text: str
    assistant_spans: list[tuple[int, int]]


@dataclass
class TokenizedChat:
    """A rendered chat tokenised with character offsets; `assistant[t]` marks token t as target."""

    input_ids: list[int]
    offsets: list[tuple[int, int]]
    assistant: list[bool]
    text: str = ""
    truncated: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _normalise(row: dict, where: str) -> tuple[list[dict[str, str]], str | None, str | None]:
    if "messages" in row:
        msgs = row["messages"]
    elif "conversations" in row:  # ShareGPT: [{from, value}]
        msgs = []
        for m in row["conversations"] or []:
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                raise PivotfuseError(f"{where}: ShareGPT turn needs 'from' and 'value', got {m!r}")
            role = _SHAREGPT_ROLES.get(str(m["from"]).lower())
            if role is None:
                raise PivotfuseError(f"{where}: unknown ShareGPT speaker {m['from']!r}")
            msgs.append({"role": role, "content": m["value"]})
    else:
        raise PivotfuseError(f"{where}: row has neither 'messages' nor 'conversations'")
    if not isinstance(msgs, list):
        raise PivotfuseError(f"{where}: 'messages' must be a list")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise PivotfuseError(f"{where}: each message needs role in {ROLES} and a string content, got {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    rid = row.get("id")
    return out, (str(rid) if rid is not None else None), row.get("domain")


def iter_conversations(source: str | Path, split: str = "train", limit: int | None = None) -> Iterator[Conversation]:
    """The chats of a JSONL file or a `datasets` folder/name (saved with `save_to_disk`), read one at
    a time (a corpus of any size is never in memory whole); `limit`: only the first N.

    Rows need `messages: [{role, content}]` or ShareGPT `conversations: [{from, value}]`;
    optional `id` and `domain`. Errors name the file and line.
    """
    path = Path(source)
    rows: Iterable[tuple[str, dict]]
    if path.is_file():
        rows = ((f"{path}:{n}", row) for n, row in read_jsonl(path))
    elif path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - any load failure is a bad input path
            raise PivotfuseError(f"{path}: not a JSONL file or a saved datasets folder ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise PivotfuseError(f"{path}: no split '{split}' (has {list(ds)})")
            ds = ds[split]
        rows = ((f"{path}[{i}]", r) for i, r in enumerate(ds))
    else:
        raise PivotfuseError(f"{path}: data file not found")
    n = 0
    for where, row in rows:
        msgs, rid, domain = _normalise(row, where)
        yield Conversation(id=rid or where.rsplit(":", 1)[-1], messages=msgs, domain=domain)
        n += 1
        if limit is not None and n >= limit:  # before the next row is read: a bad row past the limit is not met
            return


def load_conversations(source: str | Path, split: str = "train", limit: int | None = None) -> list[Conversation]:
    """All the chats of `source` (`iter_conversations`) as a list; none is an error."""
    convs = list(iter_conversations(source, split, limit))
    if not convs:
        raise PivotfuseError(f"{source}: no conversations found")
    return convs


def write_conversations(convs: Iterable[Conversation], path: str | Path) -> None:
    """Write chats as JSONL (`id`, `domain`, `messages`), atomically."""
    def write(fh: Any) -> None:
        for c in convs:
            fh.write((json.dumps({"id": c.id, "domain": c.domain, "messages": c.messages}, ensure_ascii=False)
                      + "\n").encode("utf-8"))

    write_with(path, write)


def end_of_turn_tokens(tokenizer: Any) -> list[str]:
    """Special tokens that close an assistant turn: EOS, and special tokens named like an end of
    turn (`<|eot_id|>` of Llama-3, `<|im_end|>`, `<end_of_turn>`, `<|end|>`), longest first."""
    eos = getattr(tokenizer, "eos_token", None)
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    specials |= {t.content for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values()
                 if getattr(t, "special", False)}
    named = {t for t in specials if re.search(r"eot|end_of_turn|im_end|^<\|end\|>$", t.lower())}
    return sorted({eos} | named if eos else named, key=len, reverse=True)


def render_chat(tokenizer: Any, messages: list[dict[str, str]], chat_template: str | None = None,
                add_generation_prompt: bool = False) -> RenderedChat:
    """Render with the tokenizer's (or the given) chat template and locate assistant replies.

    Each assistant content is searched for in order in the rendered text (templates may
    strip it); the span is extended over the end-of-turn token when one follows (after at
    most one space, as in Llama-2's `{{ content }} </s>`), so a model learns to end its turn.
    """
    template = chat_template or getattr(tokenizer, "chat_template", None)
    name = getattr(tokenizer, "name_or_path", "tokenizer")
    if not template:
        raise PivotfuseError(f"{name}: tokenizer has no chat template (pass --chat-template FILE)")
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - template errors come from jinja with no context
        raise PivotfuseError(f"{name}: chat template failed to render: {e}") from None
    spans: list[tuple[int, int]] = []
    pos = 0
    enders = end_of_turn_tokens(tokenizer)
    for m in messages:
        content = m["content"].strip()
        if not content:
            continue
        start = text.find(content, pos)
        if start < 0:
            if m["role"] == "assistant":
                raise PivotfuseError(f"{name}: chat template dropped an assistant reply: {content[:40]!r}")
            continue
        end = start + len(content)
        pos = end
        if m["role"] != "assistant":
            continue
        for gap in ("", " "):
            hit = next((t for t in enders if text.startswith(gap + t, end)), None)
            if hit:
                end += len(gap) + len(hit)
                break
        spans.append((start, end))
        pos = end
    return RenderedChat(text=text, assistant_spans=spans)


def reply_end(text: str, start: int, end: int, enders: Iterable[str]) -> int:
    """End of the reply text in the assistant span [start, end) of `text`: before the end-of-turn
    token closing it (the longest of `enders` the span ends with) and the whitespace a template
    puts before that token (Llama-2's `reply </s>`).

    The one definition of an assistant reply's text, the same characters under every template:
    pairing, alignment, per-character losses and the demo world all count by it. Callers pass the
    enders their step recognises: the template's end-of-turn tokens (`end_of_turn_tokens`), or,
    for the token alignment, the tokenizer's EOS alone (what it has always stripped: a change would
    change every vocabulary map)."""
    hit = next((t for t in sorted((t for t in enders if t), key=len, reverse=True) if text.endswith(t, start, end)),
               None)
    if hit:
        end -= len(hit)
    return start + len(text[start:end].rstrip())


def reply_ranges(rendered: RenderedChat, enders: Iterable[str]) -> list[tuple[int, int]]:
    """[start, end) of the reply text of each assistant span of a rendered chat (`reply_end`)."""
    return [(s, reply_end(rendered.text, s, e, enders)) for s, e in rendered.assistant_spans]


def token_in_spans(start: int, end: int, text: str, spans: list[tuple[int, int]]) -> bool:
    """A token is an assistant token when its overlap with a span holds a non-space character,
    or it lies wholly inside one (so `▁Hello` after `[/INST]` counts, `[/INST]` does not)."""
    for s, e in spans:
        lo, hi = max(start, s), min(end, e)
        if lo < hi and (text[lo:hi].strip() or (start >= s and end <= e)):
            return True
    return False


def assistant_mask(text: str, spans: list[tuple[int, int]], offsets: list[tuple[int, int]]) -> np.ndarray:
    """`token_in_spans` for every token at once, (T,) bool: the same rule, in array operations per
    span rather than Python per token (it was a third of tokenising a long corpus)."""
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # (T, 2)
    mask = np.zeros(len(bounds), dtype=bool)
    if not len(bounds) or not spans:
        return mask
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)  # (C,)
    uniq, inverse = np.unique(codes, return_inverse=True)
    space = np.asarray([chr(c).isspace() for c in uniq.tolist()], dtype=bool)[inverse]  # (C,) as str.strip sees it
    start, end = bounds[:, 0], bounds[:, 1]
    for s, e in spans:
        if e <= s:  # an empty span overlaps nothing
            continue
        solid = np.zeros(len(codes) + 1, dtype=np.int64)  # solid[i]: non-space characters of [s, e) before i
        solid[s + 1:e + 1] = np.cumsum(~space[s:e])
        solid[e + 1:] = solid[e]
        lo, hi = np.maximum(start, s), np.minimum(end, e)
        overlap = lo < hi
        lo_c, hi_c = np.clip(lo, 0, len(codes)), np.clip(hi, 0, len(codes))
        mask |= overlap & ((solid[hi_c] - solid[lo_c] > 0) | ((start >= s) & (end <= e)))
    return mask


def tokenize_chat(tokenizer: Any, rendered: RenderedChat, max_length: int | None = None) -> TokenizedChat:
    """Tokenise rendered text with offsets (fast tokenizers) and mark assistant tokens.

    The template already holds BOS etc., so no special tokens are added here.
    """
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    mask = assistant_mask(rendered.text, rendered.assistant_spans, offsets).tolist()
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, offsets, mask = ids[:max_length], offsets[:max_length], mask[:max_length]
    return TokenizedChat(input_ids=ids, offsets=offsets, assistant=mask, text=rendered.text, truncated=truncated)

"""Align the pivot's and a source's tokenizations of the same conversation, reply by reply.

Each model renders the chat with its own template, so the two texts differ: only the assistant
replies are shared. Reply r of the pivot (its r-th assistant span, `core.chat`) and reply r of the
source hold the same content string; the tokens over that content are aligned with
`fuse.align.mined.align_tokens`, in reply coordinates. The end-of-turn token that closes reply r
(`<|im_end|>`, `</s>`, ...) is paired with the other model's end-of-turn token when each side has
exactly one token there. Every other token (template markers, system and user turns) is
reported unaligned.

For fusion:

    chat = align_chat(ChatTokens.from_record(pivot_rec), ChatTokens.from_record(source_rec),
                      TokenText(pivot_tok), TokenText(source_tok))
    chat.sources(t)   # source token indices aligned with pivot token t (empty: unaligned)
    chat.one_to_one   # (n,) source index where pivot t and it are aligned only with each other, else -1
    chat.exact        # (n,) same span and text on both sides (an exact shared token)
    chat.turn         # (n,) reply index of pivot token t, -1 outside every reply

Indices refer to the `ids` given: a whole tokenized chat, or only its scored assistant tokens as a
logit store keeps them (`TeacherRecord.token_ids` / `.spans`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.chat import reply_end
from fuse.align.mined import Alignment, align_tokens
from fuse.align.surface import TokenText


@dataclass
class ChatTokens:
    """One model's view of a conversation: its rendered text, reply spans and tokens with offsets."""

    text: str
    assistant_spans: list[tuple[int, int]]  # [start, end) of each reply incl. its end-of-turn token
    ids: np.ndarray  # (n,) token ids
    offsets: np.ndarray  # (n, 2) [start, end) character offsets in `text`

    @classmethod
    def from_tokenized(cls, rendered: Any, tokenized: Any) -> "ChatTokens":
        """From `core.chat.render_chat` + `core.chat.tokenize_chat` output."""
        return cls(rendered.text, [tuple(s) for s in rendered.assistant_spans], np.asarray(tokenized.input_ids, dtype=np.int64),
                   np.asarray(tokenized.offsets, dtype=np.int64).reshape(-1, 2))

    @classmethod
    def from_record(cls, rec: Any) -> "ChatTokens":
        """From a logit-store `TeacherRecord` (its scored tokens only)."""
        return cls(rec.text, [tuple(s) for s in np.asarray(rec.assistant_spans).reshape(-1, 2).tolist()],
                   np.asarray(rec.token_ids, dtype=np.int64), np.asarray(rec.spans, dtype=np.int64).reshape(-1, 2))


@dataclass
class ChatAlignment(Alignment):
    """`Alignment` over a whole conversation; `turn[t]` is pivot token t's reply (-1: template)."""

    turn: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    end_of_turn: int = 0  # end-of-turn tokens paired


def content_end(text: str, start: int, end: int, eos: str | None) -> int:
    """End of the reply text inside an assistant span as the alignment takes it: `core.chat.reply_end`
    with the tokenizer's EOS as the one end-of-turn token (a span closed by another ender keeps it,
    and the common prefix of the two replies then decides where the text ends)."""
    return reply_end(text, start, end, [eos] if eos else [])


def _common_prefix(x: str, i: int, y: str, j: int, limit: int) -> int:
    """Length of the common prefix of x[i:i+limit] and y[j:j+limit]: slice comparisons (in C),
    the whole reply at once, else a binary search."""
    if x[i:i + limit] == y[j:j + limit]:
        return limit
    lo, hi = 0, limit  # prefixes of length lo agree, of length hi differ
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if x[i:i + mid] == y[j:j + mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _inside(offsets: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Indices of tokens overlapping [lo, hi)."""
    return np.flatnonzero((offsets[:, 0] < hi) & (offsets[:, 1] > lo))


def _clip_texts(texts: list[str], offsets: np.ndarray, text: str, lo: int, hi: int) -> list[str]:
    """Drop the template characters of tokens that straddle the reply's edges (`▁Hello` after
    `[/INST]` stands for `Hello` inside the reply)."""
    for k in sorted({0, len(texts) - 1}):
        s, e = int(offsets[k, 0]), int(offsets[k, 1])
        t = texts[k]
        if s < lo < e and t.endswith(text[lo:e]):
            t, s = t[len(t) - (e - lo):], lo
        if s < hi < e and t.startswith(text[s:hi]):
            t = t[:hi - s]
        texts[k] = t
    return texts


def _end_of_turn(chat: ChatTokens, tt: TokenText, lo: int, hi: int) -> np.ndarray:
    """Non-space tokens starting in [lo, hi), or else a special token starting at `lo` after spaces."""
    s, e = chat.offsets[:, 0], chat.offsets[:, 1]
    tail = np.flatnonzero((s >= lo) & (e <= hi) & (e > s))
    tail = tail[[chat.text[a:b].strip() != "" for a, b in chat.offsets[tail].tolist()]]
    if len(tail):
        return tail
    gap = len(chat.text[lo:]) - len(chat.text[lo:].lstrip())
    nxt = np.flatnonzero(s == lo + gap)
    return nxt[:1] if len(nxt) and int(chat.ids[nxt[0]]) in tt.special_ids else nxt[:0]


def align_chat(pivot: ChatTokens, source: ChatTokens, pivot_text: TokenText, source_text: TokenText, *,
               halo: int | None = 1, theta: int = 1) -> ChatAlignment:
    """Token alignment of two renderings of one conversation (see the module doc)."""
    n, m = len(pivot.ids), len(source.ids)
    p_eos = getattr(pivot_text.tokenizer, "eos_token", None)
    s_eos = getattr(source_text.tokenizer, "eos_token", None)
    turn = np.full(n, -1, dtype=np.int64)
    exact = np.zeros(n, dtype=bool)
    parts: list[np.ndarray] = []  # reported groups
    paths: list[np.ndarray] = []  # MinED paths
    cost = eot = 0
    for r, ((ps, pe), (ss, se)) in enumerate(zip(pivot.assistant_spans, source.assistant_spans)):
        p_end, s_end = content_end(pivot.text, ps, pe, p_eos), content_end(source.text, ss, se, s_eos)
        # The shared reply text: equal by construction; the common prefix guards against templates
        # that alter a reply (then only the part both kept is aligned).
        length = _common_prefix(pivot.text, ps, source.text, ss, min(p_end - ps, s_end - ss))
        pi, si = _inside(pivot.offsets, ps, ps + length), _inside(source.offsets, ss, ss + length)
        turn[pi] = r
        if len(pi) and len(si):
            p_off = np.clip(pivot.offsets[pi] - ps, 0, length)
            s_off = np.clip(source.offsets[si] - ss, 0, length)
            a = _clip_texts(pivot_text.in_context(pivot.ids[pi], pivot.offsets[pi], pivot.text),
                            pivot.offsets[pi], pivot.text, ps, ps + length)
            b = _clip_texts(source_text.in_context(source.ids[si], source.offsets[si], source.text),
                            source.offsets[si], source.text, ss, ss + length)
            al = align_tokens(a, b, p_off, s_off, halo=halo, theta=theta)
            cost += al.cost
            exact[pi[al.exact]] = True
            paths.append(np.stack([pi[al.pairs[:, 0]], si[al.pairs[:, 1]]], axis=1))
            parts.append(np.stack([pi[al.groups[:, 0]], si[al.groups[:, 1]]], axis=1))
        # End-of-turn: the token closing the reply (inside the span, or the special token right after
        # the reply text when the span ends there, as with Llama-3's <|eot_id|>).
        p_tail = _end_of_turn(pivot, pivot_text, ps + length, pe)
        s_tail = _end_of_turn(source, source_text, ss + length, se)
        if len(p_tail) == 1 and len(s_tail) == 1:
            turn[p_tail] = r
            parts.append(np.array([[p_tail[0], s_tail[0]]], dtype=np.int64))
            paths.append(parts[-1])
            eot += 1
    def stack(xs: list[np.ndarray]) -> np.ndarray:
        out = np.concatenate(xs) if xs else np.zeros((0, 2), dtype=np.int64)
        # (pivot, source) order by one integer key; a stable sort of the usually sorted key is cheap
        return out[np.argsort(out[:, 0] * m + out[:, 1], kind="stable")]

    return ChatAlignment(n, m, stack(paths), int(cost), exact, stack(parts), turn=turn, end_of_turn=eot)

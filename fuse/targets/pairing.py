"""Which source distribution each pivot position may use: pairing by shared character boundaries.

A stored distribution at scored token t predicts token t from everything before it. A pivot
position and a source position are comparable when both models have read exactly the same
reply text before them, i.e. both tokens *start* at the same character of the same assistant
reply and neither starts inside the previous token (a clean boundary: no byte-level piece of a
split character). Each model reads its own chat template, so positions are compared in reply
coordinates: (reply r, characters from the start of reply r's content).

This is FuseChat's rule restated on characters. FuseChat pairs pivot logits position i with
source position j when tokens i and j are aligned 1:1 with equal text, or when pivot token i is
aligned to source tokens j1..jm whose concatenation is its text (then j = jm): in both cases
tokens i and j end at the same character, so the tokens they predict (i+1, j+1: the rows stored
here) start at that shared boundary. Pairing on boundaries also keeps the positions after a
many-pivot-to-one-source group, which FuseChat drops although the contexts are identical.

Two details of chat templates:
* a reply's first token may include the space a template puts before the reply (`▁Hello` after
  `[/INST]`): starts before the content count as the content start;
* the end-of-turn token pairs with the other model's end-of-turn token (both predict "the reply
  ends here"); tokens between the reply text and the end-of-turn token (the space in Llama-2's
  `18. </s>`) pair with nothing.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from core.chat import reply_end

END = -1  # reply-relative key of the end-of-turn token
Enders = str | Sequence[str] | None  # the end-of-turn token(s) of a template (core.chat.end_of_turn_tokens)


def _enders(eos: Enders) -> list[str]:
    items = [eos] if isinstance(eos, str) else list(eos or [])
    return sorted((t for t in items if t), key=len, reverse=True)


def content_ranges(text: str, assistant_spans: np.ndarray, eos: Enders) -> np.ndarray:
    """(m, 2) reply text of each assistant span: without its end-of-turn token (any of `eos`)
    and trailing whitespace, so the same characters under every template."""
    enders = _enders(eos)
    out = [(s, reply_end(text, s, e, enders)) for s, e in np.asarray(assistant_spans, dtype=np.int64).reshape(-1, 2).tolist()]
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def key_codes(text: str, spans: np.ndarray, assistant_spans: np.ndarray, eos: Enders) -> np.ndarray:
    """`reply_keys` as one int64 code per token, computed over whole arrays: (reply << 32) | (offset + 1),
    `END` as offset −1 (so code (reply << 32)), −1 for no comparable position. Two models' codes are
    equal exactly where their keys are."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    a_spans = np.asarray(assistant_spans, dtype=np.int64).reshape(-1, 2)
    n, m = len(spans), len(a_spans)
    out = np.full(n, -1, dtype=np.int64)
    if not n or not m:
        return out
    content = content_ranges(text, a_spans, eos)
    reply = token_replies(spans, a_spans)
    inside = reply < m
    r = np.minimum(reply, m - 1)
    s = spans[:, 0]
    first = np.ones(n, dtype=bool)
    first[1:] = reply[1:] != reply[:-1]
    clean = first.copy()
    clean[1:] |= spans[:-1, 1] <= s[1:]
    c0, c1 = content[r, 0], content[r, 1]
    past = inside & (s >= c1)
    keyed = inside & ~past & clean
    out[keyed] = (r[keyed] << 32) | (np.maximum(s[keyed] - c0[keyed], 0) + 1)
    enders = set(_enders(eos))
    for t in np.flatnonzero(past).tolist():  # past the reply text: only the end-of-turn token (a few per chat)
        if text[int(spans[t, 0]):int(spans[t, 1])] in enders:
            out[t] = int(r[t]) << 32
    return out


def reply_keys(text: str, spans: np.ndarray, assistant_spans: np.ndarray, eos: Enders) -> list[tuple[int, int] | None]:
    """Per scored token: (reply, offset in the reply's content) at a clean start, (reply, END) for
    the end-of-turn token, None where the token has no comparable position."""
    return [None if c < 0 else (c >> 32, (c & 0xFFFFFFFF) - 1) for c in key_codes(text, spans, assistant_spans, eos).tolist()]


def token_replies(spans: np.ndarray, assistant_spans: np.ndarray) -> np.ndarray:
    """(n,) index of the assistant reply each token belongs to (the first span ending after its start)."""
    ends = np.asarray(assistant_spans, dtype=np.int64).reshape(-1, 2)[:, 1]
    return np.searchsorted(ends, np.asarray(spans, dtype=np.int64).reshape(-1, 2)[:, 0], side="right")


def pair_positions(pivot_keys: list, source_keys: list) -> np.ndarray:
    """(n_pivot,) the source position paired with each pivot position, −1 where none.

    When several tokens of one model share a key (a lone space token before the first word),
    the last of them is the one whose context ends at the shared boundary, so it is used.
    """
    last_src: dict = {}
    for i, key in enumerate(source_keys):
        if key is not None:
            last_src[key] = i
    last_piv: dict = {}
    for j, key in enumerate(pivot_keys):
        if key is not None:
            last_piv[key] = j
    out = np.full(len(pivot_keys), -1, dtype=np.int64)
    for key, j in last_piv.items():
        out[j] = last_src.get(key, -1)
    return out


def _last_of_each(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct codes ≥ 0, index of each one's last occurrence)."""
    idx = np.flatnonzero(codes >= 0)[::-1]
    u, first_in_reversed = np.unique(codes[idx], return_index=True)
    return u, idx[first_in_reversed]


def pair_codes(pivot_codes: np.ndarray, source_codes: np.ndarray) -> np.ndarray:
    """`pair_positions` on `key_codes` arrays (the same pairs, without a Python loop per token)."""
    out = np.full(len(pivot_codes), -1, dtype=np.int64)
    pu, pj = _last_of_each(np.asarray(pivot_codes))
    su, si = _last_of_each(np.asarray(source_codes))
    if len(pu) and len(su):
        at = np.minimum(np.searchsorted(su, pu), len(su) - 1)
        hit = su[at] == pu
        out[pj[hit]] = si[at[hit]]
    return out


def token_chars(text: str, spans: np.ndarray, assistant_spans: np.ndarray, eos: Enders) -> np.ndarray:
    """(n,) characters of reply text each token covers, at least 1 (end-of-turn and template
    spaces count as one): the divisor of the per-token CE per character."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    content = content_ranges(text, assistant_spans, eos)
    out = np.ones(len(spans), dtype=np.int64)
    for c0, c1 in content.tolist():
        lo, hi = np.maximum(spans[:, 0], c0), np.minimum(spans[:, 1], c1)
        out = np.maximum(out, hi - lo)
    return out

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


def reply_keys(text: str, spans: np.ndarray, assistant_spans: np.ndarray, eos: Enders) -> list[tuple[int, int] | None]:
    """Per scored token: (reply, offset in the reply's content) at a clean start, (reply, END) for
    the end-of-turn token, None where the token has no comparable position."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    a_spans = np.asarray(assistant_spans, dtype=np.int64).reshape(-1, 2)
    content = content_ranges(text, a_spans, eos)
    enders = set(_enders(eos))
    reply = token_replies(spans, a_spans) if len(a_spans) else np.zeros(len(spans), int)
    keys: list[tuple[int, int] | None] = []
    for t, (s, e) in enumerate(spans.tolist()):
        r = int(reply[t])
        if r >= len(a_spans):
            keys.append(None)
            continue
        first = t == 0 or int(reply[t - 1]) != r
        clean = first or spans[t - 1, 1] <= s
        c0, c1 = int(content[r, 0]), int(content[r, 1])
        if s >= c1:  # past the reply text: only the end-of-turn token is comparable
            keys.append((r, END) if text[s:e] in enders else None)
        elif clean:
            keys.append((r, max(s - c0, 0)))
        else:
            keys.append(None)
    return keys


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

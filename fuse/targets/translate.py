"""Span translation: a source's next-token distribution as a distribution over *pivot* tokens.

FuseChat maps each of the source's top-k tokens to one pivot token through the vocabulary map.
When the source splits text more finely than the pivot (Llama-2 spells ` 18` as `▁`, `1`, `8`;
a byte-level pivot has one token `Ġ18`), the source's distribution at the pivot's position is
over `▁` alone: mapped, it says "the pivot's next token is `Ġ`", which the pivot's tokenizer never
produces there, and the source's knowledge of the digits sits at positions the pivot lacks.

Here the source's distribution is followed along the gold text until it covers the pivot's gold
token (positions I, I+1, … of the source that start inside the pivot token's characters):

* the source's gold pieces inside the pivot token are followed to the last one (the one that
  reaches the pivot token's end); each alternative a there stands for the text
  `gold text before it` + `text(a)`, with probability P(gold text before it) · p(a | …), where
  P(gold text before it) is the product of the source's gold-piece probabilities. Alternatives at
  earlier pieces are left out: `2` instead of the `1` of ` 18` starts a text the pivot splits
  differently (` 2…` may be `Ġ2`, `Ġ23`, …), and projecting it onto `Ġ2` would pile the mass of
  every number starting with 2 onto one token (measured on the demo world: worse targets);
* that text becomes a pivot token by **projection**: the pivot token with exactly that text, else
  the first token of the pivot's own tokenisation of it (a longer source token `▁equals` lands on
  the pivot's first piece `Ġequ`; all mass that starts the same way adds up);
* special tokens (end of turn) go through the vocabulary map; text a template puts before the
  reply (the space of `[/INST] Hello`) is swapped for the pivot template's own.

The gold pivot token thus gets exactly the source's probability of its text (the chain of its
pieces), and the alternatives that complete it keep their mass. When the source
token at the pair covers the pivot token exactly, this is the 1:1 case with projection in place
of the map. Tokens the projection cannot place (partial UTF-8 characters) are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fuse.align.surface import TokenText, bytes_to_text
from fuse.extract.store import TeacherRecord
from fuse.targets.fusion import TeacherView, merge_topk, seq_ce
from fuse.targets.pairing import END, Enders, content_ranges, reply_keys, token_replies


class PivotProjector:
    """Text → pivot token id: exact vocabulary text, else the first token of the pivot's own
    tokenisation (checked to be a prefix of the text), else the longest pivot token prefixing it."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.text = TokenText(tokenizer)
        self.exact: dict[str, int] = {}
        for i, b in enumerate(self.text.vocabulary()):
            if i in self.text.special_ids or not b:
                continue
            s = bytes_to_text(b)
            if s not in self.exact or (self.text.is_byte_fallback(self.exact[s]) and not self.text.is_byte_fallback(i)):
                self.exact[s] = i
        self.longest = max((len(s) for s in self.exact), default=1)
        self._cache: dict[str, int] = {}

    def __call__(self, s: str) -> int:
        if not s:
            return -1
        hit = self.exact.get(s)
        if hit is not None:
            return hit
        hit = self._cache.get(s)
        if hit is None:
            hit = self._cache[s] = self._project(s)
        return hit

    def _project(self, s: str) -> int:
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:  # a partial character (lone surrogate): no pivot token stands for it
            return -1
        ids = self.tokenizer(s, add_special_tokens=False)["input_ids"]
        if ids and s.startswith(self.text.text(ids[0])) and self.text.text(ids[0]):
            return int(ids[0])
        for n in range(min(len(s), self.longest), 0, -1):  # e.g. a prepended SentencePiece space
            hit = self.exact.get(s[:n])
            if hit is not None:
                return hit
        return -1


@dataclass
class SpanTranslator:
    """Span translation of one (pivot, source) pair: what it needs besides the two records."""

    projector: PivotProjector  # text → pivot id
    source_text: TokenText  # source id → text
    eos: tuple[Enders, Enders]  # end-of-turn tokens of the pivot's and the source's template

    def translate(self, p_rec: TeacherRecord, s_rec: TeacherRecord, pair: np.ndarray, vocab_map: np.ndarray,
                  k: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, k) pivot ids and log-probs of the source's distribution at each paired pivot position.

        The records' scored tokens (spans in each model's own rendered text) are taken in reply
        coordinates: each reply's content range and the reply of every token; the pivot's
        end-of-turn tokens are marked. `pair[t]` is the source position paired with pivot
        position t (−1: none, row left empty).
        """
        p_text, p_spans = p_rec.text, p_rec.spans
        p_content = content_ranges(p_rec.text, p_rec.assistant_spans, self.eos[0])
        p_reply = token_replies(p_rec.spans, p_rec.assistant_spans)
        p_end = np.array([key is not None and key[1] == END
                          for key in reply_keys(p_rec.text, p_rec.spans, p_rec.assistant_spans, self.eos[0])], dtype=bool)
        s_text, s_spans = s_rec.text, s_rec.spans
        s_content = content_ranges(s_rec.text, s_rec.assistant_spans, self.eos[1])
        s_reply = token_replies(s_rec.spans, s_rec.assistant_spans)
        s_topk_ids, s_topk_lp = s_rec.topk_ids, s_rec.topk_logprobs.astype(np.float32)
        s_gold, s_gold_lp = s_rec.token_ids, s_rec.gold_logprobs.astype(np.float32)
        source_text, project = self.source_text, self.projector
        n, n_s = len(p_spans), len(s_spans)
        width = k * 4  # candidates kept per row before merging (several steps × k alternatives)
        out_ids = np.full((n, width), -1, dtype=np.int64)
        out_lp = np.full((n, width), -np.inf, dtype=np.float32)
        special = source_text.special_ids
        for t in np.flatnonzero(pair >= 0).tolist():
            i = int(pair[t])
            cand: dict[int, float] = {}

            def add(pid: int, lp: float) -> None:
                if pid >= 0:
                    cand[pid] = float(np.logaddexp(cand[pid], lp)) if pid in cand else lp

            if p_end[t]:  # end of turn: the source's own end-of-turn distribution, through the map
                for a, lp in zip(s_topk_ids[i].tolist(), s_topk_lp[i].tolist()):
                    add(int(vocab_map[a]) if 0 <= a < len(vocab_map) else -1, lp)
            else:
                r = int(p_reply[t])
                p_start, p_stop = int(p_spans[t, 0]), int(p_spans[t, 1])
                lead_p = p_text[p_start:max(p_start, int(p_content[r, 0]))]  # template text inside the pivot token
                end_src = int(s_content[r, 0]) + (p_stop - int(p_content[r, 0]))  # the pivot token's end, source coords
                s_start = int(s_spans[i, 0])
                base = max(s_start, int(s_content[r, 0]))
                lead_s = s_text[s_start:base]
                log_prefix, l = 0.0, i
                while l < n_s and int(s_reply[l]) == r and int(s_spans[l, 0]) < end_src:
                    last = l + 1 >= n_s or int(s_reply[l + 1]) != r or int(s_spans[l + 1, 0]) >= end_src
                    prefix = s_text[base:max(int(s_spans[l, 0]), base)]
                    gold = int(s_gold[l])
                    # Only the last step's alternatives complete the pivot token's text; an earlier one
                    # (`2` instead of the gold `1` of ` 18`) starts a text the pivot splits differently
                    # (` 2…` is `Ġ2`, `Ġ23`, …): it is left out, and the gold piece continues the path.
                    steps = list(zip(s_topk_ids[l].tolist(), s_topk_lp[l].tolist())) if last else []
                    if last and gold not in s_topk_ids[l]:
                        steps.append((gold, float(s_gold_lp[l])))
                    for a, lp in steps:
                        if a < 0 or not np.isfinite(lp) or not last:
                            continue
                        if a in special:
                            add(int(vocab_map[a]) if l == i and 0 <= a < len(vocab_map) else -1, log_prefix + lp)
                            continue
                        piece = source_text.text(a)
                        if l == i and lead_s and piece.startswith(lead_s):
                            piece = piece[len(lead_s):]
                        add(project(lead_p + prefix + piece), log_prefix + lp)
                    log_prefix += float(s_gold_lp[l])
                    l += 1
            if cand:
                items = sorted(cand.items(), key=lambda kv: -kv[1])[:width]
                out_ids[t, :len(items)] = [a for a, _ in items]
                out_lp[t, :len(items)] = [b for _, b in items]
        return merge_topk(out_ids, out_lp, k)

    def view(self, p_rec: TeacherRecord, s_rec: TeacherRecord, pair: np.ndarray, p_chars: np.ndarray,
             vocab_map: np.ndarray, k: int) -> TeacherView:
        """The source's distribution over pivot tokens at each paired pivot position; its per-token
        CE is −log of the probability it gives the pivot's gold token, per character."""
        ids, lp = self.translate(p_rec, s_rec, pair, vocab_map, k)
        aligned = (pair >= 0) & (ids >= 0).any(axis=1)
        gold_lp = np.where(ids == p_rec.token_ids[:, None], lp, -np.inf).max(axis=1)  # (n,)
        ce = np.where(aligned, -gold_lp / p_chars, np.nan).astype(np.float32)
        return TeacherView(ids=ids, logprobs=lp, token_ce=ce, seq_ce=seq_ce(s_rec), aligned=aligned)

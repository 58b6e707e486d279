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
from fuse.targets.fusion import TeacherView, seq_ce
from fuse.targets.pairing import Enders, content_ranges, key_codes, token_replies


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

    def many(self, texts: list[str]) -> list[int]:
        """`self(s)` for each of `texts`, the pivot tokenizer called once for all that need it."""
        out = [self.exact.get(s, -2) if s else -1 for s in texts]
        todo = []
        for j, s in enumerate(texts):
            if out[j] == -2:
                hit = self._cache.get(s)
                if hit is not None:
                    out[j] = hit
                elif _encodable(s):
                    todo.append(j)
                else:  # a partial character (lone surrogate): no pivot token stands for it
                    out[j] = self._cache[s] = -1
        if todo:
            encoded = self.tokenizer([texts[j] for j in todo], add_special_tokens=False)["input_ids"]
            for j, ids in zip(todo, encoded):
                out[j] = self._cache[texts[j]] = self._first(texts[j], ids)
        return out

    def _first(self, s: str, ids: list[int]) -> int:
        """The projection of `s` given the pivot's tokenisation `ids` of it."""
        if ids and s.startswith(self.text.text(ids[0])) and self.text.text(ids[0]):
            return int(ids[0])
        for n in range(min(len(s), self.longest), 0, -1):  # e.g. a prepended SentencePiece space
            hit = self.exact.get(s[:n])
            if hit is not None:
                return hit
        return -1

    def _project(self, s: str) -> int:
        if not _encodable(s):  # a partial character (lone surrogate): no pivot token stands for it
            return -1
        return self._first(s, self.tokenizer(s, add_special_tokens=False)["input_ids"])


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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

        Most positions are one source step with no template text inside either token: their
        candidates are the source's top-k and gold at the paired position, each a table lookup
        (`_fast_rows`, whole arrays). The rest follow the chain of source pieces one by one.
        """
        p_text, p_spans = p_rec.text, p_rec.spans
        p_content = content_ranges(p_rec.text, p_rec.assistant_spans, self.eos[0])
        p_reply = token_replies(p_rec.spans, p_rec.assistant_spans)
        p_codes = key_codes(p_rec.text, p_rec.spans, p_rec.assistant_spans, self.eos[0])
        p_end = (p_codes >= 0) & ((p_codes & 0xFFFFFFFF) == 0)  # the key (reply, END)
        s_text, s_spans = s_rec.text, s_rec.spans
        s_content = content_ranges(s_rec.text, s_rec.assistant_spans, self.eos[1])
        s_reply = token_replies(s_rec.spans, s_rec.assistant_spans)
        s_topk_ids, s_topk_lp = s_rec.topk_ids, s_rec.topk_logprobs.astype(np.float32)
        s_gold, s_gold_lp = s_rec.token_ids, s_rec.gold_logprobs.astype(np.float32)
        n, n_s = len(p_spans), len(s_spans)
        width = k * 4  # candidates kept per row before merging (several steps × k alternatives)
        out_ids = np.full((n, width), -1, dtype=np.int64)
        out_lp = np.full((n, width), -np.inf, dtype=np.float32)
        rows = np.flatnonzero(pair >= 0)
        src = pair[rows]
        end = p_end[rows]
        # One source step with no template text in either token: the pivot token starts inside the
        # reply, so does the source token, and the next source piece starts at or after the pivot
        # token's end (or belongs to another reply, or there is none).
        r = np.minimum(p_reply[rows], max(len(p_content) - 1, 0))
        if len(p_content) and len(s_content) and n_s:
            p0, s0 = p_content[r, 0], s_content[np.minimum(r, len(s_content) - 1), 0]
            end_src = s0 + (p_spans[rows, 1] - p0)
            nxt = np.minimum(src + 1, n_s - 1)
            last = (src + 1 >= n_s) | (s_reply[nxt] != r) | (s_spans[nxt, 0] >= end_src)
            one = (p_spans[rows, 0] >= p0) & (s_spans[src, 0] >= s0) & (s_spans[src, 0] < end_src) & last
            one &= (s_reply[src] == r) & (p_reply[rows] < len(p_content)) & (r < len(s_content))
        else:
            one = np.zeros(len(rows), dtype=bool)
        fast = end | one
        self._fast_rows(rows[end], src[end], s_topk_ids, s_topk_lp, None, None, vocab_map, out_ids, out_lp)
        self._fast_rows(rows[one & ~end], src[one & ~end], s_topk_ids, s_topk_lp, s_gold, s_gold_lp, vocab_map,
                        out_ids, out_lp)
        source_text, project = self.source_text, self.projector
        special = source_text.special_ids
        for t in rows[~fast].tolist():
            i = int(pair[t])
            cand: dict[int, float] = {}

            def add(pid: int, lp: float) -> None:
                if pid >= 0:
                    cand[pid] = float(np.logaddexp(cand[pid], lp)) if pid in cand else lp

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
        return top_unique(out_ids, out_lp, k)

    def projections(self, ids: np.ndarray) -> np.ndarray:
        """Pivot id of each source id's whole text (`projector(text(a))`; −1: none), from a table
        per source id that fills as ids are met."""
        ids = np.asarray(ids, dtype=np.int64)
        table = self.__dict__.setdefault("_table", np.zeros(0, dtype=np.int64))
        top = int(ids.max(initial=-1)) + 1
        if top > len(table):
            table = self._table = np.concatenate([table, np.full(top - len(table), -2, dtype=np.int64)])
        new = np.unique(ids[(ids >= 0) & (table[np.maximum(ids, 0)] == -2)])
        if len(new):
            table[new] = self.projector.many([self.source_text.text(a) for a in new.tolist()])
        return np.where(ids >= 0, table[np.maximum(ids, 0)], -1)

    def _fast_rows(self, rows: np.ndarray, src: np.ndarray, topk_ids: np.ndarray, topk_lp: np.ndarray,
                   gold: np.ndarray | None, gold_lp: np.ndarray | None, vocab_map: np.ndarray,
                   out_ids: np.ndarray, out_lp: np.ndarray) -> None:
        """Candidates of one-step rows (with `gold`) or of end-of-turn rows (`gold` None: the source's
        top-k through the vocabulary map) into `out_ids`/`out_lp`, exactly as the chain loop makes them:
        in candidate order, duplicates merged by a running float64 logaddexp, sorted by value."""
        if not len(rows):
            return
        ids = topk_ids[src].astype(np.int64)
        lp = topk_lp[src].astype(np.float64)
        in_map = (ids >= 0) & (ids < len(vocab_map))
        mapped = np.where(in_map, vocab_map[np.clip(ids, 0, max(len(vocab_map) - 1, 0))], -1) if len(vocab_map) \
            else np.full_like(ids, -1)
        if gold is None:  # end of turn: every top-k entry through the map
            pid = mapped
        else:
            g = gold[src].astype(np.int64)
            ids = np.concatenate([ids, g[:, None]], axis=1)
            lp = np.concatenate([lp, gold_lp[src].astype(np.float64)[:, None]], axis=1)
            missing = ~(topk_ids[src] == gold[src][:, None]).any(axis=1)  # the gold piece joins when not in the top-k
            in_map = (ids >= 0) & (ids < len(vocab_map))
            mapped = np.where(in_map, vocab_map[np.clip(ids, 0, max(len(vocab_map) - 1, 0))], -1) if len(vocab_map) \
                else np.full_like(ids, -1)
            special = np.isin(ids, np.fromiter(self.source_text.special_ids, dtype=np.int64))
            pid = np.where(special, mapped, self.projections(ids))
            pid = np.where((ids >= 0) & np.isfinite(lp), pid, -1)
            pid[:, -1] = np.where(missing, pid[:, -1], -1)
            lp = 0.0 + lp  # the chain's log-prefix of one step (0.0 + −0.0 is 0.0, as there)
        merged_ids, merged_lp = merge_in_order(pid, lp)
        c = min(merged_ids.shape[1], out_ids.shape[1])
        out_ids[rows, :c] = merged_ids[:, :c]
        out_lp[rows, :c] = merged_lp[:, :c]

    def view(self, p_rec: TeacherRecord, s_rec: TeacherRecord, pair: np.ndarray, p_chars: np.ndarray,
             vocab_map: np.ndarray, k: int) -> TeacherView:
        """The source's distribution over pivot tokens at each paired pivot position; its per-token
        CE is −log of the probability it gives the pivot's gold token, per character."""
        ids, lp = self.translate(p_rec, s_rec, pair, vocab_map, k)
        aligned = (pair >= 0) & (ids >= 0).any(axis=1)
        gold_lp = np.where(ids == p_rec.token_ids[:, None], lp, -np.inf).max(axis=1)  # (n,)
        ce = np.where(aligned, -gold_lp / p_chars, np.nan).astype(np.float32)
        return TeacherView(ids=ids, logprobs=lp, token_ce=ce, seq_ce=seq_ce(s_rec), aligned=aligned)


def merge_in_order(pid: np.ndarray, lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, candidates (pid ≥ 0; −1 = left out) merged as a dict merges them in column order: a
    repeated pid adds its log-prob to its first occurrence's by float64 logaddexp, one column after
    the other; then sorted by value, highest first (ties in first-occurrence order), as float32."""
    m, c = pid.shape
    valid = pid >= 0
    acc = np.where(valid, lp, -np.inf)
    same = (pid[:, :, None] == pid[:, None, :]) & valid[:, :, None]
    first = same.argmax(axis=2)  # (m, c) column of each candidate's first occurrence
    dup = valid & (first < np.arange(c))
    for j in np.flatnonzero(dup.any(axis=0)).tolist():
        r = np.flatnonzero(dup[:, j])
        acc[r, first[r, j]] = np.logaddexp(acc[r, first[r, j]], lp[r, j])
    keep = valid & ~dup
    order = np.argsort(np.where(keep, -acc, np.inf), axis=1, kind="stable")
    ids = np.where(np.take_along_axis(keep, order, axis=1), np.take_along_axis(pid, order, axis=1), -1)
    out = np.where(ids >= 0, np.take_along_axis(acc, order, axis=1), -np.inf).astype(np.float32)
    return ids, out


def top_unique(ids: np.ndarray, lp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`fusion.merge_topk` for rows whose valid ids are distinct (nothing to merge), without its
    (n, m, m) comparison: the k best by log-prob (stable), −1/−inf padding."""
    lp = np.asarray(lp, dtype=np.float32)
    valid = (ids >= 0) & np.isfinite(lp)
    score = np.where(valid, lp + np.float32(0.0), -np.inf).astype(np.float32)  # merge_topk's lse turns −0.0 into 0.0
    order = np.argsort(-score, axis=1, kind="stable")[:, :k]
    out_lp = np.take_along_axis(score, order, axis=1)
    out_ids = np.where(np.isfinite(out_lp), np.take_along_axis(ids, order, axis=1), -1).astype(np.int32)
    if out_ids.shape[1] < k:
        pad = k - out_ids.shape[1]
        out_ids = np.pad(out_ids, ((0, 0), (0, pad)), constant_values=-1)
        out_lp = np.pad(out_lp, ((0, 0), (0, pad)), constant_values=-np.inf)
    return out_ids, out_lp

"""The training-row code as it was before the fast path (ROWS_VERSION 3, Dec 2026), kept verbatim
as the oracle of tests/test_fuse_rows_fast.py: the fast path must give the same rows bit for bit.
Only the names changed (ref_ prefix) and the imports (the unchanged public helpers)."""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from core.errors import PivotfuseError
from fuse.extract.store import TeacherRecord
from fuse.targets.fusion import TeacherView, fuse_sequence, merge_topk, seq_ce
from fuse.targets.pairing import END, Enders, content_ranges, token_chars, token_replies
from fuse.targets.rows import FusionStats, pivot_view, source_view


def _enders(eos: Enders) -> list[str]:
    items = [eos] if isinstance(eos, str) else list(eos or [])
    return sorted((t for t in items if t), key=len, reverse=True)


def ref_reply_keys(text: str, spans: np.ndarray, assistant_spans: np.ndarray, eos: Enders) -> list[tuple[int, int] | None]:
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


def ref_pair_positions(pivot_keys: list, source_keys: list) -> np.ndarray:
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


def ref_translate(self: Any, p_rec: TeacherRecord, s_rec: TeacherRecord, pair: np.ndarray, vocab_map: np.ndarray,
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
                      for key in ref_reply_keys(p_rec.text, p_rec.spans, p_rec.assistant_spans, self.eos[0])], dtype=bool)
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


def ref_view(self: Any, p_rec: TeacherRecord, s_rec: TeacherRecord, pair: np.ndarray, p_chars: np.ndarray,
             vocab_map: np.ndarray, k: int) -> TeacherView:
    """The source's distribution over pivot tokens at each paired pivot position; its per-token
    CE is −log of the probability it gives the pivot's gold token, per character."""
    ids, lp = ref_translate(self, p_rec, s_rec, pair, vocab_map, k)
    aligned = (pair >= 0) & (ids >= 0).any(axis=1)
    gold_lp = np.where(ids == p_rec.token_ids[:, None], lp, -np.inf).max(axis=1)  # (n,)
    ce = np.where(aligned, -gold_lp / p_chars, np.nan).astype(np.float32)
    return TeacherView(ids=ids, logprobs=lp, token_ce=ce, seq_ce=seq_ce(s_rec), aligned=aligned)


def ref_scored_positions(rec: TeacherRecord, input_ids: list[int], offsets: list[tuple[int, int]]) -> np.ndarray:
    """(n,) positions of the record's scored tokens in the re-tokenised sequence."""
    out = np.empty(rec.n_tokens, dtype=np.int64)
    t, L = 1, len(input_ids)
    for j in range(rec.n_tokens):
        s, e = int(rec.spans[j, 0]), int(rec.spans[j, 1])
        while t < L and (input_ids[t] != rec.token_ids[j] or tuple(offsets[t]) != (s, e)):
            t += 1
        if t >= L:
            raise PivotfuseError(f"conversation {rec.id}: the pivot tokenizer does not reproduce the stored tokens "
                                 "(store made with another tokenizer?); re-extract the pivot")
        out[j] = t
        t += 1
    return out


def ref_make_row(rec: TeacherRecord, tokenizer: Any, fused: Any) -> dict[str, Any]:
    enc = tokenizer(rec.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"][: rec.seq_len])
    pos = ref_scored_positions(rec, ids, enc["offset_mapping"][: rec.seq_len])
    labels = np.full(len(ids), -100, dtype=np.int64)
    labels[pos] = rec.token_ids
    return {"id": rec.id, "domain": rec.domain or "", "input_ids": ids, "labels": labels.tolist(),
            "target_ids": fused.ids.astype(np.int32), "target_logprobs": fused.logprobs.astype(np.float16)}


def ref_fusion_rows(pivot: Iterable[TeacherRecord], source: Callable[[int], TeacherRecord | None] | None,
                tokenizer: Any, vocab_map: np.ndarray | None, method: str, k: int, fallback: str,
                eos: tuple, stats: FusionStats,
                span: Any = None) -> Iterator[dict[str, Any]]:
    """Training rows for the pivot's records; `source(index)` gives the source's record of the same
    conversation (None: skipped by the source). `source=None`: the pivot's own targets. With
    `span`, the source's distributions are span-translated (`fuse.targets.translate`), else mapped id by id."""
    if source is not None and vocab_map is None:
        raise ValueError("a source needs a vocabulary map")
    for p_rec in pivot:
        stats.conversations += 1
        stats.positions += p_rec.n_tokens
        p_chars = token_chars(p_rec.text, p_rec.spans, p_rec.assistant_spans, eos[0])
        p_view = pivot_view(p_rec, p_chars)
        s_view = None
        if source is not None:
            s_rec = source(p_rec.index)
            if s_rec is None:
                stats.source_missing += 1
            else:
                s_chars = token_chars(s_rec.text, s_rec.spans, s_rec.assistant_spans, eos[1])
                pair = ref_pair_positions(ref_reply_keys(p_rec.text, p_rec.spans, p_rec.assistant_spans, eos[0]),
                                      ref_reply_keys(s_rec.text, s_rec.spans, s_rec.assistant_spans, eos[1]))
                s_view = ref_view(span, p_rec, s_rec, pair, p_chars, vocab_map, k) if span is not None \
                    else source_view(s_rec, pair, s_chars, vocab_map)
                stats.paired += int(s_view.aligned.sum())
                stats.same_text += sum(
                    p_rec.text[p_rec.spans[j, 0]:p_rec.spans[j, 1]] == s_rec.text[s_rec.spans[i, 0]:s_rec.spans[i, 1]]
                    for j, i in enumerate(pair.tolist()) if i >= 0)
                stats.compared += 1
                stats.pivot_ce += p_view.seq_ce
                stats.source_ce += s_view.seq_ce
        fused = fuse_sequence(method, p_view, s_view, p_rec.token_ids, k, fallback)
        stats.from_source += int(fused.from_source.sum())
        stats.fallback += int(fused.fallback.sum())
        stats.winners[fused.winner] += 1
        stats.source_weight += fused.source_weight
        dom = stats.by_domain.setdefault(p_rec.domain or "-", Counter())
        dom["conversations"] += 1
        dom["source_wins"] += int(fused.winner == "source")
        dom["from_source_positions"] += int(fused.from_source.sum())
        dom["positions"] += p_rec.n_tokens
        yield ref_make_row(p_rec, tokenizer, fused)

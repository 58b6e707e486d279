"""Vocabulary map source → pivot: one pivot id (or −1) for every source token id.

Built over a chat corpus (`fuse.align.build.build_map`: `python cli.py align`, or the pipeline):

1. **Special tokens, explicitly.** The source's end-of-turn token maps to the pivot's end-of-turn
   token, then EOS → EOS, BOS → BOS, UNK → UNK, PAD → PAD, start-of-turn → start-of-turn (markers
   found by rendering a one-turn chat with each model's own template); other special tokens map to
   a pivot special token with the same text, else nowhere. Special tokens never map to ordinary
   tokens and ordinary tokens never to special ones.
2. **Exact match** of the normalised bytes (`fuse.align.surface`): `▁the` (SentencePiece), `Ġthe`
   (byte-level) and `the` after a space are the same token; a byte-fallback `<0xE6>` is the byte
   0xE6. Among pivot tokens with equal bytes the one that is not a byte-fallback spelling wins,
   then the lowest id.
3. **Statistics** for the rest: the pivot token most often aligned 1:1 with the source token over
   the corpus (`fuse.align.chat`); ties go to the smaller edit distance between their texts, then
   to the lower pivot id. Counts are a sparse dict (FuseChat keeps a dense |V_p|×|V_s| float64
   matrix: 24–39 GB for real vocabularies).
4. Unseen, unmatched tokens stay −1 (`fuse.targets.fusion.translate_topk` drops them; FuseChat maps them to
   UNK, which would put probability on a token the pivot never predicts).

The map is JSON (`VocabMap.save`/`load`): the id array, one letter per source id telling how it was
mapped (`x` exact, `s` statistical, `p` special, `-` none), the statistics, and the evidence
(count) behind every statistical entry.

For fusion: `vmap = VocabMap.load(path)`; `vmap.to_pivot(source_id)` → pivot id or −1;
`vmap.translate(ids)` maps an array; `vmap.mapping` is the raw (V_source,) int64 array.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic import write_text
from core.errors import PivotfuseError
from core.files import is_int, need, read_json
from fuse.align.dp import ed
from fuse.align.mined import Alignment
from fuse.align.surface import TokenText

FORMAT = "pivotfuse-vocab-map"
VERSION = 1
HOW = {"x": "exact", "s": "statistical", "p": "special", "-": "unmapped"}
MARKERS = ("turn_end", "eos", "bos", "unk", "pad", "turn_start")


@dataclass
class VocabMap:
    """Source id → pivot id (−1: unmapped), how each id was mapped, and the statistics."""

    mapping: np.ndarray  # (V_source,) int64
    how: str  # one letter of HOW per source id
    pivot: dict = field(default_factory=dict)  # name, vocab_size
    source: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    evidence: list = field(default_factory=list)  # [source id, pivot id, count] of statistical entries
    fingerprint: str = ""

    def to_pivot(self, source_id: int) -> int:
        return int(self.mapping[source_id]) if 0 <= source_id < len(self.mapping) else -1

    def translate(self, ids: Any) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        inside = (ids >= 0) & (ids < len(self.mapping))
        return np.where(inside, self.mapping[np.clip(ids, 0, len(self.mapping) - 1)], -1)

    def save(self, path: str | Path) -> None:
        """Write JSON under a temporary name, then rename (a killed run leaves no half file)."""
        path = Path(path)
        data = {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint, "pivot": self.pivot,
                "source": self.source, "stats": self.stats, "map": self.mapping.tolist(), "how": self.how,
                "evidence": self.evidence}
        write_text(path, json.dumps(data, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> "VocabMap":
        path = Path(path)
        if not path.is_file():
            raise PivotfuseError(f"{path}: vocabulary map not found")
        data = read_json(path, "a vocabulary map (JSON object)")
        if data.get("format") != FORMAT:
            raise PivotfuseError(f"{path}: 'format' is not {FORMAT!r}")
        if data.get("version") != VERSION:
            raise PivotfuseError(f"{path}: 'version' {data.get('version')!r} is not {VERSION}")
        mapping, how = data.get("map"), data.get("how")
        if not isinstance(mapping, list) or not all(is_int(x) for x in mapping):
            raise PivotfuseError(f"{path}: 'map' must be a list of integers")
        if not isinstance(how, str) or len(how) != len(mapping) or set(how) - set(HOW):
            raise PivotfuseError(f"{path}: 'how' must hold one of {''.join(HOW)} per 'map' entry")
        for key in ("pivot", "source", "stats"):  # optional, but a mapping when present
            if data.get(key) is not None:
                need(data, key, lambda v: isinstance(v, dict), "a mapping", str(path))
        if data.get("evidence") is not None:
            need(data, "evidence", lambda v: isinstance(v, list) and all(
                isinstance(e, list) and len(e) == 3 and all(is_int(x) for x in e) for e in v),
                "a list of [source id, pivot id, count] integer triples", str(path))
        if data.get("fingerprint") is not None:
            need(data, "fingerprint", lambda v: isinstance(v, str), "a string", str(path))
        size = (data.get("pivot") or {}).get("vocab_size")
        arr = np.asarray(mapping, dtype=np.int64)
        if len(arr) and (arr.min() < -1 or (isinstance(size, int) and arr.max() >= size)):
            raise PivotfuseError(f"{path}: 'map' has ids outside the pivot vocabulary (size {size})")
        return cls(arr, how, data.get("pivot") or {}, data.get("source") or {}, data.get("stats") or {},
                   data.get("evidence") or [], data.get("fingerprint") or "")


def template_markers(tokenizer: Any, chat_template: str | None = None) -> dict[str, int | None]:
    """Ids of BOS/EOS/UNK/PAD and of the special tokens that open and close an assistant turn."""
    from core.chat import render_chat

    out: dict[str, int | None] = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("eos", "bos", "unk", "pad")}
    out["turn_start"] = out["turn_end"] = None
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    try:
        rendered = render_chat(tokenizer, msgs, chat_template)
    except PivotfuseError:  # no chat template: only the tokenizer's own special tokens
        return out
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    special = set(getattr(tokenizer, "all_special_ids", [])) | {
        int(i) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    special.discard(out["unk"])  # an unknown character in the template is not a marker
    start, end = rendered.assistant_spans[0] if rendered.assistant_spans else (len(rendered.text), len(rendered.text))
    content_end = start + 1  # the reply is "A"
    q = rendered.text.find("Q")
    before = [i for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]) if q + 1 <= s and e <= start and i in special]
    after = [i for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]) if s >= content_end and i in special]
    if after:
        out["turn_end"] = int(after[0])
    opening = [i for i in before if i != out["turn_end"]]
    if opening:
        out["turn_start"] = int(opening[0])
    return out


class VocabMapBuilder:
    """Collects 1:1 alignment counts over a corpus and builds the `VocabMap`."""

    def __init__(self, pivot: TokenText, source: TokenText, pivot_markers: dict | None = None,
                 source_markers: dict | None = None) -> None:
        self.pivot, self.source = pivot, source
        self.pivot_markers = pivot_markers or template_markers(pivot.tokenizer)
        self.source_markers = source_markers or template_markers(source.tokenizer)
        self.counts: dict[int, dict[int, int]] = {}  # source id → {pivot id: times aligned 1:1}
        self.pairs = 0
        self.conversations = 0

    def add(self, alignment: Alignment, pivot_ids: Any, source_ids: Any) -> None:
        """Count the 1:1 aligned (source token, pivot token) pairs of one aligned conversation."""
        one = alignment.one_to_one
        t = np.flatnonzero(one >= 0)
        p_ids = np.asarray(pivot_ids, dtype=np.int64)[t].tolist()
        s_ids = np.asarray(source_ids, dtype=np.int64)[one[t]].tolist()
        counts = self.counts
        for s, p in zip(s_ids, p_ids):
            row = counts.get(s)
            if row is None:
                row = counts[s] = {}
            row[p] = row.get(p, 0) + 1
        self.pairs += len(p_ids)
        self.conversations += 1

    def merge(self, counts: dict[int, dict[int, int]], pairs: int, conversations: int) -> None:
        """Add another builder's counts (of later conversations: the first-seen order of ids is kept)."""
        mine = self.counts
        for s, row in counts.items():
            into = mine.get(s)
            if into is None:
                mine[s] = dict(row)
                continue
            for p, c in row.items():
                into[p] = into.get(p, 0) + c
        self.pairs += pairs
        self.conversations += conversations

    def state(self) -> dict:
        """Counts as JSON-able data (for resuming an interrupted build)."""
        return {"counts": {str(s): {str(p): c for p, c in row.items()} for s, row in self.counts.items()},
                "pairs": self.pairs, "conversations": self.conversations}

    def restore(self, state: dict) -> None:
        self.counts = {int(s): {int(p): int(c) for p, c in row.items()} for s, row in state["counts"].items()}
        self.pairs, self.conversations = int(state["pairs"]), int(state["conversations"])

    def build(self) -> VocabMap:
        pv, sv = self.pivot, self.source
        p_special, s_special = pv.special_ids, sv.special_ids
        mapping = np.full(sv.vocab_size, -1, dtype=np.int64)
        how = ["-"] * sv.vocab_size
        # 1. special tokens
        for role in MARKERS:
            s, p = self.source_markers.get(role), self.pivot_markers.get(role)
            if s is not None and p is not None and 0 <= s < sv.vocab_size and how[s] == "-":
                mapping[s], how[s] = p, "p"
        p_special_text = {pv.bytes_of(i): i for i in sorted(p_special, reverse=True)}
        for s in sorted(s_special):
            if how[s] == "-" and sv.bytes_of(s) in p_special_text:
                mapping[s], how[s] = p_special_text[sv.bytes_of(s)], "p"
        # 2. exact normalised bytes among ordinary tokens
        canonical: dict[bytes, int] = {}
        for i, b in enumerate(pv.vocabulary()):
            if i in p_special or not b:
                continue
            j = canonical.get(b)
            if j is None or (pv.is_byte_fallback(j) and not pv.is_byte_fallback(i)):
                canonical[b] = i
        for s, b in enumerate(sv.vocabulary()):
            if s in s_special or how[s] != "-":
                continue
            p = canonical.get(b)
            if p is not None:
                mapping[s], how[s] = p, "x"
        # 3. statistics: most often aligned 1:1, then smaller edit distance, then lower id
        evidence = []
        for s, row in self.counts.items():
            if not 0 <= s < sv.vocab_size or how[s] != "-" or s in s_special:
                continue
            cands = [(c, p) for p, c in row.items() if p not in p_special]
            if not cands:
                continue
            top = max(c for c, _ in cands)
            s_text = sv.text(s)
            p = min((ed(s_text, pv.text(p)), p) for c, p in cands if c == top)[1]
            mapping[s], how[s] = p, "s"
            evidence.append([s, p, top])
        how_s = "".join(how)
        n = {name: how_s.count(code) for code, name in HOW.items()}
        stats = {**n, "source_vocab": sv.vocab_size, "exact_share": n["exact"] / max(1, sv.vocab_size),
                 "mapped_share": (sv.vocab_size - n["unmapped"]) / max(1, sv.vocab_size),
                 "conversations": self.conversations, "aligned_pairs": self.pairs,
                 "source_tokens_seen": len(self.counts)}
        return VocabMap(mapping, how_s, {"name": pv.name, "vocab_size": pv.vocab_size},
                        {"name": sv.name, "vocab_size": sv.vocab_size}, stats, sorted(evidence))

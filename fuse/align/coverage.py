"""Coverage of a (pivot, source) pair over a corpus: at how many pivot positions the source's
next-token distribution can be used.

Counted positions are the pivot tokens of the assistant replies (and their end-of-turn tokens), as
aligned by `fuse.align.chat`. Each falls in exactly one class:

* `exact`    — aligned 1:1 with a source token of the same span and text;
* `mapped`   — aligned 1:1 with a different source token that the vocabulary map sends to this
               very pivot token (a split that both sides made differently, an end-of-turn marker);
* `none`     — no usable source distribution: 1:1 with a token the map sends elsewhere
               (`mismatch`), one pivot token over several source tokens (`one_to_many`), several
               pivot tokens over one source token (`many_to_one`), or not aligned at all.

`exact + mapped + none = positions`; `shares()` gives the three fractions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fuse.align.mined import Alignment

KEYS = ("positions", "exact", "one_to_many", "many_to_one", "unaligned")


@dataclass
class Coverage:
    positions: int = 0
    exact: int = 0
    one_to_many: int = 0
    many_to_one: int = 0
    unaligned: int = 0
    # (source id, pivot id) → count of 1:1 pairs that are not exact: `mapped` once the map is known
    pairs: dict[tuple[int, int], int] = field(default_factory=dict)

    def add(self, al: Alignment, pivot_ids: Any, source_ids: Any, scope: np.ndarray | None = None) -> None:
        """Classify the pivot positions of one aligned conversation (`scope`: which to count;
        default every token with a reply index when `al.turn` exists, else all)."""
        if scope is None:
            scope = al.turn >= 0 if hasattr(al, "turn") else np.ones(al.n, dtype=bool)
        one = al.one_to_one
        p_cnt = np.bincount(al.groups[:, 0], minlength=al.n) if len(al.groups) else np.zeros(al.n, int)
        s_cnt = np.bincount(al.groups[:, 1], minlength=al.m) if len(al.groups) else np.zeros(al.m, int)
        shared = np.zeros(al.n, dtype=bool)  # pivot token whose source token also serves other pivot tokens
        if len(al.groups):
            multi = s_cnt[al.groups[:, 1]] > 1
            shared[al.groups[multi, 0]] = True
        idx = np.flatnonzero(scope)
        self.positions += len(idx)
        is_one = one[idx] >= 0
        ex = is_one & al.exact[idx]
        self.exact += int(ex.sum())
        rest = idx[is_one & ~al.exact[idx]]
        p_ids, s_ids = np.asarray(pivot_ids, dtype=np.int64), np.asarray(source_ids, dtype=np.int64)
        for s, p in zip(s_ids[one[rest]].tolist(), p_ids[rest].tolist()):
            self.pairs[(s, p)] = self.pairs.get((s, p), 0) + 1
        other = idx[~is_one]
        self.unaligned += int((p_cnt[other] == 0).sum())
        self.many_to_one += int(((p_cnt[other] > 0) & shared[other]).sum())
        self.one_to_many += int(((p_cnt[other] > 1) & ~shared[other]).sum())

    def merge(self, other: "Coverage") -> None:
        """Add the counts of another corpus part (of later conversations)."""
        for k in KEYS:
            setattr(self, k, getattr(self, k) + getattr(other, k))
        for key, c in other.pairs.items():
            self.pairs[key] = self.pairs.get(key, 0) + c

    def report(self, mapping: np.ndarray | None) -> dict:
        """Counts and shares; `mapped` needs the vocabulary map (source id → pivot id)."""
        mapped = mismatch = 0
        for (s, p), c in self.pairs.items():
            if mapping is not None and 0 <= s < len(mapping) and mapping[s] == p:
                mapped += c
            else:
                mismatch += c
        out = {k: getattr(self, k) for k in KEYS}
        none = self.positions - self.exact - mapped
        out.update(mapped=mapped, mismatch=mismatch, none=none)
        total = max(1, self.positions)
        out.update(exact_share=self.exact / total, mapped_share=mapped / total, none_share=none / total)
        return out

    def state(self) -> dict:
        d = asdict(self)
        d["pairs"] = [[s, p, c] for (s, p), c in self.pairs.items()]
        return d

    @classmethod
    def from_state(cls, d: dict) -> "Coverage":
        return cls(**{k: int(d[k]) for k in KEYS}, pairs={(int(s), int(p)): int(c) for s, p, c in d["pairs"]})

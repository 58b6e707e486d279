"""Token alignment of two tokenizations (pivot, source) of the same text: FuseLLM's MinED, fast.

Semantics (FuseLLM / FuseChat). Tokens are compared by their normalised text (`fuse.align.surface`).
An alignment is a monotone path through the n×m grid from (0, 0) to (n-1, m-1) with steps
diagonal, down (next pivot token, same source token) or right; its cost is the sum over its
cells of `editdistance(pivot[i], source[j])`, i.e. the recurrence
``cost(i, j) = ed(a_i, b_j) + min(cost(i-1, j-1), cost(i-1, j), cost(i, j-1))``.
`align_tokens` returns a path of minimum cost, as the full O(n·m) DP does, but fast:

1. **Exact shared tokens.** A pivot token and a source token with the same character span, the
   same text, and clean boundaries on both sides (no token of either side overlaps them) cost 0.
   The path is pinned to pass through every such cell ("anchor"). Pinning whole *spans* (forcing
   a diagonal step at every common token boundary) would lose the optimum on most real texts:
   the DP often lets a neighbouring exact token absorb a piece of a split word
   (`' full'` + `'_'` | `'binary'` is cheaper than `'_binary'` against both pieces).
2. **Windows.** Between two consecutive anchors that are not diagonal neighbours lies a span
   where the tokenizers disagree. The exact DP runs over the full rectangle of each such span
   widened by `halo` anchors on both sides and further over anchors that are within edit distance
   `theta` of a neighbouring token (repetitive text); overlapping windows merge. The optimum often
   steps around an exact token next to a disagreement (`'123'|'123'` vs `'1','2','3','1','2','3'`):
   `test_token_pinning_loses_optimum_window_fallback` keeps such inputs, where pinning every exact
   token is suboptimal and the window (the exact-DP fallback there) finds the optimum.
3. Everything else is a run of anchors on the diagonal, walked in O(1) per token.

Guarantee. Inside every window the DP is exact, so the result is optimal among paths that pass
through the anchors outside the windows. Equal total cost to the full DP is tested on every pair of
the four real tokenizers (texts with spaces, tabs, digits, code, emoji, CJK, accents, mixed
scripts; random texts; a long text) and on random segmentations of 2-3-letter texts
(tests/test_align.py). It is not a proof: an adversarial input whose optimum steps around many
consecutive exact tokens far from any disagreement can be missed (about 1 in 20,000 random
segmentations of 2-4-letter strings of 20-28 characters with the defaults; none in natural text
found). `halo=None` runs the full exact DP.

**Tie-break** (one rule, everywhere): among equal-cost paths, exact shared tokens are kept; inside
a window the back-trace from the end prefers the diagonal step, then the step that repeats the
source token (down), then the one that repeats the pivot token (right).

API used by fusion (see also `fuse.align.chat.align_chat` for two renderings of a chat):
    al = align_tokens(pivot_texts, source_texts, pivot_offsets, source_offsets)
    al.cost            # total edit distance of the path (= the full DP's optimum)
    al.pairs           # (K, 2) the MinED path itself, FuseLLM's pairs
    al.sources(t)      # source indices aligned with pivot token t (sorted; empty = unaligned):
                       #   the path's pairs that share characters (see `Alignment`)
    al.one_to_one      # (n,) source index where pivot t and that source token are grouped only
                       #      with each other, else -1
    al.exact           # (n,) pivot t is an exact shared token (same span and text)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cpdist

from fuse.align.dp import ed, solve_windows, window_costs

@dataclass
class Alignment:
    """A MinED path and the token groups reported from it.

    `pairs` (K, 2) is the minimum-cost path, (pivot index, source index) in path order: its cost is
    the FuseLLM objective. `groups` (G, 2) is what `sources`/`one_to_one` report: the path's pairs
    whose tokens share characters; a token that the path only paired across a boundary (absorbed
    by a neighbour: `' full'`–`'_'` in `' full' | '_binary'` vs `' full' | '_' | 'binary'`) is
    attached instead to the tokens it overlaps. So every reported pair overlaps in characters,
    each token's partners are contiguous and in order, and every token with characters is
    covered. Without offsets, `groups` is the path.
    """

    n: int
    m: int
    pairs: np.ndarray  # (K, 2) int64, the path
    cost: int
    exact: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # (n,) anchor tokens
    groups: np.ndarray | None = None  # (G, 2) int64 sorted by (pivot, source); None: the path

    def __post_init__(self) -> None:
        if self.groups is None:
            self.groups = self.pairs

    def sources(self, t: int) -> np.ndarray:
        """Source positions aligned with pivot token t (sorted)."""
        lo, hi = np.searchsorted(self.groups[:, 0], [t, t + 1])
        return self.groups[lo:hi, 1]

    @property
    def pivot_to_source(self) -> list[np.ndarray]:
        return [self.sources(t) for t in range(self.n)]

    @property
    def one_to_one(self) -> np.ndarray:
        """(n,) the source index grouped with pivot t when each has no other partner, else -1."""
        out = np.full(self.n, -1, dtype=np.int64)
        if not len(self.groups):
            return out
        p, s = self.groups[:, 0], self.groups[:, 1]
        pc = np.bincount(p, minlength=self.n)
        sc = np.bincount(s, minlength=self.m)
        ok = (pc[p] == 1) & (sc[s] == 1)
        out[p[ok]] = s[ok]
        return out


def _attach(kept: np.ndarray, side: int, own: np.ndarray, other: np.ndarray, presorted: bool = False) -> np.ndarray:
    """Pairs for the tokens of `side` (0 pivot, 1 source) that `kept` leaves without a partner: the
    tokens of the other side that overlap them, within the range that keeps the order of `kept`.

    Offsets are non-decreasing in token order, so the tokens overlapping [s, e) are the index range
    [#tokens ending at or before s, #tokens starting before e). `presorted`: `kept` is already in
    (side, other side) order (a monotone path's pairs are, both ways).
    """
    if not presorted:
        kept = kept[np.lexsort((kept[:, 1 - side], kept[:, side]))]
    xs, ys = kept[:, side], kept[:, 1 - side]
    has = np.zeros(len(own), dtype=bool)
    has[xs] = True
    orphans = np.flatnonzero(~has & (own[:, 1] > own[:, 0]))
    if not len(orphans):
        return np.zeros((0, 2), dtype=np.int64)
    first = np.searchsorted(np.maximum.accumulate(other[:, 1]), own[orphans, 0], "right")
    stop = np.searchsorted(other[:, 0], own[orphans, 1], "left")
    if len(xs):  # keep the order: partners between those of the nearest kept tokens on each side
        i = np.searchsorted(xs, orphans, "left")
        k = np.searchsorted(xs, orphans, "right")
        pre = np.maximum.accumulate(ys)
        suf = np.minimum.accumulate(ys[::-1])[::-1]
        first = np.maximum(first, np.where(i > 0, pre[np.maximum(i - 1, 0)], 0))
        stop = np.minimum(stop, np.where(k < len(xs), suf[np.minimum(k, len(xs) - 1)] + 1, len(other)))
    count = np.maximum(stop - first, 0)
    x = np.repeat(orphans, count)
    y = np.repeat(first, count) + (np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count))
    pair = np.stack([x, y], axis=1)
    return pair if side == 0 else pair[:, ::-1]


def overlap_groups(pairs: np.ndarray, a_off: np.ndarray, b_off: np.ndarray) -> np.ndarray:
    """The path's pairs that share characters, plus, for a token left without such a pair, the
    tokens of the other side that overlap it (in path order). Sorted by (pivot, source)."""
    p, s = pairs[:, 0], pairs[:, 1]
    share = np.maximum(a_off[p, 0], b_off[s, 0]) < np.minimum(a_off[p, 1], b_off[s, 1])
    kept = pairs[share]
    kept = np.concatenate([kept, _attach(kept, 0, a_off, b_off, presorted=True)])
    kept = np.concatenate([kept, _attach(kept, 1, b_off, a_off)])
    kept = kept.astype(np.int64)
    # one integer key per pair sorts like (pivot, source); np.unique(axis=0) and hashing are slower
    width = int(kept[:, 1].max()) + 1 if len(kept) else 1
    key = np.sort(kept[:, 0] * width + kept[:, 1])
    key = key[np.concatenate([[True], key[1:] != key[:-1]])] if len(key) else key  # unique, by sort
    return np.stack([key // width, key % width], axis=1)


def _objects(texts: Sequence[str]) -> np.ndarray:
    """(n,) object array of the texts: gathers and elementwise comparisons run in C."""
    out = np.empty(len(texts), dtype=object)
    out[:] = list(texts)
    return out


def _cheap(a: np.ndarray, b: np.ndarray, pts: np.ndarray, gaps: np.ndarray, theta: int) -> np.ndarray:
    """(K,) is point (i, j) within edit distance `theta` of a neighbouring token (repetitive text)?

    The neighbours of (i, j) are b[j-1], b[j+1], a[i-1], a[i+1], each compared with a[i] (= b[j]
    for an anchor). Where the next point is the diagonal neighbour (i+1, j+1) and a shared token,
    a[i+1] has b[j+1]'s text: that check is made once (likewise a[i-1] after (i-1, j-1)). The edit
    distance is at least the length difference, so most neighbours are ruled out by lengths; the
    rest go to one `rapidfuzz.process.cpdist` call (pairwise, in C). `a`/`b` are object arrays;
    `gaps`: the points k whose step to k+1 is not diagonal.
    """
    i, j = pts[:, 0], pts[:, 1]
    k = np.arange(len(pts))
    shared = (a[i] == b[j]).astype(bool)  # every point but a non-anchor start or end
    diag = np.ones(max(len(pts) - 1, 0), dtype=bool)  # (K-1,) point k+1 is point k's diagonal neighbour
    diag[gaps] = False
    next_diag, prev_diag = np.append(diag & shared[1:], False), np.insert(diag & shared[:-1], 0, False)
    up_b, dn_b = j > 0, j + 1 < len(b)
    up_a, dn_a = (i > 0) & ~prev_diag, (i + 1 < len(a)) & ~next_diag
    who = np.concatenate([k[up_b], k[dn_b], k[up_a], k[dn_a]])  # (N,) the point of each neighbour
    nb_b = np.concatenate([j[up_b] - 1, j[dn_b] + 1])
    nb_a = np.concatenate([i[up_a] - 1, i[dn_a] + 1])
    la = np.fromiter(map(len, a), dtype=np.int64, count=len(a))
    lb = np.fromiter(map(len, b), dtype=np.int64, count=len(b))
    near = np.abs(np.concatenate([lb[nb_b], la[nb_a]]) - la[i[who]]) <= theta
    out = np.zeros(len(pts), dtype=bool)
    if near.any():
        split = len(nb_b)
        other = np.concatenate([b[nb_b[near[:split]]], a[nb_a[near[split:]]]])
        d = cpdist(a[i[who[near]]], other, scorer=Levenshtein.distance, dtype=np.int64, score_cutoff=theta)
        out[who[near][d <= theta]] = True
    return out


def _windows(a: np.ndarray, b: np.ndarray, pts: np.ndarray, gaps: np.ndarray, halo: int, theta: int) -> np.ndarray:
    """(W, 2) windows as point index ranges [lo, hi]: each gap k (point k → k+1 not diagonal)
    widened by `halo` points on both sides, then further over points that are cheap to step
    around (`_cheap`); windows that overlap or touch merge.

    Vectorised: a window's low end is the last point at or below k-halo that is not cheap (0 if
    none), its high end the first at or above k+1+halo that is not cheap (the last point if none).
    Both ends only grow with k, so a gap starts a new window exactly when its low end lies past
    the previous gap's high end.
    """
    last = len(pts) - 1
    cheap = _cheap(a, b, pts, gaps, theta)
    q = np.arange(len(pts))
    below = np.maximum.accumulate(np.where(cheap, -1, q))  # last non-cheap point <= q (-1: none)
    above = np.minimum.accumulate(np.where(cheap, last + 1, q)[::-1])[::-1]  # first one >= q
    lo = np.maximum(below[np.maximum(gaps - halo, 0)], 0)
    hi = np.minimum(above[np.minimum(gaps + 1 + halo, last)], last)
    first = np.flatnonzero(np.concatenate([[True], lo[1:] > hi[:-1]]))  # gaps that open a window
    return np.stack([lo[first], hi[np.append(first[1:], len(gaps)) - 1]], axis=1)


def _clean(offsets: np.ndarray) -> np.ndarray:
    """(n,) token k has a non-empty span that no other token of the sequence overlaps."""
    s, e = offsets[:, 0], offsets[:, 1]
    before = np.maximum.accumulate(np.concatenate([[-1], e[:-1]]))
    after = np.minimum.accumulate(np.concatenate([s[1:], [np.iinfo(np.int64).max]])[::-1])[::-1]
    return (e > s) & (before <= s) & (e <= after)


def anchors(a: np.ndarray, b: np.ndarray, a_off: np.ndarray, b_off: np.ndarray) -> np.ndarray:
    """(K, 2) exact shared tokens: same span, same text, clean boundaries; increasing in both.
    `a`/`b` are object arrays of token texts."""
    if not len(a) or not len(b):
        return np.zeros((0, 2), dtype=np.int64)
    ia, ib = np.flatnonzero(_clean(a_off)), np.flatnonzero(_clean(b_off))
    width = int(max(a_off[:, 1].max(), b_off[:, 1].max())) + 1
    ka = a_off[ia, 0] * width + a_off[ia, 1]
    kb = b_off[ib, 0] * width + b_off[ib, 1]
    _, xa, xb = np.intersect1d(ka, kb, assume_unique=True, return_indices=True)
    pa, pb = ia[xa], ib[xb]
    same = (a[pa] == b[pb]).astype(bool)  # elementwise str ==, in C
    return np.stack([pa[same], pb[same]], axis=1)


def align_tokens(a: Sequence[str], b: Sequence[str], a_off: Sequence[Sequence[int]] | np.ndarray | None = None,
                 b_off: Sequence[Sequence[int]] | np.ndarray | None = None, *, halo: int | None = 1,
                 theta: int = 1) -> Alignment:
    """Minimum-edit-distance alignment of pivot texts `a` and source texts `b` (see module doc).

    `a_off`/`b_off` are the tokens' [start, end) character offsets in the same text. `halo`: anchors
    added to each window on both sides; `theta`: windows also grow over anchors within this edit
    distance of a neighbouring token. Without offsets, or with `halo=None`, the full exact DP runs
    (O(n·m), for checking).
    """
    n, m = len(a), len(b)
    if not n or not m:
        return Alignment(n, m, np.zeros((0, 2), dtype=np.int64), 0, np.zeros(n, dtype=bool))
    a, b = _objects(a), _objects(b)
    exact = np.zeros(n, dtype=bool)
    ao = None if a_off is None else np.asarray(a_off, dtype=np.int64).reshape(-1, 2)
    bo = None if b_off is None else np.asarray(b_off, dtype=np.int64).reshape(-1, 2)
    if ao is None or bo is None or halo is None:
        pts = np.array([[0, 0], [n - 1, m - 1]], dtype=np.int64)
    else:
        anc = anchors(a, b, ao, bo)
        exact[anc[:, 0]] = True
        head = [] if len(anc) and anc[0, 0] == 0 and anc[0, 1] == 0 else [[0, 0]]
        tail = [] if len(anc) and anc[-1, 0] == n - 1 and anc[-1, 1] == m - 1 else [[n - 1, m - 1]]
        pts = np.concatenate([np.array(head, dtype=np.int64).reshape(-1, 2), anc, np.array(tail, dtype=np.int64).reshape(-1, 2)])
    last = len(pts) - 1
    step = np.diff(pts, axis=0)
    gaps = np.flatnonzero((step[:, 0] != 1) | (step[:, 1] != 1))  # point k → k+1 is not diagonal
    windows = _windows(a, b, pts, gaps, halo or 0, theta) if len(gaps) else np.zeros((0, 2), dtype=np.int64)
    cost = ed(a[pts[0, 0]], b[pts[0, 1]])
    rect = pts[windows].reshape(-1, 4)  # (W, 4) r0, c0, r1, c1
    w_cost, cells, owner = solve_windows(window_costs(a, b, rect), rect[:, 2] - rect[:, 0] + 1, rect[:, 3] - rect[:, 1] + 1)
    cost += int(w_cost.sum())
    # The path: the points outside every window (each window's path replaces its points lo+1..hi)
    # and the windows' cells. A monotone path visits cells in (pivot, source) order: one sort.
    inside = np.zeros(len(pts) + 1, dtype=np.int64)
    if len(windows):
        np.add.at(inside, windows[:, 0] + 1, 1)
        np.add.at(inside, windows[:, 1] + 1, -1)
        cells = cells + rect[owner, :2]
    if not len(windows) or windows[-1, 1] < last:  # the end point costs 0 unless it is not an anchor
        cost += ed(a[n - 1], b[m - 1])
    path = np.concatenate([pts[np.cumsum(inside)[:-1] == 0], cells])
    path = path[np.argsort(path[:, 0] * m + path[:, 1], kind="stable")]
    groups = None if ao is None or bo is None else overlap_groups(path, ao, bo)
    return Alignment(n, m, path, int(cost), exact, groups)

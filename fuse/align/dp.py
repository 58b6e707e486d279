"""The exact DP of the MinED alignment, over many windows at once, and the edit distance of two token texts.

`fuse.align.mined` cuts an alignment into windows (spans where the tokenizers disagree) and hands
them here: `window_costs` fills each window's cost matrix (Levenshtein distances in C), and
`solve_windows` finds each window's minimum-cost path with the tie rule of `fuse.align.mined`.
`ed` is the cached edit distance the rest of the alignment uses for single token pairs.
"""

from __future__ import annotations

import editdistance
import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist, cpdist

_ed = editdistance.eval

_CACHE: dict[tuple[str, str], int] = {}
_CACHE_MAX = 2_000_000  # pairs (~200 MB at most); cleared when full


def ed(x: str, y: str) -> int:
    """Levenshtein distance of two token texts: `editdistance.eval`, with shortcuts and a cache.

    One `editdistance.eval` call costs about a microsecond; token pairs repeat across a corpus
    and most tokens are a character or two, so equal strings and single characters are
    answered in Python and the rest are remembered.
    """
    if x == y:
        return 0
    lx, ly = len(x), len(y)
    if lx <= 1 or ly <= 1:
        if not lx or not ly:
            return lx or ly
        return ly - (x in y) if lx == 1 else lx - (y in x)
    v = _CACHE.get((x, y))
    if v is None:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        v = _CACHE[(x, y)] = _ed(x, y)
    return v


_BATCH_BELOW = 40  # cells: a cdist call costs ~6 µs, a cpdist cell ~0.17 µs


def window_costs(a: np.ndarray, b: np.ndarray, rect: np.ndarray) -> np.ndarray:
    """Edit distances of each window's pivot × source tokens, all windows' cells in one flat array
    (window by window, each row-major). `rect` (W, 4): r0, c0, r1, c1, inclusive.

    `rapidfuzz` computes the same Levenshtein distance as `editdistance.eval` (code points, unit
    costs) in C: no Python call per cell. Small windows (most of them) go to one pairwise `cpdist`
    call over all their cells together; a larger one gets its own `cdist`.
    """
    rows, cols = rect[:, 2] - rect[:, 0] + 1, rect[:, 3] - rect[:, 1] + 1
    cells = rows * cols
    first = np.cumsum(cells) - cells  # (W,) offset of each window in the flat array
    flat = np.empty(int(cells.sum()), dtype=np.int64)
    big = cells >= _BATCH_BELOW
    for k, (r0, c0, r1, c1), f, n in zip(np.flatnonzero(big).tolist(), rect[big].tolist(), first[big].tolist(), cells[big].tolist()):
        flat[f:f + n] = cdist(a[r0:r1 + 1].tolist(), b[c0:c1 + 1].tolist(), scorer=Levenshtein.distance,
                              dtype=np.int64).ravel()
    small = np.flatnonzero(~big)
    if len(small):
        n_cells = cells[small]
        win = np.repeat(small, n_cells)  # (T,) window of each cell
        local = np.arange(int(n_cells.sum())) - np.repeat(np.cumsum(n_cells) - n_cells, n_cells)  # (T,) row-major
        c = cols[win]
        flat[first[win] + local] = cpdist(a[rect[win, 0] + local // c], b[rect[win, 1] + local % c],
                                          scorer=Levenshtein.distance, dtype=np.int64)
    return flat


def solve_windows(flat: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimum-cost path through each window's cost matrix (`flat` as `window_costs` gives it; window k
    is rows[k] × cols[k]), the start cell not counted: the costs (W,), and the paths' cells after
    the start, all windows together: (P, 2) (row, col) in their window and (P,) the window's index
    (cells in no particular order).

    Cumulative costs: D[0, 0] = 0, D[i, j] = c[i, j] + min(D[i-1, j-1], D[i-1, j], D[i, j-1]).
    All windows at once, one numpy row at a time. The recurrence is symmetric, so each window is
    swept along its shorter side (transposed). Windows lie side by side, most rows first (the
    windows still active at row i are a prefix), each after a separator column of cost `big`
    (more than any window's total). With S the row's prefix sums and m[j] = min(D[i-1, j-1],
    D[i-1, j]), a row is D[i, j] = S[j] + min_{k<=j} (m[k] - S[k-1]): one cumulative minimum. Any k
    left of a separator adds `big` to the sum, so the minimum never reaches across. Integer-exact.

    Back-trace: each cell's step is chosen for all cells at once (tie rule in `fuse.align.mined`'s doc,
    applied in the window's own orientation); the walk then follows flat indices.
    """
    flip = rows > cols
    short, long = np.minimum(rows, cols), np.maximum(rows, cols)  # swept shape
    first = np.cumsum(rows * cols) - rows * cols
    order = np.argsort(-short, kind="stable")
    costs = np.zeros(len(rows), dtype=np.int64)
    found: list[np.ndarray] = []  # per group: (P, 3) window, row, col
    groups: list[list[int]] = []
    rows_g = cols_g = cells_g = 0
    for k, r, c in zip(order.tolist(), short[order].tolist(), long[order].tolist()):
        # bound the padding (rows of the first window × all columns) to ~2× the cells
        if groups and rows_g * (cols_g + c + 1) <= 2 * (cells_g + r * c) + (1 << 8):
            groups[-1].append(k)
            cols_g, cells_g = cols_g + c + 1, cells_g + r * c
        else:
            groups.append([k])
            rows_g, cols_g, cells_g = r, c + 1, r * c
    for g in map(np.array, groups):
        rs, cs, fl = short[g], long[g], flip[g]
        ws = cs + 1  # with the separator
        ends = np.cumsum(ws)
        starts = ends - cs  # first column of each window
        cost = np.zeros((int(rs[0]), int(ends[-1])), dtype=np.int64)  # (R, L)
        n_cells = rs * cs
        w = np.repeat(np.arange(len(g)), n_cells)  # (T,) position in g of each cell
        local = np.arange(int(n_cells.sum())) - np.repeat(np.cumsum(n_cells) - n_cells, n_cells)
        i, j = local // cols[g][w], local % cols[g][w]  # in the window's own orientation
        f = fl[w]
        cost[np.where(f, j, i), starts[w] + np.where(f, i, j)] = flat[first[g][w] + local]
        cost[0, starts] = 0  # start cells
        big = int(cost.sum()) + 1
        cost[:, starts - 1] = big
        acc = np.cumsum(cost, axis=1)  # (R, L) S
        shift = acc - cost  # (R, L) S[k-1]
        live = (rs[None, :] > np.arange(len(cost))[:, None]).sum(1)  # (R,) windows with row i
        d = np.full_like(cost, 4 * big)  # cells below a window's last row stay out of every min
        d[:, 0] = big  # the first separator (the rows below never write it)
        d[0] = acc[0] - np.repeat(acc[0, starts], ws)
        d[0, starts - 1] = big
        for r in range(1, len(cost)):
            width = int(ends[int(live[r]) - 1])
            p = d[r - 1, :width]
            t = np.minimum(p[:-1], p[1:])
            t -= shift[r, 1:width]
            np.minimum.accumulate(t, out=t)
            t += acc[r, 1:width]
            d[r, 1:width] = t
        L = cost.shape[1]
        step = _steps(d, np.repeat(fl, ws))  # (R, L) flat offset back
        ends_at = (rs - 1) * L + starts + cs - 1  # (W,) end cells
        costs[g] = d.ravel()[ends_at]
        cells, count = [], []
        for at, stop in zip(ends_at.tolist(), starts.tolist()):  # walk back from each end
            n0 = len(cells)
            while at != stop:
                cells.append(at)
                at -= step.item(at)
            count.append(len(cells) - n0)
        idx = np.array(cells, dtype=np.int64)
        w = np.repeat(np.arange(len(g)), count)  # (P,) position of the cell's window in g
        rr, cc = idx // L, idx % L - starts[w]  # in the swept (maybe transposed) orientation
        f = fl[w]
        found.append(np.stack([g[w], np.where(f, cc, rr), np.where(f, rr, cc)], axis=1))
    cells = np.concatenate(found) if found else np.zeros((0, 3), dtype=np.int64)
    return costs, cells[:, 1:], cells[:, 0]


def _steps(d: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    """(R, L) flat-index step back from each cell: diagonal L+1, up L, left 1.

    Tie rule in the window's own orientation (pivot rows): diagonal, then down (pivot i-1), then
    right (source j-1). In a transposed window (`flipped` columns) the pivot step is left."""
    R, L = d.shape
    step = np.ones((R, L), dtype=np.int64)  # row 0: left
    if R > 1:
        diag, up, left = d[:-1, :-1], d[:-1, 1:], d[1:, :-1]
        f = flipped[1:]
        first = np.where(f, left, up)  # the pivot step's cumulative cost
        second = np.where(f, up, left)
        take_diag = (diag <= up) & (diag <= left)
        take_first = first <= second
        pivot_step = np.where(f, 1, L)  # left in a transposed window, else up
        other_step = np.where(f, L, 1)
        step[1:, 1:] = np.where(take_diag, L + 1, np.where(take_first, pivot_step, other_step))
        step[1:, 0] = L
    return step


def clear_cache() -> None:
    """Forget the remembered edit distances (benchmarks time the alignment from cold)."""
    _CACHE.clear()

"""Slice-parallel loops for the merge methods.

Element-wise work runs over fixed slices of a flattened tensor: cache-friendly, temporaries of
a few MB whatever the tensor's size, and results that depend neither on the slice size nor on
the number of threads (slices never interact; per-slice partial sums are added in order).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

CHUNK = 1 << 16  # elements per slice (fp32 temporaries of 256 KB: cache-resident)
_POOL: ThreadPoolExecutor | None = None


@contextmanager
def compute_threads(n: int) -> Iterator[None]:
    """Run `each` loops on `n` Python threads, each with single-threaded torch kernels.

    On a busy machine this is much faster than torch's OpenMP threads, whose barriers stall
    whenever one core is taken by another process; results do not depend on `n`.
    """
    global _POOL
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    _POOL = ThreadPoolExecutor(n, thread_name_prefix="merge") if n > 1 else None
    try:
        yield
    finally:
        if _POOL is not None:
            _POOL.shutdown()
        _POOL = None
        torch.set_num_threads(old)


def spans(n: int) -> list[tuple[int, int]]:
    """[start, end) slices covering range(n)."""
    return [(s, min(n, s + CHUNK)) for s in range(0, n, CHUNK)]


def each(fn: Callable[[int, int], Any], n: int) -> list[Any]:
    """[fn(start, end) for every slice of range(n)], in slice order (on the compute threads if any)."""
    todo = spans(n)
    if _POOL is None or len(todo) < 2:
        return [fn(s, e) for s, e in todo]
    return list(_POOL.map(lambda se: fn(*se), todo))

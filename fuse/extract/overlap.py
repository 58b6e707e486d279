"""Host work beside the forward pass: work computed ahead in a background thread (`ahead`) and
work finished behind, one task at a time, in another (`Behind`).

Extraction uses them to tokenise the next shard and to write the previous one while the current
one is scored, so the device does not wait on the host. Threads, not processes: the fast
tokenizer, numpy, Arrow and fsync release the GIL, and on a GPU the main thread spends the
forward pass waiting on kernels. Both are bounded (memory does not grow with the corpus), keep
the order of their items, and raise a background error in the calling thread, with a note that
names the item, rather than losing it or waiting for a result that never comes. With overlap off
(`depth` 0, `Behind(enabled=False)`) they run everything in the caller, in order, as a plain loop.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")
K = TypeVar("K")

log = logging.getLogger(__name__)


def _result(future: Future, what: str) -> Any:
    """The future's result, or its exception (the same object, raised here) with a note naming `what`."""
    try:
        return future.result()
    except BaseException as e:
        e.add_note(f"while {what} (in a background thread)")
        raise


def ahead(fn: Callable[[T], R], items: Iterable[T], depth: int, what: Callable[[T], str]) -> Iterator[R]:
    """`fn(item)` for each of `items`, yielded in order; with `depth` ≥ 1 one background thread
    computes up to `depth` results beyond the one the caller holds (0: each in the caller, when asked).

    An error of `fn(item)` is raised when that item's turn comes, noted with `what(item)`. Close the
    generator (`contextlib.closing`) so that stopping early waits for the one task that may be
    running and drops the queued ones.
    """
    it = iter(items)
    if depth <= 0:
        for item in it:
            yield fn(item)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="pivotfuse-ahead") as pool:
        queued: deque[tuple[T, Future]] = deque()
        try:
            for item in it:
                queued.append((item, pool.submit(fn, item)))
                if len(queued) > depth:  # the caller's item plus `depth` ahead: hand over the oldest
                    first, future = queued.popleft()
                    yield _result(future, what(first))
            while queued:
                first, future = queued.popleft()
                yield _result(future, what(first))
        finally:  # stopped early (an error, or the caller closed it): nothing more is started
            for _, future in queued:
                future.cancel()


class Behind:
    """Finish tasks in a background thread, one at a time and at most one unfinished: `submit`
    waits for the previous task first. `on_done(key)` runs in the caller's thread for each task
    that finished, in submission order: when the next task is submitted, or at the end of the `with`
    block for the last one (always then, so that when it runs is the same on every run).

    An error of a task is raised in the caller (at the next `submit` or at the end of the block),
    noted with `what(key)`. When the block ends on an error of the caller's own, the unfinished task
    is waited for (a task is not cut off mid-way) and its own error, if any, only logged.
    Disabled, `submit` runs the task and `on_done` in the caller at once.
    """

    def __init__(self, enabled: bool, on_done: Callable[[K], None], what: Callable[[K], str]) -> None:
        self.enabled = enabled
        self.on_done = on_done
        self.what = what
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pivotfuse-behind") if enabled else None
        self._pending: tuple[Any, Future] | None = None

    def submit(self, key: K, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` behind the caller (after the previous task has finished)."""
        self.settle()
        if self._pool is None:
            fn(*args)
            self.on_done(key)
            return
        self._pending = (key, self._pool.submit(fn, *args))

    def settle(self) -> None:
        """Wait for the unfinished task, if any: raise its error, else call `on_done`."""
        if self._pending is None:
            return
        key, future = self._pending
        self._pending = None  # settled once, whatever happens below
        _result(future, self.what(key))
        self.on_done(key)

    def __enter__(self) -> "Behind":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is None:
                self.settle()
            elif self._pending is not None:
                key, future = self._pending
                self._pending = None
                error = future.exception()  # waits: the task's thread must not outlive the block
                if error is not None:
                    log.warning("%s failed too: %r", self.what(key), error)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

"""CPU work over processes: an ordered map whose result does not depend on the number of processes.

The caller cuts its work into tasks that do not depend on how many processes run them (fixed shards
of a corpus or a store) and combines the results in task order, so one process and sixteen give the
same output. `ordered_map(fn, tasks, workers, setup)` yields `fn(state, task)` for each task in
order, with `state = setup(*setup_args)` made once: in this process (inherited by forked workers:
tokenizers and memory-mapped stores are loaded once), or in each worker where processes are spawned.
At most `window` tasks are in flight, so a long stream of tasks (a corpus read lazily) is never
queued whole.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_STATE: dict[str, Any] = {}  # the worker's state: set before forking, or by `_init` in a spawned worker


def cpu_count() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_workers(workers: int | None, tasks: int | None = None) -> int:
    """Processes to use: `workers` (0 or None: one per core), at most one per task, at least one."""
    n = cpu_count() if not workers else int(workers)
    if tasks is not None:
        n = min(n, tasks)
    return max(1, n)


def _init(setup: Callable[..., Any], setup_args: tuple) -> None:
    if "state" not in _STATE:  # spawned: build it here (a forked worker inherited it)
        _STATE["state"] = setup(*setup_args)


def _run(fn: Callable[[Any, T], R], task: T) -> R:
    return fn(_STATE["state"], task)


def ordered_map(fn: Callable[[Any, T], R], tasks: Iterable[T], workers: int, setup: Callable[..., Any],
                setup_args: tuple = (), window: int | None = None, state: Any = None) -> Iterator[R]:
    """`fn(state, task)` for each task, yielded in task order, over `workers` processes (1: here).

    `fn` and `setup` must be module-level functions (they are pickled where processes are spawned).
    `state`: `setup(*setup_args)` already made by the caller (then setup runs only in spawned workers).
    An error in a task is raised here, as it would be in one process; so is a worker that died
    (`BrokenProcessPool`), rather than a wait for a result that never comes.
    """
    from concurrent.futures import ProcessPoolExecutor

    if state is None:
        state = setup(*setup_args)
    if workers <= 1:
        for task in tasks:
            yield fn(state, task)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    if method == "fork":
        _STATE["state"] = state  # the workers inherit it
    window = window or 2 * workers
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=_init,
                                 initargs=(setup, setup_args)) as pool:
            pending: deque = deque()
            try:
                for task in tasks:
                    pending.append(pool.submit(_run, fn, task))
                    if len(pending) >= window:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:  # stopped early (an error, or the caller stopped): drop the queued tasks
                for f in pending:
                    f.cancel()
    finally:
        _STATE.pop("state", None)

"""The merge stream: read → merge → write, one tensor at a time, reading and writing on their
own threads so that disk and CPU overlap while memory stays bounded.

The reader may hold at most a byte budget of tensors read ahead (by default the working set of
the largest tensor: the peak is that one tensor, while small ones are read ahead of the merge).
Written tensors are logged as they land so that an interrupted merge resumes after them.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from core.errors import PivotfuseError
from merge.io import SafetensorsReader, ShardedWriter


@dataclass
class Item:
    """One tensor of the output and how to make it."""

    name: str
    shape: tuple[int, ...]
    sources: list[str]  # the tensor's name in each model (differs for a tied head)
    out_dtype: torch.dtype
    merge: bool  # float tensors are merged; integer buffers are copied from the base
    buf_dtype: torch.dtype  # inputs are held as stored when all share one float dtype, else float32
    nbytes: int  # working set: base + K models (+ output when its dtype differs) + a mask


class _Budget:
    """Bytes the reader may hold ahead of the writer; one item is always allowed."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used, self.cond = limit, 0, threading.Condition()

    def acquire(self, n: int, stop: threading.Event) -> bool:
        with self.cond:
            while self.used and self.used + n > self.limit and not stop.is_set():
                self.cond.wait(0.1)
            self.used += n
            return not stop.is_set()

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


def _glibc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_MALLOC_TRIM = _glibc_trim()
_TRIM_ABOVE = 64 << 20


def _release_free_memory() -> None:
    """Hand the allocator's free pages back to the OS after a big tensor: glibc keeps the
    slice temporaries' freed memory in its per-thread arenas, which would add up to the peak."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _all_finite(t: torch.Tensor) -> bool:
    # A sum is finite whenever every element is, barring overflow (float32: |sum| > 3e38),
    # which the exact element-wise check then tells apart; NaN and inf always propagate.
    # (`sum(dtype=float32)` would avoid a float16 overflow but copies the tensor to float32 first.)
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _check_finite(t: torch.Tensor, label: str, name: str) -> None:
    if not _all_finite(t):
        raise PivotfuseError(f"model {label}: tensor {name} contains NaN or inf")


def stream(base_r: SafetensorsReader, readers: list[SafetensorsReader], todo: list[Item], fn: Callable,
           args: Any, writer: ShardedWriter, log: Path, done: dict[str, dict], limit: int, bar: Any
           ) -> dict[str, float]:
    """Read → merge → write every item of `todo`: reading and writing on their own threads, the
    merge on this one; returns the seconds each stage was busy. Written tensors are logged in
    `log` (and `done`) as they land, so an interrupted stream can resume."""
    k = len(readers)
    budget, stop = _Budget(limit), threading.Event()
    q_in: queue.Queue = queue.Queue()
    q_out: queue.Queue = queue.Queue()
    errors: list[BaseException] = []
    secs = {"read": 0.0, "compute": 0.0, "write": 0.0}

    def read_loop() -> None:
        try:
            for it in todo:
                if not budget.acquire(it.nbytes, stop):
                    break
                t0 = time.perf_counter()
                if it.merge:
                    b = base_r.read_into(it.name, torch.empty(it.shape, dtype=it.buf_dtype))
                    _check_finite(b, base_r.label, it.name)
                    buf = torch.empty((k, *it.shape), dtype=it.buf_dtype)
                    for i, (r, src) in enumerate(zip(readers, it.sources)):
                        _check_finite(r.read_into(src, buf[i]), r.label, it.name)
                    q_in.put((it, b, buf))
                else:
                    q_in.put((it, base_r.read(it.name), None))
                secs["read"] += time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)
        finally:
            q_in.put(None)

    def write_loop(fh) -> None:
        try:
            while (msg := q_out.get()) is not None:
                it, tensor, rec = msg
                t0 = time.perf_counter()
                # Inputs are finite (checked on reading), yet the output may not be: an extreme
                # --scale or weight overflows float32, a --dtype float16 output overflows at 65504.
                # Checked here, on the writer's thread, so it overlaps with the next merge.
                if it.merge and not _all_finite(tensor):
                    dtype = str(it.out_dtype).removeprefix("torch.")
                    raise PivotfuseError(f"merged tensor {it.name} contains NaN or inf as {dtype}: nothing is "
                                         "published (check the weights, scale and output dtype)")
                writer.write(it.name, tensor)
                del msg, tensor  # freed before the budget lets the reader fetch more
                fh.write(json.dumps(rec) + "\n")
                fh.flush()  # logged only once written: a resumed run trusts these names
                done[it.name] = rec
                secs["write"] += time.perf_counter() - t0
                budget.release(it.nbytes)
                bar.update(1)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            stop.set()

    with log.open("a") as fh:
        rt = threading.Thread(target=read_loop, name="merge-read", daemon=True)
        wt = threading.Thread(target=write_loop, args=(fh,), name="merge-write", daemon=True)
        rt.start()
        wt.start()
        try:
            while not stop.is_set():
                msg = q_in.get()
                if msg is None:
                    break
                it, b, buf = msg
                del msg  # the queue's tuple must not keep the buffers alive
                t0 = time.perf_counter()
                rec: dict = {"name": it.name}
                if it.merge:
                    out = None if it.out_dtype == it.buf_dtype else torch.empty(it.shape, dtype=it.out_dtype)
                    res = fn(b, buf, dataclasses.replace(args, key=it.name), out)  # out=None: into b
                    tensor = res.tensor
                    rec.update(weights=res.weights, kept=res.kept)
                    del out
                    del res, buf
                else:
                    tensor = b
                if it.nbytes > _TRIM_ABOVE:
                    _release_free_memory()
                secs["compute"] += time.perf_counter() - t0
                q_out.put((it, tensor, rec))
                del b, tensor
        except BaseException:
            stop.set()
            raise
        finally:
            q_out.put(None)  # the writer finishes what is queued: a rerun resumes after it
            wt.join()
            stop.set()
            rt.join()
    if errors:
        raise errors[0]
    return secs

"""Wall time and peak resident memory of each phase of a run, per model.

    with phase("extract", "gemma3", vocab=262145):
        ...

Each phase's peak is its own: on Linux the kernel's high-water mark (VmHWM) is reset to the
current RSS when the phase starts (`/proc/self/clear_refs`, as bench/fuse_step.py does) and read
when it ends, so an earlier, larger phase does not hide a later one. Phases may nest: an outer
phase's peak includes its inner ones'. Where the mark cannot be reset (not Linux), the peak is
the process's peak so far (`peak_kind: process`). Records are kept in `RECORDS`, printed as one
line each, and appended to the JSONL file set by `record_to`.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

RECORDS: list[dict[str, Any]] = []
_STACK: list[dict[str, Any]] = []  # the open phases, innermost last
_SINK: list[Path] = []


def rss_mb(key: str = "VmRSS") -> float | None:
    """This process's current (VmRSS) or peak (VmHWM) resident memory in MiB; None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Set the peak mark (VmHWM) to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _process_peak_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20  # KiB on Linux, bytes on macOS


def _peak_now() -> float:
    return rss_mb("VmHWM") or _process_peak_mb()


def record_to(path: str | Path | None) -> None:
    """Append every finished phase's record to JSONL file `path` from now on (None: stop)."""
    _SINK.clear()
    if path is not None:
        _SINK.append(Path(path))


@contextmanager
def phase(name: str, model: str, **info: Any) -> Iterator[dict[str, Any]]:
    """Measure the block as phase `name` of `model`; the yielded record takes extra fields."""
    if _STACK:  # the parent's peak up to now, before the mark is reset for this phase
        _STACK[-1]["_peak"] = max(_STACK[-1]["_peak"], _peak_now())
    start = rss_mb() or 0.0
    exact = reset_peak()
    rec: dict[str, Any] = {"phase": name, "model": model, **info, "_peak": 0.0}
    _STACK.append(rec)
    t0 = time.perf_counter()
    try:
        yield rec
    finally:
        wall = time.perf_counter() - t0
        _STACK.pop()
        peak = max(rec.pop("_peak"), _peak_now())
        if _STACK:
            _STACK[-1]["_peak"] = max(_STACK[-1]["_peak"], peak)
        rec.update(seconds=round(wall, 2), rss_start_mb=round(start, 1), peak_rss_mb=round(peak, 1),
                   peak_kind="phase" if exact else "process")
        RECORDS.append(rec)
        extra = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in info.items())
        print(f"[phase] {name} {model}{f' ({extra})' if extra else ''}: {wall:.1f} s, peak RSS {peak:.0f} MB "
              f"(at start {start:.0f} MB)", flush=True)
        if _SINK:
            with _SINK[0].open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")

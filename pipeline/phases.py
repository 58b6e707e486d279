"""The run's time and memory per phase and model (`core.measure`), kept in `OUT/phases.jsonl` and
as a table at the end of the report."""

from __future__ import annotations

import json
from pathlib import Path

from core.atomic import write_text
from core.measure import record_to


def start_phases(out: Path) -> Path:
    """Record this invocation's phases in `OUT/phases.jsonl` (a rerun starts the file over: it holds
    what this invocation measured; a step that found its output finished shows the time to check it)."""
    path = out / "phases.jsonl"
    write_text(path, "")
    record_to(path)
    return path


def read_phases(path: Path) -> list[dict]:
    """The records of `phases.jsonl`, in order."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def phase_table(records: list[dict]) -> str:
    """Markdown: one row per phase and model, with its vocabulary sizes, wall time and peak RSS."""
    lines = ["| phase | model | vocabulary | seconds | peak RSS MB | RSS at start MB |", "|---|---|---|---:|---:|---:|"]
    for r in records:
        vocab = " × ".join(f"{r[k]:,}" for k in ("vocab", "pivot_vocab") if isinstance(r.get(k), int))
        lines.append(f"| {r['phase']} | {r['model']} | {vocab} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['rss_start_mb']:.0f} |")
    return "\n".join(lines)


def append_phase_table(report: Path, phases: Path | None) -> None:
    """Add the phase table to the report (nothing when no phase was measured)."""
    record_to(None)
    if phases is None or not phases.is_file():
        return
    records = read_phases(phases)
    if not records:
        return
    kind = "each phase's own peak (VmHWM reset at its start)" if all(r["peak_kind"] == "phase" for r in records) \
        else "the process's peak so far (this system cannot reset the peak mark)"
    text = report.read_text(encoding="utf-8").rstrip("\n")
    write_text(report, text + "\n\n## Time and memory per phase\n\n"
               f"Wall time and peak resident memory of each phase of this invocation, per model; peak RSS is {kind}. "
               "All phases run in this one process, so a phase's peak includes what earlier phases left "
               "resident (see the RSS at start). From `phases.jsonl`.\n\n" + phase_table(records) + "\n")

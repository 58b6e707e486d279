"""bench/merge.py: the interleaved-run statistics, the RESULT line and per-process peak RSS."""

from __future__ import annotations

import importlib.util
import resource
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_merge", Path(__file__).resolve().parents[1] / "bench" / "merge.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_summarise_medians_and_pair_ratios() -> None:
    # (mergekit s, MB), (pivotfuse s, MB) per repeat; medians: mergekit 30 s / 1800 MB, pivotfuse 10 s / 600 MB
    pairs = [((30.0, 1800.0), (10.0, 600.0)), ((40.0, 1700.0), (8.0, 610.0)), ((24.0, 1900.0), (12.0, 570.0))]
    s = bench.summarise(pairs)
    assert (s["mk_wall"], s["mk_rss"], s["pf_wall"], s["pf_rss"]) == (30.0, 1800.0, 10.0, 600.0)
    assert s["speedup"] == 3.0 and s["rss_ratio"] == pytest.approx(1 / 3)
    # per pair: 3.0, 5.0, 2.0 -- not the ratio of medians
    assert (s["pair_speedup"], s["pair_speedup_min"], s["pair_speedup_max"]) == (3.0, 2.0, 5.0)
    assert s["pair_rss_min"] == pytest.approx(570 / 1900) and s["pair_rss_max"] == pytest.approx(610 / 1700)
    assert s["pair_rss"] == pytest.approx(600 / 1800)


def test_summarise_even_repeats_takes_mean_of_middle_two() -> None:
    s = bench.summarise([((20.0, 100.0), (10.0, 50.0)), ((30.0, 300.0), (5.0, 30.0))])
    assert (s["mk_wall"], s["pf_wall"], s["speedup"]) == (25.0, 7.5, 25.0 / 7.5)
    assert (s["pair_speedup_min"], s["pair_speedup_max"]) == (2.0, 6.0)


def test_result_line_keys_and_order() -> None:
    fp32 = bench.summarise([((35.5, 1770.0), (10.0, 570.0))])
    bf16 = bench.summarise([((30.0, 1400.0), (12.0, 500.0))])
    line = bench.result_line({"float32": fp32, "bfloat16": bf16}, repeats=1, params=60_100_000)
    assert line == ("RESULT merge speedup=3.55 rss_ratio=0.32 speedup_bf16=2.50 rss_ratio_bf16=0.36 repeats=1 "
                    "fp32_speedup=3.55 fp32_rss_ratio=0.32 bf16_speedup=2.50 bf16_rss_ratio=0.36 "
                    "speedup_pair_min=3.55 speedup_pair_max=3.55 speedup_pair_min_bf16=2.50 "
                    "speedup_pair_max_bf16=2.50 params_m=60.1")


def test_run_reports_the_childs_peak_rss() -> None:
    own_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size_mb = int(own_mb) + 200  # above this process's peak, so the figure is the child's own
    wall, rss, out = bench.run([sys.executable, "-c", f"b = b'x' * ({size_mb} << 20); print('done')"])
    assert out.strip() == "done" and wall > 0
    assert size_mb <= rss < size_mb + 100


def test_run_refuses_a_child_smaller_than_the_parent() -> None:
    # a bare interpreter peaks below pytest's own peak: its ru_maxrss would be pytest's, not its own
    with pytest.raises(SystemExit, match=r"peak RSS of .* not measurable: .*keep torch out of the parent"):
        bench.run([sys.executable, "-c", "pass"])


def test_run_failure_names_the_command_and_status() -> None:
    with pytest.raises(SystemExit, match=r"failed \(3\):\nboom"):
        bench.run([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])

"""The memory mode of benchmarks/bench_transforms.py: the method reads a known allocation right, a case runs."""

import pytest
import torch
from conftest import load_benchmark

bench = load_benchmark("bench_transforms")
pytestmark = pytest.mark.skipif(not bench.can_reset_peak_rss(), reason="needs Linux's /proc/self/clear_refs")


def test_a_known_allocation_reads_its_size_in_process():
    # In a long pytest process other threads may free (or allocate) memory during a reading, which can only lower
    # (raise) it: the largest of three readings of an allocation, the least of three of nothing.
    mib = max(bench.peak_memory(lambda: torch.ones(100 * 2**18)) for _ in range(3)) / bench.MIB  # 100 MiB, written
    assert 98 <= mib <= 104, mib
    assert min(bench.peak_memory(lambda: None) for _ in range(3)) / bench.MIB < 2  # nothing allocated: ~nothing read


def test_a_known_allocation_reads_its_size_in_a_fresh_process():
    assert 48 <= bench.calibrate(50.0) <= 52


def test_one_case_and_the_table():
    results = bench.run_memory(rows=["MAF"], dims=[4], metrics=["train"], libs=["pyro_flows"], log=lambda _: None)
    ours = [r for r in results if r.lib == "pyro_flows"]
    assert len(ours) == 1 and ours[0].median is not None
    # a 512-row train step of five layers with hidden (128, 128) keeps ~3 MiB for backward at its peak, not none
    assert 1 < ours[0].median < 50, ours[0].median
    text = bench.memory_table(results)
    assert "| MAF | 4 | train |" in text and "n/a" in text  # peers not run
    assert bench.memory_ratio(results) == (None, None)


def test_memory_ratio_picks_the_least_peer():
    rows = [
        bench.Result("MAF", 8, "train", lib, runs=[v]) for lib, v in zip(bench.LIBS, (3.0, 2.0, 4.0, 2.5), strict=True)
    ]
    assert bench.memory_ratio(rows) == (1.5, "zuko")
    assert "1.50 (zuko) !" in bench.memory_table(rows)

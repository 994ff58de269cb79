"""benchmarks/harness.py: interleaved timing, Timing statistics, ratios, Markdown tables and the machine line."""

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness  # noqa: E402


def recording_cases(calls: list[str], names=("a", "b", "c")) -> dict:
    return {name: (lambda name=name: calls.append(name)) for name in names}


def test_interleave_rotates_the_order_after_untimed_warmup():
    calls: list[str] = []
    timings = harness.interleave(recording_cases(calls), repeats=3, warmup=2)
    # two warm-up rounds (rotated too), then one round per repeat, each starting one case later
    rounds = [calls[i : i + 3] for i in range(0, len(calls), 3)]
    assert rounds[2:] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert len(rounds) == 5 and all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert all(len(t.runs) == 3 and all(s >= 0 for s in t.runs) for t in timings.values())
    assert list(timings) == ["a", "b", "c"]


def test_interleave_syncs_around_every_timed_call():
    events: list[str] = []
    cases = {"x": lambda: events.append("x"), "y": lambda: events.append("y")}
    harness.interleave(cases, repeats=2, warmup=0, sync=lambda: events.append("sync"))
    assert events == ["sync", "x", "sync", "sync", "y", "sync", "sync", "y", "sync", "sync", "x", "sync"]


def test_interleave_measures_seconds_per_call(monkeypatch):
    clock = iter(range(100))
    monkeypatch.setattr(harness.time, "perf_counter", lambda: float(next(clock)))
    timings = harness.interleave({"a": lambda: None}, repeats=2, warmup=0)
    assert timings["a"].runs == [1.0, 1.0]


@pytest.mark.parametrize("repeats, warmup", [(0, 1), (2, -1)])
def test_interleave_rejects_bad_counts(repeats, warmup):
    with pytest.raises(ValueError, match="repeats"):
        harness.interleave({"a": lambda: None}, repeats=repeats, warmup=warmup)


def test_timing_median_and_best():
    t = harness.Timing()
    assert t.median is None and t.best is None
    for s in (0.4, 0.1, 0.3, 0.2):
        t.add(s)
    assert t.runs == [0.4, 0.1, 0.3, 0.2]
    assert t.median == pytest.approx(0.25) and t.best == 0.1


def test_ratio_against_the_best_peer_and_missing_values():
    assert harness.ratio(3.0, {"zuko": 2.0, "nflows": 1.5}) == (1.5, "zuko")
    assert harness.ratio(3.0, {"zuko": None, "nflows": 1.5}) == (2.0, "nflows")
    assert harness.ratio(None, {"zuko": 2.0}) == (None, None)
    assert harness.ratio(3.0, {"zuko": None}) == (None, None)
    assert harness.ratio(3.0, {}) == (None, None)
    assert harness.ratio(3.0, {"zuko": 0.0}) == (None, "zuko")


def test_markdown_table_alignment_and_missing_cells():
    text = harness.markdown_table(["row", "D", "ratio"], [["MAF", 8, 1.25], ["NSF", 32, None]], align=["l", "r", "c"])
    assert text.splitlines() == [
        "| row | D | ratio |",
        "|---|---:|:---:|",
        "| MAF | 8 | 1.25 |",
        "| NSF | 32 | n/a |",
    ]
    assert harness.markdown_table(["a", "b"], []).splitlines()[1] == "|---|---|"
    with pytest.raises(ValueError, match="align"):
        harness.markdown_table(["a", "b"], [], align="l")
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        harness.markdown_table(["a", "b"], [[1]])


def test_machine_line_mentions_date_commit_torch_threads_load_and_device(monkeypatch):
    monkeypatch.setattr(harness.os, "getloadavg", lambda: (0.59, 1.26, 1.72))
    monkeypatch.setattr(harness, "_commit", lambda: "abc1234")
    line = harness.machine_line()
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC, ", line)
    assert "commit abc1234" in line and f"torch {torch.__version__}" in line
    assert f"{torch.get_num_threads()} thread(s)" in line and "load average 0.59 1.26 1.72" in line
    assert line.endswith(f"CPU ({harness.os.cpu_count()} cores)")


def test_machine_line_names_the_cuda_device(monkeypatch):
    monkeypatch.setattr(harness.torch.cuda, "get_device_name", lambda device: f"Fake GPU {device}")
    assert harness.machine_line("cuda:1").endswith("Fake GPU cuda:1")


def test_commit_is_this_checkouts_head():
    commit = harness._commit()
    assert commit == "unknown" or re.fullmatch(r"[0-9a-f]{4,40}", commit)


def test_load_line_without_getloadavg(monkeypatch):
    def fail():
        raise OSError("no load")

    monkeypatch.setattr(harness.os, "getloadavg", fail)
    assert harness.load_line() == "load average n/a"


def test_version_and_threads():
    assert torch.__version__.startswith(harness.version("torch"))
    assert harness.version("no-such-distribution-xyz") == "unknown version"
    threads = torch.get_num_threads()
    try:
        harness.set_threads(1)
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="threads"):
            harness.set_threads(0)
    finally:
        torch.set_num_threads(threads)


def test_doctests():
    import doctest

    assert doctest.testmod(harness).failed == 0

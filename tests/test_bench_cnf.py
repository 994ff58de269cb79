"""Smoke test of benchmarks/bench_cnf.py: the pyro_flows side only, in quick mode (zuko not needed)."""

import torch
from conftest import load_benchmark


def test_pyro_flows_quick():
    bench = load_benchmark("bench_cnf")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results, diffs = bench.bench_cnf([2], ["pyro_flows"], 1, 32, 16, 1, log=lambda _: None)
        ours = [r for r in results if r.lib == "pyro_flows"]
        assert {r.metric for r in ours} == set(bench.METRICS)
        assert all(r.runs and r.median > 0 for r in ours)
        peers = [r for r in results if r.lib == "zuko"]
        assert peers and all(r.median is None for r in peers)  # not run: n/a
        assert diffs == {}
        text = bench.table(results, diffs)
        assert "n/a" in text and "log_prob" in text

        t_mle, target, t_fm, nll, steps = bench.fm_vs_mle(1, 2, 1, n_eval=64, batch=32, log=lambda _: None)
        assert t_mle > 0 and torch.isfinite(torch.tensor([target, nll])).all() and 1 <= steps <= 2
        assert t_fm is None or t_fm > 0
    finally:
        torch.set_num_threads(threads)

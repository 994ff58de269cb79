"""Smoke test of benchmarks/bench_cnf.py: the pyro_flows side only, in quick mode (zuko not needed)."""

import torch
from conftest import load_benchmark


def test_pyro_flows_quick():
    bench = load_benchmark("bench_cnf")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        libs = ["pyro_flows", "pyro_flows-autograd"]
        results, accuracies = bench.bench_cnf([2], libs, 1, 32, 16, 1, log=lambda _: None)
        ours = [r for r in results if r.lib in libs]
        assert {r.metric for r in ours} == set(bench.METRICS)
        assert all(r.runs and r.median > 0 for r in ours)
        peers = [r for r in results if r.lib == "zuko"]
        assert peers and all(r.median is None for r in peers)  # not run: n/a
        acc = accuracies[2]
        assert acc.error["zuko"] is None and acc.nfe["zuko"] is None
        # both traces are exact: the same solve, the same log-density up to float32 rounding
        assert acc.nfe["pyro_flows"] == acc.nfe["pyro_flows-autograd"] > 0
        assert abs(acc.error["pyro_flows"] - acc.error["pyro_flows-autograd"]) < 1e-4 and acc.error["pyro_flows"] < 1e-2
        text = bench.table(results, accuracies)
        assert "n/a" in text and "log_prob" in text

        t_mle, target, t_fm, nll, steps = bench.fm_vs_mle(1, 2, 1, n_eval=64, batch=32, log=lambda _: None)
        assert t_mle > 0 and torch.isfinite(torch.tensor([target, nll])).all() and 1 <= steps <= 2
        assert t_fm is None or t_fm > 0
    finally:
        torch.set_num_threads(threads)


def test_max_norm_is_the_largest_element():
    bench = load_benchmark("bench_cnf")
    state = (torch.tensor([[0.5, -3.0]]), torch.tensor([2.0]), torch.tensor([9.0]), torch.tensor([9.0]))
    assert bench.max_norm(state).item() == 3.0  # z and the log-det only

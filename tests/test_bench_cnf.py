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
        assert acc.error["zuko"] is None and acc.nfe["zuko"] is None and acc.tol == bench.TOL  # no zuko: no match
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


def test_rms_norm_is_the_larger_rms_of_z_and_the_log_det():
    bench = load_benchmark("bench_cnf")
    state = torch.tensor([[3.0, -4.0, 1.0, 9.0], [3.0, 4.0, -1.0, 9.0]])  # [z (D = 2), log-det, kinetic]
    # sqrt((9 + 16 + 9 + 16) / 4) for z; the kinetic column is unused
    assert abs(bench.rms_norm(state, features=2).item() - 12.5**0.5) < 1e-6
    assert abs(bench.rms_norm(state[:, [2, 1, 0, 3]], features=2).item() - 3.0) < 1e-6  # the log-det's


def test_shared_field_trace_is_the_autograd_trace():
    bench = load_benchmark("bench_cnf")
    torch.manual_seed(0)
    module = bench.ZukoStyleField(3, hidden=(8, 8)).double()
    field = bench.SharedField(module)
    z, t = torch.randn(5, 3, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    f, trace = field.forward_and_trace(z, t)
    jacobian = torch.func.vmap(torch.func.jacrev(lambda x: field(x[None], t)[0]))(z)
    torch.testing.assert_close(f, field(z, t))
    torch.testing.assert_close(trace, jacobian.diagonal(dim1=-2, dim2=-1).sum(-1))
    assert bench.SharedField(module, autograd=True).forward_and_trace is None

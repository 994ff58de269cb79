"""Smoke test of benchmarks/bench_sbi.py: the pyro_flows side only, in --quick mode (sbi not needed)."""

import torch
from conftest import load_benchmark


def test_pyro_flows_quick():
    bench = load_benchmark("bench_sbi")
    threads = torch.get_num_threads()
    results = bench.run(libs=["pyro_flows"], threads=1, repeats=1, cfg=bench.QUICK, warmup=False, log=lambda _: None)
    assert torch.get_num_threads() == threads  # restored

    ours = {r.flow: r for r in results if r.lib == "pyro_flows"}
    assert set(ours) == set(bench.FLOWS)
    for r in ours.values():
        assert r.error is None, r
        assert len(r.seconds) == 1 and r.time > 0 and r.params > 0
        assert 1 <= r.epochs[0] <= bench.QUICK.max_epochs
        assert 0.5 <= r.accuracy <= 1.0  # a C2ST accuracy (chance is 0.5)
    peers = [r for r in results if r.lib == "sbi"]
    assert {r.flow for r in peers} == set(bench.FLOWS) and all(r.error and not r.seconds for r in peers)
    text = bench.table(results)
    assert text.count("n/a") == 2 * 7 and "| maf | pyro_flows |" in text


def test_main_prints_table(capsys):
    bench = load_benchmark("bench_sbi")
    argv = ["--quick", "--libs", "pyro_flows", "--flows", "maf", "--simulations", "300", "--max-epochs", "2"]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "300 simulations" in printed and "| maf | sbi | n/a |" in printed and "| nsf | pyro_flows | n/a |" in printed


def test_analytic_posterior_is_prior_times_likelihood():
    # log q(a | x) - log q(b | x) must equal [log p(a) + log p(x | a)] - [log p(b) + log p(x | b)] for any a, b
    bench = load_benchmark("bench_sbi")
    task = bench.LinearGaussianTask(dim=4, noise=0.5)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, generator=generator, dtype=torch.float64)
    a, b = torch.randn(2, 10, 4, generator=generator, dtype=torch.float64)
    prior = torch.distributions.MultivariateNormal(
        torch.zeros(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
    )

    def log_joint(theta):
        likelihood = torch.distributions.Normal(theta @ task.mixing.T, task.noise).log_prob(x).sum(-1)
        return prior.log_prob(theta) + likelihood

    posterior = task.posterior(x)
    assert torch.allclose(posterior.log_prob(a) - posterior.log_prob(b), log_joint(a) - log_joint(b), atol=1e-10)


def test_simulations_follow_the_model():
    bench = load_benchmark("bench_sbi")
    task = bench.LinearGaussianTask(dim=3, noise=0.3)
    theta, x = task.simulations(100_000, seed=0)
    assert theta.shape == x.shape == (100_000, 3) and theta.dtype == x.dtype == torch.float32
    residual = (x - theta @ task.mixing.T.float()).double()
    assert torch.allclose(torch.cov(residual.T), 0.09 * torch.eye(3, dtype=torch.float64), atol=3e-3)
    assert torch.equal(task.simulations(10, seed=1)[1], task.simulations(10, seed=1)[1])  # seeded


def test_table_ratios():
    bench = load_benchmark("bench_sbi")
    ours = bench.Result(
        "maf", "pyro_flows", seconds=[2.0, 4.0, 3.0], epochs=[20, 40, 30], c2st=[0.6, 0.62, 0.64], params=10
    )
    peer = bench.Result("maf", "sbi", seconds=[9.0], epochs=[30], c2st=[0.7], params=11)
    text = bench.table([ours, peer])
    # pf: median 3.0 s, 0.1 s/epoch; sbi 9.0 s, 0.3 s/epoch: pf 3x faster in total and per epoch
    assert "| maf | pyro_flows | 10 | 0.620 ± 0.020 | 30 | 3.0 | 0.100 | — | — |" in text
    assert "| maf | sbi | 11 | 0.700 | 30 | 9.0 | 0.300 | 3.00× | 3.00× |" in text


def test_two_moons_reference_draws_are_the_grid_posterior():
    """The rejection draws (inverting the simulator) against the likelihood normalised on an 800 x 800 grid of the
    prior's box: means and second moments within Monte-Carlo error (20000 draws, sd ~ 0.003)."""
    bench = load_benchmark("bench_sbi")
    task = bench.TwoMoonsTask()
    x = task.simulate(torch.tensor([[0.3, 0.5]]), torch.Generator().manual_seed(3))[0]
    draws = task.reference_posterior(x, 20_000, seed=0).double()
    assert draws.shape == (20_000, 2) and bool((draws.abs() <= 1).all())
    cells = (torch.arange(800, dtype=torch.float64) + 0.5) / 400 - 1
    grid = torch.stack(torch.meshgrid(cells, cells, indexing="ij"), -1)
    log_p = task.log_likelihood(grid, x.double())
    p = (log_p - log_p.max()).exp()
    p = p / p.sum()
    mean = (p.unsqueeze(-1) * grid).sum((0, 1))
    second = (p[..., None, None] * grid.unsqueeze(-1) * grid.unsqueeze(-2)).sum((0, 1))
    torch.testing.assert_close(draws.mean(0), mean, atol=0.01, rtol=0)
    torch.testing.assert_close(draws.T @ draws / len(draws), second, atol=0.01, rtol=0)
    assert 0.45 < float((draws.sum(-1) > 0).double().mean()) < 0.55  # the two moons carry equal mass
    assert bool(torch.isfinite(task.log_likelihood(draws.float(), x)).all())  # every draw is possible


def test_two_moons_quick_run_and_table():
    bench = load_benchmark("bench_sbi")
    results = bench.run_moons(libs=["pyro_flows"], threads=1, repeats=1, cfg=bench.MOONS_QUICK, log=lambda _: None)
    ours, peer = results
    assert ours.lib == "pyro_flows" and ours.error is None and ours.epochs == [bench.MOONS_QUICK.max_epochs]
    assert 0.5 <= ours.accuracy <= 1.0 and ours.params > 0
    assert peer.lib == "sbi" and peer.error and not peer.seconds
    assert "| cnf | pyro_flows |" in bench.table(results)


def test_two_moons_main_prints_the_table(capsys):
    bench = load_benchmark("bench_sbi")
    assert bench.main(["--task", "two_moons", "--quick", "--libs", "pyro_flows", "--simulations", "300"]) == 0
    printed = capsys.readouterr().out
    assert "two moons, 300 simulations" in printed and "<= 2 epochs" in printed
    assert "| cnf | pyro_flows |" in printed and "| cnf | sbi | n/a |" in printed

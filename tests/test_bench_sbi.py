"""Smoke test of benchmarks/bench_sbi.py: the pyro_flows side only, in --quick mode (sbi not needed)."""

import torch
from conftest import load_benchmark


def test_pyro_flows_quick():
    bench = load_benchmark("bench_sbi")
    threads = torch.get_num_threads()
    quiet = dict(cfg=bench.QUICK, warmup=False, log=lambda _: None)
    results = bench.run(["linear_gaussian"], ["maf", "nsf"], ["pyro_flows"], threads=1, **quiet)
    assert torch.get_num_threads() == threads  # restored

    ours = {r.flow: r for r in results if r.lib == "pyro_flows" and r.error is None}
    assert set(ours) == {"maf", "nsf"}
    for r in ours.values():
        assert r.task == "linear_gaussian" and len(r.seconds) == 1 and r.time > 0 and r.params > 0
        assert 1 <= r.epochs[0] <= bench.QUICK.max_epochs
        assert 0.5 <= r.accuracy <= 1.0  # a C2ST accuracy (chance is 0.5)
        assert r.reach == []  # no peer: no time to its quality
    assert {(r.flow, r.lib) for r in results if r.error == "not run"} >= {("cnf", "pyro_flows"), ("maf", "sbi")}
    text = bench.table(results)
    assert text.count("n/a") >= 4 * 8 and "| linear_gaussian | maf | pyro_flows |" in text


def test_snapshots_time_to_reach_and_table():
    """The weight copies during training are evenly spaced, their times increase and exclude the copying, and the
    time to a peer's C2ST is the first scanned copy (or the final weights) that reaches it."""
    bench = load_benchmark("bench_sbi")
    task = bench.LinearGaussianTask(dim=2, noise=0.5)
    theta, x = task.simulations(300, seed=0)
    cfg = bench.replace(bench.QUICK, dim=2, max_epochs=6)
    trained = bench.train_pyro_flows("maf", task, theta, x, cfg, seed=0, record=True)
    snapshots = trained.snapshots
    times = [t for t, _ in snapshots.taken]
    assert len(times) >= 6 and times == sorted(times) and 0 < times[-1] <= trained.seconds
    assert not torch.equal(snapshots.taken[0][1][0], snapshots.taken[-1][1][0])  # the weights moved
    final = [p.detach().clone() for p in snapshots.parameters]
    observations = task.simulations(1, seed=1)[1]
    assert bench.time_to_reach(trained, 1.0, task, observations, 100, seed=0) == times[round(0.15 * (len(times) - 1))]
    assert bench.time_to_reach(trained, 0.0, task, observations, 100, seed=0) is None  # C2ST is never below 0.5
    assert all(torch.equal(p, f) for p, f in zip(snapshots.parameters, final, strict=True))  # final weights back

    ours = bench.Result("linear_gaussian", "maf", "pyro_flows", [4.0], [20], [0.52], [1.0], params=10)
    peer = bench.Result("linear_gaussian", "maf", "sbi", [8.0], [40], [0.55], params=11)
    text = bench.table([ours, peer])
    assert "| linear_gaussian | maf | pyro_flows | 10 | 0.520 | 20 | 4.0 | 0.200 | 1.0 | 2.00× | 8.00× |" in text
    assert "| linear_gaussian | maf | sbi | 11 | 0.550 | 40 | 8.0 | 0.200 | — | — | — |" in text
    ours.reach.append(None)  # a repeat that never reached the peer's C2ST is counted, not hidden
    assert "| 1.0 (1 of 2 repeats) | 2.00× | 8.00× |" in bench.table([ours, peer])


def test_main_prints_table(capsys):
    bench = load_benchmark("bench_sbi")
    argv = ["--quick", "--tasks", "linear_gaussian", "--libs", "pyro_flows", "--flows", "maf", "--simulations", "300"]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "300 simulations" in printed and "load average" in printed and "commit" in printed
    assert "| linear_gaussian | maf | sbi | n/a |" in printed
    assert "| linear_gaussian | nsf | pyro_flows | n/a |" in printed


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


def test_two_moons_cnf_quick_run_and_table():
    bench = load_benchmark("bench_sbi")
    cfg = bench.replace(bench.QUICK, max_epochs=2)
    results = bench.run(["two_moons"], ["cnf"], ["pyro_flows"], cfg=cfg, warmup=False, log=lambda _: None)
    ours = [r for r in results if r.error is None]
    assert len(ours) == 1 and ours[0].lib == "pyro_flows" and ours[0].flow == "cnf" and ours[0].epochs == [2]
    assert 0.5 <= ours[0].accuracy <= 1.0 and ours[0].params > 0
    text = bench.table(results)
    assert "| two_moons | cnf | pyro_flows |" in text and "| two_moons | FMPE | sbi | n/a |" in text


def test_two_moons_posterior_rejects_outside_the_box_and_reports_its_acceptance():
    """On two moons' box prior pyro_flows' NPE rejects the draws outside it (its default there) and the benchmark
    records the acceptance of each posterior sampled; the real prior of the linear Gaussian has nothing to reject."""
    bench = load_benchmark("bench_sbi")
    task = bench.TwoMoonsTask()
    theta, x = task.simulations(400, seed=0)
    trained = bench.train_pyro_flows("maf", task, theta, x, bench.QUICK, seed=0)
    samples = trained.sample(x[0], 300)
    assert samples.shape == (300, 2) and bool((samples.abs() <= 1).all())
    assert len(trained.acceptance) == 1 and 0.0 < trained.acceptance[0] <= 1.0
    linear = bench.LinearGaussianTask(dim=2, noise=0.5)
    theta, x = linear.simulations(300, seed=0)
    trained = bench.train_pyro_flows("maf", linear, theta, x, bench.QUICK, seed=0)
    trained.sample(x[0], 10)
    assert trained.acceptance == []

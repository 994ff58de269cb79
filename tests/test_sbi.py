"""Neural posterior estimation against analytic posteriors: a linear-Gaussian simulator
θ ~ N(0, I₂), x = Aθ + σε, whose posterior is N(P Aᵀx / σ², P) with P = (I + AᵀA / σ²)⁻¹.
"""

from __future__ import annotations

import functools
import math
import warnings

import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyro_flows as pf
from pyro_flows.diagnostics import c2st, sbc
from pyro_flows.infer import NPE, AtomicProposalLoss, NPEPosterior, simulate

A = torch.tensor([[1.0, 0.5], [-0.3, 1.0]])
NOISE = 0.5
PRIOR = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
COVARIANCE = torch.linalg.inv(torch.eye(2) + A.T @ A / NOISE**2)
X_OBS = torch.tensor([0.5, -1.0])
FAST = dict(batch_size=128, lr=3e-3, progress=False)


def linear_gaussian(theta: torch.Tensor) -> torch.Tensor:
    return theta @ A.T + NOISE * torch.randn_like(theta)


def analytic_posterior(x: torch.Tensor) -> dist.MultivariateNormal:
    return dist.MultivariateNormal(x @ (COVARIANCE @ A.T / NOISE**2).T, COVARIANCE)


class NaNAbove:
    """A picklable simulator that fails (NaN) where θ₀ > threshold."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        x = theta + torch.randn_like(theta)
        return x.masked_fill((theta[:, :1] > self.threshold), float("nan"))


@pytest.fixture(scope="module")
def npe() -> NPE:
    theta, x = simulate(linear_gaussian, PRIOR, 2000, seed=0, progress=False)
    torch.manual_seed(0)  # the networks are initialised when the first round arrives
    return (
        NPE(PRIOR, "maf", transforms=1, hidden=(16,))
        .append_simulations(theta, x)
        .train(max_epochs=60, patience=10, seed=0, **FAST)
    )


# -- the posterior --------------------------------------------------------------------------------------------------
def test_posterior_matches_the_analytic_mean_covariance_and_density(npe):
    posterior, truth = npe.posterior(X_OBS), analytic_posterior(X_OBS)
    torch.manual_seed(1)
    samples = posterior.sample((4000,))
    assert samples.shape == (4000, 2) and posterior.batch_shape == () and posterior.event_shape == (2,)
    torch.testing.assert_close(samples.mean(0), truth.mean, atol=0.08, rtol=0)  # posterior std ~0.42
    torch.testing.assert_close(torch.cov(samples.T), COVARIANCE, atol=0.04, rtol=0)
    reference = truth.sample((2000,))
    kl = (truth.log_prob(reference) - posterior.log_prob(reference)).mean()
    assert 0 <= kl.item() < 0.05  # KL(p || q) by Monte Carlo


def test_c2st_to_the_analytic_posterior_is_close_to_chance(npe):
    torch.manual_seed(2)
    samples = npe.posterior(X_OBS).sample((800,))
    assert c2st(samples, analytic_posterior(X_OBS).sample((800,))) <= 0.6


def test_sbc_of_the_trained_npe_is_uniform(npe):
    result = sbc(npe, PRIOR, linear_gaussian, num_simulations=300, num_posterior_samples=49, seed=3)
    assert bool((result.pvalues > 0.01).all()), result.pvalues
    levels, coverage = result.coverage()
    assert float((coverage - levels).abs().max()) < 0.1


def test_sbc_flags_the_npe_on_data_from_another_simulator(npe):
    """The same trained NPE, checked against a simulator it was not trained on (x shifted by +1): a biased posterior."""
    result = sbc(npe, PRIOR, lambda theta: linear_gaussian(theta) + 1.0, num_simulations=300,
                 num_posterior_samples=49, seed=3)  # fmt: skip
    assert float(result.pvalues.max()) < 1e-4, result.pvalues
    levels, coverage = result.coverage()
    assert float((coverage - levels).abs().max()) > 0.2


def test_a_batch_of_observations_gives_a_batch_of_posteriors(npe):
    xs = torch.stack([X_OBS, -X_OBS, torch.zeros(2)])
    posterior = npe.posterior(xs)
    assert posterior.batch_shape == (3,) and posterior.sample((5,)).shape == (5, 3, 2)
    theta = torch.randn(7, 3, 2)
    single = torch.stack([npe.posterior(x).log_prob(theta[:, i]) for i, x in enumerate(xs)], dim=1)
    torch.testing.assert_close(posterior.log_prob(theta), single)


def test_save_and_load_round_trip(npe, tmp_path):
    path = npe.save(tmp_path / "npe.pt")
    loaded = NPE.load(path, PRIOR)
    reference = analytic_posterior(X_OBS).sample((10,))
    torch.testing.assert_close(loaded.posterior(X_OBS).log_prob(reference), npe.posterior(X_OBS).log_prob(reference))
    header = torch.load(path, weights_only=True)
    assert (header["format"], header["version"]) == ("pyro_flows.NPE", 2)  # pyro_flows.saving's one format
    with pytest.raises(ValueError, match="not a file written by NPE.save"):
        NPE.load(pf.saving.atomic_save({"weights": torch.zeros(1)}, tmp_path / "other.pt"), PRIOR)
    theta, x = npe.rounds[0][:2]
    custom = NPE(PRIOR, flow=lambda features, context: pf.MAF(features, context, transforms=1, hidden=(8,)))
    custom.append_simulations(theta[:50], x[:50]).save(tmp_path / "custom.pt")
    with pytest.raises(ValueError, match="callable flow"):
        NPE.load(tmp_path / "custom.pt", PRIOR)
    with pytest.raises(ValueError, match="nothing to save"):
        NPE(PRIOR).save(tmp_path / "empty.pt")


# -- support --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("constraint", ["auto", "bijection"])
def test_bounded_prior_support_is_respected_and_the_density_integrates_to_one(constraint):
    """Both parameterisations of a box prior: samples inside it, a density normalised over it (the rejecting one by
    its estimated acceptance, which is the flow's mass inside the box by an independent grid integration)."""
    prior = dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1)
    theta, x = simulate(lambda t: t + 0.3 * torch.randn_like(t), prior, 1000, seed=0, progress=False)
    torch.manual_seed(0)
    npe = NPE(prior, "maf", transforms=2, hidden=(16,), constraint=constraint).append_simulations(theta, x)
    npe.train(max_epochs=5, seed=0, **FAST)
    assert npe.constraint == ("reject" if constraint == "auto" else "bijection")  # the default for a box
    x_obs = torch.tensor([0.9, -0.2])  # posterior mass near the boundary
    posterior = npe.posterior(x_obs)
    samples = posterior.sample((5000,))
    assert samples.shape == (5000, 2)
    assert bool(((samples > -1) & (samples < 1)).all()) and bool(posterior.support.check(samples).all())
    torch.testing.assert_close(posterior.support.base_constraint.upper_bound, torch.ones(2))
    # the density (flow, z-scoring, biject_to log-dets or the acceptance) integrates to 1 over the box: midpoint rule
    grid = (torch.arange(200) + 0.5) / 100 - 1
    points = torch.cartesian_prod(grid, grid)
    with torch.no_grad():
        mass = posterior.log_prob(points).exp().sum() * 0.01**2
        flow_mass = posterior.flow_distribution.log_prob(points).exp().sum() * 0.01**2
    assert float(mass) == pytest.approx(1.0, abs=0.02)
    if npe.constraint == "reject":
        assert 0.5 < float(posterior.acceptance) < 0.99  # mass leaks out near the boundary ...
        assert float(posterior.acceptance) == pytest.approx(float(flow_mass), abs=0.015)  # ... and is measured
        with pytest.raises(ValueError, match="no reparameterised gradient"):
            posterior.rsample((2,))
    else:
        assert float(posterior.acceptance) == 1.0 and float(flow_mass) == pytest.approx(1.0, abs=0.02)
        assert posterior.rsample((2,)).requires_grad
    outside = torch.tensor([[1.5, 0.0], [0.0, -1.01]])
    assert posterior.log_prob(outside).tolist() == [-math.inf, -math.inf]
    samples, log_prob = posterior.sample_and_log_prob((7,))
    torch.testing.assert_close(log_prob, posterior.log_prob(samples))
    with pytest.raises(ValueError, match="outside the prior's support"):
        npe.append_simulations(outside, torch.zeros(2, 2))


def test_rejection_matches_an_exact_truncated_posterior_in_1d():
    """θ ~ U(0, 1), x = θ + 0.2ε: the posterior is N(x, 0.2²) truncated to [0, 1]. The rejecting posterior's density is
    normalised on [0, 1], its samples stay there and match the exact CDF; a batch of observations rejects per row."""
    prior = dist.Uniform(torch.zeros(1), torch.ones(1)).to_event(1)
    theta, x = simulate(lambda t: t + 0.2 * torch.randn_like(t), prior, 4000, seed=0, progress=False)
    torch.manual_seed(0)
    npe = NPE(prior, "maf", transforms=2, hidden=(16,)).append_simulations(theta, x)
    npe.train(max_epochs=40, seed=0, **FAST)
    assert npe.constraint == "reject"
    x_obs = torch.tensor([[0.05], [0.5]])  # one near the boundary (much mass leaks), one inside
    posterior = npe.posterior(x_obs)
    assert posterior.batch_shape == (2,) and float(posterior.acceptance[0]) < float(posterior.acceptance[1])
    grid = ((torch.arange(1000) + 0.5) / 1000).reshape(-1, 1, 1)
    with torch.no_grad():
        density = posterior.log_prob(grid.expand(-1, 2, 1)).exp()  # (1000, 2)
    torch.testing.assert_close(density.mean(0), torch.ones(2), atol=0.02, rtol=0)
    samples = posterior.sample((2, 3000))
    assert samples.shape == (2, 3000, 2, 1) and bool(((samples > 0) & (samples < 1)).all())
    probe = torch.tensor([0.1, 0.3, 0.5, 0.7]).reshape(-1, 1)
    empirical_cdf = (samples.reshape(-1, 2) <= probe.unsqueeze(1)).double().mean(1)  # (4, 2)
    model_cdf = torch.stack([density[grid[:, 0, 0] <= p].sum(0) / 1000 for p in probe[:, 0]]).double()
    torch.testing.assert_close(empirical_cdf, model_cdf, atol=0.03, rtol=0)  # the draws follow the density
    exact = torch.distributions.Normal(x_obs[:, 0], 0.2)
    low, high = exact.cdf(torch.zeros(1)), exact.cdf(torch.ones(1))
    exact_cdf = ((exact.cdf(probe) - low) / (high - low)).double()
    torch.testing.assert_close(model_cdf, exact_cdf, atol=0.15, rtol=0)  # a short training's posterior
    far = dist.Uniform(torch.full((1,), 50.0), torch.full((1,), 50.001)).to_event(1)  # no flow mass there
    stranded = NPEPosterior(npe.estimator, x_obs[1], far, reject=True)
    assert float(stranded.acceptance) == 0.0
    with pytest.raises(ValueError, match="cannot be normalised"):
        stranded.log_prob(torch.full((1,), 50.0005))
    with pytest.raises(ValueError, match="fewer than 10 inside the prior's support"):
        stranded._reject(10, max_draws=5000)


def test_constraint_choice_and_bad_constraints(tmp_path):
    box = dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1)
    assert NPE(box).constraint == "reject" and NPE(box, "cnf").constraint == "bijection"  # cnf: as measured
    assert NPE(PRIOR).constraint == "bijection"  # a real support: the identity, nothing to reject
    positive = dist.LogNormal(torch.zeros(2), torch.ones(2)).to_event(1)
    assert NPE(positive).constraint == "bijection" and NPE(positive, constraint="reject").constraint == "reject"
    with pytest.raises(ValueError, match="constraint must be one of"):
        NPE(box, constraint="clip")
    with pytest.raises(ValueError, match="full dimension.*Simplex"):
        NPE(dist.Dirichlet(torch.ones(3)), constraint="reject")
    theta, x = simulate(lambda t: t + 0.3 * torch.randn_like(t), box, 200, seed=0, progress=False)
    for constraint in ("reject", "bijection"):  # the file keeps the choice
        npe = NPE(box, "maf", transforms=1, hidden=(8,), constraint=constraint).append_simulations(theta, x)
        loaded = NPE.load(npe.save(tmp_path / f"{constraint}.pt"), box)
        assert loaded.constraint == constraint and loaded.posterior(X_OBS).reject == (constraint == "reject")


def test_posterior_follows_the_estimators_dtype(npe):
    """float64 observations (and θ) into a float32 NPE are moved to float32, with the same results."""
    x64 = X_OBS.double()
    posterior, posterior64 = npe.posterior(X_OBS), npe.posterior(x64)
    torch.manual_seed(0)
    samples = posterior64.sample((10,))
    assert samples.dtype == torch.float32
    torch.manual_seed(0)
    torch.testing.assert_close(samples, posterior.sample((10,)))
    log_prob = posterior64.log_prob(samples.double())
    assert log_prob.dtype == torch.float32
    torch.testing.assert_close(log_prob, posterior.log_prob(samples))
    assert npe.posterior(x64.unsqueeze(0).expand(3, 2)).sample((4,)).dtype == torch.float32


# -- sequential NPE -------------------------------------------------------------------------------------------------
def test_atomic_loss_with_all_atoms_matches_a_direct_computation():
    class Shifted(nn.Module):  # q(θ | x) = N(x, I)
        def forward(self, x):
            return dist.Normal(x, 1.0).to_event(1)

    theta, x = torch.randn(6, 2), torch.randn(6, 2)
    loss = AtomicProposalLoss(PRIOR, num_atoms=6)(Shifted(), theta, x)  # every other row is an atom
    log_ratio = dist.Normal(x[:, None], 1.0).to_event(1).log_prob(theta[None]) - PRIOR.log_prob(theta)[None]
    expected = -(log_ratio.diagonal() - torch.logsumexp(log_ratio, dim=1)).mean()
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="num_atoms"):
        AtomicProposalLoss(PRIOR, num_atoms=1)


def test_sequential_npe_beats_one_round_at_equal_simulations():
    """A broad prior (σ_θ = 3) and small noise (0.1): one round sees few simulations near x_obs."""
    prior = dist.Normal(torch.zeros(2), 3 * torch.ones(2)).to_event(1)
    simulator = lambda t: t + 0.1 * torch.randn_like(t)
    x_obs = torch.tensor([1.5, -2.0])
    variance = 1 / (1 / 9 + 1 / 0.01)
    truth = dist.Normal(variance * x_obs / 0.01, variance**0.5).to_event(1)
    torch.manual_seed(0)
    reference = truth.sample((2000,))
    train = dict(max_epochs=60, patience=None, **FAST)
    flow = dict(flow="maf", transforms=2, hidden=(32, 32))

    @torch.no_grad()
    def kl(npe):
        return float((truth.log_prob(reference) - npe.posterior(x_obs).log_prob(reference)).mean())

    kls = []  # (one round of 600, two rounds of 300) per seed
    for seed in (0, 1):
        theta, x = simulate(simulator, prior, 600, seed=seed, progress=False)
        torch.manual_seed(seed)
        one_round = NPE(prior, **flow).append_simulations(theta, x).train(seed=seed, **train)
        sequential = NPE(prior, **flow).append_simulations(theta[:300], x[:300]).train(seed=seed, **train)
        proposal = sequential.posterior(x_obs)
        theta2 = proposal.sample((300,))
        sequential.append_simulations(theta2, simulator(theta2), proposal=proposal).train(seed=seed, **train)
        kls.append((kl(one_round), kl(sequential)))
    one_round_kl, sequential_kl = map(sum, zip(*kls, strict=True))
    assert all(two < one for one, two in kls) and sequential_kl < 0.6 * one_round_kl, kls


def test_train_with_a_proposal_marks_the_new_rounds_and_switches_to_the_apt_loss():
    """The issue's spelling, ``append_simulations(theta, x).train(proposal=posterior)``."""
    theta, x = simulate(linear_gaussian, PRIOR, 200, seed=0, progress=False)
    torch.manual_seed(0)
    npe = NPE(PRIOR, "maf", transforms=1, hidden=(8,)).append_simulations(theta, x)
    calls = []
    apt = npe.loss
    npe.loss = lambda model, t, o: calls.append(len(t)) or apt(model, t, o)
    npe.train(max_epochs=1, **FAST)
    assert calls == []  # one round from the prior: maximum likelihood
    proposal = npe.posterior(X_OBS)
    with pytest.raises(ValueError, match="none were appended"):
        npe.train(proposal=proposal, max_epochs=1, **FAST)
    theta2 = proposal.sample((100,))
    npe.append_simulations(theta2, linear_gaussian(theta2)).train(proposal=proposal, max_epochs=1, **FAST)
    assert [r[2] for r in npe.rounds] == [False, True] and calls  # the new round only; APT from now on
    with pytest.raises(TypeError, match="proposal must be a Distribution"):
        npe.append_simulations(theta2, linear_gaussian(theta2)).train(proposal="posterior")


# -- flow matching --------------------------------------------------------------------------------------------------
def test_cnf_posterior_by_flow_matching():
    theta, x = simulate(linear_gaussian, PRIOR, 2000, seed=0, progress=False)
    torch.manual_seed(0)
    npe = NPE(PRIOR, "cnf", hidden=(32, 32)).append_simulations(theta, x)
    npe.train(max_epochs=40, patience=None, seed=0, **FAST)
    assert npe.continuous
    torch.manual_seed(1)
    posterior = npe.posterior(X_OBS)
    samples = posterior.sample((1000,))
    torch.testing.assert_close(samples.mean(0), analytic_posterior(X_OBS).mean, atol=0.1, rtol=0)
    torch.testing.assert_close(samples.std(0), COVARIANCE.diagonal().sqrt(), atol=0.1, rtol=0)
    reference = analytic_posterior(X_OBS).sample((200,))
    with torch.no_grad():  # log q by the ODE
        kl = (analytic_posterior(X_OBS).log_prob(reference) - posterior.log_prob(reference)).mean()
    assert float(kl) < 0.15
    with pytest.raises(ValueError, match="APT"):
        npe.append_simulations(theta[:10], x[:10], proposal=posterior)


def test_posterior_flow_matching_goes_through_a_data_parallel_wrapper():
    """Under torchrun, fit wraps the estimator (DDP): the loss must call the wrapper, whose forward prepares the
    gradient all-reduce, or each rank keeps its own gradient and the ranks' weights drift apart."""
    from pyro_flows.infer.sbi import PosteriorFlowMatching

    theta, x = simulate(linear_gaussian, PRIOR, 64, seed=0, progress=False)
    npe = NPE(PRIOR, "cnf", hidden=(8,)).append_simulations(theta, x)
    npe.train(max_epochs=1, **FAST)

    class Wrapper(nn.Module):  # what DistributedDataParallel looks like to an objective
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, *args):
            self.calls += 1
            return self.module(*args)

    wrapper = Wrapper(npe.estimator)
    loss = PosteriorFlowMatching()(wrapper, theta, x)
    assert wrapper.calls == 1 and loss.requires_grad


# -- z-scoring ------------------------------------------------------------------------------------------------------
def test_z_scorings_of_theta_and_x_are_learnt_from_the_first_round():
    prior = dist.LogNormal(torch.zeros(2), 1.0).to_event(1)  # unconstrained θ: log θ
    simulator = lambda t: 1000 * t.log() + 5000 + torch.randn_like(t)
    theta, x = simulate(simulator, prior, 500, seed=0, progress=False)
    torch.manual_seed(0)
    estimator = NPE(prior, "maf", transforms=1, hidden=(8,)).append_simulations(theta, x).estimator
    torch.testing.assert_close(estimator.x_loc, x.mean(0))
    torch.testing.assert_close(estimator.x_scale, x.std(0))
    u = estimator.unconstrained(theta)  # (log θ - mean) / std
    torch.testing.assert_close(u.mean(0), torch.zeros(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(u.std(0), torch.ones(2), atol=1e-4, rtol=0)
    context = estimator.context(x)  # the default embedding (Flatten) sees the standardised x
    torch.testing.assert_close(context.mean(0), torch.zeros(2), atol=1e-3, rtol=0)
    torch.testing.assert_close(context.std(0), torch.ones(2), atol=1e-3, rtol=0)


def test_simulate_shows_a_progress_bar(capsys):
    simulate(linear_gaussian, PRIOR, 30, batch_size=10, seed=0, progress=True)
    err = capsys.readouterr().err
    assert "simulate" in err and "30/30" in err


# -- embedding ------------------------------------------------------------------------------------------------------
def test_embedding_is_trained_jointly():
    torch.manual_seed(0)
    embedding = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))
    before = embedding[1].weight.detach().clone()
    simulator = lambda t: (t @ A.T).unsqueeze(1).repeat(1, 3, 1) + NOISE * torch.randn(len(t), 3, 2)  # x: (3, 2)
    theta, x = simulate(simulator, PRIOR, 500, seed=0, progress=False)
    npe = NPE(PRIOR, "nsf", embedding=embedding, transforms=1, hidden=(16,)).append_simulations(theta, x)
    npe.train(max_epochs=3, patience=None, seed=0, **FAST)
    assert not torch.equal(embedding[1].weight, before)
    assert npe.posterior(x[0]).sample((4,)).shape == (4, 2)
    assert npe.posterior(x[:5]).batch_shape == (5,)


# -- simulate -------------------------------------------------------------------------------------------------------
def test_simulate_is_seeded_and_independent_of_the_number_of_workers():
    simulator = functools.partial(torch.normal, std=1.0)  # picklable without importing this module
    theta, x = simulate(simulator, PRIOR, 300, batch_size=100, seed=5, progress=False)
    again, x_again = simulate(simulator, PRIOR, 300, batch_size=100, seed=5, progress=False)
    assert torch.equal(theta, again) and torch.equal(x, x_again)
    parallel = simulate(simulator, PRIOR, 300, batch_size=100, num_workers=2, seed=5, progress=False)
    assert torch.equal(parallel[0], theta) and torch.equal(parallel[1], x)
    assert not torch.equal(simulate(simulator, PRIOR, 300, batch_size=100, seed=6, progress=False)[0], theta)


def test_simulate_reports_and_drops_nan_rows():
    simulator = NaNAbove(0.5)
    with pytest.warns(RuntimeWarning, match=r"(\d+) of 1000 simulations returned NaN or inf") as record:
        theta, x, invalid = simulate(simulator, PRIOR, 1000, seed=0, progress=False, return_invalid=True)
    count = int(str(record[0].message).split()[1])
    assert count == len(invalid) > 200 and len(theta) == len(x) == 1000 - count
    assert bool((invalid[:, 0] > 0.5).all()) and bool((theta[:, 0] <= 0.5).all())
    assert bool(torch.isfinite(x).all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        simulate(NaNAbove(100.0), PRIOR, 50, seed=0, progress=False)  # no failures: no warning


def test_simulate_bad_inputs():
    with pytest.raises(TypeError, match="picklable"):
        simulate(lambda t: t, PRIOR, 10, num_workers=2, progress=False)
    with pytest.raises(ValueError, match="shape"):
        simulate(lambda t: t[:, 0], PRIOR, 10, progress=False)
    with pytest.raises(ValueError, match=r"for θ of shape \(10, 2\) it returned shape \(9, 2\)"):
        simulate(lambda t: t[:-1], PRIOR, 10, progress=False)  # the wrong batch size
    with pytest.raises(ValueError, match="num_simulations"):
        simulate(linear_gaussian, PRIOR, 0)
    with pytest.raises(ValueError, match="to_event"):
        simulate(linear_gaussian, dist.Normal(torch.zeros(2), 1.0), 10)


# -- bad inputs -----------------------------------------------------------------------------------------------------
def test_npe_bad_inputs(npe):
    theta, x = torch.randn(20, 2), torch.randn(20, 2)
    with pytest.raises(ValueError, match="x_obs must have shape"):
        npe.posterior(torch.zeros(3))
    with pytest.raises(ValueError, match="x_obs must have shape"):
        npe.posterior(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="NaN"):
        npe.posterior(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="rows of θ"):
        NPE(PRIOR).append_simulations(theta, x[:10])
    with pytest.raises(ValueError, match="θ must have shape"):
        NPE(PRIOR).append_simulations(theta[:, :1], x)
    with pytest.raises(ValueError, match="NaN"):
        NPE(PRIOR).append_simulations(theta, x.index_fill(0, torch.tensor([3]), float("inf")))
    with pytest.raises(ValueError, match="x_shape"):
        npe.append_simulations(theta, torch.randn(20, 3))
    with pytest.raises(ValueError, match="flow must be one of"):
        NPE(PRIOR, flow="glow")
    with pytest.raises(ValueError, match="event shape"):
        NPE(dist.Normal(torch.zeros(2), 1.0))
    with pytest.raises(ValueError, match="biject_to"):
        NPE(dist.Binomial(10, torch.full((2,), 0.5)).to_event(1))  # discrete parameters
    with pytest.raises(ValueError, match="append_simulations"):
        NPE(PRIOR).train()
    with pytest.raises(TypeError, match="proposal"):
        NPE(PRIOR).append_simulations(theta, x, proposal="posterior")
    with pytest.raises(ValueError, match="context_features"):
        NPE(PRIOR, flow=lambda features, context: pf.MAF(features)).append_simulations(theta, x)
    with pytest.raises(ValueError, match="shape"):
        npe.posterior(X_OBS).log_prob(torch.zeros(3))


# -- dtypes and empty rounds (issue 16, items 4 and 8) ---------------------------------------------------------------
@pytest.mark.parametrize("flow", ["nsf", "cnf"])
def test_npe_follows_a_float64_prior_and_simulations(flow, tmp_path):
    prior = dist.Normal(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)).to_event(1)
    torch.manual_seed(0)
    theta = prior.sample((64,))
    x = theta + 0.1 * torch.randn_like(theta)
    npe = NPE(prior, flow, transforms=1, hidden=(8,)).append_simulations(theta, x)
    npe.train(max_epochs=2, seed=0, **FAST)
    assert all(p.dtype == torch.float64 for p in npe.estimator.parameters())
    x_obs = torch.tensor([0.5, -1.0], dtype=torch.float64)
    samples = npe.posterior(x_obs).sample((50,))
    assert samples.dtype == torch.float64 and samples.shape == (50, 2) and bool(torch.isfinite(samples).all())
    if flow == "nsf":  # the file keeps the dtype; a later round of another dtype is refused by name
        loaded = NPE.load(npe.save(tmp_path / "npe.pt"), prior)
        assert loaded.posterior(x_obs).sample((5,)).dtype == torch.float64
        with pytest.raises(ValueError, match="dtype torch.float32"):
            npe.append_simulations(theta.float(), x)


def test_npe_with_no_simulations_says_so():
    theta = torch.zeros(0, 2)
    with pytest.raises(ValueError, match=r"no simulations .*NaN or inf"):
        NPE(PRIOR).append_simulations(theta, torch.zeros(0, 2))
    with pytest.warns(RuntimeWarning, match="NaN or inf"):  # what an all-NaN simulator leaves
        theta, x = simulate(NaNAbove(-100.0), PRIOR, 20, seed=0, progress=False)
    npe = NPE(PRIOR, transforms=1, hidden=(8,)).append_simulations(torch.randn(20, 2), torch.randn(20, 2))
    with pytest.raises(ValueError, match="no simulations"):  # a later round too: not appended silently
        npe.append_simulations(theta, x)
    assert len(npe.rounds) == 1


def test_cnf_npe_defaults_are_the_measured_ones_and_a_tiny_budget_trains():
    """NPE(flow="cnf") with every default (a residual field of 2 x 256, FlowMatching(time_exponent=2), a fixed
    cosine-annealed epoch budget on all simulations) trains on 200 simulations for 2 epochs and samples inside
    the support; the options chosen for two moons are those of NPE's class attributes."""
    from pyro_flows.infer.sbi import PosteriorFlowMatching

    theta, x = simulate(linear_gaussian, PRIOR, 200, seed=0, progress=False)
    torch.manual_seed(0)
    npe = NPE(PRIOR, "cnf").append_simulations(theta, x).train(max_epochs=2, seed=0, progress=False)
    (layer,) = npe.estimator.flow.transforms
    assert isinstance(layer.vector_field, pf.nn.ResidualVectorField) and len(layer.vector_field.inner) == 2
    assert layer.vector_field.input.out_features == 256
    assert len(npe.history.train_loss) == 2 and npe.history.validation_loss == []  # all simulations train
    assert npe.history.steps == 2  # one batch of 512 per epoch
    samples = npe.posterior(X_OBS).sample((50,))
    assert samples.shape == (50, 2) and bool(torch.isfinite(samples).all())
    assert npe.default_flow_matching().time_exponent == 2.0
    assert NPE.cnf_fit_options.schedule == "cosine" and NPE.cnf_fit_options.patience is None
    small = NPE(PRIOR, "cnf", hidden=(16, 16), field="concatsquash").append_simulations(theta, x)
    assert isinstance(small.estimator.flow.transforms[0].vector_field, pf.nn.VectorField)
    objective = pf.FlowMatching(coupling="sinkhorn")
    assert PosteriorFlowMatching(objective).flow_matching is objective
    with pytest.raises(ValueError, match="not both"):
        PosteriorFlowMatching(objective, sigma_min=0.1)
    with pytest.raises(TypeError, match="flow_matching must be a pf.FlowMatching"):
        NPE(PRIOR, "cnf", flow_matching={"time_exponent": 2})


def test_npe_trains_a_continuous_flow_with_the_flow_matching_it_is_given(monkeypatch):
    from pyro_flows.infer import sbi

    seen = []
    original = sbi.PosteriorFlowMatching.__call__

    def spy(self, model, theta, x):
        seen.append(self.flow_matching)
        return original(self, model, theta, x)

    monkeypatch.setattr(sbi.PosteriorFlowMatching, "__call__", spy)
    theta, x = simulate(linear_gaussian, PRIOR, 64, seed=0, progress=False)
    objective = pf.FlowMatching(sigma_min=0.01)
    NPE(PRIOR, "cnf", hidden=(8,), flow_matching=objective).append_simulations(theta, x).train(max_epochs=1, **FAST)
    assert seen and all(o is objective for o in seen)


def test_default_training_is_an_annealed_step_budget_that_max_epochs_replaces():
    """fit_options (issue 17.3): cosine-annealed Adam over a step budget with early stopping on 10 % held out; a
    max_epochs given to train lifts the step budget, so exactly those epochs run."""
    options = NPE.fit_options
    assert (options.schedule, options.max_steps, options.batch_size, options.lr) == ("cosine", 8000, 512, 2e-3)
    assert options.validation_fraction == 0.1 and options.patience == 40

    class Budget(NPE):
        fit_options = NPE.fit_options.replace(max_steps=3)

    theta, x = simulate(linear_gaussian, PRIOR, 1000, seed=0, progress=False)  # 900 training rows: 2 batches
    small = dict(flow="maf", transforms=1, hidden=(8,))
    npe = Budget(PRIOR, **small).append_simulations(theta, x).train(seed=0, progress=False)
    assert npe.history.steps == 3  # the default budget, inside the second epoch
    npe = Budget(PRIOR, **small).append_simulations(theta, x).train(max_epochs=3, seed=0, progress=False)
    assert npe.history.steps == 6 and len(npe.history.train_loss) == 3  # the epochs asked for, not the budget
    npe = Budget(PRIOR, **small).append_simulations(theta, x).train(max_epochs=3, max_steps=4, progress=False)
    assert npe.history.steps == 4  # both given: the first limit reached

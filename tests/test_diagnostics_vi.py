"""Tests of the VI diagnostics: ``to_inference_data`` and ``psis``.

Importance weights are checked on a normal-normal model whose evidence and
posterior are known: with the exact posterior as guide every log-weight is
exactly log Z; wider and narrower guides bracket the Pareto k-hat thresholds.
"""

from __future__ import annotations

import math

import arviz as az
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_flows as pf

N = 10


def normal_model(x: torch.Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def posterior(x: torch.Tensor) -> tuple[float, float, float]:
    """Posterior mean, sd and log evidence of ``normal_model``."""
    n = x.shape[0]
    evidence = dist.MultivariateNormal(torch.zeros(n), torch.eye(n) + torch.ones(n, n)).log_prob(x)
    return float(x.sum() / (n + 1)), (1.0 / (n + 1)) ** 0.5, float(evidence)


def normal_guide(loc: float, scale: float):
    def guide(x):
        pyro.sample("mu", dist.Normal(loc, scale))

    return guide


@pytest.fixture
def data() -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(0)) + 1.0


@pytest.mark.parametrize("vectorize", [True, False])
def test_exact_guide_has_constant_log_weights_equal_to_the_evidence(data, vectorize):
    mean, sd, log_z = posterior(data)
    report = pf.diagnostics.psis(normal_model, normal_guide(mean, sd), data, num_samples=200, vectorize=vectorize)
    assert report.elbo == pytest.approx(log_z, abs=1e-4)
    assert report.iw_elbo == pytest.approx(log_z, abs=1e-4)
    uniform = torch.full((200,), -math.log(200), dtype=torch.float64)
    torch.testing.assert_close(report.log_weights, uniform, atol=1e-5, rtol=0)
    assert report.ess == pytest.approx(200, rel=1e-6)
    assert report.samples is None


def test_khat_separates_wide_from_narrow_guides_and_resampling_recovers_the_posterior(data):
    mean, sd, log_z = posterior(data)
    pyro.set_rng_seed(0)
    wide = pf.diagnostics.psis(normal_model, normal_guide(mean, 1.5 * sd), data, num_samples=4000, resample=True)
    narrow = pf.diagnostics.psis(normal_model, normal_guide(mean, 0.3 * sd), data, num_samples=4000)
    assert wide.khat < 0.5 < 0.7 < narrow.khat
    assert wide.elbo < wide.iw_elbo and wide.iw_elbo == pytest.approx(log_z, abs=0.02)
    assert narrow.elbo < log_z and wide.elbo < log_z
    assert 0 < narrow.ess < wide.ess < 4000
    torch.testing.assert_close(wide.log_weights.exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    draws = wide.samples["mu"]
    assert draws.shape == (4000,)
    assert abs(draws.mean() - mean) < 0.1 * sd
    assert abs(draws.std() / sd - 1) < 0.1


def structured_model(x: torch.Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 3.0).to_event(1))
    s = pyro.sample("s", dist.LogNormal(0.0, 0.5))
    with pyro.plate("groups", 3):
        pyro.sample("a", dist.Normal(0.0, 1.0))
    pyro.deterministic("s2", s**2)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(mu, s.unsqueeze(-1)).to_event(1), obs=x)


@pytest.mark.parametrize("vectorize", [True, False])
def test_to_inference_data_round_trips_names_and_shapes(vectorize):
    x = torch.randn(20, 2)
    pyro.clear_param_store()
    guide = pf.infer.AutoFlowGuide(structured_model, transforms=1, hidden=(8,))
    idata = pf.diagnostics.to_inference_data(structured_model, guide, x, num_samples=30, vectorize=vectorize)
    assert isinstance(idata, az.InferenceData)
    post = idata.posterior
    assert set(post.data_vars) == {"mu", "s", "a", "s2"}
    assert post["mu"].shape == (1, 30, 2) and post["s"].shape == (1, 30) and post["a"].shape == (1, 30, 3)
    assert post["s"].dims[:2] == ("chain", "draw")
    assert bool((post["s"] > 0).all())  # constrained values
    torch.testing.assert_close(torch.as_tensor(post["s2"].values), torch.as_tensor(post["s"].values) ** 2)
    torch.testing.assert_close(torch.as_tensor(idata.observed_data["x"].values), x)
    # pointwise log-likelihood (per datum: the event dim summed) at each draw, computed by hand
    mu, s = (torch.as_tensor(post[k].values[0]) for k in ("mu", "s"))
    expected = dist.Normal(mu[:, None, :], s[:, None, None]).log_prob(x).sum(-1)
    assert idata.log_likelihood["x"].shape == (1, 30, 20)
    torch.testing.assert_close(torch.as_tensor(idata.log_likelihood["x"].values[0]), expected)


def test_not_vectorisable_model_falls_back_to_a_loop():
    def model(x):  # s broadcasts against the particle dim of mu: only a loop gets this right
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 3.0).to_event(1))
        s = pyro.sample("s", dist.LogNormal(0.0, 0.5))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, s).to_event(1), obs=x)

    x = torch.randn(20, 2)
    pyro.clear_param_store()
    guide = pf.infer.AutoFlowGuide(model, transforms=1, hidden=(8,))
    # 20 draws and 20 data: the wrong broadcast (20, 20) even fits the plate; the re-scored first draw catches it
    with pytest.raises(ValueError, match="does not broadcast over a leading particle dim"):
        pf.diagnostics.psis(model, guide, x, num_samples=20, vectorize=True)
    idata = pf.diagnostics.to_inference_data(model, guide, x, num_samples=20)
    mu, s = (torch.as_tensor(idata.posterior[k].values[0]) for k in ("mu", "s"))
    expected = dist.Normal(mu[:, None, :], s[:, None, None]).log_prob(x).sum(-1)
    torch.testing.assert_close(torch.as_tensor(idata.log_likelihood["x"].values[0]), expected)


def test_amortized_guide_inference_data():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    x = torch.randn(12)
    pyro.clear_param_store()
    guide = pf.infer.AmortizedFlowGuide(model, ["z"], observation="x", transforms=1, hidden=(8,))
    idata = pf.diagnostics.to_inference_data(model, guide, x, num_samples=15, vectorize=True)
    assert idata.posterior["z"].shape == (1, 15, 12) and idata.log_likelihood["x"].shape == (1, 15, 12)


def test_bad_input(data):
    with pytest.raises(ValueError, match="num_samples"):
        pf.diagnostics.psis(normal_model, normal_guide(0.0, 1.0), data, num_samples=1)

    def bounded(x):
        pyro.sample("mu", dist.Uniform(0.0, 1.0))

    with pyro.validation_enabled(False), pytest.raises(ValueError, match="log-weights are not finite"):
        pf.diagnostics.psis(bounded, normal_guide(0.5, 2.0), data, num_samples=50)


def test_subsampled_model_is_rejected():
    def model(x, subsample_size=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as index:
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x[index])

    x = torch.randn(40)
    pyro.clear_param_store()
    guide = pf.infer.AutoFlowGuide(model, transforms=1, hidden=(8,))
    for vectorize in (None, False):
        with pytest.raises(ValueError, match=r"site 'x' is in plate 'data', subsampled \(10 of 40\)"):
            pf.diagnostics.psis(model, guide, x, 10, num_samples=20, vectorize=vectorize)
    # the same model and guide without subsampling: every datum at every draw
    idata = pf.diagnostics.to_inference_data(model, guide, x, num_samples=20)
    assert idata.log_likelihood["x"].shape == (1, 20, 40)


# Issue 16 item 13: PSIS k-hat cannot see a mode the guide misses; mode_coverage can.
MODES = torch.tensor([-3.0, 3.0])


def mixture_model() -> None:
    """Two equal, well separated modes at -3 and 3 (sd 0.5); no data."""
    pyro.sample("z", dist.MixtureSameFamily(dist.Categorical(torch.tensor([0.5, 0.5])), dist.Normal(MODES, 0.5)))


def mixture_draws(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    component = torch.randint(2, (n,), generator=generator)
    return MODES[component] + 0.5 * torch.randn(n, generator=generator)


def test_guide_on_one_of_two_modes_has_small_khat_but_mode_coverage_flags_the_missed_mode():
    def one_mode_guide() -> None:
        pyro.sample("z", dist.Normal(3.0, 0.6))  # a little wider than the mode: bounded weights there

    torch.manual_seed(0)
    report = pf.diagnostics.psis(mixture_model, one_mode_guide, num_samples=2000)
    assert report.khat < 0.5  # "good": the weights are near-constant where the guide puts mass
    guide_draws = pf.diagnostics.to_inference_data(mixture_model, one_mode_guide, num_samples=1000).posterior["z"]
    guide_draws = torch.as_tensor(guide_draws.values.reshape(-1))
    assert bool((guide_draws > 0).all())  # no draw near -3
    reference = mixture_draws(2000, seed=1)  # exact posterior draws, as from MCMC
    coverage = pf.diagnostics.mode_coverage(guide_draws, reference)
    assert not coverage.ok
    assert coverage.centers.shape == (4, 1) and coverage.reference_mass.shape == coverage.guide_mass.shape == (4,)
    missed = coverage.centers[coverage.missed, 0]
    assert len(missed) >= 1 and bool((missed < 0).all())  # what is flagged is the mode at -3, only
    assert float(coverage.reference_mass[coverage.centers[:, 0] < 0].sum()) == pytest.approx(0.5, abs=0.05)
    assert float(coverage.guide_mass[coverage.centers[:, 0] < 0].sum()) == 0.0
    assert float(coverage.reference_mass.sum()) == pytest.approx(1.0) and float(coverage.guide_mass.sum()) == 1.0


@pytest.mark.parametrize("clusters", [1, 2, 4, 8])
def test_draws_covering_both_modes_pass_mode_coverage(clusters):
    coverage = pf.diagnostics.mode_coverage(mixture_draws(1000, seed=2), mixture_draws(2000, seed=1), clusters=clusters)
    assert coverage.ok, (coverage.reference_mass, coverage.guide_mass)
    if clusters == 2:  # the two clusters are the two modes
        torch.testing.assert_close(coverage.centers[:, 0].sort().values, MODES.double(), atol=0.1, rtol=0)
        torch.testing.assert_close(
            coverage.reference_mass, torch.full((2,), 0.5, dtype=torch.float64), atol=0.05, rtol=0
        )
    one_mode = pf.diagnostics.mode_coverage(mixture_draws(1000, seed=2).abs(), mixture_draws(2000, seed=1), clusters=2)
    assert not one_mode.ok


def test_mode_coverage_takes_dicts_of_sites_and_standardises_columns():
    generator = torch.Generator().manual_seed(3)
    # two modes separated along "b" only, whose scale is 1000 times that of "a"
    sign = torch.where(torch.rand(1500, generator=generator) < 0.5, -1.0, 1.0)
    reference = {
        "a": torch.randn(1500, generator=generator),
        "b": 1000.0 * (3 * sign + 0.5 * torch.randn(1500, generator=generator))[:, None],
    }
    both = {"b": reference["b"].flip(0), "a": torch.randn(1500, generator=generator)}  # key order does not matter
    one = {"a": both["a"], "b": reference["b"].abs()}
    assert pf.diagnostics.mode_coverage(both, reference, clusters=2).ok
    coverage = pf.diagnostics.mode_coverage(one, reference, clusters=2)
    assert coverage.missed.tolist().count(True) == 1 and float(coverage.centers[coverage.missed, 1]) < 0
    assert coverage.centers.shape == (2, 2)


def test_mode_coverage_thresholds_and_bad_input():
    reference = mixture_draws(1000, seed=1)
    lopsided = torch.cat([mixture_draws(1000, seed=2).abs()[:950], -mixture_draws(1000, seed=2).abs()[:50]])
    assert not pf.diagnostics.mode_coverage(lopsided, reference, clusters=2).ok  # 5% where the reference has 50%
    assert pf.diagnostics.mode_coverage(lopsided, reference, clusters=2, min_fraction=0.05).ok
    assert pf.diagnostics.mode_coverage(lopsided, reference, clusters=2, min_mass=0.6).ok
    with pytest.raises(ValueError, match="values per draw"):
        pf.diagnostics.mode_coverage(torch.zeros(10, 2), torch.zeros(10, 3))
    with pytest.raises(ValueError, match="clusters"):
        pf.diagnostics.mode_coverage(reference, reference, clusters=0)
    with pytest.raises(ValueError, match="clusters"):
        pf.diagnostics.mode_coverage(reference, reference[:3], clusters=4)
    with pytest.raises(ValueError, match="finite"):
        pf.diagnostics.mode_coverage(torch.tensor([float("nan"), 1.0]), reference)
    with pytest.raises(ValueError, match="both"):
        pf.diagnostics.mode_coverage({"z": reference}, reference)
    with pytest.raises(ValueError, match="lack the sites"):
        pf.diagnostics.mode_coverage({"y": reference}, {"z": reference})
    with pytest.raises(ValueError, match="no guide draws"):
        pf.diagnostics.mode_coverage(torch.zeros(0), reference)

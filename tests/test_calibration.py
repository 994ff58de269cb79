"""Calibration diagnostics: SBC ranks and uniformity tests, expected coverage, C2ST.

Posteriors here are analytic (a linear-Gaussian simulator), so calibrated and deliberately
mis-specified posteriors are known exactly; the NPE case is in ``test_sbi.py``.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pyro.distributions as dist
import pytest
import torch
from scipy import stats

import pyro_flows as pf
from pyro_flows.diagnostics import SBCResult, c2st, expected_coverage, sbc

matplotlib.use("Agg")

NOISE = 0.5
PRIOR = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
#  x = θ + NOISE ε with θ ~ N(0, I): the posterior is N(x / (1 + NOISE²), NOISE² / (1 + NOISE²) I)
POSTERIOR_VARIANCE = NOISE**2 / (1 + NOISE**2)


def simulator(theta: torch.Tensor) -> torch.Tensor:
    return theta + NOISE * torch.randn_like(theta)


def gaussian_posterior(shift: float = 0.0, scale: float = 1.0):
    def posterior(x: torch.Tensor) -> dist.Distribution:
        loc = x / (1 + NOISE**2) + shift
        return dist.Normal(loc, scale * POSTERIOR_VARIANCE**0.5).to_event(1)

    return posterior


def run(posterior, **kwargs) -> SBCResult:
    options = dict(num_simulations=400, num_posterior_samples=49, seed=0) | kwargs
    return sbc(posterior, PRIOR, simulator, **options)


def test_sbc_of_the_exact_posterior_is_uniform_with_diagonal_coverage():
    result = run(gaussian_posterior())
    assert result.ranks.shape == (400, 2) and result.density_ranks.shape == (400,)
    assert int(result.ranks.min()) >= 0 and int(result.ranks.max()) <= 49
    assert bool((result.pvalues > 0.01).all()), result.pvalues
    levels, hpd = result.coverage()
    _, central = expected_coverage(result, levels, region="central")
    assert float((hpd - levels).abs().max()) < 0.08
    assert float((central - levels[:, None]).abs().max()) < 0.08


@pytest.mark.parametrize("shift, scale", [(0.0, 0.4), (0.5, 1.0)], ids=["too-narrow", "shifted"])
def test_sbc_flags_a_misspecified_posterior(shift, scale):
    result = run(gaussian_posterior(shift, scale))
    assert float(result.pvalues.max()) < 1e-6, result.pvalues
    levels, hpd = result.coverage(torch.tensor([0.5, 0.8]))
    assert bool((hpd < levels - 0.15).all()), hpd  # overconfident: the regions miss the truth too often


def test_too_wide_posterior_overcovers():
    levels, hpd = run(gaussian_posterior(scale=2.0)).coverage(torch.tensor([0.3, 0.5]))
    assert bool((hpd > levels + 0.2).all()), hpd


def test_ranks_of_a_posterior_far_above_the_truth_are_all_zero():
    result = run(gaussian_posterior(shift=100.0))
    assert int(result.ranks.max()) == 0 and bool((result.density_ranks == 49).all())
    levels, hpd = result.coverage(torch.tensor([0.0, 0.5, 0.99, 1.0]))
    assert hpd.tolist() == [0.0, 0.0, 0.0, 1.0]


def test_pvalues_match_scipy_chisquare_on_equal_bins():
    ranks = torch.randint(0, 100, (300, 2), generator=torch.Generator().manual_seed(0))
    ranks[:, 1] = ranks[:, 1] // 2  # half the rank values unused: clearly not uniform
    result = SBCResult(ranks, ranks[:, 0], 99, torch.zeros(2), 10)
    from pyro_flows.diagnostics.calibration import _uniformity_pvalues

    pvalues = _uniformity_pvalues(ranks, 99, 10)
    for d in range(2):
        counts, _ = np.histogram(ranks[:, d].numpy(), bins=10, range=(0, 100))
        assert float(pvalues[d]) == pytest.approx(stats.chisquare(counts).pvalue, rel=1e-10)
    assert float(pvalues[0]) > 0.01 > float(pvalues[1])
    assert result.bins == 10


def test_expected_coverage_of_exactly_uniform_ranks_is_the_level():
    ranks = torch.arange(10)
    result = SBCResult(ranks[:, None], ranks, 9, torch.ones(1), 10)
    levels = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], dtype=torch.float64)
    for region in ("hpd", "central"):
        _, coverage = result.coverage(levels, region=region)
        torch.testing.assert_close(coverage.flatten(), levels)
    with pytest.raises(ValueError, match="region"):
        result.coverage(region="box")
    with pytest.raises(ValueError, match="levels"):
        result.coverage(torch.tensor([1.5]))


@pytest.mark.parametrize("kind", ["ecdf", "hist", "coverage"])
def test_plots(kind):
    import matplotlib.pyplot as plt

    result = run(gaussian_posterior(), num_simulations=100)
    axes = result.plot(kind, names=["a", "b"])
    assert len(axes) == (1 if kind == "coverage" else 2)
    assert axes[0].has_data()
    plt.close("all")


def test_bad_inputs():
    result = run(gaussian_posterior(), num_simulations=50)
    with pytest.raises(ValueError, match="kind"):
        result.plot("violin")
    with pytest.raises(ValueError, match="names"):
        result.plot("hist", names=["only one"])
    one_row = lambda x: dist.Normal(torch.zeros(2), 1.0).to_event(1)  # ignores the batch of observations
    with pytest.raises(ValueError, match="batch shape"):
        run(one_row, num_simulations=20)
    with pytest.raises(TypeError, match="NPE or a callable"):
        sbc("posterior", PRIOR, simulator)
    with pytest.raises(ValueError, match="bins"):
        run(gaussian_posterior(), num_simulations=20, bins=1)


def test_c2st_separates_shifted_samples_and_not_equal_ones():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 2, generator=generator), torch.randn(400, 2, generator=generator)
    assert c2st(a, b) < 0.58
    assert c2st(a, b + 2.0, classifier="logistic") > 0.85
    # a difference in scale only: the MLP sees it
    assert c2st(a, 3.0 * b) > 0.7
    with pytest.raises(ValueError, match="shape"):
        c2st(a, b[:, :1])
    with pytest.raises(ValueError, match="NaN"):
        c2st(a, b.index_fill(0, torch.tensor([0]), float("nan")))


def test_exported():
    assert pf.diagnostics.sbc is sbc and pf.diagnostics.c2st is c2st

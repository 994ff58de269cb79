r"""Calibration of simulation-based posteriors: SBC ranks, expected coverage, and a classifier two-sample test.

Simulation-based calibration (Talts et al. 2018): for :math:`\theta_i \sim p(\theta)`,
:math:`x_i \sim p(x \mid \theta_i)` and :math:`L` posterior samples :math:`\theta_{i,l} \sim q(\theta \mid x_i)`,
the rank :math:`r_{i,d} = \#\{l : \theta_{i,l,d} < \theta_{i,d}\}` of each parameter is uniform on
:math:`\{0, \dots, L\}` when :math:`q` is the posterior. Expected coverage (Hermans et al. 2022) asks
the same of credible regions: the :math:`\alpha`-credible region should contain the true
:math:`\theta_i` for a fraction :math:`\alpha` of the simulations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution

from ..infer.sbi import NPE
from ..infer.simulation import Simulator, seeded, simulate
from ..utils import draw_seed, require

PosteriorFn = Callable[[Tensor], Distribution]
REGIONS = ("hpd", "central")


@dataclass
class SBCResult:
    r"""Ranks of simulation-based calibration (Talts et al. 2018), from :func:`sbc`.

    Attributes:
        ranks: ``(N, D)`` integers in :math:`[0, L]`, the number of the :math:`L` posterior samples
            below the true value, per simulation and parameter.
        density_ranks: ``(N,)`` integers in :math:`[0, L]`, the number of posterior samples with a
            higher posterior density than the true θ (the joint HPD rank, for :meth:`coverage`).
        num_posterior_samples: :math:`L`.
        pvalues: ``(D,)`` p-values of Pearson's chi-square test of uniformity of each parameter's
            ranks, binned into ``bins`` bins of consecutive rank values (expected counts from the
            exact number of rank values per bin); small values flag miscalibration.
        bins: the number of bins of that test and of the histograms.
    """

    ranks: Tensor
    density_ranks: Tensor
    num_posterior_samples: int
    pvalues: Tensor
    bins: int

    def coverage(self, levels: Optional[Tensor] = None, region: str = "hpd") -> tuple[Tensor, Tensor]:
        """Expected coverage curve; see :func:`expected_coverage`."""
        return expected_coverage(self, levels, region)

    def plot(self, kind: str = "ecdf", names: Optional[Sequence[str]] = None, axes=None):
        r"""One panel per parameter: ``"ecdf"`` the ECDF of the normalised ranks minus the uniform CDF
        with simultaneous 95% bands (``arviz.plot_ecdf``), ``"hist"`` rank histograms with the
        central 99% binomial range of each bin's count under uniformity (bins hold equal numbers of
        rank values when ``bins`` divides :math:`L + 1`, else they differ by one value);
        ``"coverage"`` one panel of the expected coverage curves (HPD and per-parameter central
        intervals) against the diagonal.
        Returns the matplotlib axes.
        """
        import matplotlib.pyplot as plt

        if kind not in ("ecdf", "hist", "coverage"):
            raise ValueError(f"SBCResult.plot: kind must be 'ecdf', 'hist' or 'coverage', got {kind!r}")
        dims = self.ranks.shape[1]
        names = list(names) if names is not None else [f"θ[{d}]" for d in range(dims)]
        if len(names) != dims:
            raise ValueError(f"SBCResult.plot: {len(names)} names for {dims} parameters")
        panels = 1 if kind == "coverage" else dims
        if axes is None:
            _, axes = plt.subplots(1, panels, figsize=(3.5 * panels, 3), squeeze=False, constrained_layout=True)
            axes = axes[0]
        axes = np.atleast_1d(axes)
        if kind == "coverage":
            _plot_coverage(self, axes[0], names)
            return axes
        for d, ax in enumerate(axes[:dims]):
            (_plot_ecdf if kind == "ecdf" else _plot_histogram)(self, d, ax)
            ax.set_title(f"{names[d]} (p = {float(self.pvalues[d]):.2g})")
        return axes


def _plot_ecdf(result: SBCResult, d: int, ax) -> None:
    import arviz as az
    from scipy import stats

    levels = result.num_posterior_samples + 1
    normalised = (result.ranks[:, d].double().numpy() + 0.5) / levels
    discrete = stats.randint(0, levels)
    az.plot_ecdf(
        normalised,
        eval_points=(np.arange(levels + 1) / levels),
        cdf=stats.uniform(0, 1).cdf,
        rvs=lambda size, random_state=None: (discrete.rvs(size, random_state=random_state) + 0.5) / levels,
        difference=True,
        confidence_bands=True,
        ci_prob=0.95,
        ax=ax,
        show=False,
    )
    ax.set_xlabel("normalised rank")


def _plot_histogram(result: SBCResult, d: int, ax) -> None:
    from scipy import stats

    observed, expected = _binned(result.ranks[:, d], result.num_posterior_samples, result.bins)
    fraction = expected / expected.sum()
    low = stats.binom.ppf(0.005, len(result.ranks), fraction)
    high = stats.binom.ppf(0.995, len(result.ranks), fraction)
    edges = np.arange(result.bins)
    ax.bar(edges, high - low, bottom=low, width=1.0, color="0.85", label="99% under uniformity")
    ax.bar(edges, observed, width=0.8, edgecolor="k", alpha=0.7)
    ax.set_xlabel("rank bin")


def _plot_coverage(result: SBCResult, ax, names: Sequence[str]) -> None:
    levels, coverage = expected_coverage(result, region="hpd")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.plot(levels, coverage, label="joint HPD")
    _, central = expected_coverage(result, levels, region="central")
    for d, name in enumerate(names):
        ax.plot(levels, central[:, d], label=f"{name} central", alpha=0.7)
    ax.set(xlabel="credibility level", ylabel="empirical coverage")
    ax.legend(fontsize="small")


def _binned(ranks: Tensor, num_samples: int, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts of the ranks in ``bins`` bins of consecutive values, and the expected counts under uniformity."""
    levels = num_samples + 1
    bin_of = lambda r: np.asarray(r) * bins // levels
    observed = np.bincount(bin_of(ranks.numpy()), minlength=bins)
    expected = np.bincount(bin_of(np.arange(levels)), minlength=bins) * len(ranks) / levels
    return observed, expected


def _uniformity_pvalues(ranks: Tensor, num_samples: int, bins: int) -> Tensor:
    from scipy import stats

    pvalues = [stats.chisquare(*_binned(ranks[:, d], num_samples, bins)).pvalue for d in range(ranks.shape[1])]
    return torch.tensor(pvalues, dtype=torch.float64)


def expected_coverage(result: SBCResult, levels: Optional[Tensor] = None, region: str = "hpd") -> tuple[Tensor, Tensor]:
    r"""Empirical coverage of the :math:`\alpha`-credible regions at credibility levels :math:`\alpha`.

    ``region="hpd"``: the joint highest-posterior-density region (Hermans et al. 2022); the true
    :math:`\theta_i` is in the :math:`\alpha`-HPD region when fewer than a fraction :math:`\alpha`
    of the posterior samples have a higher density, counted as
    :math:`(\text{density rank}_i + 1) \le \alpha (L + 1)`. ``region="central"``: per-parameter
    central intervals; with the normalised rank :math:`u = (r + \tfrac12)/(L + 1)`, the true value
    is inside when :math:`|u - \tfrac12| \le \alpha / 2`. A calibrated posterior gives coverage
    :math:`\approx \alpha`; below the diagonal is overconfident, above it underconfident.

    Returns:
        ``(levels, coverage)``: ``levels`` ``(K,)`` (default 21 levels from 0 to 1) and coverage
        ``(K,)`` for ``"hpd"``, ``(K, D)`` for ``"central"``.
    """
    if region not in REGIONS:
        raise ValueError(f"expected_coverage: region must be one of {REGIONS}, got {region!r}")
    levels = torch.linspace(0, 1, 21, dtype=torch.float64) if levels is None else torch.as_tensor(levels).double()
    if levels.dim() != 1 or bool(((levels < 0) | (levels > 1)).any()):
        raise ValueError(f"expected_coverage: levels must be a 1-D tensor in [0, 1], got {levels}")
    slots = result.num_posterior_samples + 1
    if region == "hpd":
        inside = (result.density_ranks.double() + 1).unsqueeze(0) <= levels.unsqueeze(1) * slots + 1e-9
        return levels, inside.double().mean(1)
    normalised = (result.ranks.double() + 0.5) / slots
    inside = (normalised - 0.5).abs().unsqueeze(0) <= levels[:, None, None] / 2 + 1e-9
    return levels, inside.double().mean(1)


def _posterior_fn(posterior: Union[NPE, PosteriorFn]) -> PosteriorFn:
    if isinstance(posterior, NPE):
        return posterior.posterior
    if callable(posterior):
        return posterior
    raise TypeError(f"sbc: expected an NPE or a callable x -> Distribution, got {type(posterior).__name__}")


def _ranks_of_chunk(posterior_fn: PosteriorFn, theta: Tensor, x: Tensor, samples: int) -> tuple[Tensor, Tensor]:
    """Marginal ranks ``(n, D)`` and density ranks ``(n,)`` of the true θ of one chunk of observations."""
    distribution = posterior_fn(x)
    if hasattr(distribution, "sample_and_log_prob"):  # a flow's samples and densities in one pass
        draws, log_q_draws = distribution.sample_and_log_prob((samples,))
    else:
        draws, log_q_draws = distribution.sample((samples,)), None
    if draws.shape != (samples, *theta.shape):
        raise ValueError(
            f"sbc: the posterior of a batch of {len(x)} observations must give samples of shape "
            f"({samples}, {len(x)}, {theta.shape[1]}) (batch shape ({len(x)},)), got {tuple(draws.shape)}"
        )
    log_q_draws = distribution.log_prob(draws) if log_q_draws is None else log_q_draws
    log_q_true = distribution.log_prob(theta)
    return (draws < theta).sum(0), (log_q_draws > log_q_true).sum(0)


@torch.no_grad()
def sbc(
    posterior: Union[NPE, PosteriorFn],
    prior: Distribution,
    simulator: Simulator,
    num_simulations: int = 500,
    num_posterior_samples: int = 100,
    seed: Optional[int] = None,
    bins: Optional[int] = None,
    chunk_size: int = 100,
) -> SBCResult:
    r"""Simulation-based calibration (Talts et al. 2018) of an :class:`~pyro_flows.infer.NPE` or posterior function.

    Draws ``num_simulations`` pairs with :func:`~pyro_flows.infer.simulate` (failed simulations are
    dropped with a warning), ``num_posterior_samples`` posterior samples per observation, and ranks
    the true θ among them, per parameter and by posterior density.

    Args:
        posterior: an NPE, or a callable mapping observations ``(n, *x_shape)`` to a distribution
            with batch shape ``(n,)``, ``sample`` and ``log_prob``.
        bins: bins of the chi-square uniformity test; default :math:`\min(20, L + 1, \max(2, N // 10))`
            (at least ~10 expected ranks per bin).
        chunk_size: observations whose posteriors are sampled together.

    Returns:
        :class:`SBCResult` (ranks, p-values, ``plot``, ``coverage``).

    Example:
        >>> prior = pyro.distributions.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> simulator = lambda theta: theta + 0.1 * torch.randn_like(theta)
        >>> theta, x = pf.infer.simulate(simulator, prior, 500, seed=0, progress=False)
        >>> npe = pf.infer.NPE(prior, transforms=2, hidden=(16,)).append_simulations(theta, x)
        >>> npe = npe.train(max_epochs=2, progress=False)
        >>> result = sbc(npe, prior, simulator, num_simulations=50, num_posterior_samples=20, seed=0)
        >>> result.ranks.shape, result.pvalues.shape  # result.plot("ecdf") draws the rank ECDFs
        (torch.Size([50, 2]), torch.Size([2]))
    """
    for name, value in (("num_posterior_samples", num_posterior_samples), ("chunk_size", chunk_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"sbc: {name} must be an integer >= 1, got {value!r}")
    posterior_fn = _posterior_fn(posterior)
    base_seed = seed if seed is not None else draw_seed()
    theta, x = simulate(simulator, prior, num_simulations, seed=base_seed, progress=False)
    if len(theta) < 2:
        raise ValueError(f"sbc: {len(theta)} valid simulations of {num_simulations}; need at least 2")
    bins = bins if bins is not None else min(20, num_posterior_samples + 1, max(2, len(theta) // 10))
    if not isinstance(bins, int) or not 2 <= bins <= num_posterior_samples + 1:
        raise ValueError(f"sbc: bins must be an integer in [2, num_posterior_samples + 1], got {bins!r}")
    with seeded(base_seed + 1):
        chunks = [
            _ranks_of_chunk(posterior_fn, t, o, num_posterior_samples)
            for t, o in zip(theta.split(chunk_size), x.split(chunk_size), strict=True)
        ]
    ranks = torch.cat([c[0] for c in chunks])
    return SBCResult(
        ranks=ranks,
        density_ranks=torch.cat([c[1] for c in chunks]),
        num_posterior_samples=num_posterior_samples,
        pvalues=_uniformity_pvalues(ranks, num_posterior_samples, bins),
        bins=bins,
    )


def c2st(a: Tensor, b: Tensor, seed: int = 0, folds: int = 5, classifier: str = "mlp") -> float:
    r"""Classifier two-sample test: cross-validated accuracy of a classifier telling ``a`` from ``b``.

    0.5 means the samples are indistinguishable, 1.0 perfectly separable (Lopez-Paz & Oquab 2017;
    the SBI benchmark's metric, Lueckmann et al. 2021). Both samples are z-scored with ``a``'s
    mean and standard deviation; the classifier is scikit-learn's ``MLPClassifier`` with two hidden
    layers of ``10 D`` units (``"mlp"``, as in the benchmark) or ``LogisticRegression``
    (``"logistic"``, which only sees differences in means); accuracy is the mean over ``folds``
    stratified, shuffled folds.

    Needs scikit-learn (``pip install "pyro-flows[sklearn]"``). Shapes: ``a`` ``(N, D)``, ``b`` ``(M, D)``.
    """
    LogisticRegression = require("sklearn.linear_model", "pf.diagnostics.c2st").LogisticRegression
    model_selection = require("sklearn.model_selection", "pf.diagnostics.c2st")
    StratifiedKFold, cross_val_score = model_selection.StratifiedKFold, model_selection.cross_val_score
    MLPClassifier = require("sklearn.neural_network", "pf.diagnostics.c2st").MLPClassifier

    if (
        not (isinstance(a, Tensor) and isinstance(b, Tensor))
        or a.dim() != 2
        or b.dim() != 2
        or a.shape[1] != b.shape[1]
    ):
        raise ValueError(
            f"c2st: a and b must be tensors of shape (N, D) and (M, D), got {getattr(a, 'shape', a)} "
            f"and {getattr(b, 'shape', b)}"
        )
    if classifier not in ("mlp", "logistic"):
        raise ValueError(f"c2st: classifier must be 'mlp' or 'logistic', got {classifier!r}")
    for name, t in (("a", a), ("b", b)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"c2st: {name} has NaN or inf entries")
    mean, std = a.double().mean(0), a.double().std(0).clamp(min=1e-12)
    data = ((torch.cat([a.double(), b.double()]) - mean) / std).numpy()
    labels = np.r_[np.zeros(len(a)), np.ones(len(b))]
    width = 10 * a.shape[1]
    model = (
        MLPClassifier((width, width), max_iter=1000, random_state=seed) if classifier == "mlp" else LogisticRegression()
    )
    splits = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(model, data, labels, cv=splits, scoring="accuracy")))

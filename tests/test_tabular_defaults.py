"""Tests of the table-driven defaults of ``DensityEstimator`` (``pyro_flows.tabular_defaults``) and of the guard
that keeps the starting flow (with ``whiten=True``: the fitted full-covariance Gaussian) when training does not beat
it on the validation rows.

The Gaussian is checked against torch's own ``MultivariateNormal`` with the sample mean and covariance; models are
the estimator's defaults on tables of 40 to 300 rows, so the file runs in seconds.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import pyro_flows as pf
from pyro_flows.data import two_moons
from pyro_flows.tabular_defaults import tabular_defaults

MIX = np.array([[1.0, 0.0, 0.0], [0.9, 0.4, 0.0], [0.5, -0.3, 0.2]])


def correlated_gaussian(rows: int, seed: int) -> np.ndarray:
    """Rows of a strongly correlated 3-D Gaussian (correlation 0.9 between the first two columns)."""
    return np.random.default_rng(seed).standard_normal((rows, 3)) @ MIX.T


def gaussian_log_prob(train: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Log-density of ``rows`` under the Gaussian with the sample mean and (n - 1) covariance of ``train``."""
    gaussian = torch.distributions.MultivariateNormal(torch.tensor(train.mean(0)), torch.tensor(np.cov(train.T)))
    return gaussian.log_prob(torch.tensor(rows)).numpy()


@pytest.mark.parametrize("flow", ["realnvp", "nsf"])
def test_a_flow_that_does_not_beat_the_gaussian_on_validation_rows_is_the_gaussian(flow):
    # 40 rows of a Gaussian: 10 validation rows. Before the guard, early stopping kept the best *trained* epoch,
    # and RealNVP scored 2000 fresh rows 0.028 nats below the fitted Gaussian (NSF 0.071, MAF 0.018)
    train, fresh = correlated_gaussian(40, 0), correlated_gaussian(2000, 1)
    with pytest.warns(UserWarning, match="training did not beat the fitted Gaussian on the 10 validation rows"):
        estimator = pf.DensityEstimator(flow).fit(train, progress=False)
    assert estimator.kept_start_ and estimator.whiten_
    # the validation rows chose the Gaussian; it is then fitted to all 40 rows
    np.testing.assert_allclose(estimator.score_samples(fresh), gaussian_log_prob(train, fresh), rtol=1e-5, atol=1e-4)


def test_a_flow_that_learns_is_kept_without_a_warning():
    train = two_moons(400, noise=0.1, generator=torch.Generator().manual_seed(0)).double().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimator = pf.DensityEstimator("nsf", transforms=2, hidden=(32, 32), max_epochs=15).fit(train, progress=False)
    assert not estimator.kept_start_
    assert estimator.score(train) > gaussian_log_prob(train, train).mean() + 0.2


def test_the_guard_is_saved(tmp_path):
    with pytest.warns(UserWarning, match="keeps the fitted Gaussian"):
        estimator = pf.DensityEstimator("maf", transforms=1, hidden=(8,)).fit(correlated_gaussian(40, 0))
    estimator.save(tmp_path / "model.pt")
    assert pf.DensityEstimator.load(tmp_path / "model.pt").kept_start_


def test_without_whitening_the_starting_flow_is_named():
    independent = np.random.default_rng(0).standard_normal((40, 3))  # the starting flow, a diagonal Gaussian, fits
    with pytest.warns(UserWarning, match="training did not beat the starting flow"):
        estimator = pf.DensityEstimator("realnvp", whiten=False).fit(independent, progress=False)
    assert estimator.kept_start_


def test_without_validation_rows_there_is_no_guard():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimator = pf.DensityEstimator("realnvp", transforms=1, hidden=(8,), validation_fraction=0, max_epochs=2)
        estimator.fit(correlated_gaussian(40, 0), progress=False)
    assert not estimator.kept_start_


@pytest.mark.parametrize(
    ("rows", "batch_size", "validation_fraction"),
    [(40, 16, 0.25), (150, 18, 0.25), (569, 71, 100 / 569), (5000, 256, 0.1)],
)
def test_batch_and_validation_split_follow_the_rows(rows, batch_size, validation_fraction):
    chosen = tabular_defaults("nsf", rows, 4)
    assert chosen["batch_size"] == batch_size
    assert chosen["validation_fraction"] == pytest.approx(validation_fraction)


@pytest.mark.parametrize("rows", [0, -1, 2.5, True])
def test_bad_table_sizes_are_refused(rows):
    with pytest.raises(ValueError, match="rows must be an integer >= 1"):
        tabular_defaults("nsf", rows, 3)


@pytest.mark.parametrize(("rows", "decay"), [(100, 0.05), (200, 0.05), (500, 0.02), (1000, 0.01), (20000, 0.01)])
def test_weight_decay_shrinks_with_the_rows(rows, decay):
    assert tabular_defaults("nsf", rows, 4)["weight_decay"] == pytest.approx(decay)
    assert tabular_defaults("nice", rows, 4)["weight_decay"] == pytest.approx(decay)


@pytest.mark.parametrize("flow", ["realnvp", "maf", "iaf"])
def test_affine_flows_get_bounded_scales_and_the_strongest_decay(flow):
    chosen = tabular_defaults(flow, 20000, 4)
    assert chosen["log_scale_bound"] == 1.5 and chosen["weight_decay"] == 0.05
    assert "log_scale_bound" not in tabular_defaults("nsf", 20000, 4)


@pytest.mark.parametrize(("given", "bound"), [({}, 1.5), ({"log_scale_bound": 3.0}, 3.0)])
def test_the_affine_bound_reaches_the_layers_unless_given(given, bound):
    estimator = pf.DensityEstimator("realnvp", max_epochs=1, validation_fraction=0, **given)
    estimator.fit(correlated_gaussian(40, 0), progress=False)
    layers = [layer for layer in estimator.flow_.transforms if hasattr(layer, "transform_map")]
    assert len(layers) == 5 and {layer.transform_map.log_scale_bound for layer in layers} == {bound}


def test_whiten_must_be_a_bool():
    with pytest.raises(ValueError, match="whiten must be True or False, got 'yes'"):
        pf.DensityEstimator("realnvp", whiten="yes").fit(correlated_gaussian(40, 0))


def test_the_whitening_of_a_trained_flow_is_fitted_to_the_training_rows_only():
    rng = np.random.default_rng(0)  # two correlated clusters: training beats the Gaussian at once
    table = np.where(rng.random((200, 1)) < 0.5, -2.0, 2.0) + 0.3 * rng.standard_normal((200, 2)) @ MIX[:2, :2].T
    estimator = pf.DensityEstimator(
        "nsf", transforms=2, hidden=(16, 16), max_epochs=5, validation_fraction=0.25, refit=False
    )
    estimator.fit(table, progress=False)
    assert not estimator.kept_start_
    training = torch.randperm(200, generator=torch.Generator().manual_seed(0))[50:].numpy()  # pyro_flows.fit's split
    (whiten,) = [layer for layer in estimator.flow_.transforms if hasattr(layer, "scale_tril")]
    expected = np.linalg.cholesky(np.corrcoef(table[training].T))
    np.testing.assert_allclose(whiten.scale_tril.numpy(), expected, atol=1e-6)


def bimodal(rows: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.where(rng.random((rows, 1)) < 0.5, -2.0, 2.0) + 0.3 * rng.standard_normal((rows, 2))


SMALL_NSF = dict(transforms=2, hidden=(16, 16), max_epochs=6, patience=None)


def test_a_small_table_is_refitted_on_all_rows_for_the_chosen_epochs():
    table = bimodal(120)
    estimator = pf.DensityEstimator("nsf", **SMALL_NSF).fit(table, progress=False)
    assert estimator.refitted_ and not estimator.kept_start_
    epochs = estimator.history_.best_epoch + 1  # the validated run's history
    by_hand = pf.DensityEstimator("nsf", **{**SMALL_NSF, "max_epochs": epochs}, validation_fraction=0)
    by_hand.fit(table, progress=False)
    assert not by_hand.refitted_  # no validation rows: nothing to choose epochs with
    np.testing.assert_array_equal(estimator.score_samples(table), by_hand.score_samples(table))
    validated = pf.DensityEstimator("nsf", **SMALL_NSF, refit=False).fit(table, progress=False)
    assert not validated.refitted_
    assert not np.array_equal(validated.score_samples(table), estimator.score_samples(table))


def test_a_large_table_is_not_refitted():
    from pyro_flows.tabular_defaults import REFIT_ROWS

    estimator = pf.DensityEstimator("nsf", **{**SMALL_NSF, "max_epochs": 2}).fit(bimodal(REFIT_ROWS + 1))
    assert not estimator.refitted_ and not estimator.kept_start_


def test_refit_must_be_a_bool_or_none():
    with pytest.raises(ValueError, match="refit must be True, False or None, got 'yes'"):
        pf.DensityEstimator("nsf", **SMALL_NSF, refit="yes").fit(bimodal(120))


def test_a_conditional_model_keeps_the_former_decay_and_bound():
    conditional = tabular_defaults("maf", 600, 1, context=1)
    assert conditional["weight_decay"] == 1e-2 and "log_scale_bound" not in conditional
    assert tabular_defaults("maf", 600, 1)["log_scale_bound"] == 1.5

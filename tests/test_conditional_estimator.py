"""Conditional density estimation with DensityEstimator (issue 13.4): p(targets | context columns), checked
against the analytic conditional density of a linear-Gaussian table; samples per context row, temperature,
encode/decode, saving, and the errors for bad context columns."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import pyro_flows as pf

SLOPE, NOISE = 2.0, 0.5


def linear_gaussian(rows: int, seed: int = 0) -> np.ndarray:
    """Columns (y, x): x ~ N(3, 1), y | x ~ N(SLOPE x - 1, NOISE^2)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, 1.0, rows)
    return np.column_stack([SLOPE * x - 1.0 + NOISE * rng.standard_normal(rows), x])


def true_log_density(X: np.ndarray) -> np.ndarray:
    residual = (X[:, 0] - (SLOPE * X[:, 1] - 1.0)) / NOISE
    return -0.5 * residual**2 - math.log(NOISE) - 0.5 * math.log(2 * math.pi)


@pytest.fixture(scope="module")
def fitted() -> pf.DensityEstimator:
    est = pf.DensityEstimator(
        "maf",
        transforms=2,
        hidden=(16,),
        context=["x"],
        max_epochs=60,
        batch_size=128,
        weight_decay=0.0,  # the exact conditional, not the regularised default
    )
    return est.fit(linear_gaussian(1500), feature_names=["y", "x"], progress=False)


def test_conditional_log_density_matches_the_analytic_one(fitted):
    test = linear_gaussian(2000, seed=1)
    scores = fitted.score_samples(test)
    assert scores.shape == (2000,)
    assert np.mean(scores) == pytest.approx(np.mean(true_log_density(test)), abs=0.08)
    central = np.abs(test[:, 1] - 3.0) < 1.5  # row by row where the training rows are dense
    error = np.abs(scores - true_log_density(test))[central]
    assert np.median(error) < 0.1 and np.quantile(error, 0.95) < 0.4
    # the marginal model of y alone is far worse: the context is used
    marginal = pf.DensityEstimator("maf", transforms=2, hidden=(16,), max_epochs=20).fit(
        linear_gaussian(1500)[:, :1], progress=False
    )
    assert np.mean(scores) > marginal.score(test[:, :1]) + 1.0
    assert (fitted.context_columns_, fitted.target_columns_, fitted.features_, fitted.n_features_in_) == (
        [1],
        [0],
        1,
        2,
    )


def test_samples_per_context_row_follow_the_conditional(fitted):
    context = np.array([[2.0], [3.0], [4.0]])
    samples = fitted.sample(4000, seed=0, context=context)
    assert samples.shape == (3, 4000, 1)
    np.testing.assert_allclose(samples[..., 0].mean(1), SLOPE * context[:, 0] - 1.0, atol=0.15)
    np.testing.assert_allclose(samples[..., 0].std(1), NOISE, rtol=0.1)
    assert fitted.sample(5, seed=0, context=np.array([3.0])).shape == (5, 1)  # one context row: (n, features)
    np.testing.assert_array_equal(fitted.sample(7, seed=3, context=context), fitted.sample(7, seed=3, context=context))


def test_temperature_scales_the_base_draws(fitted):
    context = np.array([[3.0]])
    cold = fitted.sample(4000, seed=0, context=context, temperature=0.5)[0, :, 0]
    warm = fitted.sample(4000, seed=0, context=context)[0, :, 0]
    assert cold.std() == pytest.approx(0.5 * warm.std(), rel=0.1)  # the model is close to affine in z
    mode = fitted.sample(3, seed=0, context=context, temperature=0.0)[0, :, 0]
    assert np.ptp(mode) == 0 and mode[0] == pytest.approx(SLOPE * 3.0 - 1.0, abs=0.1)
    for bad in (-1.0, float("nan"), "hot"):
        with pytest.raises(ValueError, match="temperature must be a number >= 0"):
            fitted.sample(2, context=context, temperature=bad)


def test_encode_and_decode_are_inverse_and_encode_whitens(fitted):
    X = linear_gaussian(3000, seed=2)
    Z = fitted.encode(X)
    assert Z.shape == (3000, 1)
    assert abs(Z.mean()) < 0.15 and Z.std() == pytest.approx(1.0, rel=0.08)
    np.testing.assert_allclose(fitted.decode(Z, context=X[:, 1:]), X[:, :1], atol=1e-4)
    with pytest.raises(ValueError, match=re.escape("pass context=, the values of its context columns ['x']")):
        fitted.decode(Z)
    with pytest.raises(ValueError, match="context has 2 rows for 3000 rows of base points"):
        fitted.decode(Z, context=X[:2, 1:])


def test_save_and_load_keep_the_conditional_model(fitted, tmp_path):
    fitted.save(tmp_path / "c.pt")
    loaded = pf.DensityEstimator.load(tmp_path / "c.pt")
    X = linear_gaussian(50, seed=3)
    np.testing.assert_allclose(loaded.score_samples(X), fitted.score_samples(X), rtol=1e-6)
    context = X[:4, 1:]
    np.testing.assert_array_equal(loaded.sample(3, seed=1, context=context), fitted.sample(3, seed=1, context=context))
    assert loaded.context == [1] and loaded.feature_names_in_ == ["y", "x"]


def test_context_columns_by_index_and_a_tensor_table():
    X = torch.from_numpy(linear_gaussian(300)).float()
    est = pf.DensityEstimator("nsf", transforms=1, hidden=(8,), context=[-1], max_epochs=2).fit(X, progress=False)
    assert est.context_columns_ == [1]
    samples = est.sample(5, seed=0, context=X[:2, 1:])
    assert isinstance(samples, torch.Tensor) and samples.shape == (2, 5, 1)


@pytest.mark.parametrize(
    "context, names, message",
    [
        (3, None, "context must be a list of column names or indices (e.g. context=[3]), got 3"),
        ("x", ["y", "x"], "context must be a list of column names or indices (e.g. context=['x'])"),
        (["z"], ["y", "x"], "context column 'z' is not a column of X; X has ['y', 'x']"),
        (["x"], None, "context column 'x' is named, but X has no column names"),
        ([2], None, "context column 2 is neither a column name nor an index in [0, 2)"),
        ([0, 1], None, "context takes all 2 columns of X; no column is left to model"),
        ([1, -1], None, "context names a column twice"),
    ],
)
def test_bad_context_columns_are_named(context, names, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        pf.DensityEstimator(context=context).fit(linear_gaussian(20), feature_names=names)


def test_context_mismatches_are_named(fitted):
    with pytest.raises(ValueError, match=re.escape("pass context=, the values of its context columns ['x']")):
        fitted.sample(3)
    with pytest.raises(ValueError, match="context has 2 features, but DensityEstimator is expecting 1"):
        fitted.sample(3, context=np.zeros((1, 2)))
    unconditional = pf.DensityEstimator("maf", transforms=1, hidden=(8,), max_epochs=1).fit(
        linear_gaussian(50), progress=False
    )
    with pytest.raises(ValueError, match="fitted without context columns; pass no context"):
        unconditional.sample(3, context=np.zeros((1, 1)))


def test_a_non_numeric_column_is_named():
    X = linear_gaussian(10).astype(object)
    X[4, 1] = "n/a"
    with pytest.raises(ValueError, match=re.escape("column 1 of X is not numeric (e.g. 'n/a'")):
        pf.DensityEstimator(context=[1]).fit(X)

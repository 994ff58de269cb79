"""Tests of ``DensityEstimator`` and its ``Standardize`` layer.

Densities are checked against independent computations: NumPy's means and
standard deviations, the flow without its standardisation evaluated on
hand-standardised data, and the true Gaussian log-density of the data.
Models are tiny and trained for a few epochs, so the file runs in seconds.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pyro.distributions as dist
import pytest
import torch

import pyro_flows as pf
from pyro_flows.data import two_moons
from pyro_flows.estimator import NotFittedError
from pyro_flows.saving import atomic_save
from pyro_flows.transforms import Standardize

TINY = dict(transforms=2, hidden=(8,))
QUICK = dict(max_epochs=2, batch_size=128, progress=False)


def gaussian_data(rows: int, seed: int = 0, scale=(100.0, 0.01, 3.0), loc=(5.0, -2.0, 1000.0)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.asarray(loc) + np.asarray(scale) * rng.standard_normal((rows, len(scale)))


@pytest.fixture(scope="module")
def fitted() -> pf.DensityEstimator:
    return pf.DensityEstimator("maf", **TINY).fit(gaussian_data(300), validation_fraction=0.2, **QUICK)


# -- Standardize --------------------------------------------------------------------


def test_standardize_is_a_fixed_affine_map_with_its_log_det():
    loc, scale = (
        torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64),
        torch.tensor([2.0, 0.1, 30.0], dtype=torch.float64),
    )
    layer = Standardize(loc, scale)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y, ladj = layer.call_and_ladj(x)
    torch.testing.assert_close(y, loc + scale * x, rtol=0, atol=1e-14)
    torch.testing.assert_close(ladj, torch.full((4,), math.log(2.0 * 0.1 * 30.0), dtype=torch.float64))
    back, inverse_ladj = layer.inverse_and_ladj(y.clone())
    torch.testing.assert_close(back, x, rtol=0, atol=1e-14)
    torch.testing.assert_close(inverse_ladj, -ladj)
    assert list(layer.parameters()) == []  # fixed: nothing for an optimizer
    assert set(layer.state_dict()) == {"loc", "scale"}
    assert layer.to(torch.float32).loc.dtype == torch.float32


def test_standardize_density_is_the_shifted_scaled_normal():
    loc, scale = torch.tensor([3.0, -1.0]), torch.tensor([100.0, 0.5])
    flow = pf.Flow(pf.StandardNormal(2), [Standardize(loc, scale)])
    y = torch.randn(6, 2) * 50
    expected = dist.Normal(loc, scale).log_prob(y).sum(-1)
    torch.testing.assert_close(flow().log_prob(y), expected)


def test_standardize_from_data_uses_column_mean_and_std_with_a_floor():
    data = gaussian_data(50)
    data[:, 1] = 7.0  # a constant column
    layer = Standardize.from_data(torch.from_numpy(data), min_scale=1e-6)
    np.testing.assert_allclose(layer.loc.numpy(), data.mean(0), rtol=1e-12)
    np.testing.assert_allclose(layer.scale.numpy()[[0, 2]], data.std(0, ddof=1)[[0, 2]], rtol=1e-12)
    # floored at min_scale * the largest column's spread (issue 16.1: not * |mean|, which inflated far-off columns)
    assert layer.scale[1].item() == pytest.approx(1e-6 * data.std(0, ddof=1).max(), rel=1e-12)


@pytest.mark.parametrize(
    "loc, scale, message",
    [
        (torch.zeros(2), torch.tensor([1.0, 0.0]), "finite and positive"),
        (torch.zeros(2), torch.tensor([1.0, -1.0]), "finite and positive"),
        (torch.tensor([0.0, float("nan")]), torch.ones(2), "finite"),
        (torch.zeros(2), torch.ones(3), "shape"),
        (torch.zeros(2, 2), torch.ones(2, 2), "shape"),
    ],
)
def test_standardize_rejects_bad_parameters(loc, scale, message):
    with pytest.raises(ValueError, match=message):
        Standardize(loc, scale)


# -- densities in data units ----------------------------------------------------------


def test_log_prob_is_the_flow_of_standardised_data_minus_log_std(fitted):
    X = gaussian_data(300)
    *layers, standardize = fitted.flow_.transforms
    assert isinstance(standardize, Standardize)
    mean, std = X.mean(0), X.std(0, ddof=1)  # independent: NumPy, float64
    inner = pf.Flow(fitted.flow_.base, layers)
    Z = torch.from_numpy((X[:20] - mean) / std).float()
    with torch.no_grad():
        expected = inner().log_prob(Z).double().numpy() - np.log(std).sum()
    np.testing.assert_allclose(fitted.log_prob(X[:20]), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(fitted.score_samples(X[:20]), fitted.log_prob(X[:20]))


def test_gaussian_data_gets_the_true_log_likelihood_in_data_units():
    loc, scale = np.array([5.0, -2.0, 1000.0]), np.array([100.0, 100.0, 100.0])
    train, test = gaussian_data(2000, 0, scale, loc), gaussian_data(1000, 1, scale, loc)
    est = pf.DensityEstimator("realnvp", **TINY).fit(train, validation_fraction=0.1, seed=0, **QUICK)
    truth = dist.Normal(torch.from_numpy(loc), torch.from_numpy(scale)).log_prob(torch.from_numpy(test)).sum(-1)
    true_mean = truth.mean().item()  # about -3/2 log(2 pi e) - 3 log 100 = -18.07
    assert true_mean == pytest.approx(-1.5 * math.log(2 * math.pi * math.e) - 3 * math.log(100), abs=0.1)
    assert est.score(test) == pytest.approx(true_mean, abs=0.05)
    assert np.median(np.abs(est.log_prob(test) - truth.numpy())) < 0.1  # row by row too


def test_fitting_learns_more_than_the_standardisation():
    generator = torch.Generator().manual_seed(0)
    train, test = two_moons(2000, generator=generator), two_moons(500, generator=generator)
    est = pf.DensityEstimator("nsf", transforms=2, hidden=(32, 32), bins=6)
    est.fit(train, max_epochs=15, batch_size=128, lr=5e-3, validation_fraction=0.0, progress=False)
    mean, covariance = train.double().mean(0), torch.cov(train.double().T)
    gaussian = dist.MultivariateNormal(mean, covariance).log_prob(test.double()).mean().item()
    assert isinstance(est.log_prob(test), torch.Tensor)
    assert est.score(test) > gaussian + 0.4  # two moons: a full-covariance Gaussian is far from the truth


def test_nats_and_bits_per_dim(fitted):
    X = gaussian_data(100, seed=3)
    mean_log_prob = fitted.log_prob(X).mean()
    assert fitted.score(X) == pytest.approx(mean_log_prob, rel=1e-12)
    assert fitted.nats_per_dim(X) == pytest.approx(-mean_log_prob / 3, rel=1e-12)
    assert fitted.bits_per_dim(X) == pytest.approx(-mean_log_prob / (3 * math.log(2)), rel=1e-12)
    assert fitted.bits_per_dim(X, levels=256) == pytest.approx(-mean_log_prob / (3 * math.log(2)) + 8, rel=1e-12)


# -- types, dtypes, determinism -----------------------------------------------------------


def test_outputs_follow_the_input_type(fitted):
    X = gaussian_data(10, seed=1)
    out = fitted.log_prob(X)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (10,)
    out_t = fitted.log_prob(torch.from_numpy(X))
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32 and out_t.shape == (10,)
    np.testing.assert_allclose(out_t.double().numpy(), out, rtol=1e-6)
    samples = fitted.sample(7, seed=0)
    assert isinstance(samples, np.ndarray) and samples.shape == (7, 3) and samples.dtype == np.float64
    np.testing.assert_array_equal(samples, fitted.sample(7, seed=0))
    assert not np.array_equal(samples, fitted.sample(7, seed=1))


def test_samples_are_in_data_units(fitted):
    samples = fitted.sample(4000, seed=0)
    X = gaussian_data(300)
    np.testing.assert_allclose(samples.mean(0), X.mean(0), atol=0.2 * X.std(0).max())
    np.testing.assert_allclose(samples.std(0), X.std(0), rtol=0.3)
    assert samples[:, 2].mean() == pytest.approx(1000, abs=1.0)


def test_torch_fit_gives_torch_samples_and_float64_on_request():
    X = torch.from_numpy(gaussian_data(200))
    est = pf.DensityEstimator("nice", dtype=torch.float64, **TINY).fit(X, validation_fraction=0.0, **QUICK)
    assert all(p.dtype == torch.float64 for p in est.flow_.parameters())
    samples = est.sample(5)
    assert isinstance(samples, torch.Tensor) and samples.dtype == torch.float64 and samples.shape == (5, 3)
    assert est.log_prob(X[:3]).dtype == torch.float64


def test_same_seed_same_model():
    X = gaussian_data(200)
    a = pf.DensityEstimator("realnvp", **TINY).fit(X, seed=3, validation_fraction=0.2, **QUICK)
    b = pf.DensityEstimator("realnvp", **TINY).fit(X, seed=3, validation_fraction=0.2, **QUICK)
    np.testing.assert_array_equal(a.log_prob(X), b.log_prob(X))


def test_history_records_training(fitted):
    history = fitted.history_
    assert len(history.train_loss) >= 1 and all(math.isfinite(v) for v in history.train_loss)
    assert len(history.validation_loss) == len(history.train_loss)


# -- save and load ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flow, kwargs",
    [
        ("nice", {}),
        ("realnvp", {"mixing": "random"}),
        ("maf", {"mixing": "lu"}),
        ("iaf", {}),
        ("nsf", {"bins": 4, "bound": 4.0, "autoregressive": False}),
    ],
)
def test_save_load_round_trip(tmp_path, flow, kwargs):
    X = gaussian_data(200)
    est = pf.DensityEstimator(flow, **TINY, **kwargs).fit(X, validation_fraction=0.25, seed=1, **QUICK)
    est.save(tmp_path / "model.pt")
    loaded = pf.DensityEstimator.load(tmp_path / "model.pt")
    assert (loaded.flow, loaded.transforms, loaded.hidden) == (flow, 2, (8,))
    # the options given, and those fit chose from the data (pyro_flows.tabular_defaults)
    assert loaded.flow_kwargs == {**est.architecture_["kwargs"], **kwargs} == est.architecture_["kwargs"]
    np.testing.assert_array_equal(loaded.log_prob(X), est.log_prob(X))
    np.testing.assert_array_equal(loaded.sample(5, seed=0), est.sample(5, seed=0))
    assert loaded.history_.train_loss == est.history_.train_loss
    assert loaded.history_.best_epoch == est.history_.best_epoch


def test_loaded_torch_estimator_keeps_its_output_type(tmp_path):
    X = torch.from_numpy(gaussian_data(100)).float()
    pf.DensityEstimator("maf", **TINY).fit(X, validation_fraction=0.0, **QUICK).save(tmp_path / "m.pt")
    loaded = pf.DensityEstimator.load(tmp_path / "m.pt")
    assert isinstance(loaded.sample(2), torch.Tensor) and loaded.dtype == torch.float32


def test_saved_file_is_plain(tmp_path, fitted):
    fitted.save(tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["format"] == "pyro_flows.DensityEstimator" and payload["version"] == 2
    assert payload["config"] == {
        "flow": "maf",
        "transforms": 2,
        "hidden": [8],
        "min_scale": 1e-6,
        "kwargs": fitted.architecture_["kwargs"],  # chosen from the data
        "context": [],
    }
    assert fitted.architecture_["kwargs"] == {"input_bound": 3.0, "log_scale_bound": 1.5}  # MAF: an affine flow
    assert payload["kept_start"] is fitted.kept_start_
    assert payload["features"] == 3 and payload["dtype"] == "float32" and payload["fitted_on"] == "numpy"
    assert isinstance(payload["history"]["train_loss"], list)


class _Malicious:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_load_refuses_a_file_that_would_run_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": "pyro_flows.DensityEstimator", "version": 1, "x": _Malicious(str(marker))}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="refusing to execute code"):
        pf.DensityEstimator.load(tmp_path / "m.pt")
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"format": "something else", "version": 1}, "not a saved pyro_flows DensityEstimator"),
        ([1, 2, 3], "not a saved pyro_flows DensityEstimator"),
        ({"format": "pyro_flows.DensityEstimator", "version": 99}, "unknown DensityEstimator file version 99"),
    ],
)
def test_load_rejects_other_files(tmp_path, payload, message):
    atomic_save(payload, tmp_path / "m.pt")
    with pytest.raises(ValueError, match=message):
        pf.DensityEstimator.load(tmp_path / "m.pt")


def test_load_rejects_a_damaged_file(tmp_path, fitted):
    fitted.save(tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    del payload["state_dict"][next(iter(payload["state_dict"]))]
    atomic_save(payload, tmp_path / "damaged.pt")
    with pytest.raises(ValueError, match="damaged DensityEstimator file"):
        pf.DensityEstimator.load(tmp_path / "damaged.pt")
    del payload["config"]
    atomic_save(payload, tmp_path / "damaged.pt")
    with pytest.raises(ValueError, match="damaged DensityEstimator file"):
        pf.DensityEstimator.load(tmp_path / "damaged.pt")


@pytest.mark.parametrize("content", [b"x,y\n1,2\n", b"", b"hello world", bytes(range(256)), b"PK\x03\x04junk"])
def test_load_rejects_junk(tmp_path, content):
    (tmp_path / "junk.pt").write_bytes(content)
    with pytest.raises(ValueError, match="junk.pt"):
        pf.DensityEstimator.load(tmp_path / "junk.pt")


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        pf.DensityEstimator.load(tmp_path / "nope.pt")


# -- bad input ----------------------------------------------------------------------------


def test_nonfinite_rows_at_fit_are_named():
    X = gaussian_data(50)
    X[3, 0], X[17, 2], X[40, 1] = np.nan, np.inf, -np.inf
    with pytest.raises(ValueError, match=re.escape("3 rows of X have NaN or inf values (rows 3, 17, 40)")):
        pf.DensityEstimator("maf", **TINY).fit(X, **QUICK)
    with pytest.raises(ValueError, match=re.escape("(rows 3, 17, 40)")):
        pf.DensityEstimator("maf", **TINY).fit(torch.from_numpy(X), **QUICK)


def test_nonfinite_rows_at_log_prob_are_named(fitted):
    X = gaussian_data(5)
    X[2, 1] = np.nan
    with pytest.raises(ValueError, match=re.escape("log_prob: 1 rows of X have NaN or inf values (rows 2)")):
        fitted.log_prob(X)


def test_wrong_feature_count(fitted):
    # scikit-learn's wording (check_n_features_in_after_fitting)
    with pytest.raises(ValueError, match="X has 2 features, but DensityEstimator is expecting 3 features as input"):
        fitted.score_samples(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="X has 5 features, but DensityEstimator is expecting 3"):
        fitted.log_prob(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="X has 1 features, but DensityEstimator is expecting 3"):
        fitted.score(np.zeros((4, 1)))


@pytest.mark.parametrize(
    "X, message",
    [
        (np.zeros(10), re.escape("X must be 2-D (rows, features), got shape (10,) (use X.reshape(-1, 1)")),
        (np.zeros((4, 2, 2)), re.escape("X must be 2-D (rows, features), got shape (4, 2, 2)")),
        (np.array([["a", "b"]]), re.escape("column 0 of X is not numeric (e.g. ")),
        (torch.zeros(3, 2, dtype=torch.complex64), "must be real numbers"),
        (np.zeros((10, 0)), re.escape("X has 0 feature(s) (shape=(10, 0)) while a minimum of 1 is required.")),
    ],
)
def test_bad_shapes_and_types(X, message):
    with pytest.raises(ValueError, match=message):
        pf.DensityEstimator("maf", **TINY).fit(X, **QUICK)


def test_too_few_rows_for_the_validation_split():
    X = np.random.default_rng(0).normal(size=(3, 2))
    with pytest.raises(ValueError, match=re.escape("validation_fraction=0.9 of 3 rows")):
        pf.DensityEstimator("maf", **TINY).fit(X, validation_fraction=0.9)
    with pytest.raises(ValueError, match=re.escape("validation_fraction=0.1 of 3 rows")):
        pf.DensityEstimator("maf", **TINY).fit(X, validation_fraction=0.1)
    with pytest.raises(ValueError, match=re.escape("got 1 sample (row) of X; need at least 2 rows")):
        pf.DensityEstimator("maf", **TINY).fit(np.zeros((1, 2)), validation_fraction=0.0)
    with pytest.raises(ValueError, match=re.escape("validation_fraction must be in [0, 1)")):
        pf.DensityEstimator("maf", **TINY).fit(np.zeros((10, 2)), validation_fraction=1.0)


def test_a_failed_fit_leaves_the_estimator_as_it_was(fitted, tmp_path):
    fitted.save(tmp_path / "m.pt")
    est = pf.DensityEstimator.load(tmp_path / "m.pt")
    before = est.log_prob(gaussian_data(5))
    with pytest.raises(ValueError, match="of 3 rows"):
        est.fit(np.random.default_rng(0).normal(size=(3, 2)), validation_fraction=0.9)
    assert est.features_ == 3
    np.testing.assert_array_equal(est.log_prob(gaussian_data(5)), before)


@pytest.mark.parametrize(
    "call",
    [
        lambda est: est.log_prob(np.zeros((2, 2))),
        lambda est: est.score_samples(np.zeros((2, 2))),
        lambda est: est.score(np.zeros((2, 2))),
        lambda est: est.sample(3),
        lambda est: est.save(os.devnull),
        lambda est: est.bits_per_dim(np.zeros((2, 2))),
    ],
)
def test_using_an_unfitted_estimator_is_a_runtime_error(call):
    with pytest.raises(NotFittedError, match="not fitted yet; call fit"):
        call(pf.DensityEstimator())
    assert issubclass(NotFittedError, RuntimeError)


def test_parameters_are_checked_by_fit():
    # scikit-learn's convention: the constructor stores, fit checks (a value that cannot be saved is refused at once)
    X = gaussian_data(20)
    with pytest.raises(ValueError, match="flow must be one of nice, realnvp, maf, iaf, nsf, cnf, ffjord, got 'glow'"):
        pf.DensityEstimator("glow").fit(X)
    with pytest.raises(ValueError, match="flow option activation=.* is not a plain value"):
        pf.DensityEstimator("maf", activation=torch.nn.ReLU())
    for dtype in (torch.int64, "int64", "float128"):
        with pytest.raises(ValueError, match="dtype must be a floating"):
            pf.DensityEstimator("maf", dtype=dtype).fit(X)
    with pytest.raises(ValueError, match="transforms must be a positive integer, got 0"):
        pf.DensityEstimator("maf", transforms=0).fit(X)
    with pytest.raises(ValueError, match="hidden must be a sequence of layer widths"):
        pf.DensityEstimator("maf", hidden=64).fit(X)


def test_sample_checks_n(fitted):
    for n in (2.5, 0, -1, True):
        with pytest.raises(ValueError, match="n must be a positive integer"):
            fitted.sample(n)
    assert fitted.sample(1).shape == (1, 3)


def test_feature_names_are_kept_and_saved(tmp_path):
    X = np.random.default_rng(0).normal(size=(64, 2))
    estimator = pf.DensityEstimator(flow="realnvp", transforms=1, hidden=(8,))
    estimator.fit(X, max_epochs=1, validation_fraction=0.0, progress=False, feature_names=["a", "b"])
    assert estimator.feature_names_in_ == ["a", "b"]
    estimator.save(tmp_path / "model.pt")
    assert pf.DensityEstimator.load(tmp_path / "model.pt").feature_names_in_ == ["a", "b"]
    with pytest.raises(ValueError, match="1 feature names for 2 columns"):
        estimator.fit(X, max_epochs=1, validation_fraction=0.0, progress=False, feature_names=["a"])


def test_whiten_false_only_standardises():
    from pyro_flows.transforms.preprocessing import Whiten

    X = gaussian_data(100)
    whitened = pf.DensityEstimator("maf", **TINY).fit(X, **QUICK)
    plain = pf.DensityEstimator("maf", **TINY, whiten=False).fit(X, **QUICK)
    assert any(isinstance(t, Whiten) for t in whitened.flow_.transforms)
    assert not any(isinstance(t, Whiten) for t in plain.flow_.transforms) and plain.get_params()["whiten"] is False

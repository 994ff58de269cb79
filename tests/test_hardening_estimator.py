"""Issue 16, items 5 and 1: ``DensityEstimator`` memory (chunked sampling and scoring) and data far from zero."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import warnings
import weakref

import numpy as np
import pytest
import torch

import pyro_flows as pf
from pyro_flows import estimator as estimator_module
from pyro_flows.flows.base import FlowDistribution

TINY = dict(transforms=2, hidden=(8,))
QUICK = dict(max_epochs=2, batch_size=128, progress=False)


@pytest.fixture(scope="module")
def fitted() -> pf.DensityEstimator:
    X = np.random.default_rng(0).normal(size=(300, 3)) * [1.0, 2.0, 3.0]
    return pf.DensityEstimator("realnvp", **TINY).fit(X, validation_fraction=0.2, **QUICK)


# -- item 5: memory ---------------------------------------------------------------------------------------------


@pytest.fixture
def passes(monkeypatch):
    """The rows of every pass through the flow (``_from_base``: sampling, ``_to_base``: scoring), each pass's
    output kept as a weak reference, with a chunk size of 64 rows."""
    monkeypatch.setattr(estimator_module, "CHUNK_ROWS", 64, raising=False)
    seen: dict[str, list] = {"from_base": [], "to_base": [], "alive": []}
    for name in ("from_base", "to_base"):
        original = getattr(FlowDistribution, f"_{name}")

        def wrapped(self, value, _original=original, _name=name):
            out, ladj = _original(self, value)
            seen[_name].append(value.shape[0])
            seen["alive"] += [weakref.ref(out), weakref.ref(value)]
            return out, ladj

        monkeypatch.setattr(FlowDistribution, f"_{name}", wrapped)
    return seen


def test_sample_is_drawn_in_bounded_chunks_and_keeps_nothing_alive(fitted, passes):
    samples = fitted.sample(1000, seed=0)
    assert samples.shape == (1000, 3) and samples.dtype == np.float64 and np.isfinite(samples).all()
    assert passes["from_base"] == [64] * 15 + [40]  # not one pass of 1000 rows
    assert all(ref() is None for ref in passes["alive"])  # no layer or memo keeps a chunk after the call
    # one random stream across the chunks: the first chunks are those of a smaller draw, and seeds repeat
    np.testing.assert_array_equal(samples[:128], fitted.sample(128, seed=0))
    np.testing.assert_array_equal(samples, fitted.sample(1000, seed=0))
    assert len(np.unique(samples[:, 0])) == 1000  # every chunk is a fresh draw


def test_score_samples_is_computed_in_bounded_chunks(fitted, passes):
    X = np.random.default_rng(1).normal(size=(1000, 3))
    scores = fitted.score_samples(X)
    assert passes["to_base"] == [64] * 15 + [40]
    assert all(ref() is None for ref in passes["alive"])
    # each row scored on its own gives the same value: the chunks are the rows they claim to be
    single = np.array([fitted.score_samples(X[i : i + 1])[0] for i in (0, 63, 64, 500, 999)])
    np.testing.assert_allclose(scores[[0, 63, 64, 500, 999]], single, rtol=1e-6)
    tensor_scores = fitted.score_samples(torch.from_numpy(X).float())
    assert tensor_scores.dtype == torch.float32 and tensor_scores.shape == (1000,)
    np.testing.assert_allclose(tensor_scores.numpy(), scores, rtol=1e-5, atol=1e-5)


MEMORY_SCRIPT = """
import gc, json, resource
import numpy as np, torch
import pyro_flows as pf
torch.set_num_threads(1)
rows = 200_000
X = np.random.default_rng(0).normal(size=(256, 8))
est = pf.DensityEstimator("realnvp", transforms=2, hidden=(64, 64)).fit(X, max_epochs=1, progress=False)
Y = np.random.default_rng(1).normal(size=(rows, 8))
est.sample(10, seed=0), est.score_samples(Y[:10])  # warm up
gc.collect()
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux: KiB)
before = peak()
scores = est.score_samples(Y)  # first: the peak only grows
after_score = peak()
samples = est.sample(rows, seed=0)
print(json.dumps({"score": after_score - before, "score_result": scores.nbytes, "X": Y.nbytes,
                  "sample": peak() - after_score, "sample_result": samples.nbytes}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux's")
def test_peak_memory_of_sample_and_score_is_a_small_multiple_of_the_result():
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MEMORY_SCRIPT)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    # unchunked (before issue 16.5): +94 MB for the 12.8 MB sample, +106 MB to score X (12.8 MB; 1.6 MB of scores)
    assert figures["sample"] <= 3 * figures["sample_result"], figures  # now ~1x
    assert figures["score"] <= figures["X"] / 2, figures  # now ~3.7 MB: no copy of X, one chunk's activations


# -- item 1: data far from zero -------------------------------------------------------------------------------------

FAR = 1.7e9


def _gaussian_log_likelihood(X: np.ndarray) -> float:
    """Mean log-density of the rows of ``X`` under N(0, I), per row."""
    return float(np.mean(-0.5 * (X**2).sum(1) - 0.5 * X.shape[1] * np.log(2 * np.pi)))


def test_standardize_floors_the_spread_on_the_spreads_not_the_mean():
    data = torch.from_numpy(np.random.default_rng(0).normal(size=(500, 2)) + [FAR, 0.0])
    layer = pf.transforms.Standardize.from_data(data)
    np.testing.assert_allclose(layer.scale.numpy(), data.std(0).numpy(), rtol=1e-12)  # was 1700 for column 0
    constant = pf.transforms.Standardize.from_data(torch.full((10, 2), 7.0, dtype=torch.float64))
    assert constant.scale.tolist() == pytest.approx([7e-6, 7e-6])  # every column constant: min_scale * |mean|


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_data_far_from_zero_is_fitted_as_the_same_data_near_zero(dtype, tmp_path):
    X = np.random.default_rng(0).normal(size=(1000, 2))
    options = dict(max_epochs=3, batch_size=250, progress=False, validation_fraction=0)
    near = pf.DensityEstimator("realnvp", dtype=dtype, **TINY).fit(X, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float64 data at 1.7e9 with sd 1 is representable: no warning
        far = pf.DensityEstimator("realnvp", dtype=dtype, **TINY).fit(X + FAR, **options)
    score_near, score_far = near.score(X), far.score(X + FAR)
    assert score_far == pytest.approx(score_near, abs=0.3)  # before issue 16.1: -9.39 against -2.84
    assert score_far == pytest.approx(_gaussian_log_likelihood(X), abs=0.15)  # about -2.84 for N(0, I)
    np.testing.assert_allclose(far.offset_.numpy(), X.mean(0) + FAR, rtol=0, atol=1e-5)
    assert far.offset_.dtype == torch.float64
    # the rows are not coarsened to float32's steps of 128 at 1.7e9: nearby rows get different scores
    nearby = X[:5] + FAR
    assert len(np.unique(far.score_samples(nearby))) == 5
    # samples come back in the data's units, at full float64 resolution
    samples = far.sample(4000, seed=0)
    assert samples.dtype == np.float64
    np.testing.assert_allclose(samples.mean(0), FAR, rtol=0, atol=0.2)
    np.testing.assert_allclose(samples.std(0), 1.0, rtol=0.2)
    assert len(np.unique(samples[:, 0])) > 3990  # not float32's steps of 128 (a few float32 draws may coincide)
    # save / load keeps the offset
    far.save(tmp_path / "far.pt")
    loaded = pf.DensityEstimator.load(tmp_path / "far.pt")
    assert torch.equal(loaded.offset_, far.offset_) and loaded.offset_.dtype == torch.float64
    np.testing.assert_array_equal(loaded.score_samples(nearby), far.score_samples(nearby))
    np.testing.assert_array_equal(loaded.sample(10, seed=1), far.sample(10, seed=1))


def test_a_column_coarsened_by_its_dtype_is_warned_about():
    X = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    X[:, 0] = X[:, 0] * 100 + FAR  # float32 steps of 128 at 1.7e9: an sd of 100 is a few steps
    with pytest.warns(UserWarning, match=r"column\(s\) 0 .*fewer than 16 steps"):
        pf.DensityEstimator("realnvp", **TINY).fit(X, **QUICK)


def test_a_finite_value_too_large_for_the_models_dtype_is_named_not_called_nan():
    """Issue 16.6 through the Python API: 1e39 is finite in float64 but inf in a float32 model."""
    X = np.random.default_rng(0).normal(size=(50, 2))
    est = pf.DensityEstimator("maf", transforms=1, hidden=(8,), max_epochs=1).fit(X, progress=False)
    bad = X.copy()
    bad[3, 1] = 1e39
    message = re.escape("1 rows of X (rows 3) have values too large for the model's dtype float32")
    for method in (est.score_samples, est.encode):
        with pytest.raises(ValueError, match=message):
            method(bad)
    assert np.isfinite(est.score_samples(X)).all()

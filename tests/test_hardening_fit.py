"""Regression tests of issue 16's fitting and estimator items (3, 7, 8, 11, 1): short batches, empty
inputs, validation of arguments, non-finite data from loaders, and data far from zero."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import pyro_flows as pf
from pyro_flows import NegativeLogLikelihood
from pyro_flows import transforms as T


def batchnorm_flow(features: int = 3) -> pf.Flow:
    torch.manual_seed(0)
    return pf.Flow(pf.StandardNormal(features), [T.AffineCoupling(features), T.BatchNorm(features)])


# --------------------------------------------------------------------------- item 3: short batches


def test_a_one_row_last_batch_is_merged_into_the_batch_before_it():
    sizes: list[int] = []
    nll = NegativeLogLikelihood()

    def objective(model, x, context):
        sizes.append(x.shape[0])
        return nll(model, x, context)

    flow = batchnorm_flow()
    history = pf.fit(flow, torch.randn(257, 3), batch_size=256, max_epochs=2, objective=objective, seed=0,
                     progress=False)  # fmt: skip
    assert sizes == [257, 257] and history.steps == 2
    assert all(torch.isfinite(torch.tensor(history.train_loss)))
    # a last batch of two rows or more is kept as it is
    sizes.clear()
    pf.fit(batchnorm_flow(), torch.randn(258, 3), batch_size=256, max_epochs=1, objective=objective, seed=0,
           progress=False)  # fmt: skip
    assert sorted(sizes) == [2, 256]


def test_one_sample_is_drawn_from_a_fresh_flow_in_training_mode():
    torch.manual_seed(0)
    flow = pf.NICE(2)  # ActNorm layers, initialised from data
    assert flow.training
    assert flow().sample().shape == (2,) and flow().sample((1,)).shape == (1, 2)
    # the single row did not initialise ActNorm: the next batch of data does
    actnorms = [m for m in flow.modules() if isinstance(m, T.ActNorm)]
    assert actnorms and not any(bool(m.initialized) for m in actnorms)
    x = 5 + 3 * torch.randn(500, 2)
    flow().log_prob(x)
    assert all(bool(m.initialized) for m in actnorms)


def test_batchnorm_in_training_mode_takes_one_row_with_its_running_statistics():
    layer = T.BatchNorm(3)
    y = torch.randn(1, 3)
    z = layer.inv(y)
    assert torch.allclose(z, (y - layer.running_mean) / (layer.running_var + layer.eps).sqrt())
    assert torch.equal(layer.running_mean, torch.zeros(3))  # not updated from one row
    assert torch.isfinite(batchnorm_flow()().log_prob(torch.randn(1, 3))).all()


# --------------------------------------------------------------------------- item 8: empty inputs


def test_fit_refuses_data_without_rows():
    with pytest.raises(ValueError, match=re.escape("fit: data has no rows (shape (0, 2))")):
        pf.fit(pf.RealNVP(2), torch.randn(0, 2), progress=False)
    with pytest.raises(ValueError, match=re.escape("fit: validation_data has no rows (shape (0, 2))")):
        pf.fit(pf.RealNVP(2), torch.randn(10, 2), validation_data=torch.randn(0, 2), progress=False)


@pytest.mark.parametrize("factory", [pf.RealNVP, pf.NSF, pf.MAF, pf.NICE])
def test_log_prob_of_an_empty_batch_is_empty(factory):
    torch.manual_seed(0)
    flow = factory(2)
    assert flow().log_prob(torch.randn(0, 2)).shape == (0,)
    assert flow().log_prob(torch.randn(3, 0, 2)).shape == (3, 0)
    assert flow().sample((0,)).shape == (0, 2)


def test_a_continuous_flow_on_an_empty_batch_gives_an_empty_result():
    torch.manual_seed(0)
    flow = pf.CNF(2)
    assert flow().log_prob(torch.randn(0, 2)).shape == (0,)
    assert flow().sample((0,)).shape == (0, 2)
    layer = flow.transforms[0]
    y, ladj = layer.call_and_ladj(torch.randn(0, 2))  # the layer itself, on the generic path too
    assert y.shape == (0, 2) and ladj.shape == (0,) and layer.nfe == 0
    assert flow(None).log_prob(torch.randn(1, 2)).shape == (1,)  # and a real batch still integrates


# --------------------------------------------------------------------------- item 11: validation gaps


@pytest.mark.parametrize(
    "build",
    [
        lambda hidden: pf.nn.MLP(2, 2, hidden=hidden),
        lambda hidden: pf.nn.MADE(2, hidden=hidden),
        lambda hidden: pf.nn.CNN(2, 2, hidden=hidden),
        lambda hidden: pf.nn.VectorField(2, hidden=hidden),
        lambda hidden: pf.RealNVP(2, hidden=hidden),
        lambda hidden: pf.DensityEstimator("maf", hidden=hidden).fit(torch.zeros(8, 2)),  # fit checks parameters
    ],
)
@pytest.mark.parametrize("hidden", [(0,), (16, -1), (2.5,)])
def test_a_network_refuses_hidden_widths_that_are_not_positive_integers(build, hidden):
    with pytest.raises(ValueError, match=r"hidden must be a sequence of layer widths, each an integer >= 1"):
        build(hidden)
    with pytest.raises(ValueError, match=r"MLP: hidden must be a sequence of layer widths"):
        pf.nn.MLP(2, 2, hidden=64)  # type: ignore[arg-type]


def test_a_column_whose_spread_overflows_is_named():
    X = torch.randn(50, 3, dtype=torch.float64)
    X[4, 1] = 1e300
    with pytest.raises(ValueError, match=re.escape("column(s) [1] overflows torch.float64")):
        pf.DensityEstimator("maf", transforms=1, hidden=(8,)).fit(X, max_epochs=1, progress=False)


@pytest.mark.parametrize(("flow", "kwargs"), [("nsf", {"binz": 4}), ("maf", {"bins": 4}), ("cnf", {"trce": "exact"})])
def test_the_estimator_reports_an_unknown_keyword_argument_at_construction(flow, kwargs):
    (name,) = kwargs
    with pytest.raises(TypeError, match=f"flow '{flow}' takes no keyword argument '{name}'"):
        pf.DensityEstimator(flow, **kwargs)
    state = torch.random.get_rng_state()
    pf.DensityEstimator("nsf", bins=4, bound=3.0)  # known ones are accepted, and the caller's RNG is untouched
    assert torch.equal(state, torch.random.get_rng_state())


# --------------------------------------------------------------------------- item 7: NaN rows from a data source


@pytest.mark.parametrize("validate", [True, False])
def test_a_nan_row_from_a_loader_or_a_callable_is_a_data_error_not_a_divergence(validate):
    from torch.utils.data import DataLoader

    x = torch.randn(64, 2)
    x[37] = float("nan")
    previous = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(validate)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "non-finite loss" recovery warning
            message = re.escape(
                "fit: batch 3 of epoch 1 (counting from 1) from the data source has NaN or inf values in row 5"
            )
            with pytest.raises(ValueError, match=message):
                pf.fit(pf.RealNVP(2, transforms=1, hidden=(8,)), DataLoader(x, batch_size=16), max_epochs=2,
                       progress=False)  # fmt: skip
            message = re.escape(
                "fit: batch 1 of epoch 1 (counting from 1) from the data source has NaN or inf values in row 7"
            )
            with pytest.raises(ValueError, match=message):
                pf.fit(pf.RealNVP(2, transforms=1, hidden=(8,)), lambda: x[30:40], max_epochs=1, steps_per_epoch=2,
                       progress=False)  # fmt: skip
    finally:
        torch.distributions.Distribution.set_default_validate_args(previous)

"""No public call changes process-wide state: the caller's random streams (torch's CPU and CUDA generators,
NumPy's and ``random``'s) and ``torch.distributions``' default argument validation are what they were before
every call; seeded work runs on streams of its own and repeats for a given seed."""

from __future__ import annotations

import contextlib
import io
import math
import random

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import Distribution

import pyro_flows as pf
from pyro_flows import cli, demo
from pyro_flows.diagnostics import sbc
from pyro_flows.infer import NPE, simulate
from pyro_flows.io import write_table

PRIOR = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
TINY = dict(transforms=1, hidden=(8,))


def rows(n: int = 120, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed)) * torch.tensor([3.0, 0.5]) + 1.0


def fresh_flow() -> pf.Flow:
    """A flow built without touching the caller's stream (building a module draws its initial weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return pf.RealNVP(2, **TINY)


def noisy_simulator(theta: torch.Tensor) -> torch.Tensor:
    """Draws from torch's, NumPy's and ``random``'s global generators, as simulators do."""
    numpy_noise = torch.from_numpy(np.random.normal(size=tuple(theta.shape))).to(theta.dtype)
    return theta + 0.3 * torch.randn_like(theta) + 0.01 * numpy_noise + 0.01 * random.random()


def snapshot() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].copy(),
        "random": random.getstate(),
        "validate_args": Distribution._validate_args,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def assert_unchanged(before: dict, after: dict) -> None:
    assert torch.equal(before["torch"], after["torch"]), "torch's CPU random stream changed"
    assert np.array_equal(before["numpy"], after["numpy"]), "NumPy's global random stream changed"
    assert before["random"] == after["random"], "random's stream changed"
    assert before["validate_args"] is after["validate_args"], "torch.distributions' validation flag changed"
    if "cuda" in before:
        assert all(torch.equal(a, b) for a, b in zip(before["cuda"], after["cuda"], strict=True)), "CUDA stream"


@pytest.fixture(scope="module")
def npe() -> NPE:
    theta, x = simulate(noisy_simulator, PRIOR, 300, seed=0, progress=False)
    return NPE(PRIOR, "maf", **TINY).append_simulations(theta, x).train(max_epochs=2, seed=0, progress=False)


@pytest.fixture(scope="module")
def estimator() -> pf.DensityEstimator:
    return pf.DensityEstimator("realnvp", **TINY).fit(rows(), max_epochs=2, progress=False)


def cli_fit_and_sample(tmp_path) -> None:
    write_table(rows().double().numpy(), tmp_path / "x.csv", header=["a", "b"])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(["fit", str(tmp_path / "x.csv"), "--out", str(tmp_path / "m.pt"), "--epochs", "2",
                         "--transforms", "1", "--hidden", "8", "--no-progress"]) == 0  # fmt: skip
        assert cli.main(["sample", str(tmp_path / "m.pt"), "-n", "5", "--seed", "1"]) == 0


CALLS = {
    "fit": lambda est, npe, tmp: pf.fit(fresh_flow(), rows(), max_epochs=2, seed=0, progress=False),
    "fit-validation-checkpoint": lambda est, npe, tmp: pf.fit(
        fresh_flow(),
        rows(),
        max_epochs=2,
        validation_fraction=0.2,
        patience=1,
        seed=3,
        checkpoint=tmp / "run.pt",
        progress=False,
    ),  # fmt: skip
    "fit-resume": lambda est, npe, tmp: [
        pf.fit(
            fresh_flow(),
            rows(),
            max_epochs=epochs,
            seed=1,
            checkpoint=tmp / "r.pt",
            resume=tmp / "r.pt",
            progress=False,
        )
        for epochs in (1, 2)
    ],  # fmt: skip
    "DensityEstimator.fit": lambda est, npe, tmp: pf.DensityEstimator("maf", **TINY).fit(
        rows(), max_epochs=2, progress=False
    ),
    "DensityEstimator.sample": lambda est, npe, tmp: est.sample(10, seed=4),
    "DensityEstimator.save/load": lambda est, npe, tmp: (
        est.save(tmp / "e.pt"),
        pf.DensityEstimator.load(tmp / "e.pt").log_prob(rows(5)),
    ),
    "simulate": lambda est, npe, tmp: simulate(noisy_simulator, PRIOR, 50, batch_size=20, seed=1, progress=False),
    "NPE.save/load": lambda est, npe, tmp: NPE.load(npe.save(tmp / "npe.pt"), PRIOR),
    "NPE.train": lambda est, npe, tmp: npe.train(max_epochs=1, seed=2, progress=False),
    "sbc": lambda est, npe, tmp: sbc(npe, PRIOR, noisy_simulator, num_simulations=20, num_posterior_samples=9, seed=5),
    "cli fit and sample": lambda est, npe, tmp: cli_fit_and_sample(tmp),
}


@pytest.mark.parametrize("validate", [True, False], ids=["validation-on", "validation-off"])
@pytest.mark.parametrize("name", list(CALLS))
def test_a_seeded_public_call_leaves_the_callers_state_alone(name, validate, estimator, npe, tmp_path):
    previous = Distribution._validate_args
    Distribution.set_default_validate_args(validate)
    try:
        torch.manual_seed(123)
        np.random.seed(123)
        random.seed(123)
        before = snapshot()
        CALLS[name](estimator, npe, tmp_path)
        assert_unchanged(before, snapshot())
    finally:
        Distribution.set_default_validate_args(previous)


def test_the_demo_leaves_the_callers_state_alone(tmp_path):
    torch.manual_seed(7)
    before = snapshot()
    threads = torch.get_num_threads()
    demo.demo(tmp_path, demo.QUICK, seed=0)
    assert_unchanged(before, snapshot())
    assert torch.get_num_threads() == threads


def test_a_guide_draws_from_pyros_stream_and_never_reseeds_it():
    """A guide is a random op of the model's program: each call draws on (never resets) the global stream."""

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    previous = Distribution._validate_args
    for validate in (True, False):
        Distribution.set_default_validate_args(validate)
        try:
            pyro.clear_param_store()
            guide = pf.infer.AutoFlowGuide(model, flow="nsf", **TINY)
            guide()  # builds the flow (its initialisation draws from the stream, as any module's)
            pyro.set_rng_seed(0)
            first, second = guide()["z"], guide()["z"]
            assert not torch.equal(first, second)
            pyro.set_rng_seed(0)
            torch.testing.assert_close(guide()["z"], first)  # the caller's seed decides, nothing else
            assert Distribution._validate_args is validate
        finally:
            Distribution.set_default_validate_args(previous)


# --------------------------------------------------------------------------- the bootstrap loop


def test_a_bootstrap_loop_around_fit_draws_new_rows_every_iteration():
    """The issue's loop: ``DensityEstimator().fit`` (default seed 0) reset the caller's stream, so every
    iteration resampled the same rows ([44, 39, 233, 60, 163] each time)."""
    X = rows(250)
    torch.manual_seed(0)
    draws, expected = [], []
    for _ in range(3):
        index = torch.randint(0, len(X), (len(X),))
        draws.append(index[:5].tolist())
        pf.DensityEstimator("realnvp", **TINY).fit(X[index], max_epochs=1, progress=False)
    torch.manual_seed(0)
    expected = [torch.randint(0, len(X), (len(X),))[:5].tolist() for _ in range(3)]
    assert draws == expected  # exactly the caller's own stream, as if fit had not run
    assert len({tuple(d) for d in draws}) == 3


def test_argument_validation_stays_as_the_caller_set_it_during_fit():
    """fit used to switch validation off after the first step; the objective sees the caller's setting."""
    seen = []

    def objective(model, x, context):
        seen.append(Distribution._validate_args)
        return pf.NegativeLogLikelihood()(model, x, context)

    previous = Distribution._validate_args
    for validate in (True, False):
        Distribution.set_default_validate_args(validate)
        try:
            seen.clear()
            pf.fit(pf.RealNVP(2, **TINY), rows(), objective=objective, max_epochs=2, batch_size=40,
                   validation_fraction=0.25, seed=0, progress=False)  # fmt: skip
            assert len(seen) == 2 * 3 + 2 and set(seen) == {validate}  # training and validation calls
        finally:
            Distribution.set_default_validate_args(previous)


def test_a_nan_inside_a_flow_is_recovered_with_validation_on():
    """What the flag used to protect: under the caller's validation, a layer gone NaN is a NaN loss."""
    calls = []

    def objective(model, x, context):
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                next(model.parameters()).fill_(math.nan)
        return pf.NegativeLogLikelihood()(model, x, context)

    previous = Distribution._validate_args
    Distribution.set_default_validate_args(True)
    try:
        with pytest.warns(RuntimeWarning, match="non-finite loss"):
            history = pf.fit(pf.RealNVP(2, **TINY), rows(), objective=objective, max_epochs=1, batch_size=30,
                             seed=0, progress=False)  # fmt: skip
        assert history.recoveries == 1 and Distribution._validate_args is True
    finally:
        Distribution.set_default_validate_args(previous)


# --------------------------------------------------------------------------- seeds: private, reproducible


def weights(module: torch.nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in module.state_dict().values()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def noisy_nll(model, x, context):
    """A loss that draws from torch's global generator (as dequantisation, dropout or Hutchinson probes do)."""
    return pf.NegativeLogLikelihood()(model, x + 0.05 * torch.randn_like(x), context)


def seeded_fit(seed, caller_seed: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    flow = pf.RealNVP(2, **TINY)
    torch.manual_seed(caller_seed)
    pf.fit(flow, rows(), objective=noisy_nll, max_epochs=2, batch_size=32, validation_fraction=0.25, seed=seed,
           progress=False)  # fmt: skip
    return weights(flow)


def test_same_seed_same_weights_whatever_the_callers_stream():
    reference = seeded_fit(3, caller_seed=1)
    assert same(seeded_fit(3, caller_seed=2), reference)  # the run's stream is its own
    assert not same(seeded_fit(4, caller_seed=1), reference)  # and the seed does decide it


def test_an_unseeded_fit_is_one_draw_of_the_callers_stream():
    """Unseeded: the seed is one draw from torch's generator, so torch.manual_seed makes the run repeat and
    two runs in a row differ; the caller's stream advances by that one draw only."""
    first = seeded_fit(None, caller_seed=5)
    assert same(seeded_fit(None, caller_seed=5), first)
    assert not same(seeded_fit(None, caller_seed=6), first)
    flow = pf.RealNVP(2, **TINY)
    torch.manual_seed(5)
    pf.fit(flow, rows(), objective=noisy_nll, max_epochs=1, progress=False)
    after_fit = torch.get_rng_state()
    torch.manual_seed(5)
    torch.randint(2**62, ())
    assert torch.equal(after_fit, torch.get_rng_state())


def test_estimator_seeds_repeat_and_unseeded_calls_differ():
    X = rows(200)
    a = pf.DensityEstimator("realnvp", **TINY).fit(X, max_epochs=2, progress=False)  # default seed 0
    torch.manual_seed(99)  # the caller's state plays no part in a seeded fit or sample
    b = pf.DensityEstimator("realnvp", **TINY).fit(X, max_epochs=2, progress=False)
    assert same(weights(a.flow_), weights(b.flow_))
    assert np.array_equal(a.sample(5, seed=1), b.sample(5, seed=1))
    c = pf.DensityEstimator("realnvp", **TINY).fit(X, max_epochs=2, seed=1, progress=False)
    assert not same(weights(a.flow_), weights(c.flow_))
    # unseeded samples: new ones on every call (the fork used to hand back the same rows each time) ...
    assert not np.array_equal(a.sample(5), a.sample(5))
    # ... that torch.manual_seed repeats
    torch.manual_seed(11)
    first = a.sample(5)
    torch.manual_seed(11)
    assert np.array_equal(a.sample(5), first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_streams_are_left_alone_and_seeded_cuda_runs_repeat():
    device = torch.device("cuda")
    torch.manual_seed(17)
    before = snapshot()
    results = []
    for _ in range(2):
        with torch.random.fork_rng(devices=[]):  # the test's own draws must not move the CPU stream either
            torch.manual_seed(0)
            flow = pf.RealNVP(2, **TINY)
        pf.fit(flow, rows(), objective=noisy_nll, max_epochs=2, batch_size=32, seed=3, device=device, progress=False)
        results.append([t.cpu() for t in weights(flow)])
        est = pf.DensityEstimator("realnvp", **TINY).fit(rows(), max_epochs=1, device=device, progress=False)
        results.append([torch.as_tensor(est.sample(4, seed=2))])
    assert same(results[0], results[2]) and same(results[1], results[3])
    assert_unchanged(before, snapshot())

"""Every flow family on every device present (the CPU always, CUDA where there is one: the ``device`` fixture of
conftest.py), against the same weights on the CPU; and the errors for a flow and its inputs on different devices or
in different dtypes, which name both and the fix (tested on the CPU with the ``meta`` device)."""

from __future__ import annotations

import copy
from typing import Callable, Optional

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import perturb
from torch import Tensor, nn

import pyro_flows as pf
from pyro_flows.infer import NPE, simulate

Maker = Callable[[torch.Generator, int], Tensor]


def normal(*shape: int) -> Maker:
    return lambda g, n: torch.randn(n, *shape, generator=g)


def images(*shape: int) -> Maker:  # in (0, 1): Glow's continuous flow ends in a logit
    return lambda g, n: torch.rand(n, *shape, generator=g) * 0.9 + 0.05


def labels(classes: int) -> Maker:
    return lambda g, n: torch.randint(classes, (n,), generator=g)


SMALL = dict(transforms=2, hidden=(8,))
GLOW = dict(levels=1, steps=1, hidden_channels=4, pixel_levels=None)
# family: (the flow, its data, its context or None)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], Maker, Optional[Maker]]] = {
    "NICE": (lambda: pf.NICE(3, **SMALL), normal(3), None),
    "RealNVP": (lambda: pf.RealNVP(3, **SMALL), normal(3), None),
    "MAF": (lambda: pf.MAF(3, **SMALL), normal(3), None),
    "IAF": (lambda: pf.IAF(3, **SMALL), normal(3), None),
    "NSF": (lambda: pf.NSF(3, bins=4, **SMALL), normal(3), None),
    "NSF coupling": (lambda: pf.NSF(3, bins=4, autoregressive=False, **SMALL), normal(3), None),
    "CNF": (lambda: pf.CNF(2, hidden=(8,)), normal(2), None),
    "Glow": (lambda: pf.Glow((1, 4, 4), **GLOW), images(1, 4, 4), None),
    "WaveGlow": (lambda: pf.WaveGlow((1, 16), steps=1, groups=4, hidden_channels=4, layers=2), normal(1, 16), None),
    "MAF context": (lambda: pf.MAF(3, context=2, **SMALL), normal(3), normal(2)),
    "NSF classes": (lambda: pf.NSF(3, bins=4, classes=3, **SMALL), normal(3), labels(3)),
    "CNF context": (lambda: pf.CNF(2, context=2, hidden=(8,)), normal(2), normal(2)),
    "Glow classes": (lambda: pf.Glow((1, 4, 4), classes=3, **GLOW), images(1, 4, 4), labels(3)),
}
TOLERANCE = dict(rtol=1e-4, atol=1e-3)  # float32 on two devices (and an adaptive ODE solver for the CNFs)


def build(family: str, rows: int = 5, seed: int = 0) -> tuple[nn.Module, Tensor, tuple[Tensor, ...]]:
    """The family's flow (seeded, perturbed off its identity initialisation), data and context (as call args)."""
    factory, data, context = FAMILIES[family]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    flow = perturb(factory(), scale=0.1, seed=seed)
    return flow, data(g, rows), () if context is None else (context(g, rows),)


def on(device: str, *tensors: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.to(device) for t in tensors)


@pytest.fixture
def exact_cuda():
    """float32 matrix products and convolutions in full precision on CUDA (cuDNN uses TF32 by default), to compare
    with the CPU; the flags are restored after the test."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# -- each family on each device, against the CPU -----------------------------------------------------------------
@pytest.mark.usefixtures("exact_cuda")
@pytest.mark.parametrize("family", FAMILIES)
def test_log_prob_and_sampling_on_the_device_match_the_cpu(family: str, device: str) -> None:
    cpu, x, context = build(family)
    moved = copy.deepcopy(cpu).to(device)
    assert all(p.device.type == torch.device(device).type for p in moved.parameters())
    on_device = moved(*on(device, *context))

    log_prob = on_device.log_prob(x.to(device))
    assert log_prob.device.type == torch.device(device).type
    torch.testing.assert_close(log_prob.cpu(), cpu(*context).log_prob(x), **TOLERANCE)

    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))  # the same base points on both devices
    torch.testing.assert_close(on_device.from_base(z.to(device)).cpu(), cpu(*context).from_base(z), **TOLERANCE)

    samples = on_device.sample((2,))
    assert samples.shape == (2, *on_device.batch_shape, *on_device.event_shape) and samples.device == log_prob.device
    assert bool(torch.isfinite(samples).all())

    moved.zero_grad()
    on_device.rsample((2,)).square().mean().backward()
    grads = [p.grad for p in moved.parameters() if p.grad is not None]
    assert grads and all(g.device == log_prob.device and bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_fit_step_on_the_device(family: str, device: str) -> None:
    flow, x, context = build(family, rows=16)
    before = copy.deepcopy(flow.state_dict())
    history = pf.fit(flow, x, *context, max_steps=2, batch_size=8, lr=1e-2, progress=False, device=device)
    assert history.steps == 2 and history.recoveries == 0 and all(np.isfinite(history.train_loss))
    assert all(p.device.type == torch.device(device).type for p in flow.parameters())
    changed = [not torch.equal(before[k].to(device), v) for k, v in flow.state_dict().items() if v.is_floating_point()]
    assert any(changed)


def test_dequantized_glow_on_the_device(device: str) -> None:
    torch.manual_seed(0)
    model = pf.Glow((1, 4, 4), levels=1, steps=1, hidden_channels=4, pixel_levels=17).to(device)
    pixels = torch.randint(0, 17, (4, 1, 4, 4), device=device)
    pf.fit(model, pixels, max_steps=1, batch_size=4, progress=False, device=device)
    log_prob = model().log_prob(pixels)
    assert log_prob.shape == (4,) and log_prob.device == pixels.device and bool(torch.isfinite(log_prob).all())
    samples = model().sample((3,))
    assert samples.device == pixels.device and bool(((samples >= 0) & (samples <= 16)).all())


def test_density_estimator_on_the_device(device: str) -> None:
    X = np.random.default_rng(0).normal(size=(64, 2))
    options = dict(max_steps=3, batch_size=32, validation_fraction=0.0, patience=None, seed=0, progress=False)
    on_cpu = pf.DensityEstimator("maf", transforms=1, hidden=(8,)).fit(X, **options)
    moved = copy.deepcopy(on_cpu)
    moved.flow_.to(device)
    np.testing.assert_allclose(moved.score_samples(X), on_cpu.score_samples(X), rtol=1e-4, atol=1e-4)
    assert moved.sample(5, seed=0).shape == (5, 2)

    trained = pf.DensityEstimator("maf", transforms=1, hidden=(8,)).fit(X, device=device, **options)
    assert next(trained.flow_.parameters()).device.type == torch.device(device).type
    assert trained.history_.steps == 3 and np.isfinite(trained.score_samples(X)).all()
    assert np.isfinite(trained.sample(5, seed=0)).all()


def test_npe_trains_and_samples_on_the_device(device: str) -> None:
    prior = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    theta, x = simulate(lambda t: t + 0.5 * torch.randn_like(t), prior, 256, seed=0, progress=False)
    torch.manual_seed(0)
    npe = NPE(prior, "maf", transforms=1, hidden=(8,)).append_simulations(theta, x)
    npe.train(max_epochs=2, batch_size=64, seed=0, progress=False, device=device)
    x_obs = torch.tensor([0.5, -1.0])
    posterior = npe.posterior(x_obs.to(device))
    samples = posterior.sample((20,))
    assert samples.shape == (20, 2) and samples.device.type == torch.device(device).type
    assert bool(torch.isfinite(samples).all())

    on_cpu = copy.deepcopy(npe)
    on_cpu.estimator.to("cpu")
    points = samples[:5]
    torch.testing.assert_close(
        posterior.log_prob(points).cpu(), on_cpu.posterior(x_obs).log_prob(points.cpu()), rtol=1e-4, atol=1e-4
    )


# -- a flow and its inputs on different devices or in different dtypes ------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_data_on_another_device_is_a_named_error(family: str) -> None:
    flow, x, context = build(family)
    distribution = flow(*context)
    with pytest.raises(ValueError, match=r"is on meta but the flow is on cpu; move the flow with flow\.to\('meta'\)"):
        distribution.log_prob(x.to("meta"))
    if not context:  # (a context on the meta device cannot be checked for NaNs: the next test moves the flow)
        distribution.log_prob(x)  # checked once on the CPU: the check follows the flow to its new device
        flow.to("meta")
        with pytest.raises(
            ValueError, match=r"is on cpu but the flow is on meta; move the flow with flow\.to\('cpu'\)"
        ):
            flow().log_prob(x)


@pytest.mark.parametrize("family", [f for f, (_, _, context) in FAMILIES.items() if context is not None])
def test_a_context_on_another_device_is_a_named_error(family: str) -> None:
    flow, x, context = build(family)
    flow.to("meta")
    with pytest.raises(ValueError, match=r"the context is on cpu but the flow is on meta; .*flow\.to\('cpu'\)"):
        flow(*context).sample()


@pytest.mark.parametrize("flow_dtype, data_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)])
@pytest.mark.parametrize("family", ["MAF", "NSF coupling", "Glow", "MAF context"])
def test_data_in_another_dtype_is_a_named_error(family: str, flow_dtype: torch.dtype, data_dtype: torch.dtype) -> None:
    flow, x, context = build(family)
    flow.to(flow_dtype)
    context = tuple(c.to(flow_dtype) for c in context)
    message = rf"has dtype {data_dtype} but the flow has {flow_dtype}; convert the flow with flow\.to\({data_dtype}\)"
    with pytest.raises(ValueError, match=message):
        flow(*context).log_prob(x.to(data_dtype))
    with pyro.validation_enabled(False):  # unvalidated distributions: the first layer names it
        with pytest.raises(ValueError, match=message):
            flow(*context).log_prob(x.to(data_dtype))
    if context:
        with pytest.raises(ValueError, match=rf"the context has dtype {data_dtype} but the flow has {flow_dtype}"):
            flow(context[0].to(data_dtype)).sample()


def test_a_layer_called_directly_names_the_devices_and_dtypes() -> None:
    layer = pf.transforms.AffineCoupling(4)
    x = torch.randn(3, 4)
    layer.call_and_ladj(x)
    with pytest.raises(ValueError, match=r"AffineCoupling: the input has dtype torch\.float64 .* flow\.to\("):
        layer.call_and_ladj(x.double())
    layer.to("meta")
    with pytest.raises(ValueError, match=r"AffineCoupling: the input of the inverse is on cpu but the flow is on meta"):
        layer.inverse_and_ladj(x)


def test_integer_labels_keep_their_dtype() -> None:
    flow, x, (classes,) = build("NSF classes")
    flow.double()
    assert flow(classes).log_prob(x.double()).dtype == torch.float64  # int64 labels with a float64 flow: no error

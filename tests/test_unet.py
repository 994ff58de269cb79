"""The U-Net vector field (nn.UNet) and the image CNF built on it (pf.ImageCNF): shapes at 8×8 and 28×28 with and
without class, vector and aligned-image contexts, layouts, broadcasting, float64, the zero start, independent samples,
flow matching on images and Hutchinson bits/dim against the exact trace."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import per_sample_jacobian, perturb

import pyro_flows as pf
from pyro_flows import transforms as T
from pyro_flows.flows.image_cnf import ImageCNF, image_rows
from pyro_flows.nn.unet import UNet, sinusoidal_embedding
from pyro_flows.transforms.continuous import exact_divergence


def draw(shape, dtype=torch.float64, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def unet(shape, seed=0, **kwargs):
    torch.manual_seed(seed)
    return perturb(UNet(shape, **kwargs), scale=0.1, seed=seed + 1).double()


# (shape, channels, context_features, context_shape): the network's context is as wide as context_features, or as the
# flattened context_shape when context_features is 0
CONFIGS = [
    pytest.param((1, 8, 8), (8, 16), 0, None, id="8x8"),
    pytest.param((1, 8, 8), (8, 16), 5, None, id="8x8-vector"),
    pytest.param((1, 8, 8), (8, 16), 0, (1, 8, 8), id="8x8-image"),
    pytest.param((1, 8, 8), (8, 16), 16 + 3, (1, 4, 4), id="8x8-small-image-and-vector"),
    pytest.param((1, 28, 28), (4, 8, 8), 0, None, id="28x28"),
    pytest.param((1, 28, 28), (4, 8, 8), 4, None, id="28x28-vector"),
    pytest.param((1, 28, 28), (4, 8, 8), 0, (2, 14, 14), id="28x28-image"),
    pytest.param((2, 7, 5), (4, 8, 8, 8), 0, None, id="odd-7x5-four-levels"),
]


def context_size(context_features, context_shape):
    return context_features or (0 if context_shape is None else math.prod(context_shape))


@pytest.mark.parametrize("shape, channels, features, context_shape", CONFIGS)
def test_shapes_and_layouts(shape, channels, features, context_shape):
    net = unet(shape, channels=channels, context_features=features, context_shape=context_shape)
    size = context_size(features, context_shape)
    assert net.context_features == size
    x, t = draw((3, *shape), seed=1), torch.rand(3, dtype=torch.float64)
    context = draw((3, size), seed=2) if size else None
    out = net(x, t, context)
    assert out.shape == x.shape and out.dtype == torch.float64 and bool(torch.isfinite(out).all())
    assert out.abs().max() > 0  # perturbed: not the zero field
    rows = net(x.reshape(3, -1), t, context)  # the same images as rows (what ContinuousFlow hands it)
    assert rows.shape == (3, math.prod(shape))
    torch.testing.assert_close(rows, out.reshape(3, -1), rtol=0, atol=0)


@pytest.mark.parametrize("shape, channels, features, context_shape", CONFIGS[:4])
def test_batch_broadcasting(shape, channels, features, context_shape):
    """Batch dims of the images, the times and the context broadcast; each entry is the field at its own inputs."""
    net = unet(shape, channels=channels, context_features=features, context_shape=context_shape)
    size = context_size(features, context_shape)
    x, t = draw((2, 1, *shape), seed=3), torch.rand(1, 3, dtype=torch.float64)
    context = draw((3, size), seed=4) if size else None
    out = net(x, t, context)
    assert out.shape == (2, 3, *shape)
    for i in range(2):
        for j in range(3):
            expected = net(x[i, 0], t[0, j], None if context is None else context[j])
            torch.testing.assert_close(out[i, j], expected, rtol=1e-10, atol=1e-12)
    # one time for all rows: a number or a scalar tensor
    torch.testing.assert_close(
        net(x[:, 0], 0.25, context[0] if size else None), net(x[:, 0], torch.tensor(0.25), context[0] if size else None)
    )


def test_float64_agrees_with_float32():
    net32 = perturb(UNet((1, 8, 8), channels=(8, 16), context_features=3), scale=0.1, seed=5)
    net64 = UNet((1, 8, 8), channels=(8, 16), context_features=3)
    net64.load_state_dict(net32.state_dict())
    net64.double()
    x, c, t = draw((4, 1, 8, 8), torch.float32, 6), draw((4, 3), torch.float32, 7), torch.rand(4)
    out64 = net64(x.double(), t.double(), c.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(net32(x, t, c).double(), out64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28)])
def test_fresh_field_is_zero_and_its_flow_the_identity(shape):
    """The last convolution starts at zero (weights and bias): f = 0, and the CNF it drives is the identity."""
    net = UNet(shape, channels=(4, 8))
    assert net.out.weight.abs().max() == 0 and net.out.bias.abs().max() == 0
    x = draw((2, *shape), torch.float32, 8)
    assert net(x, torch.rand(2)).abs().max() == 0
    flow = ImageCNF(shape, channels=(4, 8), alpha=None)  # no logit: the flow is the base
    rows = x.reshape(2, -1)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(rows).sum(-1)
    torch.testing.assert_close(flow().log_prob(rows), expected)


def test_samples_are_independent_and_exact_trace_is_the_jacobians():
    """GroupNorm normalises each image alone: no output depends on another sample (a batch norm would); the exact
    divergence of ContinuousFlow is the trace of the per-sample autograd Jacobian."""
    shape = (1, 4, 4)
    net = unet(shape, channels=(4, 8), context_features=2)
    z, c, t = draw((3, 16), seed=9), draw((3, 2), seed=10), torch.tensor(0.3, dtype=torch.float64)
    jacobians = per_sample_jacobian(lambda v: net(v, t, c), z)  # asserts the cross-sample blocks are zero
    z = z.clone().requires_grad_(True)
    trace, frobenius = exact_divergence(net(z, t, c), z, None, False)
    torch.testing.assert_close(trace, jacobians.diagonal(dim1=1, dim2=2).sum(-1))
    torch.testing.assert_close(frobenius, jacobians.square().sum((1, 2)))


def test_sinusoidal_embedding_closed_form():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    e = sinusoidal_embedding(t, 6, max_period=100.0, scale=10.0)
    frequencies = torch.tensor([1.0, 100.0 ** (-1 / 3), 100.0 ** (-2 / 3)], dtype=torch.float64)
    angles = 10.0 * t[:, None] * frequencies
    torch.testing.assert_close(e, torch.cat((angles.cos(), angles.sin()), -1))


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match=r"shape must be an image shape \(C, H, W\)"):
        UNet((8, 8))
    with pytest.raises(ValueError, match="hidden must be a sequence"):
        UNet((1, 8, 8), channels=(8, 0))
    with pytest.raises(ValueError, match="even time_features"):
        UNet((1, 8, 8), time_features=7)
    with pytest.raises(ValueError, match="context_features must be an integer >= 0"):
        UNet((1, 8, 8), context_features=-1)
    net = UNet((1, 8, 8), channels=(4,), context_features=3)
    with pytest.raises(ValueError, match=r"z must be images \(\.\.\., 1, 8, 8\) or rows \(\.\.\., 64\)"):
        net(torch.randn(2, 1, 8, 7), 0.5, torch.randn(2, 3))
    with pytest.raises(ValueError, match="needs a context of shape"):
        net(torch.randn(2, 64), 0.5)
    with pytest.raises(ValueError, match=r"context must have shape \(\.\.\., 3\)"):
        net(torch.randn(2, 64), 0.5, torch.randn(2, 4))
    with pytest.raises(ValueError, match="built without a context"):
        UNet((1, 8, 8), channels=(4,))(torch.randn(2, 64), 0.5, torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"ImageCNF: shape must be an image shape"):
        ImageCNF((64,))
    with pytest.raises(ValueError, match="pixels must be integers in"):
        image_rows(torch.full((2, 1, 2, 2), 20), levels=17)


def _blobs(n, size=8, seed=0):
    """Images of one Gaussian blob each, at a random place: structured 8×8 data without a download."""
    g = torch.Generator().manual_seed(seed)
    centres = 2 + (size - 4) * torch.rand(n, 2, 1, 1, generator=g)
    grid = torch.arange(size, dtype=torch.float32)
    d2 = (grid[None, :, None] - centres[:, 0]) ** 2 + (grid[None, None, :] - centres[:, 1]) ** 2
    return torch.exp(-d2 / 4.0).unsqueeze(1)  # (n, 1, size, size) in [0, 1]


def _fm_loss(flow, rows, context, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        with torch.no_grad():
            return float(pf.FlowMatching()(flow, rows, context))


@pytest.mark.parametrize("conditioning", ["none", "classes"])
def test_flow_matching_reduces_the_loss_at_8x8(conditioning):
    images = _blobs(256)
    rows = image_rows(images)
    labels = (images.flatten(1).argmax(-1) % 4) if conditioning == "classes" else None
    torch.manual_seed(0)
    flow = ImageCNF((1, 8, 8), channels=(8, 16), classes=4 if labels is not None else None)
    before = _fm_loss(flow, rows, labels)
    pf.fit(flow, rows, labels, objective=pf.FlowMatching(), max_steps=30, batch_size=64, lr=3e-3, progress=False)
    after = _fm_loss(flow, rows, labels)
    assert after < 0.8 * before, (before, after)


def test_flow_matching_step_at_28x28_with_an_aligned_image_context():
    """A 28×28 flow conditioned on a 14×14 image (super-resolution): one flow-matching step, samples, log_prob."""
    images = _blobs(8, size=28)
    condition = torch.nn.functional.avg_pool2d(images, 2)  # (8, 1, 14, 14)
    flow = ImageCNF((1, 28, 28), channels=(4, 8, 8), context_shape=(1, 14, 14), context_channels=2)
    history = pf.fit(flow, image_rows(images), condition, objective=pf.FlowMatching(), max_steps=1, progress=False)
    assert history.steps == 1 and math.isfinite(history[-1])
    with pf.fixed_steps(flow, 2):
        assert flow(condition[:3]).sample().shape == (3, 784)
        assert flow(condition[:3]).log_prob(image_rows(images[:3])).shape == (3,)


def test_hutchinson_bits_per_dim_match_the_exact_trace():
    """On 3×3 images, the mean of Hutchinson's bits/dim over many probes is the exact trace's, within its
    standard error (each row's probe is drawn independently, so repeated rows average the probes). Both integrate
    on the same fixed RK4 grid, on which the trajectories do not depend on the probe and the estimate is unbiased."""
    torch.manual_seed(0)
    shape, n, probes = (1, 3, 3), 4, 256
    exact = ImageCNF(shape, channels=(4, 8), trace="exact", solver="rk4", steps=6).double()
    perturb(exact, scale=0.3, seed=11)
    hutchinson = ImageCNF(shape, channels=(4, 8), trace="hutchinson", solver="rk4", steps=6).double()
    hutchinson.load_state_dict(exact.state_dict())
    rows = image_rows(torch.randint(0, 17, (n, *shape)), levels=17, dtype=torch.float64)
    with torch.no_grad():
        exact_lp = exact().log_prob(rows)
        estimates = hutchinson().log_prob(rows.repeat(probes, 1)).reshape(probes, n)
    assert bool(torch.isfinite(estimates).all())
    assert estimates.std(0).min() > 0  # the field is not trivial: the probes disagree
    error = (estimates.mean(0) - exact_lp).abs()
    assert bool((error < 4 * estimates.std(0) / math.sqrt(probes) + 1e-6).all()), (error, estimates.std(0))
    bits = pf.bits_per_dim(estimates.mean(0), 9, levels=17)
    assert math.isfinite(bits)
    assert bits == pytest.approx(pf.bits_per_dim(exact_lp, 9, levels=17), abs=0.05)


def test_logit_tail_flow_matching_and_likelihood():
    """alpha= ends the flow with a fixed Logit: flow matching regresses in logit space (through its inverse), and a
    fresh flow's log-density of y in [0, 1) is the standard normal's of logit(alpha + (1 - 2 alpha) y) plus the
    logit's log-det."""
    rows = image_rows(torch.randint(0, 17, (16, 1, 4, 4)), levels=17, generator=torch.Generator().manual_seed(0))
    flow = ImageCNF((1, 4, 4), channels=(4, 8), alpha=0.05)
    reference = pf.Flow(pf.StandardNormal(16), [pf.transforms.Logit(16, 0.05)])
    torch.testing.assert_close(flow().log_prob(rows), reference().log_prob(rows))
    before = _fm_loss(flow, rows, None)
    pf.fit(flow, rows, objective=pf.FlowMatching(), max_steps=20, lr=3e-3, progress=False)
    assert _fm_loss(flow, rows, None) < before
    with pf.fixed_steps(flow, 2):
        samples = flow().sample((5,))
    assert samples.shape == (5, 16) and bool(((samples > -0.06) & (samples < 1.06)).all())


def test_exact_trace_under_gradients():
    """Maximum likelihood with the exact trace differentiates the batched vector-Jacobian products again: torch's
    native group norm has no batching rule for that (a RuntimeError); LayerNormGroups, the same function, has."""
    torch.manual_seed(0)
    batched = unet((1, 4, 4), channels=(4, 8))
    native = UNet((1, 4, 4), channels=(4, 8), batched_jacobian=False).double()
    native.load_state_dict(batched.state_dict())
    z, t = draw((3, 16), seed=12), torch.rand(3, dtype=torch.float64)
    torch.testing.assert_close(native(z, t), batched(z, t))
    for net, works in ((batched, True), (native, False)):
        x = z.clone().requires_grad_(True)
        if works:
            trace, _ = exact_divergence(net(x, t), x, None, True)
            trace.sum().backward()  # through the batched products: the gradient of the log-det
            grads = [p.grad for p in (net.out.weight, net.stem.weight, net.time_mlp[0].weight)]
            assert all(g is not None and bool(torch.isfinite(g).all()) and g.abs().max() > 0 for g in grads)
        else:
            with pytest.raises(RuntimeError):
                exact_divergence(net(x, t), x, None, True)
    flow = ImageCNF((1, 4, 4), channels=(4, 8), trace="exact", solver="rk4", steps=2)
    rows = image_rows(torch.randint(0, 17, (8, 1, 4, 4)), levels=17)
    history = pf.fit(flow, rows, max_steps=1, progress=False)  # maximum likelihood, exact trace
    assert history.steps == 1 and math.isfinite(history[-1])


def test_continuous_flow_takes_image_events_like_their_flattened_rows():
    """ContinuousFlow((C, H, W)) runs the ODE on flattened events: same values, log-dets and exact inverse as the
    row layer; flow matching trains it on image batches and names a batch of rows as the wrong shape."""
    torch.manual_seed(0)
    net = UNet((1, 4, 4), channels=(4, 8)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    image_layer = T.ContinuousFlow((1, 4, 4), vector_field=net, trace="exact").double()
    row_layer = T.ContinuousFlow(16, vector_field=net, trace="exact").double()
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    y, ladj = image_layer.call_and_ladj(x)
    y_rows, ladj_rows = row_layer.call_and_ladj(x.reshape(5, 16))
    assert y.shape == (5, 1, 4, 4) and ladj.shape == (5,)
    torch.testing.assert_close(y.reshape(5, 16), y_rows)
    torch.testing.assert_close(ladj, ladj_rows)
    torch.testing.assert_close(image_layer.inverse_and_ladj(y)[0], x, atol=1e-4, rtol=0)

    layers = [T.ContinuousFlow((1, 4, 4), vector_field=UNet((1, 4, 4), channels=(4, 8))), T.Logit((1, 4, 4), 0.05)]
    flow = pf.Flow(pf.StandardNormal((1, 4, 4)), layers)
    data = torch.rand(64, 1, 4, 4)
    history = pf.fit(flow, data, objective=pf.FlowMatching(), max_steps=3, progress=False)
    assert history.steps == 3 and all(math.isfinite(v) for v in history.train_loss)
    with pf.fixed_steps(flow, 4, "rk4"):
        assert flow().log_prob(data[:3]).shape == (3,)
        assert flow().sample((2,)).shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"rows \(N, 1, 4, 4\)"):
        pf.FlowMatching()(flow, data.reshape(64, 16))

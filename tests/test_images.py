"""Image flows end to end: pf.Glow and pf.RealNVP(shape=...), dequantisation, bits/dim, class-conditional digits.

Layer-level checks (contract, log-dets of single image layers) live in test_image_layers.py and test_contract.py;
here the references are independent of the library: autograd Jacobians of the whole inverse map, Gauss-Legendre
integration of the continuous density over a pixel cell, an analytic discrete likelihood, a per-pixel categorical
baseline and a scikit-learn classifier.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from conftest import perturb
from torch.distributions import AffineTransform

import pyro_flows as pf
import pyro_flows.transforms as T
from pyro_flows.data import DIGITS_LEVELS, digit_images
from pyro_flows.nn.cnn import pack_context

SHAPE = (1, 4, 4)
CLASSES = 3
CONTEXT = 3

# name -> keyword arguments of a tiny image model; every conditioning and both families
MODELS = {
    "glow": dict(family=pf.Glow, levels=2, steps=2, hidden_channels=4, pixel_levels=None),
    "glow-classes": dict(family=pf.Glow, levels=2, steps=1, hidden_channels=4, classes=CLASSES, pixel_levels=5),
    "glow-context": dict(family=pf.Glow, levels=2, steps=1, hidden_channels=4, context=CONTEXT, pixel_levels=None),
    "glow-no-split-prior": dict(family=pf.Glow, levels=2, steps=1, hidden_channels=4, split_prior=False),
    "realnvp": dict(family=pf.RealNVP, levels=2, steps=1, hidden=(4,), pixel_levels=None),
    "realnvp-classes": dict(family=pf.RealNVP, levels=2, steps=1, hidden=(4,), classes=CLASSES, pixel_levels=None),
    "realnvp-context": dict(family=pf.RealNVP, levels=2, steps=1, hidden=(4,), context=CONTEXT, pixel_levels=7),
    # aligned condition images: a coarser one through a conditioning network, a finer one with labels (packed)
    "glow-aligned": dict(
        family=pf.Glow,
        levels=2,
        steps=1,
        hidden_channels=4,
        context_shape=(1, 2, 2),
        context_channels=2,
        pixel_levels=None,
    ),
    "realnvp-aligned-classes": dict(
        family=pf.RealNVP,
        levels=2,
        steps=1,
        hidden=(4,),
        context_shape=(2, 8, 8),
        context_channels=0,
        classes=CLASSES,
        pixel_levels=5,
    ),
}


def make(name: str, seed: int = 0) -> torch.nn.Module:
    """The named tiny model in float64, with perturbed parameters (so no layer is the identity), in eval mode."""
    kwargs = dict(MODELS[name])
    family = kwargs.pop("family")
    torch.manual_seed(seed)
    model = perturb(family(shape=SHAPE, **kwargs).double(), scale=0.2, seed=seed)
    return model.eval()


def continuous_flow(model: torch.nn.Module) -> pf.Flow:
    return model.flow if isinstance(model, pf.Dequantized) else model


def contexts(name: str, batch: tuple) -> torch.Tensor | None:
    """A context batch for the named model: class labels, context vectors, condition images (packed with their
    labels) or None."""
    generator = torch.Generator().manual_seed(1)
    if "aligned" in name:
        image = torch.randn(batch + MODELS[name]["context_shape"], generator=generator, dtype=torch.float64)
        if "classes" not in name:
            return image
        return pack_context(image, labels=torch.randint(CLASSES, batch, generator=generator))
    if "classes" in name:
        return torch.randint(CLASSES, batch, generator=generator)
    if "context" in name:
        return torch.randn(batch + (CONTEXT,), generator=generator, dtype=torch.float64)
    return None


def distribution(flow: torch.nn.Module, context: torch.Tensor | None):
    return flow() if context is None else flow(context)


def data_points(flow: pf.Flow, n: int) -> torch.Tensor:
    """Points inside the flow's support: the unit cube when it ends in a Logit, any reals otherwise."""
    generator = torch.Generator().manual_seed(2)
    if isinstance(flow.transforms[-1], T.Logit):
        return torch.rand((n,) + SHAPE, generator=generator, dtype=torch.float64) * 0.98 + 0.01
    return torch.randn((n,) + SHAPE, generator=generator, dtype=torch.float64)


# -- exactness of the continuous flows --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_log_prob_is_base_density_plus_autograd_log_det_of_the_whole_inverse(name):
    flow = continuous_flow(make(name))
    y = data_points(flow, 3)
    context = contexts(name, (3,))
    log_prob = distribution(flow, context).log_prob(y)
    assert log_prob.shape == (3,)
    normal = torch.distributions.Normal(torch.zeros(()), torch.ones(()))
    for n in range(3):
        single = distribution(flow, None if context is None else context[n])

        def inverse(values, single=single):
            return single.to_base(values.reshape(SHAPE)).reshape(-1)

        z = inverse(y[n].reshape(-1))
        jacobian = torch.autograd.functional.jacobian(inverse, y[n].reshape(-1))
        expected = normal.log_prob(z).sum() + torch.linalg.slogdet(jacobian)[1]
        torch.testing.assert_close(log_prob[n], expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", MODELS)
def test_to_base_and_from_base_are_inverse(name):
    flow = continuous_flow(make(name))
    context = contexts(name, (4,))
    d = distribution(flow, context)
    y = data_points(flow, 4)
    torch.testing.assert_close(d.from_base(d.to_base(y)), y, rtol=0, atol=1e-10)
    z = torch.randn((4,) + SHAPE, dtype=torch.float64) * 0.5
    torch.testing.assert_close(d.to_base(d.from_base(z)), z, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", MODELS)
def test_sample_shapes_with_batched_contexts_and_sample_shape(name):
    model = make(name)
    context = contexts(name, (2, 3))
    batch = () if context is None else (2, 3)
    d = distribution(model, context)
    assert d.sample().shape == batch + SHAPE
    x = d.sample((5,), temperature=0.7)
    assert x.shape == (5,) + batch + SHAPE and x.dtype == torch.float64
    if isinstance(model, pf.Dequantized):  # integer pixels in range
        assert torch.equal(x, x.round()) and x.min() >= 0 and x.max() <= model.levels - 1
    assert d.log_prob(x).shape == (5,) + batch


@pytest.mark.parametrize("name", ["glow-classes", "realnvp-context"])
def test_temperature_scales_the_base_sample(name):
    flow = continuous_flow(make(name))
    d = distribution(flow, contexts(name, (2000,)))
    torch.manual_seed(3)
    z_one = d.to_base(d.sample(temperature=1.0))
    torch.manual_seed(3)
    z_cold = d.to_base(d.sample(temperature=0.4))
    # the same base draw, shrunk towards the (zero) base mean by T: z_T = T z_1
    torch.testing.assert_close(z_cold, 0.4 * z_one, rtol=0, atol=1e-7)
    assert abs(z_one.std().item() - 1.0) < 0.02 and abs(z_cold.std().item() - 0.4) < 0.01


@pytest.mark.parametrize("temperature", [0.0, -0.5, float("nan")])
def test_non_positive_temperature_is_an_error(temperature):
    model = make("glow-classes")
    with pytest.raises(ValueError, match="temperature must be positive"):
        model(torch.tensor([0, 1])).sample(temperature=temperature)
    with pytest.raises(ValueError, match="temperature must be positive"):
        model.flow(torch.tensor([0, 1])).sample(temperature=temperature)


def test_temperature_needs_a_gaussian_base():
    uniform = dist.Uniform(torch.zeros(2), torch.ones(2)).to_event(1)
    flow = pf.Flow(uniform, [T.AffineCoupling(2)])
    assert flow().sample((3,), temperature=1.0).shape == (3, 2)
    with pytest.raises(ValueError, match="temperature needs a Gaussian base"):
        flow().sample((3,), temperature=0.5)


# -- dequantisation: the bound against exact discrete probabilities ---------------------------------------------------
def test_uniform_bound_of_a_logit_normal_matches_quadrature_and_lies_below_the_exact_probability():
    """A 1-D flow y = sigmoid(a + b z): P(x) = Phi((logit((x+1)/L) - a)/b) - Phi((logit(x/L) - a)/b) exactly."""
    levels, a, b = 4, 0.3, 0.8
    flow = pf.Flow(
        pf.StandardNormal(1).double(), [AffineTransform(torch.tensor(a), torch.tensor(b), event_dim=1), T.Logit(1, 0.0)]
    )
    model = pf.Dequantized(flow, levels)
    x = torch.arange(levels, dtype=torch.float64)
    edges = torch.logit(torch.arange(levels + 1, dtype=torch.float64) / levels)
    cdf = torch.distributions.Normal(0.0, 1.0).cdf((edges - a) / b)
    exact = torch.log(cdf[1:] - cdf[:-1])
    assert math.isclose(exact.exp().sum().item(), 1.0, rel_tol=1e-12)
    # E_u[log p((x + u) / L)] - log L by 64-point Gauss-Legendre on each cell
    nodes, weights = (torch.as_tensor(v) for v in np.polynomial.legendre.leggauss(64))
    y = (x[:, None] + (nodes + 1) / 2) / levels
    log_density = (
        torch.distributions.Normal(a, b).log_prob(torch.logit(y)) - torch.log(y) - torch.log1p(-y)
    )  # change of variables through the logit
    expected_bound = (log_density * weights / 2).sum(-1) - math.log(levels)
    assert bool((expected_bound < exact - 1e-3).all())  # Jensen's gap is strictly positive here
    torch.manual_seed(4)
    samples = model().log_prob(x.reshape(1, levels, 1).expand(20000, levels, 1))
    mean, error = samples.mean(0), samples.std(0) / math.sqrt(20000)
    assert bool(((mean - expected_bound).abs() < 4 * error).all())


def cell_quadrature(model: pf.Dequantized, nodes_per_dim: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Every image ``x`` of a tiny model, :math:`\log P(x)` and :math:`E_u \log p((x+u)/L) - D \log L`.

    Both integrals over each pixel cell by Gauss-Legendre quadrature (``nodes_per_dim`` nodes per pixel).
    """
    shape, levels = model().event_shape, model.levels
    dims = shape.numel()
    nodes, weights = (torch.as_tensor(v) for v in np.polynomial.legendre.leggauss(nodes_per_dim))
    grid = torch.cartesian_prod(*[(nodes + 1) / 2] * dims)
    weight = torch.cartesian_prod(*[weights / 2] * dims).prod(-1)
    images = torch.cartesian_prod(*[torch.arange(levels, dtype=torch.float64)] * dims)
    with torch.no_grad():
        y = ((images[:, None, :] + grid) / levels).reshape((-1,) + shape)
        log_density = model.flow().log_prob(y).reshape(len(images), -1)
    log_probability = torch.logsumexp(log_density + weight.log(), -1) - dims * math.log(levels)
    expected_bound = (log_density * weight).sum(-1) - dims * math.log(levels)
    return images.reshape((-1,) + shape), log_probability, expected_bound


def tiny_glow(dequantization: str) -> pf.Dequantized:
    """A 1x2x2 Glow with 2 grey levels (16 possible images), perturbed, in float64 and eval mode."""
    torch.manual_seed(5)
    model = pf.Glow(
        shape=(1, 2, 2), levels=1, steps=2, hidden_channels=8, pixel_levels=2, dequantization=dequantization
    )
    perturb(model.flow.double(), scale=0.1, seed=5)
    return model.double().eval()


def test_glow_discrete_probabilities_by_quadrature_match_sampling_and_bound_the_uniform_log_prob():
    model = tiny_glow("uniform")
    images, log_probability, expected_bound = cell_quadrature(model)
    # the 16 cell probabilities add up to the continuous mass inside [0, 1)^4 (the Logit's range is a bit wider)
    torch.manual_seed(6)
    y = model().continuous.sample((40000,))
    inside = ((y >= 0) & (y < 1)).flatten(1).all(-1).double()
    assert abs(log_probability.exp().sum().item() - inside.mean().item()) < 4 * inside.std().item() / 200
    assert 0.8 < inside.mean().item() < 0.999  # the check above is not vacuous
    # Jensen: the expected uniform bound lies below log P(x) for every image, by a clear gap
    assert bool((expected_bound < log_probability - 0.1).all())
    # and the one-sample log_prob averages to that expectation
    torch.manual_seed(7)
    samples = model().log_prob(images.expand(3000, *images.shape))
    mean, error = samples.mean(0), samples.std(0) / math.sqrt(3000)
    assert bool(((mean - expected_bound).abs() < 4 * error).all())


def test_variational_dequantisation_tightens_the_bound_and_stays_below_log_p():
    uniform, variational = tiny_glow("uniform"), tiny_glow("variational")
    variational.flow.load_state_dict(uniform.flow.state_dict())  # the same continuous flow
    variational.flow.requires_grad_(False)
    images, log_probability, expected_uniform_bound = cell_quadrature(uniform)
    variational.dequantizer.train()
    optimizer = torch.optim.Adam(variational.dequantizer.parameters(), lr=3e-3)
    batch = images.repeat(16, 1, 1, 1)
    torch.manual_seed(8)
    for _ in range(150):
        optimizer.zero_grad()
        loss = -variational().log_prob(batch).mean()
        loss.backward()
        optimizer.step()
    variational.eval()
    with torch.no_grad():
        u, _ = variational.dequantizer(batch)
        assert bool(((u > 0) & (u < 1)).all())
        samples = variational().log_prob(images.expand(2000, *images.shape))
    mean, error = samples.mean(0), samples.std(0) / math.sqrt(2000)
    assert bool((mean <= log_probability + 4 * error).all())  # still a lower bound on log P(x)
    gap_uniform = (log_probability - expected_uniform_bound).mean().item()
    gap_variational = (log_probability - mean).mean().item()
    assert gap_variational < 0.25 * gap_uniform, (gap_uniform, gap_variational)


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.full((2, 1, 2, 2), 0.5), "must be integers in \\[0, 1\\]"),
        (torch.full((2, 1, 2, 2), 2.0), "must be integers in \\[0, 1\\]"),
        (torch.full((2, 1, 2, 2), -1.0), "must be integers in \\[0, 1\\]"),
        (torch.full((2, 1, 2, 2), float("nan")), "must be integers in \\[0, 1\\]"),
        (torch.zeros(2, 1, 3, 3), "must have shape \\(..., 1, 2, 2\\)"),
        (torch.zeros(2, 4), "must have shape \\(..., 1, 2, 2\\)"),
    ],
)
def test_bad_pixels_are_named(images, message):
    with pytest.raises(ValueError, match=message):
        tiny_glow("uniform")().log_prob(images.double())


@pytest.mark.parametrize(
    "family, kwargs, message",
    [
        (pf.Glow, dict(shape=(1, 6, 6), levels=2), "divisible by 4"),
        (pf.Glow, dict(shape=(8, 8)), "needs shape \\(C, H, W\\)"),
        (pf.Glow, dict(shape=(1, 8, 8), levels=0), "levels >= 1"),
        (pf.Glow, dict(shape=(1, 8, 8), steps=0), "steps must be an integer >= 1"),
        (pf.Glow, dict(shape=(1, 8, 8), hidden_channels=0), "hidden channels must be integers >= 1"),
        (pf.Glow, dict(shape=(1, 8, 8), classes=3, context=2), "class labels \\(classes=\\) or a context"),
        (pf.Glow, dict(shape=(1, 8, 8), pixel_levels=1), "levels must be an integer >= 2"),
        (pf.Glow, dict(shape=(1, 8, 8), dequantization="none"), "'uniform' or 'variational'"),
        (pf.RealNVP, dict(shape=(1, 6, 6), levels=3), "divisible by 4"),
        (pf.RealNVP, dict(shape=(1, 8, 8), steps=0), "steps must be an integer >= 1"),
        (pf.RealNVP, dict(shape=(1, 8, 8), hidden=()), "hidden channels must be integers >= 1"),
        (pf.RealNVP, dict(features=4, shape=(1, 8, 8)), "not both"),
    ],
)
def test_bad_model_arguments_are_named(family, kwargs, message):
    with pytest.raises(ValueError, match=message):
        family(**kwargs)


@pytest.mark.parametrize(
    "labels, message",
    [
        (torch.tensor([0, 3]), "labels must lie in \\[0, 3\\)"),
        (torch.tensor([-1, 0]), "labels must lie in \\[0, 3\\)"),
        (torch.tensor([0.5, 1.0]), "whole numbers"),
        (torch.tensor([float("nan"), 1.0]), "NaN or inf"),
    ],
)
def test_bad_class_labels_are_named(labels, message):
    model = make("glow-classes")
    images = torch.zeros(2, *SHAPE, dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        model(labels).log_prob(images)
    with pytest.raises(ValueError, match="is conditional"):
        model().log_prob(images)


def test_bits_per_dim_of_a_dequantized_model_refuses_levels():
    model = make("glow-classes")
    labels = torch.tensor([0, 1, 2])
    images = torch.randint(0, model.levels, (3, *SHAPE)).double()
    assert math.isfinite(pf.bits_per_dim(model, images, context=labels))
    with pytest.raises(ValueError, match="leave levels out"):
        pf.bits_per_dim(model, images, model.levels, context=labels)


def test_integer_dtype_pixels_give_the_same_log_prob():
    model = tiny_glow("uniform")
    images = torch.randint(0, 2, (5, 1, 2, 2))
    torch.manual_seed(9)
    from_long = model().log_prob(images)
    torch.manual_seed(9)
    torch.testing.assert_close(from_long, model().log_prob(images.double()), rtol=0, atol=0)


# -- learning on scikit-learn's digits --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_fit():
    """A class-conditional Glow fitted for 300 steps on 1500 digits; the other 297 are held out."""
    images, labels = digit_images()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, test = order[:1500], order[1500:]
    torch.manual_seed(0)
    model = pf.Glow(shape=(1, 8, 8), levels=2, steps=2, hidden_channels=32, classes=10, pixel_levels=DIGITS_LEVELS)
    pf.fit(model, images[train], context=labels[train], max_steps=300, batch_size=128, lr=2e-3, seed=0, progress=False)
    model.eval()
    return model, (images[train], labels[train]), (images[test], labels[test])


def categorical_bits_per_dim(train: torch.Tensor, test: torch.Tensor, levels: int) -> float:
    """Held-out bits/dim of independent per-pixel categoricals fitted on ``train`` (add-one smoothing)."""
    train, test = train.long().flatten(1), test.long().flatten(1)
    counts = torch.stack([(train == level).sum(0) for level in range(levels)]).double() + 1.0
    log_probs = torch.log(counts / counts.sum(0))  # (levels, pixels)
    per_pixel = log_probs[test, torch.arange(test.shape[1])]  # (rows, pixels)
    return -per_pixel.mean().item() / math.log(2)


def test_held_out_bits_per_dim_beat_the_independent_pixel_baseline(digits_fit):
    model, (train_images, _), (test_images, test_labels) = digits_fit
    baseline = categorical_bits_per_dim(train_images, test_images, DIGITS_LEVELS)
    assert 2.3 < baseline < 2.6  # the reference itself is sane (log2(17) = 4.09 for a uniform guess)
    torch.manual_seed(10)
    bits = pf.bits_per_dim(model, test_images, context=test_labels)
    assert bits < baseline - 0.1, (bits, baseline)


def test_class_conditional_samples_are_recognised_as_their_class(digits_fit):
    from sklearn.linear_model import LogisticRegression

    model, (train_images, train_labels), (test_images, test_labels) = digits_fit
    classifier = LogisticRegression(max_iter=2000).fit(train_images.flatten(1).numpy() / 16, train_labels.numpy())
    assert classifier.score(test_images.flatten(1).numpy() / 16, test_labels.numpy()) > 0.9
    labels = torch.arange(10).repeat_interleave(20)
    torch.manual_seed(11)
    samples = model(labels).sample()  # temperature 1: the model's own distribution
    assert samples.shape == (200, 1, 8, 8) and torch.equal(samples, samples.round())
    accuracy = (classifier.predict(samples.flatten(1).numpy() / 16) == labels.numpy()).mean()
    # chance is 10%: 60% of 200 samples cannot happen by luck (binomial tail < 1e-70)
    assert accuracy > 0.6, accuracy


def test_latent_interpolation_reproduces_its_endpoints_after_quantisation(digits_fit):
    model, (train_images, train_labels), _ = digits_fit
    first, second = torch.nonzero(train_labels == 3).flatten()[:2]
    ends = train_images[torch.stack((first, second))]
    path = torch.linspace(0, 1, 7)
    with torch.no_grad():
        z = model(torch.full((2,), 3)).continuous.to_base((ends + 0.5) / DIGITS_LEVELS)  # the cells' centres
        between = z[0] + path[:, None, None, None] * (z[1] - z[0])
        decoded = model(torch.full((7,), 3)).continuous.from_base(between)
    images = torch.floor(decoded * DIGITS_LEVELS).clamp(0, DIGITS_LEVELS - 1)
    assert torch.equal(images[0], ends[0]) and torch.equal(images[-1], ends[1])
    assert not torch.equal(images[3], ends[0]) and not torch.equal(images[3], ends[1])  # a real path between


def test_state_dict_round_trip_of_a_trained_glow_gives_identical_log_probs(digits_fit):
    model, _, (test_images, test_labels) = digits_fit
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = pf.Glow(shape=(1, 8, 8), levels=2, steps=2, hidden_channels=32, classes=10, pixel_levels=DIGITS_LEVELS)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    torch.manual_seed(12)
    expected = model(test_labels).log_prob(test_images)
    # in training mode too: the ActNorm layers come back initialised and do not re-initialise from this batch
    for mode in (False, True):
        torch.manual_seed(12)
        assert torch.equal(restored.train(mode)(test_labels).log_prob(test_images), expected)


def test_double_precision_end_to_end():
    images, labels = digit_images()
    images, labels = images[:256].double(), labels[:256]
    torch.manual_seed(13)
    model = pf.Glow(
        shape=(1, 8, 8),
        levels=2,
        steps=1,
        hidden_channels=8,
        classes=10,
        pixel_levels=DIGITS_LEVELS,
        dequantization="variational",
    ).double()
    history = pf.fit(model, images, context=labels, max_steps=20, batch_size=64, lr=2e-3, seed=0, progress=False)
    assert history[-1] < history[0]
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model(labels[:4]).log_prob(images[:4]).dtype == torch.float64
    assert model(labels[:4]).sample(temperature=0.7).dtype == torch.float64
    assert math.isfinite(pf.bits_per_dim(model, images, context=labels))

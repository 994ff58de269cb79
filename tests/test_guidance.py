"""Classifier-free guidance for flow matching: context dropout trains a null context whose field is the marginal
one, and the guided field f(∅) + w (f(c) - f(∅)) samples (Ho & Salimans 2022; Zheng et al. 2023)."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb
from test_flow_matching import gaussian_optimal_field

import pyro_flows as pf
from pyro_flows.objectives import CondOT
from pyro_flows.transforms.continuous import guided_velocity

F64 = torch.float64

# a 1-D two-class Gaussian mixture with overlapping classes: x | c ~ N(MEANS[c], STD^2), P(c) = WEIGHTS[c]
MEANS, STD, WEIGHTS = (-1.0, 1.0), 0.7, (0.4, 0.6)


def mixture(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(torch.tensor(WEIGHTS), n, replacement=True, generator=generator)
    x = torch.tensor(MEANS)[labels] + STD * torch.randn(n, generator=generator)
    return x.unsqueeze(-1), labels


def marginal_optimal_field(x: torch.Tensor, t: float) -> torch.Tensor:
    r"""E[u | x_t = x] for the mixture on straight paths: the classes' Gaussian optimal fields weighted by
    P(c | x_t = x) ∝ P(c) N(x; t m_c, t² s² + (1 - t)²)."""
    scheduler, s2 = CondOT(0.0), torch.tensor([[STD**2]], dtype=F64)
    fields, log_weights = [], []
    for mean, weight in zip(MEANS, WEIGHTS, strict=True):
        field, centre, cov = gaussian_optimal_field(scheduler, torch.tensor([mean], dtype=F64), s2, x, t)
        fields.append(field)
        normal = torch.distributions.Normal(centre, cov.sqrt().squeeze(-1))
        log_weights.append(normal.log_prob(x).sum(-1) + torch.tensor(weight, dtype=F64).log())
    posterior = torch.stack(log_weights, -1).softmax(-1)  # (N, classes)
    return (torch.stack(fields, -1) * posterior.unsqueeze(1)).sum(-1)


def grid(t: float, label: int | None = None, points: int = 41) -> torch.Tensor:
    """``points`` values ``(points, 1)`` on ±2 sd around the mean of x_t = t x_1 + (1 - t) z_0: x_1 from the mixture
    (``label`` None) or from one class."""
    weights, means = torch.tensor(WEIGHTS, dtype=F64), torch.tensor(MEANS, dtype=F64)
    if label is not None:
        weights = torch.nn.functional.one_hot(torch.tensor(label), len(MEANS)).to(F64)
    mean = (weights * means).sum()
    variance = t**2 * (STD**2 + (weights * (means - mean) ** 2).sum()) + (1 - t) ** 2
    return (t * mean + 2 * variance.sqrt() * torch.linspace(-1, 1, points, dtype=F64)).unsqueeze(-1)


def conditional_optimal_field(x: torch.Tensor, t: float, label: int) -> torch.Tensor:
    s2, mean = torch.tensor([[STD**2]], dtype=F64), torch.tensor([MEANS[label]], dtype=F64)
    return gaussian_optimal_field(CondOT(0.0), mean, s2, x, t)[0]


def rms(x: torch.Tensor) -> torch.Tensor:
    return x.square().mean().sqrt()


@pytest.fixture(scope="module")
def guided_flow() -> pf.Flow:
    """A class-conditional CNF trained by flow matching with context dropout 0.5 (800 steps of 1024 rows)."""
    torch.manual_seed(0)
    x, labels = mixture(8000, seed=1)
    flow = pf.CNF(1, classes=2, hidden=(64, 64), null_context=True, solver="rk4", steps=20)
    objective = pf.FlowMatching(context_dropout=0.5)
    pf.fit(flow, x, context=labels, objective=objective, max_steps=800, batch_size=1024, lr=1e-2,
           schedule="cosine", seed=0, progress=False)  # fmt: skip
    return flow.eval()


# -- the guided field ------------------------------------------------------------------------------------------------
def test_guided_field_is_the_conditional_field_at_scale_1_and_the_null_field_at_scale_0():
    field = perturb(pf.nn.VectorField(3, hidden=(16, 16), context_features=4).double(), seed=1)
    generator = torch.Generator().manual_seed(0)
    z, context = torch.randn(10, 3, generator=generator, dtype=F64), torch.randn(10, 4, generator=generator, dtype=F64)
    null, t = torch.randn(4, generator=generator, dtype=F64), torch.rand(10, generator=generator, dtype=F64)
    conditional, unconditional = field(z, t, context), field(z, t, null.expand(10, 4))
    for time in (t, torch.tensor(0.3, dtype=F64)):  # a time per row (training) or one time (the ODE)
        torch.testing.assert_close(guided_velocity(field, z, time, context, null, 1.0), field(z, time, context),
                                   atol=1e-14, rtol=0)  # fmt: skip
        torch.testing.assert_close(guided_velocity(field, z, time, context, null, 0.0),
                                   field(z, time, null.expand(10, 4)), atol=1e-14, rtol=0)  # fmt: skip
    guided = guided_velocity(field, z, t, context, null, 2.5)
    torch.testing.assert_close(guided, unconditional + 2.5 * (conditional - unconditional), atol=1e-12, rtol=0)


@pytest.mark.parametrize("context", ["classes", "vector"])
def test_guided_samples_at_scale_1_and_0_are_the_conditional_and_the_null_context_flows(context):
    """Same base draws, same fixed grid: w = 1 gives flow(c)'s samples, w = 0 those of the layer under ∅."""
    kwargs = dict(classes=3) if context == "classes" else dict(context=2)
    flow = perturb(pf.CNF(2, hidden=(16,), null_context=True, solver="rk4", steps=6, **kwargs).double(), seed=2)
    c = torch.tensor([0, 2]) if context == "classes" else torch.randn(2, 2, dtype=F64)
    (layer,) = flow.transforms
    torch.manual_seed(3)
    guided = pf.guided_sample(flow, c, 1.0, (5,))
    torch.manual_seed(3)
    torch.testing.assert_close(guided, flow(c).sample((5,)), atol=1e-12, rtol=0)
    torch.manual_seed(3)
    unguided = pf.guided_sample(flow, c, 0.0, (5,))
    torch.manual_seed(3)
    z = torch.randn(5, 2, 2, dtype=F64)
    null = layer.null_context.expand(5, 2, -1)
    torch.testing.assert_close(unguided, layer.call_and_ladj(z, null)[0], atol=1e-12, rtol=0)
    assert guided.shape == (5, 2, 2) and not torch.allclose(guided, unguided)


# -- training the null context ---------------------------------------------------------------------------------------
def test_context_dropout_trains_the_null_field_on_the_marginal(guided_flow):
    """The null field matches the mixture's closed-form marginal optimal field on ±2 sd of x_t around its mean at
    t = 0.25, 0.5, 0.75 (relative RMS error < 0.25), and is far closer to it than to either class's field; the
    class fields match their Gaussian optimal fields."""
    (layer,) = guided_flow.transforms
    null = layer.null_context.detach()
    embed = guided_flow.embed
    with torch.no_grad():
        for t in (0.25, 0.5, 0.75):
            x = grid(t)
            marginal = marginal_optimal_field(x, t)
            null_field = layer.vector_field(x.float(), torch.tensor(t), null.expand(41, -1)).double()
            error = rms(null_field - marginal)
            assert error < 0.25 * rms(marginal), (t, error)
            for label in (0, 1):
                assert rms(null_field - conditional_optimal_field(x, t, label)) > 5 * error  # measured >= 8
                x_class = grid(t, label)
                expected = conditional_optimal_field(x_class, t, label)
                class_field = layer.vector_field(x_class.float(), torch.tensor(t), embed(torch.full((41,), label)))
                assert rms(class_field.double() - expected) < 0.25 * rms(expected), (t, label)


def test_guidance_above_1_moves_the_samples_towards_the_class(guided_flow):
    """Class 1 (mean +1): P(x < 0) is Φ(-1/0.7) = 0.077 unguided; guidance w = 3 (~ p(x|c) p(c|x)^2) must cut it
    and move the mean outwards; the unguided samples match the class's mean and sd, w = 0 the mixture (measured:
    w = 1 mean 1.01, sd 0.71, P(x < 0) 0.077; w = 3 mean 1.58, P(x < 0) 0.000; w = 0 mean 0.21, P(x < 0) 0.41)."""
    labels = torch.ones(4000, dtype=torch.long)
    torch.manual_seed(0)
    with torch.no_grad():
        plain = pf.guided_sample(guided_flow, labels[:1], 1.0, (4000,)).squeeze()
        guided = pf.guided_sample(guided_flow, labels[:1], 3.0, (4000,)).squeeze()
        marginal = pf.guided_sample(guided_flow, labels[:1], 0.0, (4000,)).squeeze()
    assert abs(plain.mean() - 1.0) < 0.1 and abs(plain.std() - STD) < 0.1, (plain.mean(), plain.std())
    below = {name: float((s < 0).double().mean()) for name, s in [("w=1", plain), ("w=3", guided)]}
    assert below["w=3"] < 0.5 * below["w=1"] and 0.04 < below["w=1"] < 0.12, below
    assert guided.mean() > plain.mean() + 0.15, (guided.mean(), plain.mean())
    expected_mean = sum(w * m for w, m in zip(WEIGHTS, MEANS, strict=True))  # w = 0: the mixture (mean 0.2)
    assert abs(marginal.mean() - expected_mean) < 0.1  # and P(x < 0) = 0.4 Φ(1/0.7) + 0.6 Φ(-1/0.7) = 0.415
    assert abs(float((marginal < 0).double().mean()) - 0.415) < 0.05


def test_context_dropout_reaches_the_null_context_only_when_asked():
    flow = pf.CNF(2, context=3, hidden=(8,), null_context=True)
    x, c = torch.randn(256, 2), torch.randn(256, 3)
    (layer,) = flow.transforms
    perturb(layer.vector_field, seed=0)
    pf.FlowMatching()(flow, x, c).backward()
    assert layer.null_context.grad is None  # no dropout: the null context is never used
    torch.manual_seed(0)
    pf.FlowMatching(context_dropout=0.5)(flow, x, c).backward()
    assert layer.null_context.grad.abs().sum() > 0
    assert any(name.endswith("null_context") for name in flow.state_dict())  # saved with the weights
    assert repr(pf.FlowMatching(context_dropout=0.25)).endswith("context_dropout=0.25)")


# -- bad input -------------------------------------------------------------------------------------------------------
def test_bad_guidance_scales_dropouts_and_flows_are_refused():
    conditional = pf.CNF(2, classes=2, hidden=(8,), null_context=True)
    for p in (1.0, -0.1, 1.5, True, float("nan")):
        with pytest.raises(ValueError, match="context_dropout must be a probability in"):
            pf.FlowMatching(context_dropout=p)
    for scale in (-1.0, float("nan"), float("inf"), "2", True):
        with pytest.raises(ValueError, match="guidance scale must be a finite number >= 0"):
            pf.guided_sample(conditional, torch.tensor([0]), scale)
    with pytest.raises(ValueError, match="guided_sample: the flow is unconditional"):
        pf.guided_sample(pf.CNF(2, hidden=(8,)), torch.tensor([0]), 2.0)
    no_null = pf.CNF(2, classes=2, hidden=(8,))
    with pytest.raises(ValueError, match="no null context; build it with null_context=True"):
        pf.guided_sample(no_null, torch.tensor([0]), 2.0)
    with pytest.raises(ValueError, match="guided_sample: the model must be a Flow consisting of exactly one"):
        pf.guided_sample(pf.MAF(2, context=2, transforms=1, hidden=(8,)), torch.zeros(1, 2), 2.0)
    with pytest.raises(ValueError, match="null_context=True needs a conditional layer"):
        pf.CNF(2, hidden=(8,), null_context=True)
    dropout = pf.FlowMatching(context_dropout=0.2)
    with pytest.raises(ValueError, match="needs a conditional flow built with null_context=True.*layer without"):
        dropout(no_null, torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="needs a conditional flow built with null_context=True.*unconditional"):
        dropout(pf.CNF(2, hidden=(8,)), torch.randn(4, 2))

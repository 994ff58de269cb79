"""Class-conditional vector flows: ``classes=K`` on every vector factory (NICE, RealNVP, MAF, IAF, NSF, CNF, FFJORD).

``flow(labels)`` embeds integer labels of shape ``batch`` with a :class:`~pyro_flows.nn.ClassEmbedding` and returns
the distribution of batch shape ``batch``. Its densities are checked against the layers conditioned on the embedding
by hand (inverse and autograd Jacobian) and against one label at a time, in float32 and float64.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import perturb

import pyro_flows as pf

D, K, HIDDEN = 3, 4, (16, 16)
FAMILIES = {
    "NICE": pf.NICE,
    "RealNVP": pf.RealNVP,
    "MAF": pf.MAF,
    "IAF": pf.IAF,
    "NSF-autoregressive": functools.partial(pf.NSF, autoregressive=True),
    "NSF-coupling": functools.partial(pf.NSF, autoregressive=False),
    "CNF": functools.partial(pf.CNF, atol=1e-10, rtol=1e-10),
    "FFJORD": pf.FFJORD,
}
# FFJORD's densities are Hutchinson estimates (random probes): its numbers are CNF's, checked with the exact trace.
EXACT = [name for name in FAMILIES if name != "FFJORD"]
DTYPES = [torch.float32, torch.float64]
BATCHES = [(), (5,), (2, 3)]


def tolerance(dtype: torch.dtype) -> dict:
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-8, atol=1e-8)


def build(name: str, dtype: torch.dtype = torch.float32, **kwargs) -> pf.Flow:
    """A class-conditional flow with perturbed parameters (fresh layers are the identity, which hides the labels).

    One batch first initialises NICE's ActNorm from data (later calls, one row at a time too, then leave it).
    """
    torch.manual_seed(0)
    options = {} if name in ("CNF", "FFJORD") else dict(transforms=2)
    flow = FAMILIES[name](D, classes=K, hidden=HIDDEN, **options, **kwargs)
    with torch.no_grad():
        flow(torch.tensor(0)).log_prob(1.0 + 2.0 * randn(64, D, dtype=torch.float32, seed=9))
    return perturb(flow, scale=0.3).to(dtype)


def labels_of(batch: tuple) -> torch.Tensor:
    return torch.arange(math.prod(batch)).remainder(K).reshape(batch)


def randn(*shape: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def hand_log_prob(flow: pf.Flow, label: int, x: torch.Tensor) -> torch.Tensor:
    """log N(f^{-1}(x); 0, I) + log|det d f^{-1}/dx| with the layers conditioned on the label's embedding by hand."""
    embedded = flow.embedding.embedding.weight[label]
    layers = [t.condition(embedded) if isinstance(t, pf.transforms.Conditional) else t for t in flow.transforms]

    def inverse(v: torch.Tensor) -> torch.Tensor:
        for t in reversed(layers):
            v = t.inv(v)
        return v

    values = []
    for row in x:
        z = inverse(row.clone())
        jacobian = torch.autograd.functional.jacobian(inverse, row.clone())
        log_normal = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum()
        values.append(log_normal + torch.linalg.slogdet(jacobian).logabsdet)
    return torch.stack(values).detach()


@pytest.mark.parametrize("batch", BATCHES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name", EXACT)
def test_class_conditional_flow_contract(name, dtype, batch):
    flow = build(name, dtype)
    assert flow.embedding.classes == K and flow.context_features == 16  # the default embedding_features
    labels = labels_of(batch)
    d = flow(labels)
    assert d.batch_shape == batch and d.event_shape == (D,)
    x = randn(*batch, D, dtype=dtype)
    log_p = d.log_prob(x)
    assert log_p.shape == batch and log_p.dtype == dtype
    flat_labels, flat_x = labels.reshape(-1), x.reshape(-1, D)
    one_at_a_time = torch.stack([flow(y).log_prob(v) for y, v in zip(flat_labels, flat_x, strict=True)])
    torch.testing.assert_close(log_p.reshape(-1), one_at_a_time, **tolerance(dtype))
    # whole-number float labels are the same labels
    torch.testing.assert_close(flow(labels.to(dtype)).log_prob(x), log_p, **tolerance(dtype))
    # the labels make a difference: every point scored under each label
    per_label = torch.stack([flow(torch.tensor(k)).log_prob(flat_x) for k in range(K)])
    assert (per_label - per_label[0]).abs().amax(1)[1:].min() > 1e-3
    # samples: sample dims in front of the labels' batch, and each scored by its own label's density
    y, log_q = d.rsample_and_log_prob((7,))
    assert y.shape == (7, *batch, D) and log_q.shape == (7, *batch) and y.dtype == dtype
    torch.testing.assert_close(d.log_prob(y.detach().clone()), log_q.detach(), **tolerance(dtype))
    assert d.sample((2, 7)).shape == (2, 7, *batch, D)


@pytest.mark.parametrize("name", EXACT)
def test_class_conditional_density_matches_the_hand_computation(name):
    flow = build(name, torch.float64)
    x = randn(4, D, dtype=torch.float64, seed=3)
    for label in (0, K - 1):
        expected = hand_log_prob(flow, label, x)
        torch.testing.assert_close(flow(torch.tensor(label)).log_prob(x), expected, rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(flow(torch.full((4,), label)).log_prob(x), expected, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_is_class_conditional(name):
    """``classes=`` gives the conditional twins and an embedding, whatever the family; FFJORD included."""
    flow = build(name, embedding_features=5)
    assert isinstance(flow.embedding, pf.nn.ClassEmbedding) and flow.context_features == 5
    assert any(isinstance(t, pf.transforms.Conditional) for t in flow.transforms)
    assert flow(torch.tensor([0, 3])).batch_shape == (2,) and flow(torch.tensor(2)).batch_shape == ()
    assert flow(torch.tensor([[0, 1, 2]])).sample((4,)).shape == (4, 1, 3, D)
    assert flow(torch.tensor(1)).log_prob(torch.randn(6, D)).shape == (6,)


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize(
    "labels, message",
    [
        (torch.tensor([0, K]), rf"labels must lie in \[0, {K}\)"),
        (torch.tensor([-1, 0]), rf"labels must lie in \[0, {K}\)"),
        (torch.tensor([0.5, 1.0]), "whole numbers"),
        (torch.tensor([True, False]), "integer class indices"),
        (torch.tensor([float("nan"), 1.0]), "NaN or inf"),
    ],
    ids=["too-large", "negative", "fractional", "bool", "nan"],
)
def test_bad_labels_raise_value_errors(name, labels, message):
    flow = build(name)
    with pytest.raises(ValueError, match=message):
        flow(labels).log_prob(torch.randn(2, D))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_bad_class_arguments_raise_value_errors(name):
    factory = FAMILIES[name]
    with pytest.raises(ValueError, match=r"class labels \(classes=\) or a context vector \(context=\), not both"):
        factory(D, context=2, classes=K)
    for classes in (1, 0, 2.5, "3", True):
        with pytest.raises(ValueError, match="classes >= 2"):
            factory(D, classes=classes)
    with pytest.raises(ValueError, match="features >= 1"):
        factory(D, classes=K, embedding_features=0)
    with pytest.raises(ValueError, match="call it with a context"):
        factory(D, classes=K)()  # a class-conditional flow needs its labels


def test_image_flows_follow_the_same_rule():
    """The image flows refuse classes with context by the same code and message as the vector flows."""
    for family, kwargs in ((pf.Glow, {}), (pf.RealNVP, dict(hidden=(4,)))):
        with pytest.raises(ValueError, match=rf"{family.__name__}: .*classes=\) or a context vector .* not both"):
            family(shape=(1, 8, 8), classes=3, context=2, **kwargs)


def test_class_conditional_nsf_learns_each_class():
    """Two well-separated classes: each class's points score higher under their own label; samples follow labels."""
    generator = torch.Generator().manual_seed(0)
    means = torch.tensor([[-2.0, 1.0], [2.0, -1.0]])
    labels = torch.randint(0, 2, (256,), generator=generator)
    data = means[labels] + 0.3 * torch.randn(256, 2, generator=generator)
    torch.manual_seed(0)
    flow = pf.NSF(2, classes=2, transforms=2, hidden=(16, 16))
    pf.fit(flow, data, labels, max_epochs=10, batch_size=64, lr=1e-2, seed=0, progress=False)
    with torch.no_grad():
        own, other = flow(labels).log_prob(data), flow(1 - labels).log_prob(data)
        assert (own > other).float().mean() > 0.99
        samples = flow(torch.tensor([0, 1])).sample((400,), temperature=1.0)
    assert samples.shape == (400, 2, 2)
    torch.testing.assert_close(samples.mean(0), means, atol=0.3, rtol=0)
    # sampling one label: every draw lies on that class's side
    assert (flow(torch.tensor(1)).sample((200,))[:, 0] > 0).float().mean() > 0.97

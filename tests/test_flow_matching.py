"""Flow matching sees the context that ``log_prob`` and sampling see: the flow's embedding of it.

``Flow.embed`` is the one place a context is checked and embedded; the objective conditions the vector
field on its output, so an embedding trains with the field (issue 12, item 5: it used to get the raw
context, and no gradient).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import perturb
from torch import nn

import pyro_flows as pf
from pyro_flows import transforms as T
from pyro_flows.nn import ClassEmbedding
from pyro_flows.objectives import conditional_ot_pairing, ot_pairing

F64 = torch.float64


def embedded_cnf(embedding: nn.Module, features: int = 1, context_features: int = 4, **kwargs) -> pf.Flow:
    layer = T.ConditionalContinuousFlow(features, context_features=context_features, **kwargs)
    return pf.Flow(pf.StandardNormal(features), [layer], context_features, embedding=embedding)


def test_embed_checks_and_embeds_the_context_as_the_distribution_does():
    torch.manual_seed(0)
    flow = embedded_cnf(nn.Linear(1, 4), hidden=(8,))
    c = torch.randn(5, 1)
    torch.testing.assert_close(flow.embed(c), flow.embedding(c))
    assert pf.CNF(2).embed() is None
    plain = pf.CNF(2, context=3)
    c3 = torch.randn(5, 3)
    assert plain.embed(c3) is c3  # no embedding: the context itself, checked
    with pytest.raises(ValueError, match="unconditional"):
        pf.CNF(2).embed(c3)
    with pytest.raises(ValueError, match="conditional"):
        flow.embed(None)
    with pytest.raises(ValueError, match="NaN or inf"):
        flow.embed(torch.full((2, 1), math.nan))
    with pytest.raises(ValueError, match="embedded context"):
        embedded_cnf(nn.Linear(1, 3), hidden=(8,)).embed(c)
    with pytest.raises(ValueError, match="context"):
        plain.embed(torch.randn(5, 2))
    # the distribution is conditioned on the embedded context: the same log_prob as the field given it directly
    x = torch.randn(5, 1)
    twin = pf.Flow(pf.StandardNormal(1), flow.transforms, 4)
    with torch.no_grad():
        torch.testing.assert_close(flow(c).log_prob(x), twin(flow.embedding(c)).log_prob(x))


@pytest.mark.parametrize(
    "embedding",
    [nn.Linear(1, 4), ClassEmbedding(2, 4), nn.Linear(1, 1)],
    ids=["linear", "classes", "same-width"],  # same width: the raw context used to pass silently
)
def test_flow_matching_conditions_the_field_on_the_embedded_context_and_trains_the_embedding(embedding):
    torch.manual_seed(0)
    width = 1 if isinstance(embedding, nn.Linear) and embedding.out_features == 1 else 4
    flow = embedded_cnf(embedding, features=2, context_features=width, hidden=(8,), t0=1.0, t1=3.0).double()
    perturb(flow, scale=0.3, seed=2)
    (layer,) = flow.transforms
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(11), dtype=F64)
    c = torch.randint(0, 2, (16, 1), generator=torch.Generator().manual_seed(12)).to(F64)
    torch.manual_seed(5)
    loss = pf.FlowMatching(sigma_min=0.1)(flow, x, c if isinstance(embedding, nn.Linear) else c.squeeze(-1))
    torch.manual_seed(5)  # the same z0 and t
    z0 = torch.randn_like(x)
    t = torch.rand(16, 1, dtype=F64)
    x_t = (1 - 0.9 * t) * z0 + t * x
    embedded = flow.embedding(c if isinstance(embedding, nn.Linear) else c.squeeze(-1)).detach()
    velocity = layer.vector_field(x_t, 1.0 + 2.0 * t.squeeze(-1), embedded)
    expected = (2.0 * velocity - (x - 0.9 * z0)).square().sum(-1).mean()
    torch.testing.assert_close(loss, expected.detach())
    loss.backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name  # the embedding's included


def test_flow_matching_with_ot_pairing_keeps_rows_and_their_embedded_contexts_together():
    torch.manual_seed(0)
    flow = perturb(embedded_cnf(nn.Linear(1, 4), hidden=(8,)), scale=0.3, seed=3)
    (layer,) = flow.transforms
    x, c = torch.randn(32, 1), torch.randint(0, 2, (32, 1)).float()
    torch.manual_seed(7)
    loss = pf.FlowMatching(ot_pairing=True)(flow, x, c)
    torch.manual_seed(7)
    z0 = torch.randn_like(x)
    order = conditional_ot_pairing(z0, x, c)
    assert not torch.equal(order, torch.arange(32))
    x, embedded = x[order], flow.embedding(c)[order]
    t = torch.rand(32, 1)
    velocity = layer.vector_field((1 - t) * z0 + t * x, t.squeeze(-1), embedded)
    torch.testing.assert_close(loss, (velocity - (x - z0)).square().sum(-1).mean())
    loss.backward()
    assert flow.embedding.weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match="one row per row of x"):
        pf.FlowMatching(ot_pairing=True)(flow, x, c[:5])


def test_conditional_ot_pairing_pairs_within_each_context_only():
    generator = torch.Generator().manual_seed(0)
    z0, x = torch.randn(64, 2, generator=generator), torch.randn(64, 2, generator=generator)
    labels = torch.randint(0, 3, (64,), generator=generator)
    labels[-1] = 3  # a context of one row keeps its row
    order = conditional_ot_pairing(z0, x, labels.float().unsqueeze(-1))
    assert sorted(order.tolist()) == list(range(64)) and torch.equal(labels[order], labels) and order[-1] == 63
    for label in range(3):  # and within a context it is the exact OT pairing
        rows = (labels == label).nonzero().flatten()
        torch.testing.assert_close(order[rows], rows[ot_pairing(z0[rows], x[rows])])
    unique = torch.randn(64, 1, generator=generator)  # a continuous context: the independent pairing
    assert torch.equal(conditional_ot_pairing(z0, x, unique), torch.arange(64))


@pytest.mark.parametrize(
    "ot, steps, batch_size, tolerance",
    [(False, 600, 256, 0.25), (True, 300, 128, 0.35)],  # measured log_prob errors: 0.13 and 0.25
    ids=["independent", "ot-pairing"],
)
def test_conditional_cnf_with_an_embedding_learns_a_context_dependent_gaussian(ot, steps, batch_size, tolerance):
    """x | c ~ N(2c, 0.5²), c in {-1, 1}, through an ``nn.Linear(1, 4)`` embedding: samples and the ODE's
    log_prob match each context's Gaussian. (With the raw context given to the field, training fails; with
    OT pairing across contexts, each context's base samples were biased: means ±1.1–1.4, std 0.9–1.0.)"""
    generator = torch.Generator().manual_seed(0)
    c = 2 * torch.randint(0, 2, (2000, 1), generator=generator).float() - 1
    x = 2 * c + 0.5 * torch.randn(2000, 1, generator=generator)
    torch.manual_seed(0)
    flow = embedded_cnf(nn.Linear(1, 4), hidden=(64, 64))
    objective = pf.FlowMatching(ot_pairing=ot)
    pf.fit(flow, x, c, objective=objective, max_steps=steps, batch_size=batch_size, lr=1e-2, seed=0, progress=False)
    contexts = torch.tensor([[-1.0], [1.0]])
    points = torch.linspace(-1.0, 1.0, 9).unsqueeze(-1)  # within ±2 standard deviations of each mean
    with torch.no_grad():
        samples = flow(contexts).sample((1000,))  # (1000, 2, 1)
        for i, mean in enumerate((-2.0, 2.0)):
            y = mean + 0.5 * points
            log_q = flow(contexts[i].expand(9, 1)).log_prob(y)
            log_p = torch.distributions.Normal(mean, 0.5).log_prob(y).squeeze(-1)
            assert (log_q - log_p).abs().max() < tolerance, (mean, log_q - log_p)
    means, stds = samples.mean(0).squeeze(-1), samples.std(0).squeeze(-1)
    torch.testing.assert_close(means, torch.tensor([-2.0, 2.0]), atol=0.15, rtol=0)  # measured: within 0.11
    torch.testing.assert_close(stds, torch.tensor([0.5, 0.5]), atol=0.1, rtol=0)  # measured: within 0.02

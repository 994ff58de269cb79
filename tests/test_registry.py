"""The one registry of flow names (``pyro_flows.flows.FLOWS``, ``build_flow``) and the front ends that read it:
``DensityEstimator`` (every name, ``"cnf"`` included), the guides, NPE and the command line."""

from __future__ import annotations

import numpy as np
import pyro.distributions as dist
import pytest
import torch

import pyro_flows as pf
from pyro_flows import cli
from pyro_flows.data import two_moons
from pyro_flows.flows import FLOWS, build_flow
from pyro_flows.flows.registry import CONTINUOUS
from pyro_flows.infer import NPE, AutoFlowGuide

PRIOR = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)


@pytest.mark.parametrize("name", list(FLOWS))
def test_build_flow_builds_every_name(name):
    torch.manual_seed(0)
    flow = build_flow(name, 3, transforms=2, hidden=(8,))
    conditional = build_flow(name, 3, context=2, transforms=2, hidden=(8,))
    assert isinstance(flow, pf.Flow) and flow.context_features == 0 and conditional.context_features == 2
    assert flow().sample((4,)).shape == (4, 3)
    assert conditional(torch.randn(5, 2)).log_prob(torch.randn(5, 3)).shape == (5,)
    layers = len([t for t in flow.transforms if isinstance(t, torch.nn.Module)])
    assert layers == 1 if name in CONTINUOUS else layers >= 2  # a CNF is one ODE layer, whatever transforms says
    assert FLOWS[name] in (pf.NICE, pf.RealNVP, pf.MAF, pf.IAF, pf.NSF, pf.CNF, pf.FFJORD)


@pytest.mark.parametrize("name", list(FLOWS))
def test_build_flow_passes_classes_through(name):
    """``classes=K``: the flow embeds integer labels; its batch shape is theirs."""
    torch.manual_seed(0)
    flow = build_flow(name, 3, transforms=2, hidden=(8,), classes=5, embedding_features=4)
    assert isinstance(flow.embedding, pf.nn.ClassEmbedding) and flow.embedding.classes == 5
    assert flow.context_features == 4
    assert flow(torch.tensor([0, 4])).log_prob(torch.randn(2, 3)).shape == (2,)
    assert flow(torch.tensor(3)).sample((6,)).shape == (6, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        flow(torch.tensor([5]))


@pytest.mark.parametrize("name", ["cnf", "ffjord"])
def test_a_cnf_over_images_is_refused_naming_the_image_flows(name):
    with pytest.raises(ValueError, match=r"over vectors.*\(1, 8, 8\).*Glow\(shape=\.\.\.\) or pf\.RealNVP\(shape"):
        FLOWS[name](features=(1, 8, 8))


@pytest.mark.parametrize("name", list(FLOWS))
def test_features_must_be_a_positive_integer(name):
    for features in (0, -1, 2.0, True, (1, 8, 8)):
        with pytest.raises(ValueError, match=f"{FLOWS[name].__name__}.*features must be an integer >= 1"):
            FLOWS[name](features)


IMAGE_FACTORIES = {
    "glow": lambda hidden: pf.Glow(shape=(1, 8, 8), levels=2, steps=1, hidden_channels=hidden),
    "realnvp-images": lambda hidden: pf.RealNVP(shape=(1, 8, 8), hidden=hidden),
}


@pytest.mark.parametrize("name", [*FLOWS, *IMAGE_FACTORIES])
def test_every_factory_checks_hidden(name):
    """``hidden`` is a sequence of widths (``nn.mlp.check_hidden``): an int, as ``hidden=64``, is refused by name.

    Glow's ``hidden_channels`` is one int (the width of each conditioner layer), so Glow is checked with bad ints.
    """
    if name == "glow":
        bad = [0, -3, 2.5, True]
    else:
        bad = [64, (0,), (8, -1), (8.0,), "64", (True,)] + ([()] if name == "realnvp-images" else [])
    for hidden in bad:
        with pytest.raises(ValueError, match="hidden"):
            if name in IMAGE_FACTORIES:
                IMAGE_FACTORIES[name](hidden)
            else:
                build_flow(name, 2, hidden=hidden)
    built = (
        IMAGE_FACTORIES[name](4 if name == "glow" else [4])
        if name in IMAGE_FACTORIES
        else build_flow(name, 2, hidden=[4])
    )
    assert sum(p.numel() for p in built.parameters()) > 0  # a list of widths is a sequence too


def test_an_unknown_name_lists_the_known_ones():
    known = "nice, realnvp, maf, iaf, nsf, cnf, ffjord"
    with pytest.raises(ValueError, match=f"build_flow: flow must be one of {known}, got 'glow'"):
        build_flow("glow", 2)
    with pytest.raises(ValueError, match=f"DensityEstimator: flow must be one of {known}, got 'glow'"):
        pf.DensityEstimator("glow").fit(np.zeros((4, 2)))  # checked by fit (scikit-learn's convention)
    with pytest.raises(ValueError, match=f"NPE: flow must be one of {known} or a callable, got 'glow'"):
        NPE(PRIOR, flow="glow")
    with pytest.raises(ValueError, match=f"flow must be one of {known} or a callable, got 'glow'"):
        AutoFlowGuide(lambda: None, flow="glow")


def test_every_front_end_reads_the_registry():
    """No front end keeps a list of its own: each accepts exactly the registry's names."""
    assert pf.estimator.FLOWS is FLOWS
    choices = next(a for a in cli.parser()._subparsers._group_actions[0].choices["fit"]._actions if a.dest == "flow")
    assert list(choices.choices) == list(FLOWS)
    for name in FLOWS:
        pf.DensityEstimator(name)
        NPE(PRIOR, flow=name)
        AutoFlowGuide(lambda: None, flow=name)


@pytest.mark.parametrize("name", list(FLOWS))
def test_density_estimator_fits_scores_samples_and_reloads_every_flow(name, tmp_path):
    X = np.random.default_rng(0).normal([5.0, -1.0], [3.0, 0.2], size=(200, 2))
    options = dict(atol=1e-4, rtol=1e-4) if name in CONTINUOUS else {}
    est = pf.DensityEstimator(name, transforms=2, hidden=(8,), **options).fit(X, max_epochs=2, progress=False)
    scores = est.score_samples(X[:5])
    samples = est.sample(6, seed=0)
    assert scores.shape == (5,) and np.isfinite(scores).all() and samples.shape == (6, 2)
    est.save(tmp_path / "m.pt")
    loaded = pf.DensityEstimator.load(tmp_path / "m.pt")
    assert loaded.flow == name and loaded.flow_kwargs.items() >= options.items()  # and those chosen from the data
    torch.manual_seed(0)  # the same Hutchinson probes for FFJORD's trace estimate
    scores = est.score_samples(X[:5])
    torch.manual_seed(0)
    np.testing.assert_allclose(loaded.score_samples(X[:5]), scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(loaded.sample(6, seed=0), samples)


def test_a_cnf_density_estimator_learns_more_than_a_gaussian():
    """``DensityEstimator(flow="cnf")`` (rejected before the registry) fits two moons by maximum likelihood."""
    generator = torch.Generator().manual_seed(0)
    train, test = two_moons(1000, generator=generator).double(), two_moons(500, generator=generator).double()
    est = pf.DensityEstimator("cnf", hidden=(32, 32), atol=1e-4, rtol=1e-4)
    est.fit(train, max_epochs=16, batch_size=128, lr=1e-2, validation_fraction=0.0, progress=False)
    gaussian = dist.MultivariateNormal(train.mean(0), torch.cov(train.T)).log_prob(test).mean().item()
    assert est.score(test) > gaussian + 0.3

"""The transform contract (docs: DESIGN.md, "The transform contract"), checked once for every layer.

Every layer is built with a fixed seed and its parameters are perturbed (fresh
coupling/autoregressive layers are the identity, which would make the checks
vacuous). Inputs have standard deviation 2 and splines a bound of 3, so some
coordinates fall outside the spline interval.

A case's events are vectors ``(D,)`` or images ``(C, H, W)`` (``event_dim`` 3); a layer may change the event shape
(:class:`~pyro_flows.transforms.Squeeze`): inputs of the forward direction have ``case.shape``, inputs of the inverse
``case.codomain_shape``, and Jacobians are those of the flattened maps. A side whose constraint is bounded
(:class:`~pyro_flows.transforms.Logit`'s codomain) gets no Gaussian draws: its inputs are Gaussian draws of the other
side pushed through an independent copy of the layer, so they lie inside the support.
"""

from __future__ import annotations

import copy
import functools
import json
import pickle
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import pyro.distributions as dist
import pytest
import torch
from conftest import ATOL, perturb, slogdet_ladj
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from torch.distributions import Transform, constraints

from pyro_flows import transforms as T
from pyro_flows.transforms.signals import Squeeze1d

D, C, HIDDEN = 5, 3, (16, 16)
BINS, BOUND = 5, 3.0
# Image cases: tiny images and CNNs keep the autograd Jacobians (32 x 32 per sample) cheap.
IMAGE, IMAGE_HIDDEN = (2, 4, 4), (8, 8)
SQUEEZED = (8, 2, 2)  # Squeeze(IMAGE).codomain_shape
KEPT = (1, 4, 4)  # the channels a FactorOut(IMAGE) keeps
ALIGNED = (1, 2, 2)  # an aligned context image of a lower resolution than IMAGE
SIGNAL = (2, 8)  # signal events (C, L)
# Scale of the random perturbation of every parameter: far from the identity (outputs move by O(1)), yet the splines
# keep moderate slopes. With much stronger perturbations (0.3) nearly flat spline bins appear and the float32 round
# trip in x loses up to ulp(B) / min slope ~ 2e-2 (ill-conditioning; float64 stays below 1e-10).
PERTURB = 0.15


def _ode(**kwargs):
    return dict(hidden=HIDDEN, atol=1e-12, rtol=1e-12, **kwargs)


ODE_ROUND_TRIP_ATOL = {torch.float32: 1e-4, torch.float64: 1e-10}
# Logit's inverse loses ulp(1) / (s (1 - s)) at s = sigmoid(x): ~3e-5 in float32 at |x| ~ 6.5 (the largest of a few
# hundred draws of standard deviation 2); float64 keeps the exact 1e-10.
LOGIT_ROUND_TRIP_ATOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def _spline(**kwargs):
    return dict(bins=BINS, bound=BOUND, hidden=HIDDEN, **kwargs)


def _image(**kwargs):
    return dict(hidden=IMAGE_HIDDEN, **kwargs)


def _image_spline(**kwargs):
    return dict(bins=BINS, bound=BOUND, hidden=IMAGE_HIDDEN, **kwargs)


def _mask():
    return torch.tensor([True, False, True, False, True])


def _order():
    return [3, 0, 4, 1, 2]


def _squeezed_chain():
    """Squeeze, a coupling and a 1x1 convolution at the coarser scale, then back: events (2, 4, 4) -> (2, 4, 4)."""
    return T.Chain(
        [
            T.Squeeze(IMAGE),
            T.AffineCoupling(SQUEEZED, **_image()),
            T.InvertibleConv1x1(SQUEEZED),
            T.Squeeze(IMAGE).inv,
        ]
    )


def _conditional_chain():
    """Conditional and unconditional layers across a Squeeze: events (2, 4, 4) -> (8, 2, 2).

    The spline comes first, on the unit-scale inputs: after an affine coupling's scaling its CNN would see inputs
    ~10 and draw nearly flat bins, whose float32 inverse is ill-conditioned (not a bug; float64 stays exact).
    """
    return T.ConditionalChain(
        [
            T.ConditionalSplineCoupling(IMAGE, mask=T.checkerboard_mask(IMAGE), context_features=C, **_image_spline()),
            T.Squeeze(IMAGE),
            T.ConditionalAffineCoupling(SQUEEZED, context_features=C, **_image()),
            T.InvertibleConv1x1(SQUEEZED),
        ]
    )


def _multiscale_inner():
    """The kept channels' flow at a coarser scale: squeeze, couple, unsqueeze."""
    return T.Chain([T.Squeeze(KEPT), T.AffineCoupling((4, 2, 2), **_image()), T.Squeeze(KEPT).inv])


@dataclass(frozen=True, eq=False)  # hashed by identity (functools.cache)
class Case:
    name: str
    build: Callable[[], T.FlowTransform]
    conditional: bool = False
    kind: str = ""  # "actnorm" / "batchnorm": data-dependent warm-up; "fixed": no parameters
    # Round-trip tolerance per dtype, where it differs from conftest.ATOL: an ODE layer's inverse is a second solve
    # whose error does not cancel the first's. In float32 the solver cannot go below its ~1e-6 tolerance floor, and the
    # two solves of a round trip then disagree by up to ~3e-5; float64 (tolerances 1e-12) keeps the exact 1e-10.
    round_trip_atol: Optional[dict] = None
    volume_preserving: bool = False  # log|det J| = 0 everywhere
    shape: tuple = (D,)  # event shape of the forward direction's input
    out_shape: Optional[tuple] = None  # event shape of its output, where it differs
    context_features: int = C  # size of the (flat) context of a conditional case

    def __repr__(self) -> str:
        return self.name

    @property
    def codomain_shape(self) -> tuple:
        return self.shape if self.out_shape is None else self.out_shape

    @property
    def event_dim(self) -> int:
        return len(self.shape)


VECTOR_CASES = [
    Case("AdditiveCoupling", lambda: T.AdditiveCoupling(D, hidden=HIDDEN), volume_preserving=True),
    Case("AffineCoupling", lambda: T.AffineCoupling(D, hidden=HIDDEN)),
    Case("SplineCoupling", lambda: T.SplineCoupling(D, **_spline())),
    Case("AffineAutoregressive", lambda: T.AffineAutoregressive(D, hidden=HIDDEN)),
    Case("AffineAutoregressive.inv", lambda: T.AffineAutoregressive(D, hidden=HIDDEN).inv),
    Case("SplineAutoregressive", lambda: T.SplineAutoregressive(D, **_spline())),
    Case("SplineAutoregressive.inv", lambda: T.SplineAutoregressive(D, **_spline()).inv),
    Case("Permute-reverse", lambda: T.Permute(D, "reverse"), kind="fixed", volume_preserving=True),
    Case("Permute-random", lambda: T.Permute(D, "random"), kind="fixed", volume_preserving=True),
    Case(
        "Standardize",
        lambda: T.Standardize(torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0]), torch.tensor([2.0, 0.5, 1.5, 3.0, 0.8])),
        kind="fixed",
    ),
    Case("LULinear", lambda: T.LULinear(D)),
    Case("ActNorm", lambda: T.ActNorm(D), kind="actnorm"),
    Case("BatchNorm", lambda: T.BatchNorm(D), kind="batchnorm"),
    Case("Logit", lambda: T.Logit(D, alpha=0.05), kind="fixed", round_trip_atol=LOGIT_ROUND_TRIP_ATOL),
    Case("Logit.inv", lambda: T.Logit(D, alpha=0.05).inv, kind="fixed", round_trip_atol=LOGIT_ROUND_TRIP_ATOL),
    Case("Coupling-Shift", lambda: T.Coupling(D, T.Shift(), mask=_mask(), hidden=HIDDEN), volume_preserving=True),
    Case("Coupling-Affine", lambda: T.Coupling(D, T.Affine(), mask=_mask(), hidden=HIDDEN)),
    Case(
        "Coupling-Spline",
        lambda: T.Coupling(D, T.RationalQuadraticSpline(BINS, BOUND), mask=_mask(), hidden=HIDDEN),
    ),
    Case(
        "Autoregressive-Shift",
        lambda: T.Autoregressive(D, T.Shift(), hidden=HIDDEN, order=_order()),
        volume_preserving=True,
    ),
    Case("Autoregressive-Affine", lambda: T.Autoregressive(D, T.Affine(), hidden=HIDDEN, order=_order())),
    Case(
        "Autoregressive-Spline",
        lambda: T.Autoregressive(D, T.RationalQuadraticSpline(BINS, BOUND), hidden=HIDDEN, order=_order()),
    ),
    Case("ContinuousFlow", lambda: T.ContinuousFlow(D, **_ode()), round_trip_atol=ODE_ROUND_TRIP_ATOL),
    Case(
        "ConditionalAdditiveCoupling",
        lambda: T.ConditionalAdditiveCoupling(D, hidden=HIDDEN, context_features=C),
        conditional=True,
        volume_preserving=True,
    ),
    Case(
        "ConditionalAffineCoupling",
        lambda: T.ConditionalAffineCoupling(D, hidden=HIDDEN, context_features=C),
        conditional=True,
    ),
    Case(
        "ConditionalSplineCoupling",
        lambda: T.ConditionalSplineCoupling(D, context_features=C, **_spline()),
        conditional=True,
    ),
    Case(
        "ConditionalCoupling-Affine",
        lambda: T.ConditionalCoupling(D, T.Affine(), mask=_mask(), hidden=HIDDEN, context_features=C),
        conditional=True,
    ),
    Case(
        "ConditionalAffineAutoregressive",
        lambda: T.ConditionalAffineAutoregressive(D, hidden=HIDDEN, context_features=C),
        conditional=True,
    ),
    Case(
        "ConditionalAffineAutoregressive.inv",
        lambda: T.ConditionalAffineAutoregressive(D, hidden=HIDDEN, context_features=C).inv,
        conditional=True,
    ),
    Case(
        "ConditionalSplineAutoregressive",
        lambda: T.ConditionalSplineAutoregressive(D, context_features=C, **_spline()),
        conditional=True,
    ),
    Case(
        "ConditionalSplineAutoregressive.inv",
        lambda: T.ConditionalSplineAutoregressive(D, context_features=C, **_spline()).inv,
        conditional=True,
    ),
    Case(
        "ConditionalAutoregressive-Spline",
        lambda: T.ConditionalAutoregressive(
            D, T.RationalQuadraticSpline(BINS, BOUND), hidden=HIDDEN, context_features=C, order=_order()
        ),
        conditional=True,
    ),
    Case(
        "ConditionalContinuousFlow",
        lambda: T.ConditionalContinuousFlow(D, context_features=C, **_ode()),
        conditional=True,
        round_trip_atol=ODE_ROUND_TRIP_ATOL,
    ),
]


def _image_case(name: str, build: Callable[[], T.FlowTransform], shape: tuple = IMAGE, **kwargs) -> Case:
    return Case(f"image-{name}", build, shape=shape, **kwargs)


IMAGE_CASES = [
    _image_case("ActNorm", lambda: T.ActNorm(IMAGE), kind="actnorm"),
    _image_case("InvertibleConv1x1", lambda: T.InvertibleConv1x1((3, 4, 4)), shape=(3, 4, 4)),
    _image_case("AffineCoupling-channel", lambda: T.AffineCoupling(IMAGE, **_image())),
    _image_case(
        "AffineCoupling-checkerboard",
        lambda: T.AffineCoupling(IMAGE, mask=T.checkerboard_mask(IMAGE), **_image()),
    ),
    _image_case(
        "AdditiveCoupling-channel",
        lambda: T.AdditiveCoupling(IMAGE, mask=T.channel_mask(2, parity=1), **_image()),
        volume_preserving=True,
    ),
    _image_case(
        "AdditiveCoupling-checkerboard",
        lambda: T.AdditiveCoupling(IMAGE, mask=T.checkerboard_mask(IMAGE, parity=1), **_image()),
        volume_preserving=True,
    ),
    _image_case("SplineCoupling-channel", lambda: T.SplineCoupling((3, 4, 4), **_image_spline()), shape=(3, 4, 4)),
    _image_case(
        "SplineCoupling-checkerboard",
        lambda: T.SplineCoupling(IMAGE, mask=T.checkerboard_mask(IMAGE), **_image_spline()),
    ),
    _image_case("Squeeze", lambda: T.Squeeze(IMAGE), kind="fixed", volume_preserving=True, out_shape=SQUEEZED),
    _image_case(
        "Squeeze.inv",
        lambda: T.Squeeze(IMAGE).inv,
        kind="fixed",
        volume_preserving=True,
        shape=SQUEEZED,
        out_shape=IMAGE,
    ),
    _image_case("Chain-squeezed", _squeezed_chain),
    _image_case(
        "Chain-to-coarser",
        lambda: T.Chain([T.InvertibleConv1x1(IMAGE), T.Squeeze(IMAGE)]),
        out_shape=SQUEEZED,
    ),
    _image_case(
        "FactorOut-split-prior",
        lambda: T.FactorOut(IMAGE, T.AffineCoupling(KEPT, mask=T.checkerboard_mask(KEPT), **_image()), **_image()),
    ),
    _image_case(
        "FactorOut-multiscale-no-split-prior",
        lambda: T.FactorOut(IMAGE, _multiscale_inner(), split_prior=False, **_image()),
    ),
    _image_case("Logit", lambda: T.Logit(IMAGE, alpha=0.05), kind="fixed", round_trip_atol=LOGIT_ROUND_TRIP_ATOL),
    _image_case(
        "ConditionalAffineCoupling-checkerboard",
        lambda: T.ConditionalAffineCoupling(IMAGE, mask=T.checkerboard_mask(IMAGE), context_features=C, **_image()),
        conditional=True,
    ),
    _image_case(
        "ConditionalAdditiveCoupling-channel",
        lambda: T.ConditionalAdditiveCoupling(IMAGE, context_features=C, **_image()),
        conditional=True,
        volume_preserving=True,
    ),
    _image_case(
        "ConditionalSplineCoupling-channel",
        lambda: T.ConditionalSplineCoupling(IMAGE, context_features=C, **_image_spline()),
        conditional=True,
    ),
    _image_case("ConditionalChain", _conditional_chain, conditional=True, out_shape=SQUEEZED),
    _image_case(
        "ConditionalFactorOut",
        lambda: T.ConditionalFactorOut(
            IMAGE,
            T.ConditionalAffineCoupling(KEPT, mask=T.checkerboard_mask(KEPT), context_features=C, **_image()),
            context_features=C,
            **_image(),
        ),
        conditional=True,
    ),
    # aligned contexts (the flattened condition image leads the context): a 2x2 image upsampled to 4x4, an 8x8 one
    # downsampled (antialiased) with 3 vector features after it, and a factor-out whose prior and inner layer see it
    _image_case(
        "ConditionalAffineCoupling-aligned",
        lambda: T.ConditionalAffineCoupling(IMAGE, context_shape=ALIGNED, **_image()),
        conditional=True,
        context_features=4,
    ),
    _image_case(
        "ConditionalSplineCoupling-aligned-vector",
        lambda: T.ConditionalSplineCoupling(
            IMAGE, mask=T.checkerboard_mask(IMAGE), context_shape=(1, 8, 8), context_features=64 + C, **_image_spline()
        ),
        conditional=True,
        context_features=64 + C,
    ),
    _image_case(
        "ConditionalFactorOut-aligned",
        lambda: T.ConditionalFactorOut(
            IMAGE,
            T.ConditionalAffineCoupling(KEPT, mask=T.checkerboard_mask(KEPT), context_shape=ALIGNED, **_image()),
            context_shape=ALIGNED,
            **_image(),
        ),
        conditional=True,
        context_features=4,
    ),
]


def _signal_case(name: str, build: Callable[[], T.FlowTransform], shape: tuple = SIGNAL, **kwargs) -> Case:
    return Case(f"signal-{name}", build, shape=shape, **kwargs)


# 1-D signals (C, L): WaveGlow's layers; the couplings' conditioner is a WaveNet (equal widths, one per layer)
SIGNAL_CASES = [
    _signal_case("Squeeze1d", lambda: Squeeze1d(SIGNAL, 2), kind="fixed", volume_preserving=True, out_shape=(4, 4)),
    _signal_case(
        "Squeeze1d.inv",
        lambda: Squeeze1d(SIGNAL, 2).inv,
        kind="fixed",
        volume_preserving=True,
        shape=(4, 4),
        out_shape=SIGNAL,
    ),
    _signal_case("InvertibleConv1x1", lambda: T.InvertibleConv1x1((3, 8)), shape=(3, 8)),
    _signal_case("AffineCoupling", lambda: T.AffineCoupling(SIGNAL, hidden=IMAGE_HIDDEN)),
    _signal_case("SplineCoupling", lambda: T.SplineCoupling(SIGNAL, **_image_spline())),
    _signal_case(
        "ConditionalAffineCoupling-aligned-vector",
        lambda: T.ConditionalAffineCoupling(SIGNAL, context_shape=(2, 3), context_features=6 + C, hidden=IMAGE_HIDDEN),
        conditional=True,
        context_features=6 + C,
    ),
    _signal_case(
        "ConditionalChain-WaveGlow-step",
        lambda: T.ConditionalChain(
            [
                Squeeze1d(SIGNAL, 2),
                T.ConditionalAffineCoupling((4, 4), context_shape=(1, 16), hidden=IMAGE_HIDDEN),
                T.InvertibleConv1x1((4, 4)),
                Squeeze1d(SIGNAL, 2).inv,
            ]
        ),
        conditional=True,
        context_features=16,
    ),
]
CASES = VECTOR_CASES + IMAGE_CASES + SIGNAL_CASES
PARAMETRIC = [c for c in CASES if c.kind != "fixed"]
CONDITIONAL = [c for c in CASES if c.conditional]
UNCONDITIONAL = [c for c in CASES if not c.conditional]
DTYPES = [torch.float32, torch.float64]

all_cases = pytest.mark.parametrize("case", CASES, ids=repr)
parametric_cases = pytest.mark.parametrize("case", PARAMETRIC, ids=repr)
conditional_cases = pytest.mark.parametrize("case", CONDITIONAL, ids=repr)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])


# -- helpers ----------------------------------------------------------------------------------------------------------
def randn(shape, dtype=torch.float64, seed=0, std=2.0):
    generator = torch.Generator().manual_seed(seed)
    return std * torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


@functools.cache
def _unperturbed(case: Case) -> T.FlowTransform:
    """An independent float64 copy of the case's layer, for the constraints and for pushing inputs into a support."""
    with torch.random.fork_rng():
        return case.build().double()


def bounded(case: Case, side: str) -> bool:
    """Whether the layer's ``"domain"`` or ``"codomain"`` is a proper subset of the reals."""
    constraint = getattr(_unperturbed(case), side)
    return getattr(constraint, "base_constraint", constraint) is not constraints.real


def _input(case: Case, side: str, batch, dtype, seed: int, std: float) -> torch.Tensor:
    shape, other = (case.shape, case.codomain_shape) if side == "domain" else (case.codomain_shape, case.shape)
    if not bounded(case, side):
        return randn(tuple(batch) + tuple(shape), dtype, seed, std)
    assert not case.conditional, "bounded conditional layers need a context to push inputs through"
    layer = _unperturbed(case)
    push = layer.inverse_and_ladj if side == "domain" else layer.call_and_ladj
    with torch.no_grad():
        return push(randn(tuple(batch) + tuple(other), torch.float64, seed, std))[0].to(dtype)


def domain_input(case: Case, batch, dtype=torch.float64, seed: int = 0, std: float = 2.0) -> torch.Tensor:
    """Inputs ``batch + case.shape`` of the forward direction (inside the domain)."""
    return _input(case, "domain", batch, dtype, seed, std)


def codomain_input(case: Case, batch, dtype=torch.float64, seed: int = 0, std: float = 2.0) -> torch.Tensor:
    """Inputs ``batch + case.codomain_shape`` of the inverse direction (inside the codomain)."""
    return _input(case, "codomain", batch, dtype, seed, std)


def direction_input(case: Case, direction: str, batch, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """Inputs of ``call_and_ladj`` or ``inverse_and_ladj``."""
    side = "domain" if direction == "call_and_ladj" else "codomain"
    return _input(case, side, batch, dtype, seed, 2.0)


def output_shape(case: Case, direction: str) -> tuple:
    return case.codomain_shape if direction == "call_and_ladj" else case.shape


def make(
    case: Case, dtype=torch.float32, seed: int = 0, perturbed: bool = True, scale: float = PERTURB
) -> T.FlowTransform:
    """The layer of ``case``: built under ``seed``, warmed, perturbed, then converted to ``dtype``."""
    torch.manual_seed(seed)
    layer = case.build()
    data = 1.0 + randn((64,) + case.codomain_shape, torch.get_default_dtype(), seed=100 + seed)
    if case.kind == "actnorm":
        layer.inv(data)  # data-dependent initialisation (training mode)
        assert bool(layer.initialized)
    if perturbed:
        perturb(layer, scale=scale, seed=1 + seed)
    if case.kind == "batchnorm":
        layer.inv(data)  # one training-mode call fills the running statistics
        layer.eval()
    return layer.to(dtype)


def context(case: Case, batch_shape, dtype, seed=7) -> Optional[torch.Tensor]:
    return randn(tuple(batch_shape) + (case.context_features,), dtype, seed=seed, std=1.0) if case.conditional else None


def pyro_transform(layer, ctx) -> Transform:
    """What Pyro sees: the layer itself, or ``layer.condition(ctx)`` for a conditional one."""
    return layer if ctx is None else layer.condition(ctx)


def base_distribution(case: Case, dtype) -> dist.Distribution:
    """Standard normal over the layer's input events; uniform over a bounded domain (``Logit.inv``'s interval)."""
    zeros = torch.zeros(case.shape, dtype=dtype)
    if bounded(case, "domain"):
        interval = _unperturbed(case).domain.base_constraint
        return dist.Uniform(zeros + interval.lower_bound, zeros + interval.upper_bound).to_event(case.event_dim)
    return dist.Normal(zeros, torch.ones_like(zeros)).to_event(case.event_dim)


def flat_slogdet_ladj(fn, x: torch.Tensor) -> torch.Tensor:
    """``log|det d fn / dx|`` per sample of ``x`` (n, *event) by autograd, the events flattened to vectors."""
    n, event = x.shape[0], x.shape[1:]
    return slogdet_ladj(lambda v: fn(v.reshape((n,) + event)).reshape(n, -1), x.reshape(n, -1))


def first_entry(v: torch.Tensor, batch_dims: int = 1) -> torch.Tensor:
    """The first entry of every event of ``v``: a batch-shaped weight."""
    return v.flatten(batch_dims)[..., 0]


def ladj_tol(dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 1e-9


def close(a, b, atol):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= atol, f"max abs error {err:.3g} > {atol:.3g}"


def moved(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest change between two batches of events of possibly different shapes (equal sizes)."""
    return (a.reshape(a.shape[0], -1) - b.reshape(b.shape[0], -1)).abs().max().item()


# -- structure --------------------------------------------------------------------------------------------------------
@all_cases
def test_transform_attributes(case):
    layer = make(case)
    assert isinstance(layer, T.FlowTransform) and isinstance(layer, TransformModule)
    assert layer.bijective
    assert layer.domain.event_dim == case.event_dim and layer.codomain.event_dim == case.event_dim
    assert tuple(layer.event_shape) == case.shape and tuple(layer.codomain_shape) == case.codomain_shape
    if not isinstance(layer, T.Inverse):
        assert layer.inv.inv is layer
    x = domain_input(case, (4,), torch.float32)
    ctx = context(case, (4,), torch.float32)
    close(layer.inv.inv.call_and_ladj(x.clone(), ctx)[0], layer.call_and_ladj(x.clone(), ctx)[0], 0.0)
    assert layer.inv.domain.event_dim == case.event_dim
    assert tuple(layer.inv.event_shape) == case.codomain_shape and tuple(layer.inv.codomain_shape) == case.shape
    assert isinstance(layer, ConditionalTransformModule) == case.conditional
    assert isinstance(layer.inv, ConditionalTransformModule) == case.conditional
    if case.conditional:
        t = layer.condition(context(case, (4,), torch.float32))
        assert isinstance(t, Transform) and t.bijective and t.domain.event_dim == case.event_dim
    # the inverse shares the parameters (same objects)
    assert {id(p) for p in layer.parameters()} == {id(p) for p in layer.inv.parameters()}


# -- round trip -------------------------------------------------------------------------------------------------------
@all_cases
@dtypes
def test_round_trip(case, dtype):
    layer = make(case, dtype)
    n = 16
    ctx = context(case, (n,), dtype)
    x = domain_input(case, (n,), dtype, seed=1)
    if not bounded(case, "domain"):
        assert (x.abs() > BOUND).any() and (x.abs() < BOUND).any()

    y, ladj = layer.call_and_ladj(x, ctx)
    assert y.shape == (n,) + case.codomain_shape
    assert layer.codomain.check(y).all(), "the output left the codomain"
    assert moved(y, x) > 1e-2, "the layer is (close to) the identity: the test would be vacuous"
    x_back, ladj_back = layer.inverse_and_ladj(y.clone(), ctx)  # clone: no cache hit
    atol = (case.round_trip_atol or ATOL)[dtype]
    close(x_back, x, atol)
    close(ladj_back, -ladj, ladj_tol(dtype))

    y2 = codomain_input(case, (n,), dtype, seed=2)
    x2, ladj2 = layer.inverse_and_ladj(y2, ctx)
    assert layer.domain.check(x2).all(), "the inverse left the domain"
    y2_back, ladj2_back = layer.call_and_ladj(x2.clone(), ctx)
    close(y2_back, y2, atol)
    close(ladj2_back, -ladj2, ladj_tol(dtype))
    assert torch.isfinite(ladj).all() and torch.isfinite(ladj2).all()


# -- log-det vs autograd ----------------------------------------------------------------------------------------------
@all_cases
def test_log_det_matches_autograd_jacobian(case):
    dtype = torch.float64
    layer = make(case, dtype)
    n = 6
    ctx = context(case, (n,), dtype)
    x = domain_input(case, (n,), dtype, seed=3)
    y = codomain_input(case, (n,), dtype, seed=4)

    _, ladj = layer.call_and_ladj(x, ctx)
    expected = flat_slogdet_ladj(lambda v: layer.call_and_ladj(v, ctx)[0], x)
    close(ladj, expected, 1e-9)

    _, ladj_inv = layer.inverse_and_ladj(y, ctx)
    expected_inv = flat_slogdet_ladj(lambda v: layer.inverse_and_ladj(v, ctx)[0], y)
    close(ladj_inv, expected_inv, 1e-9)

    # inverse_and_ladj's log-det is the negative of call_and_ladj's at the matching point
    x_of_y = layer.inverse_and_ladj(y.clone(), ctx)[0]
    close(ladj_inv, -layer.call_and_ladj(x_of_y.clone(), ctx)[1], 1e-9)


# -- Pyro entry points ------------------------------------------------------------------------------------------------
@all_cases
@dtypes
def test_pyro_entry_points_agree_with_fused(case, dtype):
    layer = make(case, dtype)
    n = 8
    ctx = context(case, (n,), dtype)
    t = pyro_transform(layer, ctx)
    x = domain_input(case, (n,), dtype, seed=5)
    y = codomain_input(case, (n,), dtype, seed=6)
    eps = ATOL[dtype]

    y_fused, ladj_fused = layer.call_and_ladj(x.clone(), ctx)
    x_fused, ladj_inv_fused = layer.inverse_and_ladj(y.clone(), ctx)

    xa = x.clone()
    y_pyro = t(xa)
    close(y_pyro, y_fused, eps)
    close(t.log_abs_det_jacobian(xa, y_pyro), ladj_fused, eps)  # through the cache
    close(t.log_abs_det_jacobian(x.clone(), y_pyro.clone()), ladj_fused, eps)  # recomputed

    ya = y.clone()
    x_pyro = t.inv(ya)
    close(x_pyro, x_fused, eps)
    close(t.log_abs_det_jacobian(x_pyro, ya), -ladj_inv_fused, eps)
    close(t.inv.log_abs_det_jacobian(ya, x_pyro), ladj_inv_fused, eps)
    close(t.inv.log_abs_det_jacobian(y.clone(), x_pyro.clone()), ladj_inv_fused, ladj_tol(dtype))


# -- shapes -----------------------------------------------------------------------------------------------------------
@all_cases
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)], ids=str)
def test_batch_shapes(case, batch):
    dtype = torch.float64
    layer = make(case, dtype)
    ctx = context(case, batch, dtype)
    x = domain_input(case, batch, dtype, seed=8)
    y = codomain_input(case, batch, dtype, seed=8)
    out, ladj = layer.call_and_ladj(x, ctx)
    assert out.shape == batch + case.codomain_shape and ladj.shape == batch
    xi, ladj_inv = layer.inverse_and_ladj(y, ctx)
    assert xi.shape == batch + case.shape and ladj_inv.shape == batch

    # values equal a flat (N, *event) batch computation
    flat_ctx = None if ctx is None else ctx.reshape(-1, case.context_features)
    out_flat, ladj_flat = layer.call_and_ladj(x.reshape((-1,) + case.shape).clone(), flat_ctx)
    close(out, out_flat.reshape(batch + case.codomain_shape), 1e-12)
    close(ladj, ladj_flat.reshape(batch), 1e-12)
    xi_flat, ladj_inv_flat = layer.inverse_and_ladj(y.reshape((-1,) + case.codomain_shape).clone(), flat_ctx)
    close(xi, xi_flat.reshape(batch + case.shape), 1e-12)
    close(ladj_inv, ladj_inv_flat.reshape(batch), 1e-12)

    t = pyro_transform(layer, ctx)
    xx = x.clone()
    yy = t(xx)
    assert yy.shape == batch + case.codomain_shape
    assert t.inv(yy.clone()).shape == batch + case.shape
    assert t.log_abs_det_jacobian(xx, yy).shape == batch
    assert tuple(t.forward_shape(x.shape)) == batch + case.codomain_shape
    assert tuple(t.inverse_shape(y.shape)) == batch + case.shape


@conditional_cases
def test_context_broadcasting(case):
    dtype = torch.float64
    layer = make(case, dtype)
    k, n = 2, 3
    for seed, direction in enumerate(("call_and_ladj", "inverse_and_ladj")):
        apply = getattr(layer, direction)
        event = case.shape if direction == "call_and_ladj" else case.codomain_shape
        out_event = output_shape(case, direction)
        # x (k, n, *event) with context (n, C)
        x = direction_input(case, direction, (k, n), dtype, seed=9 + 10 * seed)
        ctx = context(case, (n,), dtype)
        out, ladj = apply(x, ctx)
        assert out.shape == (k, n) + out_event and ladj.shape == (k, n)
        ref, ref_ladj = apply(x.clone(), ctx.expand(k, n, case.context_features).clone())
        close(out, ref, 1e-12)
        close(ladj, ref_ladj, 1e-12)
        # x (*event) with context (n, C)
        x1 = direction_input(case, direction, (), dtype, seed=10 + 10 * seed)
        out, ladj = apply(x1, ctx)
        assert out.shape == (n,) + out_event and ladj.shape == (n,)
        ref, ref_ladj = apply(x1.expand((n,) + event).clone(), ctx.clone())
        close(out, ref, 1e-12)
        close(ladj, ref_ladj, 1e-12)
        # different contexts give different outputs for the same x (the context is used)
        assert (out[0] - out[1]).abs().max() > 1e-6
        # x (n, *event) with context (C,)
        xn = direction_input(case, direction, (n,), dtype, seed=11 + 10 * seed)
        c1 = context(case, (), dtype)
        out, ladj = apply(xn, c1)
        assert out.shape == (n,) + out_event and ladj.shape == (n,)
        ref, ref_ladj = apply(xn.clone(), c1.expand(n, case.context_features).clone())
        close(out, ref, 1e-12)
        close(ladj, ref_ladj, 1e-12)

    # the same through Pyro's conditioned transform
    ctx = context(case, (n,), dtype)
    t = layer.condition(ctx)
    x1 = domain_input(case, (), dtype, seed=12)
    y = t(x1)
    assert y.shape == (n,) + case.codomain_shape and tuple(t.forward_shape(x1.shape)) == (n,) + case.codomain_shape
    assert t.log_abs_det_jacobian(x1, y).shape == (n,)
    assert t(domain_input(case, (k, n), dtype, seed=13)).shape == (k, n) + case.codomain_shape


# -- gradients --------------------------------------------------------------------------------------------------------
@all_cases
def test_gradients_reach_every_parameter(case):
    dtype = torch.float32
    layer = make(case, dtype)
    n = 12
    ctx = context(case, (n,), dtype)
    if ctx is not None:
        ctx.requires_grad_(True)
    x = domain_input(case, (n,), dtype, seed=14).requires_grad_(True)
    y0 = codomain_input(case, (n,), dtype, seed=15).requires_grad_(True)
    y, ladj = layer.call_and_ladj(x, ctx)
    xi, ladj_inv = layer.inverse_and_ladj(y0, ctx)
    loss = (y**2).mean() + ladj.mean() + (xi**2).mean() + ladj_inv.mean()
    loss.backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
        assert p.grad.abs().max() > 0, f"zero gradient for {name}"
    for name, v in (("x", x), ("y", y0), ("context", ctx)):
        if v is not None:
            assert v.grad is not None and torch.isfinite(v.grad).all(), name
            assert v.grad.abs().max() > 0, name
    if case.kind != "fixed":
        assert len(list(layer.parameters())) > 0


@all_cases
@pytest.mark.parametrize("terms", ["all", "log_dets"])
def test_gradients_match_finite_differences(case, terms):
    """Autograd's directional derivative (parameters, inputs and context together) equals a central difference."""
    dtype = torch.float64
    layer = make(case, dtype)
    n = 6
    ctx = context(case, (n,), dtype)
    x, y = domain_input(case, (n,), dtype, seed=32), codomain_input(case, (n,), dtype, seed=33)
    w1 = randn((n,) + case.codomain_shape, dtype, seed=34, std=1.0)  # weights of the forward outputs
    w2 = randn((n,) + case.shape, dtype, seed=35, std=1.0)  # and of the inverse outputs
    leaves = list(layer.parameters()) + [x, y] + ([ctx] if ctx is not None else [])
    generator = torch.Generator().manual_seed(36)
    direction = [torch.randn(t.shape, generator=generator, dtype=dtype) for t in leaves]

    def loss():
        out, ladj = layer.call_and_ladj(x.clone(), None if ctx is None else ctx.clone())
        back, ladj_inv = layer.inverse_and_ladj(y.clone(), None if ctx is None else ctx.clone())
        # weighted: constant log-dets must not cancel
        value = (ladj * first_entry(w1)).sum() + (ladj_inv * first_entry(w2)).sum()
        return value + (out * w1).sum() + (back * w2).sum() if terms == "all" else value

    for t in leaves:
        t.requires_grad_(True)
    value = loss()
    if not value.requires_grad:  # volume-preserving layers: constant log-dets
        assert terms == "log_dets" and (case.volume_preserving or case.kind == "fixed")
        return
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    analytic = sum(((g * v).sum() for g, v in zip(grads, direction, strict=True) if g is not None), torch.zeros(()))
    eps = 1e-6
    with torch.no_grad():
        for t, v in zip(leaves, direction, strict=True):
            t.add_(eps * v)
        plus = loss()
        for t, v in zip(leaves, direction, strict=True):
            t.sub_(2 * eps * v)
        minus = loss()
        for t, v in zip(leaves, direction, strict=True):
            t.add_(eps * v)
    numeric = (plus - minus) / (2 * eps)
    assert abs(numeric) > 1e-3 or terms == "log_dets" and case.volume_preserving
    assert abs(analytic - numeric) <= 1e-5 * (1 + abs(numeric)), (analytic.item(), numeric.item())


# -- TransformedDistribution ------------------------------------------------------------------------------------------
@all_cases
def test_transformed_distribution_log_prob_matches_hand_computation(case):
    dtype = torch.float64
    layer = make(case, dtype)
    n = 7
    base = base_distribution(case, dtype)
    ctx = context(case, (n,), dtype)
    if case.conditional:
        d = dist.ConditionalTransformedDistribution(base, [layer]).condition(ctx)
    else:
        d = dist.TransformedDistribution(base, [layer])
    assert tuple(d.event_shape) == case.codomain_shape
    y = codomain_input(case, (n,), dtype, seed=16)
    log_prob = d.log_prob(y)

    def inverse(v):
        return layer.inverse_and_ladj(v, ctx)[0]

    x = inverse(y.clone())
    expected = base.log_prob(x) + flat_slogdet_ladj(inverse, y.clone())
    close(log_prob, expected, 1e-9)

    # sampling works and its samples have finite densities
    if case.conditional:
        s = d.rsample()
        assert s.shape == (n,) + case.codomain_shape
    else:
        s = d.rsample((4,))
        assert s.shape == (4,) + case.codomain_shape
    assert torch.isfinite(d.log_prob(s)).all()
    assert torch.isfinite(d.log_prob(s.clone())).all()


@conditional_cases
def test_conditional_transformed_distribution_depends_on_context(case):
    dtype = torch.float64
    layer = make(case, dtype)
    cd = dist.ConditionalTransformedDistribution(base_distribution(case, dtype), [layer])
    y = codomain_input(case, (4,), dtype, seed=17)
    lp1 = cd.condition(context(case, (4,), dtype, seed=1)).log_prob(y)
    lp2 = cd.condition(context(case, (4,), dtype, seed=2)).log_prob(y)
    assert lp1.shape == (4,) and (lp1 - lp2).abs().max() > 1e-6
    # a single context (C,) broadcasts against a batch of values
    c1 = context(case, (), dtype, seed=3)
    close(cd.condition(c1).log_prob(y), cd.condition(c1.expand(4, case.context_features)).log_prob(y.clone()), 1e-12)


# -- dtype ------------------------------------------------------------------------------------------------------------
@all_cases
def test_follows_dtype_and_works_in_float64(case):
    layer32 = make(case, torch.float32)
    layer = copy.deepcopy(layer32)
    layer.to(torch.float64)
    fresh32 = make(case, torch.float32)
    for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
        ref = dict(list(fresh32.named_parameters()) + list(fresh32.named_buffers()))[name]
        if ref.is_floating_point():
            assert t.dtype == torch.float64, f"{name} did not follow .to(float64)"
            close(t, ref.double(), 0.0)
        else:
            assert t.dtype == ref.dtype, f"{name} ({ref.dtype}) changed dtype"
    n = 6
    ctx = context(case, (n,), torch.float64)
    x = domain_input(case, (n,), torch.float64, seed=18)
    y, ladj = layer.call_and_ladj(x, ctx)
    assert y.dtype == torch.float64 and ladj.dtype == torch.float64
    close(layer.inverse_and_ladj(y.clone(), ctx)[0], x, 1e-10)
    # the float64 layer computes the same function as the float32 one
    ctx32 = None if ctx is None else ctx.float()
    y32, ladj32 = layer32.call_and_ladj(x.float(), ctx32)
    close(y32.double(), y, 1e-4)
    close(ladj32.double(), ladj, 1e-4)
    # and back to float32
    layer.to(torch.float32)
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    assert layer.call_and_ladj(x.float(), ctx32)[0].dtype == torch.float32


# -- errors -----------------------------------------------------------------------------------------------------------
@conditional_cases
def test_conditional_layer_without_context_raises(case):
    layer = make(case)
    x = domain_input(case, (4,), torch.float32)
    y = codomain_input(case, (4,), torch.float32)
    for call in (
        lambda: layer(x),
        lambda: layer.inv(y),
        lambda: layer.log_abs_det_jacobian(x, y),
        lambda: layer.call_and_ladj(x),
        lambda: layer.inverse_and_ladj(y),
    ):
        with pytest.raises(ValueError, match="conditional"):
            call()
    with pytest.raises(ValueError):
        dist.TransformedDistribution(base_distribution(case, torch.float32), [layer]).log_prob(y)
    # a context of the wrong size or dtype is a ValueError too
    features = case.context_features
    with pytest.raises(ValueError, match=rf"\(\.\.\., {features}\)"):
        layer.call_and_ladj(x, torch.zeros(4, features + 1))
    with pytest.raises(ValueError, match=rf"\(\.\.\., {features}\)"):
        layer.condition(torch.zeros(4, features + 1))
    with pytest.raises(ValueError, match="dtype"):
        layer.call_and_ladj(x, torch.zeros(4, features, dtype=torch.float64))


@pytest.mark.parametrize("case", UNCONDITIONAL, ids=repr)
def test_unconditional_layer_with_context_raises(case):
    layer = make(case)
    x = domain_input(case, (4,), torch.float32)
    y = codomain_input(case, (4,), torch.float32)
    with pytest.raises(ValueError, match="unconditional"):
        layer.call_and_ladj(x, torch.zeros(4, C))
    with pytest.raises(ValueError, match="unconditional"):
        layer.inverse_and_ladj(y, torch.zeros(4, C))


def _shape_message(expected: tuple, got: tuple) -> str:
    """The pattern of a wrong-shape error: it names the expected event shape and the shape it got."""
    return re.escape(f"(..., {', '.join(map(str, expected))})") + ".*" + re.escape(str(got))


@all_cases
def test_wrong_event_shape_raises_naming_the_shape(case):
    layer = make(case)
    ctx = context(case, (4,), torch.float32)
    t = pyro_transform(layer, ctx)
    for direction, pyro_call in (("call_and_ladj", t), ("inverse_and_ladj", t.inv)):
        event = case.shape if direction == "call_and_ladj" else case.codomain_shape
        bad_shape = (4,) + event[:-1] + (event[-1] + 1,)  # one entry too many in the last dim
        bad = randn(bad_shape, torch.float32)
        with pytest.raises(ValueError, match=_shape_message(event, bad_shape)):
            getattr(layer, direction)(bad, ctx)
        with pytest.raises(ValueError, match=_shape_message(event, bad_shape)):
            pyro_call(bad)
    with pytest.raises(ValueError, match=_shape_message(case.shape, ())):
        layer.call_and_ladj(torch.tensor(1.0), ctx)
    if case.event_dim > 1:  # an image with the dims in the wrong order
        wrong_order = (4,) + case.shape[::-1]
        if wrong_order != (4,) + case.shape:
            with pytest.raises(ValueError, match=_shape_message(case.shape, wrong_order)):
                layer.call_and_ladj(randn(wrong_order, torch.float32), ctx)


# -- stale cache (pyro #2564) ------------------------------------------------------------------------------------------
# Each check calls the layer with the SAME tensor object first (the cache is one slot: a reference computed on the
# original layer beforehand would evict the entry under test), then compares with a reference from an independent copy.
def reference(layer, direction, value, ctx):
    other = copy.deepcopy(layer)  # its own (empty) cache, same parameters
    return getattr(other, direction)(value.clone(), None if ctx is None else ctx.clone())


def _step(layer, loss):
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@parametric_cases
@pytest.mark.parametrize("entry", ["call", "ladj_new_y", "ladj_old_y", "inv", "fused"])
def test_no_stale_cache_after_optimizer_step(case, entry):
    layer = make(case)
    n = 8
    ctx = context(case, (n,), torch.float32)
    t = pyro_transform(layer, ctx)
    x = domain_input(case, (n,), torch.float32, seed=19)
    y_data = codomain_input(case, (n,), torch.float32, seed=20)

    y = t(x)
    ladj = t.log_abs_det_jacobian(x, y)
    x_of_data = t.inv(y_data)
    if entry == "inv":  # the last cached pair is the one under test
        y, x_of_data = t(x), t.inv(y_data)
    _step(layer, (y**2).mean() + ladj.mean() + (x_of_data**2).mean())

    if entry == "call":
        got = t(x)
        expected = reference(layer, "call_and_ladj", x, ctx)[0]
        old = y
    elif entry == "ladj_new_y":  # Pyro: y = t(x); t.log_abs_det_jacobian(x, y)
        y_new = t(x)
        got = t.log_abs_det_jacobian(x, y_new)
        expected = reference(layer, "call_and_ladj", x, ctx)[1]
        old = ladj
    elif entry == "ladj_old_y":  # the pair (x, y) cached before the step must not be served
        got = t.log_abs_det_jacobian(x, y)
        expected = reference(layer, "call_and_ladj", x, ctx)[1]
        old = ladj
    elif entry == "inv":
        got = t.inv(y_data)
        expected = reference(layer, "inverse_and_ladj", y_data, ctx)[0]
        old = x_of_data
    else:
        got = layer.call_and_ladj(x, ctx)[0]
        expected = reference(layer, "call_and_ladj", x, ctx)[0]
        old = y
    if not (entry.startswith("ladj") and case.volume_preserving):
        assert (expected - old).abs().max() > 1e-4, "the step did not change the layer: vacuous"
    close(got, expected, 0.0)


@parametric_cases
def test_transformed_distribution_log_prob_not_stale_after_optimizer_step(case):
    """pyro #2564: log_prob of the same data tensor after a step must use the new parameters."""
    layer = make(case)
    n = 8
    base = base_distribution(case, torch.float32)
    ctx = context(case, (n,), torch.float32)
    if case.conditional:
        d = dist.ConditionalTransformedDistribution(base, [layer]).condition(ctx)
    else:
        d = dist.TransformedDistribution(base, [layer])
    data = codomain_input(case, (n,), torch.float32, seed=21)
    lp = d.log_prob(data)
    _step(layer, -lp.mean())
    lp_new = d.log_prob(data)
    x, ladj = reference(layer, "inverse_and_ladj", data, ctx)
    expected = base.log_prob(x) + ladj
    assert (expected - lp).abs().max() > 1e-4
    close(lp_new, expected, 1e-5)


@parametric_cases
def test_clear_cache_after_parameter_data_update(case):
    """Writes through ``.data`` (``p.data -= lr * p.grad``) are invisible to PyTorch's version counters:
    the documented remedy is ``clear_cache()``, after which nothing stale is served."""
    layer = make(case)
    n = 8
    ctx = context(case, (n,), torch.float32)
    t = pyro_transform(layer, ctx)
    x = domain_input(case, (n,), torch.float32, seed=22)
    y = t(x)
    (y**2).mean().backward()
    for p in layer.parameters():
        p.data.sub_(0.1 * p.grad)
    layer.clear_cache()
    got = t(x)
    expected = reference(layer, "call_and_ladj", x, ctx)[0]
    assert (expected - y).abs().max() > 1e-4
    close(got, expected, 0.0)


def _load_state_dict_then_call(case, assign):
    n = 8
    layer = make(case, seed=0)
    other = make(case, seed=5)
    ctx = context(case, (n,), torch.float32)
    t = pyro_transform(layer, ctx)
    x = domain_input(case, (n,), torch.float32, seed=23)
    y = t(x)
    layer.load_state_dict(other.state_dict(), assign=assign)
    got = t(x)
    expected = other.call_and_ladj(x.clone(), ctx)[0]
    assert (expected - y).abs().max() > 1e-4
    close(got, expected, 0.0)


@parametric_cases
def test_no_stale_cache_after_load_state_dict(case):
    _load_state_dict_then_call(case, assign=False)


@parametric_cases
def test_no_stale_cache_after_load_state_dict_with_assign(case):
    """``load_state_dict(..., assign=True)`` swaps in new parameter tensors (whose version counters may coincide)."""
    _load_state_dict_then_call(case, assign=True)


@parametric_cases
@pytest.mark.parametrize("direction", ["call_and_ladj", "inverse_and_ladj"])
def test_cache_does_not_serve_no_grad_values_under_autograd(case, direction):
    """A value computed under ``torch.no_grad()`` (e.g. a validation pass) must not be served to a training pass."""
    layer = make(case)
    n = 8
    ctx = context(case, (n,), torch.float32)
    x = direction_input(case, direction, (n,), torch.float32, seed=24)
    apply = getattr(layer, direction)
    with torch.no_grad():
        apply(x, ctx)
    out, _ = apply(x, ctx)  # the same x object, now with autograd on
    assert out.requires_grad, "served a value without a graph"
    (out**2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in layer.parameters())
    # Pyro's entry points: the other direction of a pair stored under no_grad is recomputed with a graph
    t = pyro_transform(layer, ctx)
    there, back = (t, t.inv) if direction == "call_and_ladj" else (t.inv, t)
    with torch.no_grad():
        out = there(x)
    assert back(out).requires_grad, "served a value without a graph"
    if not case.volume_preserving:
        assert t.log_abs_det_jacobian(*((x, out) if direction == "call_and_ladj" else (out, x))).requires_grad


@all_cases
def test_no_stale_cache_after_input_modified_in_place(case):
    layer = make(case)
    n = 8
    ctx = context(case, (n,), torch.float32)
    t = pyro_transform(layer, ctx)
    x = domain_input(case, (n,), torch.float32, seed=25)
    y = t(x)
    with torch.no_grad():
        x.mul_(0.5)
    got = t(x)
    close(got, reference(layer, "call_and_ladj", x, ctx)[0], 0.0)
    assert (got - y).abs().max() > 1e-4


@conditional_cases
def test_no_stale_cache_after_context_modified_in_place(case):
    layer = make(case)
    n = 8
    ctx = context(case, (n,), torch.float32)
    t = layer.condition(ctx)
    x = domain_input(case, (n,), torch.float32, seed=26)
    y = t(x)
    with torch.no_grad():
        ctx.add_(1.0)
    got = t(x)
    expected = reference(layer, "call_and_ladj", x, ctx)[0]
    assert (expected - y).abs().max() > 1e-4
    close(got, expected, 0.0)


@conditional_cases
def test_cache_hit_returns_the_broadcast_shape(case):
    """``t.inv(t(x))`` has the shape of ``t(x)``, whether or not the cache answers."""
    dtype = torch.float64
    layer = make(case, dtype)
    t = layer.condition(context(case, (3,), dtype))
    x = domain_input(case, (), dtype, seed=27)
    y = t(x)
    assert y.shape == (3,) + case.codomain_shape
    cached = t.inv(y)  # the cache holds (x, y): it must not answer with x's shape (*event,)
    assert cached.shape == (3,) + case.shape
    fresh = t.inv(y.clone())
    assert fresh.shape == (3,) + case.shape
    close(cached, fresh, 1e-10)


def test_batchnorm_cache_respects_train_eval_switch():
    layer = make(Case("BatchNorm", lambda: T.BatchNorm(D), kind="batchnorm"))
    y = randn((32, D), torch.float32, seed=28)
    layer.train()
    x_train = layer.inv(y)
    layer.eval()
    x_eval = layer.inv(y)
    close(x_eval, layer.inverse_and_ladj(y.clone())[0], 0.0)
    assert (x_eval - x_train).abs().max() > 1e-3
    # training mode standardises the batch
    close(x_train.mean(0), layer.beta.detach(), 1e-4)


def test_train_eval_switch_is_not_served_a_stale_inverse():
    """The inverse of a sample drawn in eval mode (running statistics) is recomputed in training mode."""
    layer = make(Case("BatchNorm", lambda: T.BatchNorm(D), kind="batchnorm"))
    x = randn((32, D), torch.float32, seed=31)
    y = layer(x)  # eval mode: the pair (x, y) is stored
    assert layer.inv(y) is x  # ... and served
    layer.train()
    expected = copy.deepcopy(layer).inverse_and_ladj(y.clone())[0]  # training mode: the batch's statistics
    got = layer.inv(y)
    close(got, expected, 0.0)
    assert (got - x).abs().max() > 1e-3


@all_cases
def test_fused_directions_store_nothing(case):
    """FlowDistribution's path: ``call_and_ladj`` / ``inverse_and_ladj`` keep no tensor alive on any layer."""
    layer = make(case)
    layer.clear_cache()  # make() warms data-dependent layers through Pyro's entry points
    n = 4
    ctx = context(case, (n,), torch.float32)
    y, _ = layer.call_and_ladj(domain_input(case, (n,), torch.float32, seed=37), ctx)
    layer.inverse_and_ladj(y, ctx)
    layer.inverse_and_ladj(codomain_input(case, (n,), torch.float32, seed=38), ctx)
    assert all(m._entry is None for m in layer.modules() if isinstance(m, T.FlowTransform))


def _count_directions(layer, monkeypatch) -> list:
    calls: list = []
    for direction in ("_forward", "_backward"):
        original = getattr(layer, direction)

        def counted(*args, _original=original, _direction=direction):
            calls.append(_direction)
            return _original(*args)

        monkeypatch.setattr(layer, direction, counted)
    return calls


@all_cases
def test_pyro_scores_a_sample_without_the_inverse(case, monkeypatch):
    """Pyro's TransformedDistribution: ``log_prob`` of its own sample is served by the layer's entry (no inverse,
    sequential for an IAF layer) while nothing changed, and recomputed after an optimizer step."""
    layer = make(case)
    n = 6
    base = base_distribution(case, torch.float32)
    ctx = context(case, (n,), torch.float32)
    d = (
        dist.ConditionalTransformedDistribution(base, [layer]).condition(ctx)
        if case.conditional
        else dist.TransformedDistribution(base.expand((n,)), [layer])
    )
    inverted = isinstance(layer, T.Inverse)  # whose entry is its layer's
    calls = _count_directions(layer.layer if inverted else layer, monkeypatch)
    y = d.rsample()
    log_prob = d.log_prob(y)
    assert calls == ["_backward" if inverted else "_forward"], calls
    monkeypatch.undo()
    x, ladj = reference(layer, "inverse_and_ladj", y, ctx)
    close(log_prob, base.log_prob(x) + ladj, 1e-4)
    if case.kind != "fixed":
        _step(layer, -log_prob.mean() + y.square().mean())
        x, ladj = reference(layer, "inverse_and_ladj", y, ctx)
        expected = base.log_prob(x) + ladj
        assert (expected - log_prob).abs().max() > 1e-4, "the step did not change the density: vacuous"
        close(d.log_prob(y), expected, 0.0)


def test_import_registers_no_global_hooks_and_changes_no_global_state():
    """Importing the package leaves torch's process-wide module hooks, RNG, validation flag and dtype alone."""
    code = """if True:
        import json, torch, pyro
        from torch.nn.modules import module as m
        def state():
            hooks = {n: len(getattr(m, n)) for n in dir(m) if n.startswith("_global") and n.endswith("hooks")}
            return hooks, torch.random.get_rng_state().tolist(), torch.distributions.Distribution._validate_args, str(
                torch.get_default_dtype()
            )
        before = state()
        import pyro_flows, pyro_flows.transforms
        print(json.dumps([before, state(), sorted(before[0])]))
    """
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after, names = json.loads(result.stdout)
    assert {"_global_parameter_registration_hooks", "_global_module_registration_hooks"} <= set(names)
    assert "_global_buffer_registration_hooks" in names
    assert after == before


# -- copying and serialisation ----------------------------------------------------------------------------------------
@all_cases
def test_deepcopy_and_pickle_after_a_call(case):
    layer = make(case)
    n = 8
    ctx = context(case, (n,), torch.float32)
    x = domain_input(case, (n,), torch.float32, seed=29)
    y_data = codomain_input(case, (n,), torch.float32, seed=29)
    y, ladj = layer.call_and_ladj(x, ctx)
    xi, ladj_inv = layer.inverse_and_ladj(y_data, ctx)
    t = pyro_transform(layer, ctx)
    t.inv(t(x.clone()))  # fills the cache of Pyro's entry points
    assert any(m._entry is not None for m in layer.modules() if isinstance(m, T.FlowTransform))
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert type(clone) is type(layer)
        assert all(m._entry is None for m in clone.modules() if isinstance(m, T.FlowTransform)), "cache copied"
        y2, ladj2 = clone.call_and_ladj(x, ctx)
        close(y2, y, 0.0)
        close(ladj2, ladj, 0.0)
        xi2, ladj_inv2 = clone.inverse_and_ladj(y_data, ctx)
        close(xi2, xi, 0.0)
        close(ladj_inv2, ladj_inv, 0.0)
        # the copy is independent: changing it changes neither the original nor its cache
        if case.kind != "fixed":
            perturb(clone, seed=9)
            close(clone.call_and_ladj(x, ctx)[0], clone.call_and_ladj(x.clone(), ctx)[0], 0.0)
            assert (clone.call_and_ladj(x.clone(), ctx)[0] - y).abs().max() > 1e-4
            close(layer.call_and_ladj(x.clone(), ctx)[0], y, 0.0)


@all_cases
def test_state_dict_round_trip(case):
    layer = make(case, seed=0)
    fresh = make(case, seed=3, perturbed=False)
    missing, unexpected = fresh.load_state_dict(layer.state_dict())
    assert not missing and not unexpected
    fresh.train(layer.training)
    n = 8
    ctx = context(case, (n,), torch.float32)
    for direction in ("call_and_ladj", "inverse_and_ladj"):
        x = direction_input(case, direction, (n,), torch.float32, seed=30)
        out, ladj = getattr(layer, direction)(x.clone(), ctx)
        out2, ladj2 = getattr(fresh, direction)(x.clone(), ctx)
        close(out2, out, 0.0)
        close(ladj2, ladj, 0.0)


# -- sign of the determinant (issue 16 item 12) -----------------------------------------------------------------------
def _autograd_det_sign(fn, x: torch.Tensor, ctx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per sample, the sign of ``torch.linalg.det`` of the autograd Jacobian of ``fn(v, c)`` (events flattened)."""
    signs = []
    for i in range(x.shape[0]):
        c = None if ctx is None else ctx[i : i + 1]
        jacobian = torch.autograd.functional.jacobian(lambda v, c=c: fn(v, c).flatten(), x[i : i + 1])
        det = torch.linalg.det(jacobian.reshape(jacobian.shape[0], -1))
        assert det != 0
        signs.append(det.sign())
    return torch.stack(signs)


@all_cases
def test_sign_matches_the_autograd_jacobian(case):
    """``sign`` is what torch's Transform promises (the sign of the Jacobian's determinant), for both directions and
    for the transform Pyro's conditional distributions use."""
    layer = make(case, torch.float64)
    ctx = context(case, (3,), torch.float64)
    x = domain_input(case, (3,), torch.float64, seed=3)
    y = codomain_input(case, (3,), torch.float64, seed=4)
    for transform, fn, value in (
        (layer, lambda v, c: layer.call_and_ladj(v, c)[0], x),
        (layer.inv, lambda v, c: layer.inverse_and_ladj(v, c)[0], y),
    ):
        expected = _autograd_det_sign(fn, value, ctx)
        assert (expected == transform.sign).all(), (transform.sign, expected)
        assert pyro_transform(transform, ctx).sign == transform.sign


def _negative_lu(layer):
    with torch.no_grad():
        if layer.lu.det_sign() > 0:
            layer.lu.sign[0] = -layer.lu.sign[0]
    return layer


@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda: T.Permute(3), -1),  # reversing 3 is one transposition
        (lambda: T.Permute(5, [1, 0, 2, 3, 4]), -1),
        (lambda: T.Permute(5, [1, 2, 0, 4, 3]), -1),  # a 3-cycle and a transposition
        (lambda: T.Permute(4), 1),
        (lambda: _negative_lu(T.LULinear(4)), -1),
        (lambda: _negative_lu(T.InvertibleConv1x1((3, 3, 3))), -1),  # (det W)^9
        (lambda: _negative_lu(T.InvertibleConv1x1((3, 2, 2))), 1),  # (det W)^4
        (lambda: T.Chain([T.Permute(3), T.AffineCoupling(3, hidden=(8,))]), -1),
        (lambda: T.Chain([T.Permute(3), T.Permute(3, [1, 0, 2])]), 1),
        (lambda: T.Squeeze((2, 4, 6)), 1),
    ],
    ids=[
        "Permute3",
        "transposition",
        "cycles",
        "Permute4",
        "LULinear",
        "Conv1x1-odd",
        "Conv1x1-even",
        "Chain",
        "Chain2",
        "Squeeze",
    ],
)
def test_sign_of_layers_with_negative_determinants(build, expected):
    """Layers whose determinant can be negative say so (they all claimed +1): the sign is the permutation's parity,
    the LU weight's determinant sign (to the power H W for the 1x1 convolution), a chain's product."""
    torch.manual_seed(0)
    layer = build().double()
    x = torch.randn((2,) + tuple(layer.event_shape), dtype=torch.float64)
    assert (_autograd_det_sign(lambda v, c: layer.call_and_ladj(v)[0], x) == expected).all()
    assert layer.sign == expected and layer.inv.sign == expected

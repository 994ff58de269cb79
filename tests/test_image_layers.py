"""The math of single image layers, against independent computations.

InvertibleConv1x1 against ``torch.linalg.slogdet`` and ``conv2d``; Squeeze against an index-by-index hand
permutation; coupling masks against the autograd Jacobian's structure; ActNorm's data initialisation against the
per-channel moments; Glow's split prior against the Gaussian density built from its conditioner's raw outputs; Logit
against its closed form. Plus bad-input errors, float64 end to end and context broadcasting. The shared contract
(round trips, autograd log-dets, caching, ...) of these layers is in test_contract.py.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from conftest import perturb, slogdet_ladj
from torch.distributions import constraints

from pyro_flows import transforms as T

SHAPE, HIDDEN, CONTEXT = (2, 4, 4), (8, 8), 3


def draw(shape, seed: int = 0, std: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (std * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)


def perturbed(layer: T.FlowTransform, seed: int = 0, scale: float = 0.2) -> T.FlowTransform:
    """``layer`` in float64 with seeded noise on every parameter (fresh couplings are the identity)."""
    return perturb(layer, scale=scale, seed=seed).double()


def standard_normal(shape) -> dist.Distribution:
    zeros = torch.zeros(shape, dtype=torch.float64)
    return dist.Normal(zeros, torch.ones_like(zeros)).to_event(len(shape))


def flat_log_det(fn, x: torch.Tensor) -> torch.Tensor:
    """``log|det d fn/dx|`` per sample of ``x`` (n, *event) by autograd on the flattened map."""
    n, event = x.shape[0], x.shape[1:]
    return slogdet_ladj(lambda v: fn(v.reshape((n,) + event)).reshape(n, -1), x.reshape(n, -1))


# -- InvertibleConv1x1 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 4, 4), (4, 2, 6)], ids=str)
def test_invertible_conv_is_a_conv2d_with_log_det_hw_log_abs_det_weight(shape):
    torch.manual_seed(0)
    layer = perturbed(T.InvertibleConv1x1(shape), scale=0.3)
    weight = layer.lu.weight().detach()
    x = draw((5,) + shape, seed=1)
    y, ladj = layer.call_and_ladj(x)
    close_to = dict(atol=1e-12, rtol=0)
    torch.testing.assert_close(y, F.conv2d(x, weight[:, :, None, None]), **close_to)
    sign, logabsdet = torch.linalg.slogdet(weight)
    assert sign != 0 and abs(logabsdet.item()) > 0.1, "weight too close to a rotation: the log-det check is weak"
    height, width = shape[1:]
    torch.testing.assert_close(ladj, (height * width * logabsdet).expand(5), **close_to)
    x_back, ladj_inv = layer.inverse_and_ladj(y.clone())
    torch.testing.assert_close(x_back, F.conv2d(y, torch.linalg.inv(weight)[:, :, None, None]), atol=1e-10, rtol=0)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(ladj_inv, -ladj, **close_to)


def test_invertible_conv_shares_lu_math_with_lulinear():
    """Per pixel, the 1x1 convolution is LULinear's matrix (same LUWeight state, LULinear's bias zero)."""
    torch.manual_seed(0)
    conv = perturbed(T.InvertibleConv1x1((3, 2, 2)), scale=0.3)
    linear = T.LULinear(3).double()
    linear.lu.load_state_dict(conv.lu.state_dict())
    x = draw((4, 3, 2, 2), seed=2)
    y, ladj = conv.call_and_ladj(x)
    y_rows, ladj_rows = linear.call_and_ladj(x.movedim(1, -1).reshape(-1, 3))
    torch.testing.assert_close(y.movedim(1, -1).reshape(-1, 3), y_rows, atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj, 4 * ladj_rows[:4], atol=1e-12, rtol=0)


# -- Squeeze ----------------------------------------------------------------------------------------------------------
def test_squeeze_is_the_space_to_depth_permutation():
    shape = (2, 4, 6)
    layer = T.Squeeze(shape)
    assert tuple(layer.codomain_shape) == (8, 2, 3)
    x = torch.arange(2 * 4 * 6, dtype=torch.float64).reshape(shape)
    expected = torch.empty(8, 2, 3, dtype=torch.float64)
    for c in range(2):
        for i in range(2):
            for j in range(2):
                for h in range(2):
                    for w in range(3):
                        expected[4 * c + 2 * i + j, h, w] = x[c, 2 * h + i, 2 * w + j]
    y, ladj = layer.call_and_ladj(x)
    assert torch.equal(y, expected) and ladj.shape == () and ladj == 0
    # the documented example: the first output pixel holds the top-left 2x2 block
    one_channel = T.Squeeze((1, 4, 4))(torch.arange(16.0).reshape(1, 4, 4))
    assert one_channel[:, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    # the inverse (and Squeeze.inv, depth to space) undo it exactly, on a batch
    batch = torch.stack([x, -x, 2 * x])
    squeezed = layer.call_and_ladj(batch)[0]
    assert torch.equal(layer.inverse_and_ladj(squeezed.clone())[0], batch)
    unsqueeze = layer.inv
    assert tuple(unsqueeze.event_shape) == (8, 2, 3) and tuple(unsqueeze.codomain_shape) == shape
    assert torch.equal(unsqueeze(expected), x)


# -- coupling masks ---------------------------------------------------------------------------------------------------
def test_mask_constructors():
    board = T.checkerboard_mask((2, 3, 3))
    assert board.shape == (2, 3, 3) and board.dtype == torch.bool
    assert board[0].tolist() == [[False, True, False], [True, False, True], [False, True, False]]
    assert torch.equal(board[0], board[1])  # the same in every channel
    assert torch.equal(T.checkerboard_mask((2, 3, 3), parity=1), ~board)
    assert T.channel_mask(4).tolist() == [False, False, True, True]
    assert T.channel_mask(4, parity=1).tolist() == [True, True, False, False]
    assert T.channel_mask(3).tolist() == [False, True, True]


COUPLINGS = {
    "affine": lambda shape, **kw: T.AffineCoupling(shape, hidden=HIDDEN, **kw),
    "additive": lambda shape, **kw: T.AdditiveCoupling(shape, hidden=HIDDEN, **kw),
    "spline": lambda shape, **kw: T.SplineCoupling(shape, hidden=HIDDEN, bins=4, bound=3.0, **kw),
}
MASKS = {
    "channel": lambda shape: T.channel_mask(shape[0]),
    "channel-parity": lambda shape: T.channel_mask(shape[0], parity=1),
    "checkerboard": lambda shape: T.checkerboard_mask(shape),
    "checkerboard-parity": lambda shape: T.checkerboard_mask(shape, parity=1),
}


def _entrywise(mask: torch.Tensor, shape) -> torch.Tensor:
    """A (C,) channel mask or a (C, H, W) pixel mask as a (C, H, W) mask of the transformed entries."""
    return mask if mask.shape == shape else mask[:, None, None].expand(shape)


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("coupling", list(COUPLINGS))
def test_coupling_masks_leave_the_identity_part_exactly_unchanged(coupling, mask_name):
    shape = (3, 4, 4)
    mask = MASKS[mask_name](shape)
    torch.manual_seed(0)
    layer = perturbed(COUPLINGS[coupling](shape, mask=mask))
    transformed = _entrywise(mask, shape)
    x = draw((2,) + shape, seed=3).clamp(-2.5, 2.5)  # inside the spline's interval, where it is not the identity
    for direction in ("call_and_ladj", "inverse_and_ladj"):
        y = getattr(layer, direction)(x.clone())[0]
        assert torch.equal(y[:, ~transformed], x[:, ~transformed])  # bit for bit
        assert (y[:, transformed] - x[:, transformed]).abs().min() > 0, "some transformed entry did not move"
    # Jacobian structure: identity rows on the kept entries, diagonal on the transformed ones (a transformed entry
    # depends on the kept entries and on itself only)
    jacobian = torch.autograd.functional.jacobian(lambda v: layer.call_and_ladj(v)[0], x[0]).reshape(48, 48)
    kept, moved = ~transformed.flatten(), transformed.flatten()
    assert torch.equal(jacobian[kept][:, kept], torch.eye(int(kept.sum()), dtype=torch.float64))
    assert (jacobian[kept][:, moved] == 0).all()
    block = jacobian[moved][:, moved]
    assert (block - torch.diag(torch.diagonal(block)) == 0).all()
    assert (jacobian[moved][:, kept] != 0).any(), "the transformed entries do not depend on the kept ones"


def test_checkerboard_conditioner_never_sees_the_transformed_pixels():
    torch.manual_seed(0)
    mask = T.checkerboard_mask(SHAPE)
    layer = perturbed(T.AffineCoupling(SHAPE, mask=mask, hidden=HIDDEN))
    x = draw((1,) + SHAPE, seed=4)
    other = torch.where(mask, draw((1,) + SHAPE, seed=5), x)  # only the transformed pixels differ
    masked = layer.conditioner(x.masked_fill(mask, 0.0))
    assert torch.equal(layer.conditioner(other.masked_fill(mask, 0.0)), masked)
    # so the maps of the transformed pixels are the same for x and other: y - x is an affine function of x
    y, y_other = layer.call_and_ladj(x)[0], layer.call_and_ladj(other)[0]
    shift, raw = masked[0].unflatten(0, (2, 2))
    scale = torch.exp(raw / (1 + raw.abs() / 3.0))
    torch.testing.assert_close(y[0][mask], (x[0] * scale + shift)[mask], atol=1e-12, rtol=0)
    torch.testing.assert_close(y_other[0][mask], (other[0] * scale + shift)[mask], atol=1e-12, rtol=0)


def test_image_coupling_rejects_a_bad_mask():
    with pytest.raises(ValueError, match=r"mask must be a boolean \(2,\) or \(2, 4, 4\)"):
        T.AffineCoupling(SHAPE, mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="True entry"):
        T.AffineCoupling(SHAPE, mask=torch.zeros(SHAPE, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"features must be D, a signal shape \(C, L\) or an image shape"):
        T.AffineCoupling((1, 2, 4, 4))


# -- ActNorm ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("first_call", ["inverse", "forward"])
def test_actnorm_image_data_init_standardises_each_channel(first_call):
    shape = (3, 4, 5)
    layer = T.ActNorm(shape).double()
    loc = torch.tensor([1.0, -4.0, 10.0], dtype=torch.float64)[:, None, None]
    scale = torch.tensor([0.5, 3.0, 20.0], dtype=torch.float64)[:, None, None]
    values = loc + scale * draw((2, 50) + shape, seed=6)  # two batch dims
    first = layer.inv if first_call == "inverse" else layer
    out = first(values)
    mean = out.mean(dim=(0, 1, 3, 4))
    var = out.var(dim=(0, 1, 3, 4), unbiased=False)
    torch.testing.assert_close(mean, torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(var, torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)  # eps = 1e-6
    assert bool(layer.initialized)
    # one (scale, shift) per channel, shared by its H*W pixels: log|det J| = H W sum_c s_c
    x = draw((7,) + shape, seed=7)
    _, ladj = layer.call_and_ladj(x)
    torch.testing.assert_close(ladj, (20 * layer.log_scale.sum()).expand(7), atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj, flat_log_det(lambda v: layer.call_and_ladj(v)[0], x), atol=1e-9, rtol=0)
    # a second training-mode call does not re-initialise
    before = layer.log_scale.detach().clone()
    layer.inv(5 * values)
    assert torch.equal(layer.log_scale.detach(), before)


def test_actnorm_rejects_a_bad_shape():
    with pytest.raises(ValueError, match=r"image shape \(C, H, W\)"):
        T.ActNorm((2, 4))


# -- FactorOut --------------------------------------------------------------------------------------------------------
def _inner(kept_shape) -> T.FlowTransform:
    return T.AffineCoupling(kept_shape, mask=T.checkerboard_mask(kept_shape), hidden=HIDDEN)


@pytest.mark.parametrize("hidden", [HIDDEN, ()], ids=["cnn", "glow-conv2d-zeros"])
@pytest.mark.parametrize("shape", [(4, 4, 4), (3, 4, 4)], ids=str)
def test_split_prior_is_a_gaussian_with_the_conditioners_mean_and_scale(shape, hidden):
    """log p(y) = log p_inner(y_a) + log N(y_b; mu(y_a), e^{2 s(y_a)}), mu and s read off the prior's network."""
    channels = shape[0]
    kept = channels // 2
    kept_shape = (kept,) + shape[1:]
    torch.manual_seed(0)
    layer = perturbed(T.FactorOut(shape, _inner(kept_shape), hidden=hidden), scale=0.3)
    y = draw((6,) + shape, seed=8, std=1.5)
    log_prob = dist.TransformedDistribution(standard_normal(shape), [layer]).log_prob(y)

    kept_y, factored_y = y[:, :kept], y[:, kept:]
    raw = layer.prior.conditioner(kept_y).detach()  # (n, 2 * factored, H, W): shifts first, then raw log-scales
    factored = channels - kept
    mean, raw_log_scale = raw[:, :factored], raw[:, factored:]
    log_scale = raw_log_scale / (1 + raw_log_scale.abs() / 3.0)  # Affine's soft clamp, bound 3
    assert mean.abs().max() > 0.1 and log_scale.abs().max() > 0.1, "prior too close to N(0, I): a weak check"
    factored_log_prob = dist.Normal(mean, log_scale.exp()).log_prob(factored_y).sum(dim=(1, 2, 3))
    inner_log_prob = dist.TransformedDistribution(standard_normal(kept_shape), [layer.inner]).log_prob(kept_y)
    torch.testing.assert_close(log_prob, inner_log_prob + factored_log_prob, atol=1e-10, rtol=0)

    # sampling: the factored channels are mean + scale * noise given the kept ones
    z = draw((6,) + shape, seed=9)
    x, _ = layer.call_and_ladj(z)
    raw = layer.prior.conditioner(x[:, :kept]).detach()
    log_scale = raw[:, factored:] / (1 + raw[:, factored:].abs() / 3.0)
    torch.testing.assert_close(x[:, kept:], raw[:, :factored] + log_scale.exp() * z[:, kept:], atol=1e-12, rtol=0)


def test_factor_out_without_split_prior_leaves_standard_normal_channels():
    shape = (4, 4, 4)
    torch.manual_seed(0)
    layer = perturbed(T.FactorOut(shape, _inner((2, 4, 4)), split_prior=False, hidden=HIDDEN))
    assert layer.prior is None
    y = draw((5,) + shape, seed=10, std=1.5)
    log_prob = dist.TransformedDistribution(standard_normal(shape), [layer]).log_prob(y)
    inner_log_prob = dist.TransformedDistribution(standard_normal((2, 4, 4)), [layer.inner]).log_prob(y[:, :2])
    factored = dist.Normal(0.0, 1.0).log_prob(y[:, 2:]).sum(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, inner_log_prob + factored, atol=1e-10, rtol=0)
    assert torch.equal(layer.call_and_ladj(y)[0][:, 2:], y[:, 2:])  # passed through untouched


@pytest.mark.parametrize("hidden", [HIDDEN, ()], ids=["cnn", "glow-conv2d-zeros"])
def test_fresh_split_prior_is_standard_normal(hidden):
    """The prior's network starts at zero: a fresh FactorOut models the factored channels as N(0, I)."""
    torch.manual_seed(0)
    layer = T.FactorOut((2, 4, 4), _inner((1, 4, 4)), hidden=hidden).double()
    y = draw((3, 2, 4, 4), seed=11)
    out, ladj = layer.prior.call_and_ladj(y)
    assert torch.equal(out, y) and torch.equal(ladj, torch.zeros(3, dtype=torch.float64))


def test_factor_out_rejects_mismatched_inner_layers():
    with pytest.raises(ValueError, match=r"inner must map events of shape \(2, 4, 4\).*got \(1, 4, 4\)"):
        T.FactorOut((4, 4, 4), _inner((1, 4, 4)))
    with pytest.raises(ValueError, match=r"\(2, 4, 4\) -> \(8, 2, 2\)"):
        T.FactorOut((4, 4, 4), T.Squeeze((2, 4, 4)))
    with pytest.raises(ValueError, match=r"C >= 2"):
        T.FactorOut((1, 4, 4), _inner((1, 4, 4)))
    conditional_inner = T.ConditionalAffineCoupling(
        (1, 4, 4), mask=T.checkerboard_mask((1, 4, 4)), context_features=2, hidden=HIDDEN
    )
    with pytest.raises(ValueError, match="context_features=2"):
        T.ConditionalFactorOut(SHAPE, conditional_inner, context_features=CONTEXT)


# -- Chain ------------------------------------------------------------------------------------------------------------
def test_chain_is_the_composition_of_its_layers():
    torch.manual_seed(0)
    layers = [
        T.AffineCoupling(SHAPE, hidden=HIDDEN),
        T.Squeeze(SHAPE),
        T.InvertibleConv1x1((8, 2, 2)),
        T.AdditiveCoupling((8, 2, 2), hidden=HIDDEN),
    ]
    chain = perturbed(T.Chain(layers))
    assert tuple(chain.event_shape) == SHAPE and tuple(chain.codomain_shape) == (8, 2, 2)
    x = draw((3,) + SHAPE, seed=12)
    y, ladj = chain.call_and_ladj(x)
    h, total = x, 0.0
    for layer in layers:
        h, step = layer.call_and_ladj(h.clone())
        total = total + step
    torch.testing.assert_close(y, h, atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj, total, atol=1e-12, rtol=0)


def test_chain_rejects_bad_layers():
    with pytest.raises(ValueError, match=r"Squeeze outputs events of shape \(8, 2, 2\).*AffineCoupling.*\(2, 4, 4\)"):
        T.Chain([T.Squeeze(SHAPE), T.AffineCoupling(SHAPE)])
    with pytest.raises(ValueError, match="at least one layer"):
        T.Chain([])
    with pytest.raises(ValueError, match="different context sizes"):
        T.ConditionalChain(
            [
                T.ConditionalAffineCoupling(SHAPE, context_features=2, hidden=HIDDEN),
                T.ConditionalAffineCoupling(SHAPE, context_features=3, hidden=HIDDEN),
            ]
        )
    with pytest.raises(ValueError, match="Conditional"):  # a conditional layer in an unconditional Chain
        T.Chain([T.ConditionalAffineCoupling(SHAPE, context_features=2, hidden=HIDDEN)])


def test_squeeze_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"even H and W, got \(2, 3, 4\)"):
        T.Squeeze((2, 3, 4))
    with pytest.raises(ValueError, match=r"even H and W, got \(2, 4, 5\)"):
        T.Squeeze((2, 4, 5))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        T.Squeeze((4, 4))
    with pytest.raises(ValueError, match=r"\(\.\.\., 2, 4, 4\), got \(3, 2, 4, 2\)"):
        T.Squeeze(SHAPE)(torch.zeros(3, 2, 4, 2))
    with pytest.raises(ValueError, match=r"\(\.\.\., 8, 2, 2\), got \(3, 2, 4, 4\)"):
        T.Squeeze(SHAPE).inv(torch.zeros(3, 2, 4, 4))


def test_invertible_conv_rejects_a_bad_shape():
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        T.InvertibleConv1x1((4,))


# -- Logit ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.05])
def test_logit_matches_its_closed_form(alpha):
    layer = T.Logit(SHAPE, alpha=alpha)
    x = draw((5,) + SHAPE, seed=13, std=3.0)
    y, ladj = layer.call_and_ladj(x)
    sigmoid = 1 / (1 + torch.exp(-x))
    torch.testing.assert_close(y, (sigmoid - alpha) / (1 - 2 * alpha), atol=1e-14, rtol=0)
    # dy/dx = sigma (1 - sigma) / (1 - 2 alpha) per entry
    expected = torch.log(sigmoid * (1 - sigmoid) / (1 - 2 * alpha)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(ladj, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(ladj, flat_log_det(lambda v: layer.call_and_ladj(v)[0], x), atol=1e-9, rtol=0)
    # data to base: x = logit(alpha + (1 - 2 alpha) y)
    data = torch.rand((5,) + SHAPE, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    base, ladj_inv = layer.inverse_and_ladj(data)
    s = alpha + (1 - 2 * alpha) * data
    torch.testing.assert_close(base, torch.log(s / (1 - s)), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        ladj_inv, -torch.log(s * (1 - s) / (1 - 2 * alpha)).sum(dim=(1, 2, 3)), atol=1e-10, rtol=0
    )


def test_logit_with_alpha_keeps_the_data_edges_finite():
    layer = T.Logit(4, alpha=0.05)
    x, ladj = layer.inverse_and_ladj(torch.tensor([0.0, 1.0, 0.5, 0.25], dtype=torch.float64))
    logits = [math.log(0.05 / 0.95), math.log(0.95 / 0.05), 0.0, math.log(0.275 / 0.725)]
    torch.testing.assert_close(x, torch.tensor(logits, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.isfinite(ladj)
    margin = 0.05 / 0.9
    assert layer.codomain.check(torch.tensor([-margin / 2, 0.0, 1.0, 1 + margin / 2])).item()
    assert not layer.codomain.check(torch.tensor([-2 * margin, 0.0, 1.0, 0.5])).item()


@pytest.mark.parametrize("bad", [1.5, -0.2, float("nan"), float("inf")])
def test_logit_rejects_data_outside_its_support(bad):
    layer = T.Logit(SHAPE, alpha=0.05)
    y = torch.full((2,) + SHAPE, 0.5)
    y[1, 0, 2, 3] = bad
    with pytest.raises(ValueError, match="outside its support"):
        layer.inverse_and_ladj(y)
    with pytest.raises(ValueError, match="outside its support"):
        base = dist.Normal(torch.zeros(SHAPE), 1.0).to_event(3)
        dist.TransformedDistribution(base, [layer], validate_args=False).log_prob(y)


def test_logit_without_alpha_rejects_the_edges_and_bad_alpha():
    with pytest.raises(ValueError, match="outside its support"):
        T.Logit(3, alpha=0.0).inverse_and_ladj(torch.tensor([0.0, 0.5, 0.5]))
    for alpha in (-0.1, 0.5):
        with pytest.raises(ValueError, match=r"alpha must be in \[0, 0.5\)"):
            T.Logit(3, alpha=alpha)
    with pytest.raises(ValueError, match=r"\(\.\.\., 2, 4, 4\), got \(2, 4, 4, 2\)"):
        T.Logit(SHAPE).inverse_and_ladj(torch.full((2, 4, 4, 2), 0.5))


def test_logit_inverse_has_the_interval_as_its_domain():
    """``Logit(...).inv`` (data -> base as a layer) maps the interval onto the reals: its constraints are swapped."""
    layer = T.Logit(SHAPE, alpha=0.05)
    for constraint, real in ((layer.codomain, False), (layer.inv.domain, False), (layer.inv.codomain, True)):
        assert constraint.event_dim == 3
        assert (constraint.base_constraint is constraints.real) == real
    assert layer.inv.domain.base_constraint.upper_bound == pytest.approx(1 + 0.05 / 0.9)
    uniform = dist.Uniform(torch.zeros(SHAPE), torch.ones(SHAPE)).to_event(3)
    assert dist.TransformedDistribution(uniform, [layer.inv]).support.base_constraint is constraints.real


# -- float64 end to end -----------------------------------------------------------------------------------------------
def _multiscale(shape=(1, 4, 4), context_features: int = 0) -> T.FlowTransform:
    """A small Glow-like base -> data stack: two scales, then Logit into the unit interval."""
    squeezed = (4 * shape[0],) + tuple(s // 2 for s in shape[1:])
    kept = (squeezed[0] // 2,) + squeezed[1:]
    conditional = {"context_features": context_features} if context_features else {}
    coupling = T.ConditionalAffineCoupling if context_features else T.AffineCoupling
    inner = T.Chain([T.ActNorm(kept), T.InvertibleConv1x1(kept), coupling(kept, hidden=HIDDEN, **conditional)])
    factor = (T.ConditionalFactorOut if context_features else T.FactorOut)(
        squeezed, inner, hidden=HIDDEN, **conditional
    )
    layers = [T.Squeeze(shape), factor, T.Squeeze(shape).inv, T.Logit(shape)]
    return (T.ConditionalChain if context_features else T.Chain)(layers)


def test_float64_end_to_end():
    torch.manual_seed(0)
    flow = perturbed(_multiscale(), scale=0.3).eval()  # eval: ActNorm keeps its (perturbed) parameters
    assert all(p.dtype == torch.float64 for p in flow.parameters())
    assert all(b.dtype == torch.float64 for b in flow.buffers() if b.is_floating_point())
    data = torch.rand((4, 1, 4, 4), generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    d = dist.TransformedDistribution(standard_normal((1, 4, 4)), [flow])
    log_prob = d.log_prob(data)
    assert log_prob.dtype == torch.float64

    def inverse(v):
        return flow.inverse_and_ladj(v)[0]

    z = inverse(data.clone())
    expected = standard_normal((1, 4, 4)).log_prob(z) + flat_log_det(inverse, data.clone())
    torch.testing.assert_close(log_prob, expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(flow.call_and_ladj(z.clone())[0], data, atol=1e-12, rtol=0)
    (-log_prob.mean()).backward()
    grads = [p.grad for p in flow.parameters()]
    assert all(g is not None and g.dtype == torch.float64 and torch.isfinite(g).all() for g in grads)
    sample = d.rsample((3,))
    assert sample.dtype == torch.float64 and sample.shape == (3, 1, 4, 4)
    assert ((sample > -0.06) & (sample < 1.06)).all()


# -- batch shapes and context broadcasting ----------------------------------------------------------------------------
CONDITIONAL_LAYERS = {
    "coupling-checkerboard": lambda: T.ConditionalAffineCoupling(
        SHAPE, mask=T.checkerboard_mask(SHAPE), context_features=CONTEXT, hidden=HIDDEN
    ),
    "spline-coupling-channel": lambda: T.ConditionalSplineCoupling(
        SHAPE, context_features=CONTEXT, hidden=HIDDEN, bins=4, bound=3.0
    ),
    "factor-out": lambda: T.ConditionalFactorOut(
        SHAPE,
        T.ConditionalAffineCoupling(
            (1, 4, 4), mask=T.checkerboard_mask((1, 4, 4)), context_features=CONTEXT, hidden=HIDDEN
        ),
        context_features=CONTEXT,
        hidden=HIDDEN,
    ),
    "chain": lambda: T.ConditionalChain(
        [
            T.Squeeze(SHAPE),
            T.ConditionalAffineCoupling((8, 2, 2), context_features=CONTEXT, hidden=HIDDEN),
            T.Squeeze(SHAPE).inv,
        ]
    ),
}


@pytest.mark.parametrize("name", list(CONDITIONAL_LAYERS))
def test_context_broadcasts_against_image_batches(name):
    """A (5, 1, 3) context with (4, C, H, W) inputs gives (5, 4, C, H, W) outputs and (5, 4) log-dets."""
    torch.manual_seed(0)
    layer = perturbed(CONDITIONAL_LAYERS[name]())
    ctx = draw((5, 1, CONTEXT), seed=16)
    x = draw((4,) + SHAPE, seed=17, std=2.0)
    for direction in ("call_and_ladj", "inverse_and_ladj"):
        out, ladj = getattr(layer, direction)(x, ctx)
        assert out.shape == (5, 4) + SHAPE and ladj.shape == (5, 4)
        for i in (0, 4):
            for j in (0, 3):
                ref, ref_ladj = getattr(layer, direction)(x[j : j + 1].clone(), ctx[i, 0].clone())
                torch.testing.assert_close(out[i, j], ref[0], atol=1e-12, rtol=0)
                torch.testing.assert_close(ladj[i, j], ref_ladj[0], atol=1e-12, rtol=0)
        assert (out[0] - out[4]).abs().max() > 1e-3, "the context is ignored"
    # through Pyro's conditional distribution: log_prob of (4, C, H, W) data under (5, 1, 3) contexts
    cd = dist.ConditionalTransformedDistribution(standard_normal(SHAPE), [layer])
    log_prob = cd.condition(ctx).log_prob(x)
    assert log_prob.shape == (5, 4)
    torch.testing.assert_close(
        log_prob[3], cd.condition(ctx[3, 0].expand(4, CONTEXT)).log_prob(x.clone()), atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("batch", [(), (3,), (2, 3)], ids=str)
def test_unconditional_image_layers_keep_batch_shapes(batch):
    torch.manual_seed(0)
    layers = [
        T.ActNorm(SHAPE),
        T.InvertibleConv1x1(SHAPE),
        T.AffineCoupling(SHAPE, mask=T.checkerboard_mask(SHAPE), hidden=HIDDEN),
        T.Squeeze(SHAPE),
        T.FactorOut(SHAPE, _inner((1, 4, 4)), hidden=HIDDEN),
        T.Logit(SHAPE),
    ]
    for layer in layers:
        layer = perturbed(layer).eval()  # eval: ActNorm keeps its (perturbed) parameters
        x = draw(batch + SHAPE, seed=18)
        y, ladj = layer.call_and_ladj(x)
        assert y.shape == batch + tuple(layer.codomain_shape) and ladj.shape == batch
        x_back, ladj_back = layer.inverse_and_ladj(y.clone())
        assert x_back.shape == batch + SHAPE and ladj_back.shape == batch
        torch.testing.assert_close(x_back, x, atol=1e-10, rtol=0)
        flat_y, flat_ladj = layer.call_and_ladj(x.reshape((-1,) + SHAPE).clone())
        torch.testing.assert_close(y, flat_y.reshape(y.shape), atol=1e-12, rtol=0)
        torch.testing.assert_close(ladj, flat_ladj.reshape(batch), atol=1e-12, rtol=0)


# -- Glow's split-prior network and the coupling's two-block split ----------------------------------------------------
def test_conv2d_zeros_is_one_linear_convolution_with_contexts():
    """Conv2dZeros = conv2d(x ++ resize(aligned), W, b) + A vector, against F.conv2d and F.interpolate by hand."""
    from pyro_flows.nn.cnn import Conv2dZeros

    net = perturb(Conv2dZeros(2, 3, context_features=4 + 2, context_shape=(1, 2, 2)), scale=0.3, seed=2).double()
    x, cond, vector = draw((5, 2, 4, 4), seed=1), draw((5, 1, 2, 2), seed=2), draw((5, 2), seed=3)
    out = net(x, torch.cat((cond.flatten(1), vector), -1))
    grown = F.interpolate(cond, size=(4, 4), mode="bilinear", align_corners=False)
    expected = F.conv2d(torch.cat((x, grown), 1), net.output.weight, net.output.bias, padding=1)
    expected = expected + (vector @ net.context_bias.weight.T + net.context_bias.bias)[:, :, None, None]
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    assert sum(p.numel() for p in net.parameters()) == 3 * 3 * 9 + 3 + 3 * 2 + 3
    fresh = Conv2dZeros(2, 3, context_features=2)(torch.randn(5, 2, 4, 4), torch.randn(5, 2))
    assert torch.equal(fresh, torch.zeros(5, 3, 4, 4))  # zero-initialised: a fresh split prior is N(0, I)


def test_glow_split_prior_is_glows_conv2d_zeros():
    """pf.Glow's split prior is one zero-initialised 3x3 convolution of the kept half, as in Glow's code."""
    import pyro_flows as pf
    from pyro_flows.nn.cnn import Conv2dZeros

    model = pf.Glow((1, 8, 8), levels=2, steps=1, hidden_channels=8, pixel_levels=None)
    priors = [m.prior for m in model.modules() if isinstance(m, T.FactorOut)]
    assert len(priors) == 1 and isinstance(priors[0].conditioner, Conv2dZeros)


@pytest.mark.parametrize("mask", [T.channel_mask(5), T.channel_mask(5, 1)], ids=["second-half", "first-half"])
def test_channel_coupling_blocks_match_the_gather_scatter_path(mask):
    """The narrow-and-cat path of a two-block channel mask equals the index_select / index_copy path, in both
    directions, with a context that broadcasts against the batch."""
    torch.manual_seed(0)
    layer = perturbed(T.ConditionalAffineCoupling((5, 4, 4), mask=mask, hidden=HIDDEN, context_features=CONTEXT))
    assert layer.blocks
    x, context = draw((3, 1, 5, 4, 4), seed=4), draw((2, CONTEXT), seed=5)
    fast = layer.call_and_ladj(x, context), layer.inverse_and_ladj(x, context)
    layer.blocks = False  # the general path, for any boolean mask
    slow = layer.call_and_ladj(x, context), layer.inverse_and_ladj(x, context)
    assert fast[0][0].shape == (3, 2, 5, 4, 4)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    interleaved = T.AffineCoupling((4, 4, 4), mask=torch.tensor([True, False, True, False]), hidden=HIDDEN)
    assert not interleaved.blocks  # not two blocks: gathers


# -- Glow's fused step: (1x1 convolution, ActNorm) pairs, the LU inverse, channels-last networks -----------------------
def _glow_step(shape=(4, 4, 4)) -> T.Chain:
    """Coupling, 1x1 convolution, ActNorm (base→data) and a second convolution: one fusable pair, one lone conv."""
    layers = [
        T.AffineCoupling(shape, hidden=HIDDEN),
        T.InvertibleConv1x1(shape),
        T.ActNorm(shape),
        T.InvertibleConv1x1(shape),
    ]
    return T.Chain(layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_chain_runs_conv_actnorm_pairs_as_one_exact_affine_map(dtype):
    """The fused (1x1 conv, ActNorm) path gives the layers' composition, both directions, and its log-det is the
    autograd Jacobian's; a fresh ActNorm still initialises from the first training call (layer by layer)."""
    torch.manual_seed(0)
    chain = perturbed(_glow_step()).to(dtype)
    conv, norm = chain.layers[1], chain.layers[2]
    assert [len(unit) for unit in chain._units()] == [1, 2, 1]
    norm.initialized.fill_(False)
    norm._seen_initialized = False
    data = (3.0 + 2.0 * draw((64, 4, 4, 4), seed=3)).to(dtype)
    z, _ = chain.inverse_and_ladj(data)  # training mode: the ActNorm initialises from these values
    assert bool(norm.initialized) and not norm.initializing()
    standardised = norm.inverse_and_ladj(chain.layers[3].inverse_and_ladj(data)[0])[0]
    assert standardised.mean((0, 2, 3)).abs().max() < 1e-4 and (standardised.std((0, 2, 3)) - 1).abs().max() < 1e-3
    tolerance = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    x = draw((5, 4, 4, 4), seed=4, dtype=dtype)
    y, ladj = chain.call_and_ladj(x)
    h, total = x, 0.0
    for layer in chain.layers:
        h, step = layer.call_and_ladj(h)
        total = total + step
    torch.testing.assert_close(y, h, **tolerance)
    torch.testing.assert_close(ladj, total, **tolerance)
    x_back, ladj_inv = chain.inverse_and_ladj(y)
    torch.testing.assert_close(x_back, x, **tolerance)
    torch.testing.assert_close(ladj_inv, -ladj, **tolerance)
    if dtype == torch.float64:
        torch.testing.assert_close(ladj, flat_log_det(lambda v: chain.call_and_ladj(v)[0], x), atol=1e-10, rtol=0)
        inverse = flat_log_det(lambda v: chain.inverse_and_ladj(v)[0], y)
        torch.testing.assert_close(ladj_inv, inverse, atol=1e-10, rtol=0)
    # the fused log-det is HW (sum log|u_cc| + sum s_c) for the pair
    pair = conv.call_and_ladj(x)[1] + norm.call_and_ladj(x)[1]
    torch.testing.assert_close(pair, 16 * (conv.lu.log_diagonal.sum() + norm.log_scale.sum()).expand(5), **tolerance)


def test_fused_pair_gradients_match_the_layers():
    """Gradients of every parameter through the fused pair equal those through the layers one after the other."""
    torch.manual_seed(0)
    chain = perturbed(_glow_step())
    chain.layers[2].initialized.fill_(True)
    y = draw((6, 4, 4, 4), seed=5).requires_grad_()

    def gradients(loss: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad(loss, [y, *chain.parameters()]))

    z, ladj = chain.inverse_and_ladj(y)
    fused = gradients((z**2).sum() + ladj.sum())
    h, total = y, 0.0
    for layer in reversed(list(chain.layers)):
        h, step = layer.inverse_and_ladj(h)
        total = total + step
    layered = gradients((h**2).sum() + total.sum())
    for a, b in zip(fused, layered, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_lu_inverse_weight_with_column_scale_is_the_inverse_times_the_diagonal():
    torch.manual_seed(0)
    lu = perturb(T.LUWeight(5), scale=0.3, seed=1).double()
    d = torch.rand(5, dtype=torch.float64) + 0.5
    expected = torch.linalg.inv(lu.weight()) @ torch.diag(d)
    torch.testing.assert_close(lu.inverse_weight(d), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(lu.inverse_weight(), torch.linalg.inv(lu.weight()), atol=1e-12, rtol=0)
    (lower_grad,) = torch.autograd.grad(lu.inverse_weight(d).sum(), [lu.lower])
    assert torch.equal(lower_grad.triu(), torch.zeros_like(lower_grad))  # the fixed diagonal and upper part


@pytest.mark.parametrize("size", [6, 4, 2], ids=["6x6-convolutions", "4x4-matmuls", "2x2-matmuls"])
@pytest.mark.parametrize("context", [False, True], ids=["unconditional", "vector-context"])
def test_cnn_in_channels_last_computes_the_nchw_network(context, size):
    """The CNN's float32 channels-last convolutions (tiny images: dense matmuls) and in-place ReLUs compute the
    float64 NCHW network by hand, values and input gradients, and hand back an NCHW output."""
    from pyro_flows.nn.cnn import CNN, conv_layout

    torch.manual_seed(0)
    net = perturb(CNN(2, 4, hidden=(16, 16), context_features=3 if context else 0), scale=0.3, seed=2)
    x = torch.randn(5, 2, size, size, requires_grad=True)
    c = torch.randn(5, 3) if context else None
    out = net(x, c)
    assert out.is_contiguous() and conv_layout(x).is_contiguous(memory_format=torch.channels_last)
    (grad,) = torch.autograd.grad(out.square().sum(), [x])
    x64 = x.detach().double().requires_grad_()
    h = F.conv2d(x64, net.hidden[0].weight.double(), net.hidden[0].bias.double(), padding=1)
    if context:
        h = h + (c.double() @ net.context_bias.weight.double().T + net.context_bias.bias.double())[:, :, None, None]
    h = F.relu(F.conv2d(F.relu(h), net.hidden[1].weight.double(), net.hidden[1].bias.double()))
    expected = F.conv2d(h, net.output.weight.double(), net.output.bias.double(), padding=1)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), [x64])
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad.double(), expected_grad, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("kernel", [3, 1])
@pytest.mark.parametrize("size", [(4, 4), (2, 2), (1, 3), (3, 5)])
@pytest.mark.parametrize("pixels_first", [(False, False), (False, True), (True, False), (True, True)])
def test_dense_conv_is_the_zero_padded_convolution(kernel, size, pixels_first):
    """dense_conv's matmul is F.conv2d (stride 1, zero padding k // 2) in float64, with and without a bias: values
    and the gradients of the input, the kernel and the bias, in either entry order (channel-major NCHW or pixel-major
    NHWC) of input and output."""
    from pyro_flows.nn.cnn import dense_conv

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, kernel, padding=kernel // 2).double()
    x = torch.randn(4, 3, *size, dtype=torch.float64, requires_grad=True)

    def flat(images: torch.Tensor, pixels: bool) -> torch.Tensor:
        return (images.movedim(1, -1) if pixels else images).flatten(1)

    for bias in (None, conv.bias):
        out = dense_conv(flat(x, pixels_first[0]), conv.weight, size, pixels_first, bias)
        expected = F.conv2d(x, conv.weight, padding=kernel // 2)
        expected = expected if bias is None else expected + bias[:, None, None]
        torch.testing.assert_close(out, flat(expected, pixels_first[1]), atol=1e-12, rtol=0)
        g = torch.randn_like(expected)
        inputs = [x, conv.weight] + ([] if bias is None else [bias])
        grads = torch.autograd.grad(out, inputs, flat(g, pixels_first[1]))
        expected_grads = torch.autograd.grad(expected, inputs, g)
        for grad, expected_grad in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("aligned", [False, True], ids=["vector-context", "aligned-context"])
def test_networks_on_tiny_images_match_their_convolutions(aligned, monkeypatch):
    """On tiny images (dense_pays) the CNN and Conv2dZeros compute by matmuls what their convolutions compute
    on larger ones: the same values and parameter gradients with the dense path switched off, float64."""
    import pyro_flows.nn.cnn as cnn

    torch.manual_seed(0)
    kw = {"context_features": 4 + 4 * 3, "context_shape": (1, 2, 2)} if aligned else {"context_features": 3}
    nets = [perturb(cnn.CNN(2, 4, hidden=(8, 6, 5), **kw), scale=0.3, seed=3), cnn.Conv2dZeros(2, 4, **kw)]
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    c = torch.randn(3, kw["context_features"], dtype=torch.float64)
    for net in nets:
        net = perturb(net, scale=0.3, seed=4).double()
        out = net(x, c)
        grads = torch.autograd.grad(out.square().sum(), list(net.parameters()))
        monkeypatch.setattr(cnn, "DENSE_CONV_ENTRIES", 0)
        expected = net(x, c)
        expected_grads = torch.autograd.grad(expected.square().sum(), list(net.parameters()))
        monkeypatch.undo()
        assert out.abs().max() > 0.1 and out.is_contiguous()
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
        for grad, expected_grad in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad, expected_grad, atol=1e-11, rtol=0)


def test_dense_convolutions_only_for_tiny_images_with_few_channels():
    """dense_pays admits Glow's 64-channel networks on 8×8 digits (4×4 and 2×2 levels), not wide networks at 4×4 nor
    any image over 4×4 pixels; a wide CNN at 4×4 computes the same function by its convolutions."""
    from pyro_flows.nn.cnn import CNN, dense_pays

    assert dense_pays((4, 4), (2, 64), (64, 4)) and dense_pays((2, 2), (8, 64), (64, 16))
    assert not dense_pays((4, 4), (8, 64)) and not dense_pays((4, 4), (24, 512), (512, 48))
    assert dense_pays((2, 2), (64, 64)) and not dense_pays((8, 8), (1, 2)) and not dense_pays((5, 5), (1, 1))
    net = perturb(CNN(8, 4, hidden=(64, 64)), scale=0.3, seed=5).double()
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    h = F.relu(F.conv2d(x, net.hidden[0].weight, net.hidden[0].bias, padding=1))
    h = F.relu(F.conv2d(h, net.hidden[1].weight, net.hidden[1].bias))
    expected = F.conv2d(h, net.output.weight, net.output.bias, padding=1)
    torch.testing.assert_close(net(x), expected, atol=1e-10, rtol=0)

r"""The latent space as a tool: encode, decode, interpolate, and edit along attribute directions.

A flow is a bijection :math:`y = f(z)` between its base space (a standard normal :math:`z`) and the data,
so every data point has exactly one *latent* point :math:`z = f^{-1}(y)` and every latent point decodes to
a data point. Paths and arithmetic in the latent space become paths and edits of the data (Kingma &
Dhariwal 2018, section 5): interpolations between two images, or moving an image along the direction
that separates two groups (smiling and not smiling; one class and another).

- :func:`encode` / :func:`decode`: :math:`z = f^{-1}(y \mid c)` and :math:`y = f(z \mid c)`, for any flow
  of this package (a :class:`~pyro_flows.flows.base.Flow` or a :class:`~pyro_flows.dequantization.Dequantized`
  image model, or the distribution one returns) over vectors, images or signals, unconditional or conditional
  (a context vector, class labels, a condition image or feature sequence), multi-scale or not. They take the
  same path as ``log_prob`` and ``sample`` (:meth:`~pyro_flows.flows.base.FlowDistribution.to_base` and
  :meth:`~pyro_flows.flows.base.FlowDistribution.from_base`): no second implementation of the layers' inverses.
- :func:`interpolate`: linear or spherical (slerp) paths between latent points.
- :func:`attribute_direction` and :func:`shift`: the mean latent point of one group minus another's, and
  a move along it with a strength.

A multi-scale flow (Glow, multi-scale RealNVP) keeps the channels it factors out at each level in place,
so its latent point has the shape of the image: the functions here need no knowledge of the levels.

Example:
    >>> flow = pf.Glow(shape=(1, 8, 8), levels=2, steps=1, hidden_channels=8, pixel_levels=None)
    >>> x = torch.randn(2, 1, 8, 8)
    >>> z = encode(flow, x)
    >>> bool(torch.allclose(decode(flow, z), x, atol=1e-5))
    True
    >>> path = decode(flow, interpolate(z[0], z[1], steps=5, method="spherical"))
    >>> path.shape
    torch.Size([5, 1, 8, 8])

References:
    - Kingma & Dhariwal (2018), *Glow: Generative flow with invertible 1x1 convolutions*, arXiv:1807.03039
      (latent interpolation and attribute manipulation, section 5).
    - White (2016), *Sampling generative networks*, arXiv:1609.04468 (spherical interpolation).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .dequantization import DequantizedDistribution, check_pixels
from .flows.base import FlowDistribution
from .transforms.base import check_shape
from .utils import check_device_dtype

__all__ = ["METHODS", "attribute_direction", "decode", "encode", "interpolate", "shift"]

METHODS = ("linear", "spherical")
"""The interpolation methods of :func:`interpolate`."""

Model = Union[nn.Module, FlowDistribution, DequantizedDistribution]
AnyFlowDistribution = Union[FlowDistribution, DequantizedDistribution]


def _distribution(model: Model, context: Optional[Tensor], method: str) -> AnyFlowDistribution:
    """The distribution of ``model`` given ``context``: a module is called, a distribution taken as it is."""
    if isinstance(model, (FlowDistribution, DequantizedDistribution)):
        if context is not None:
            raise ValueError(
                f"{method}: the model is a distribution, already conditioned; pass context= with the flow module "
                "(flow, not flow(context))"
            )
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"{method}: expected a flow (an nn.Module such as pf.Glow(...)), got {type(model).__name__}")
    distribution = model() if context is None else model(context)
    if not isinstance(distribution, (FlowDistribution, DequantizedDistribution)):
        raise TypeError(
            f"{method}: {type(model).__name__} returns a {type(distribution).__name__}, not a flow's distribution "
            "(a pf.FlowDistribution or pf.DequantizedDistribution): it has no latent space to map to"
        )
    return distribution


def _check_points(distribution: FlowDistribution, points: Tensor, event_shape: torch.Size, what: str, method: str):
    """ValueErrors naming the problem for points of the wrong event shape, batch, device, dtype, or with NaN/inf."""
    check_shape(method, points, tuple(event_shape), what)
    batch = points.shape[: points.dim() - len(event_shape)]
    try:
        torch.broadcast_shapes(batch, distribution.batch_shape)
    except RuntimeError:
        raise ValueError(
            f"{method}: the {what} have batch shape {tuple(batch)}, which does not broadcast with the flow's batch "
            f"shape {tuple(distribution.batch_shape)} (that of its context)"
        ) from None
    check_device_dtype(method, points, distribution.base_dist.mean, f"{what} tensor")
    if not bool(torch.isfinite(points).all()):
        raise ValueError(f"{method}: the {what} have {int((~torch.isfinite(points)).sum())} NaN or inf entries")


def encode(model: Model, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
    r"""The latent point :math:`z = f^{-1}(x \mid c)` of each data point: the inverse of :func:`decode`.

    For a :class:`~pyro_flows.dequantization.Dequantized` model of integer pixels
    :math:`x \in \{0, \dots, L-1\}^D` the encoded point is that of the centre of the pixel's dequantisation
    cell, :math:`z = f^{-1}\big((x + \tfrac12) / L\big)`, so that :func:`decode` (which quantises) returns
    :math:`x` exactly.

    Args:
        model: a flow module (``pf.Glow(...)``, ``pf.NSF(...)``, any :class:`~pyro_flows.flows.base.Flow` or
            :class:`~pyro_flows.dequantization.Dequantized`), or the distribution it returned (then no context).
        x: data ``(..., *event_shape)`` in the flow's dtype (integer pixels of any dtype for a dequantised
            model); the batch dims broadcast with the context's.
        context: what a conditional flow is called with: context vectors ``(..., F)``, class labels ``(...)``
            or condition images, as for ``model(context)``.

    Returns:
        :math:`z`, shape ``(..., *base_event_shape)`` (the image shape for the image flows, multi-scale
        ones included). Differentiable in ``x`` and the flow's parameters.

    Raises a ValueError for points of the wrong shape, batch or dtype, NaN or inf entries, pixels that are
    not integers in range, or a context the flow does not take; a TypeError for a model that is not a flow.

    Example:
        >>> flow = pf.NSF(features=3, context=2)
        >>> x, c = torch.randn(4, 3), torch.randn(4, 2)
        >>> encode(flow, x, c).shape
        torch.Size([4, 3])
    """
    distribution = _distribution(model, context, "encode")
    if isinstance(distribution, DequantizedDistribution):
        check_shape("encode", x, tuple(distribution.event_shape), "images")
        check_pixels(x, distribution.levels, "encode")
        levels, distribution = distribution.levels, distribution.continuous
        x = (x.to(distribution.base_dist.mean.dtype) + 0.5) / levels  # the centres of the pixels' cells
    _check_points(distribution, x, distribution.event_shape, "data", "encode")
    return distribution.to_base(x)


def decode(model: Model, z: Tensor, context: Optional[Tensor] = None) -> Tensor:
    r"""The data point :math:`x = f(z \mid c)` of each latent point: the inverse of :func:`encode`.

    A :class:`~pyro_flows.dequantization.Dequantized` model's output is quantised to integer pixels,
    :math:`x = \min(\lfloor L\, f(z) \rfloor, L - 1)` (in the flow's float dtype), as its ``sample`` is.

    Args:
        model: a flow module or its distribution, as for :func:`encode`.
        z: latent points ``(..., *base_event_shape)`` in the flow's dtype; the batch dims broadcast with the
            context's (e.g. a path ``(steps, 1, 28, 28)`` decoded under one label ``(1,)``).
        context: as for :func:`encode`; decoding under another context than the encoding's transfers the
            latent point to that condition (e.g. the same style, another class).

    Returns:
        :math:`x`, shape ``(..., *event_shape)``.

    Example:
        >>> flow = pf.RealNVP(features=2)
        >>> decode(flow, torch.zeros(3, 2)).shape
        torch.Size([3, 2])
    """
    distribution = _distribution(model, context, "decode")
    continuous = distribution.continuous if isinstance(distribution, DequantizedDistribution) else distribution
    _check_points(continuous, z, continuous.base_dist.event_shape, "latent points", "decode")
    y = continuous.from_base(z)
    if isinstance(distribution, DequantizedDistribution):
        return torch.floor(y * distribution.levels).clamp(0, distribution.levels - 1)
    return y


def _check_latents(method: str, **points: Tensor) -> None:
    """TypeErrors/ValueErrors unless the named points are finite floating tensors."""
    for name, value in points.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{method}: {name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise ValueError(f"{method}: {name} must be a floating-point tensor, got dtype {value.dtype}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{method}: {name} has NaN or inf entries")


def interpolate(
    z0: Tensor, z1: Tensor, steps: int = 8, method: str = "linear", event_dim: Optional[int] = None
) -> Tensor:
    r"""``steps`` points from ``z0`` to ``z1``, both included, at :math:`t_i = i / (\text{steps} - 1)`.

    ``"linear"``: :math:`z_t = (1 - t)\, z_0 + t\, z_1`.

    ``"spherical"`` (slerp; Shoemake 1985, White 2016): along the great circle through the two points,

    .. math:: z_t = \frac{\sin((1 - t)\,\Omega)}{\sin \Omega}\, z_0 + \frac{\sin(t\,\Omega)}{\sin \Omega}\, z_1,
              \qquad \cos \Omega = \frac{\langle z_0, z_1 \rangle}{\lVert z_0 \rVert\, \lVert z_1 \rVert},

    which keeps the norm of endpoints of equal norm (:math:`\lVert z_t \rVert = \lVert z_0 \rVert`). In high
    dimensions a standard normal puts its mass near the sphere of radius :math:`\sqrt{D}`, which the midpoint of
    a linear path leaves (its norm is :math:`\cos(\Omega/2)` times smaller), so slerp stays among typical latent
    points. Points that are (anti)parallel, :math:`\sin\Omega < 10^{-6}`, or zero, are interpolated linearly.

    Args:
        z0, z1: latent points of the same shape (e.g. from :func:`encode`) and dtype.
        steps: the number of points, at least 2.
        method: ``"linear"`` or ``"spherical"``.
        event_dim: for ``"spherical"``, how many trailing dims form one point (angles and norms are taken over
            them); the leading ones are a batch of pairs. Default: all of them (``z0`` is one point).

    Returns:
        The path, shape ``(steps, *z0.shape)``: ``path[0]`` is ``z0`` and ``path[-1]`` is ``z1`` exactly.

    Example:
        >>> z0, z1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
        >>> interpolate(z0, z1, steps=3)
        tensor([[1.0000, 0.0000],
                [0.5000, 0.5000],
                [0.0000, 1.0000]])
        >>> interpolate(z0, z1, steps=3, method="spherical")[1]  # on the unit circle
        tensor([0.7071, 0.7071])
    """
    _check_latents("interpolate", z0=z0, z1=z1)
    if z0.shape != z1.shape:
        raise ValueError(
            f"interpolate: z0 and z1 must have the same shape, got {tuple(z0.shape)} and {tuple(z1.shape)}"
        )
    if z0.dtype != z1.dtype:
        raise ValueError(f"interpolate: z0 and z1 must have the same dtype, got {z0.dtype} and {z1.dtype}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"interpolate: steps must be an integer >= 2 (both endpoints are included), got {steps!r}")
    if method not in METHODS:
        raise ValueError(f"interpolate: unknown method {method!r}; use one of {', '.join(map(repr, METHODS))}")
    dims = z0.dim() if event_dim is None else event_dim
    if isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= z0.dim():
        raise ValueError(
            f"interpolate: event_dim must be an integer in 1..{z0.dim()} (the dims of one point), got {event_dim!r}"
        )
    t = torch.linspace(0, 1, steps, dtype=z0.dtype, device=z0.device).reshape((steps,) + (1,) * z0.dim())
    if method == "linear":
        return (1 - t) * z0 + t * z1
    batch = z0.shape[: z0.dim() - dims]
    a, b = z0.reshape(batch + (-1,)), z1.reshape(batch + (-1,))
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    cos = ((a * b).sum(-1) / norms.clamp_min(torch.finfo(z0.dtype).tiny)).clamp(-1, 1)
    omega = torch.acos(cos).reshape(batch + (1,) * dims)
    sin = torch.sin(omega)
    curved = (sin >= 1e-6) & (norms.reshape(sin.shape) > 0)
    safe = torch.where(curved, sin, torch.ones_like(sin))
    w0 = torch.where(curved, torch.sin((1 - t) * omega) / safe, 1 - t)
    w1 = torch.where(curved, torch.sin(t * omega) / safe, t)
    return w0 * z0 + w1 * z1


def attribute_direction(z_a: Tensor, z_b: Tensor) -> Tensor:
    r"""The direction from group ``b`` to group ``a`` in the latent space: :math:`\bar z_a - \bar z_b`.

    The difference of the groups' mean latent points (Kingma & Dhariwal 2018, section 5: e.g. the images with
    an attribute and those without). Adding it to the latent point of a ``b`` image (:func:`shift`) moves the
    image towards group ``a``.

    Args:
        z_a, z_b: latent points of the two groups, ``(N_a, *event)`` and ``(N_b, *event)`` (e.g.
            ``encode(flow, x[labels == 1])``), at least one point each.

    Returns:
        The direction, shape ``event``.

    Example:
        >>> attribute_direction(torch.tensor([[2.0, 0.0], [4.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
        tensor([ 3., -1.])
    """
    _check_latents("attribute_direction", z_a=z_a, z_b=z_b)
    for name, z in (("z_a", z_a), ("z_b", z_b)):
        if z.dim() < 1 or len(z) == 0:
            raise ValueError(
                f"attribute_direction: {name} must hold at least one latent point along its first dim, "
                f"got shape {tuple(z.shape)}"
            )
    if z_a.shape[1:] != z_b.shape[1:]:
        raise ValueError(
            "attribute_direction: the groups' points must have the same shape after the first (group) dim, got "
            f"{tuple(z_a.shape)} and {tuple(z_b.shape)}"
        )
    return z_a.mean(0) - z_b.mean(0)


def shift(z: Tensor, direction: Tensor, strength: Union[float, Sequence[float], Tensor] = 1.0) -> Tensor:
    r"""Latent points moved along ``direction``: :math:`z + \alpha\, d`.

    Strength 0 returns ``z`` itself (the same values); 1 moves the whole mean difference of
    :func:`attribute_direction`; negative strengths move the other way.

    Args:
        z: latent points ``(..., *direction.shape)``.
        direction: the direction :math:`d`, e.g. from :func:`attribute_direction`; its shape must be the
            trailing dims of ``z``'s.
        strength: :math:`\alpha`: a number, or a 1-D sequence/tensor of ``S`` numbers for ``S`` edits at once.

    Returns:
        Shape ``z.shape`` for one strength, ``(S, *z.shape)`` for ``S`` strengths.

    Example:
        >>> shift(torch.zeros(2), torch.tensor([1.0, -1.0]), [0.0, 0.5, 2.0])
        tensor([[ 0.0000,  0.0000],
                [ 0.5000, -0.5000],
                [ 2.0000, -2.0000]])
    """
    _check_latents("shift", z=z, direction=direction)
    if direction.dim() > z.dim() or z.shape[z.dim() - direction.dim() :] != direction.shape:
        raise ValueError(
            f"shift: direction of shape {tuple(direction.shape)} must match the trailing dims of z, "
            f"got z of shape {tuple(z.shape)}"
        )
    try:
        alphas = None if isinstance(strength, bool) else torch.as_tensor(strength, dtype=z.dtype, device=z.device)
    except (TypeError, ValueError, RuntimeError):
        alphas = None
    if alphas is None or alphas.dim() > 1 or not bool(torch.isfinite(alphas).all()):
        raise ValueError(f"shift: strength must be a finite number or a 1-D sequence of them, got {strength!r}")
    return z + alphas.reshape(alphas.shape + (1,) * z.dim()) * direction

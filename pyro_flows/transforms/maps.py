r"""Monotone elementwise maps: the "what" of every coupling and autoregressive layer.

A map acts on each coordinate independently, with per-coordinate parameters
produced by a conditioner network. Each one is a small stateless object with

* ``num_params`` — parameters per coordinate,
* ``forward(x, params) -> (y, log dy/dx)`` and ``inverse(y, params) -> (x, log dx/dy)``,

where ``params`` has shape ``(num_params, *x.shape)`` — the parameter axis
first, so each group of parameters (e.g. a spline's bin widths) is a block
whose reductions (softmax, cumsum over bins) run over the leading axis, which
is several times faster than over a short last axis — and the
log-derivatives are elementwise (shape of ``x``). All-zero parameters give the identity, so a
conditioner whose last layer starts at zero makes a fresh flow the identity.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import Tensor

from ..nn.mlp import soft_clamp
from ..utils import function_transformed


class ElementwiseMap(abc.ABC):
    """Interface of a monotone elementwise map (see the module docstring)."""

    num_params: int

    @abc.abstractmethod
    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, log dy/dx)`` elementwise."""

    @abc.abstractmethod
    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, log dx/dy)`` elementwise."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Shift(ElementwiseMap):
    r"""Additive map (NICE, Dinh et al. 2015): :math:`y = x + t`, :math:`\log|dy/dx| = 0`.

    Example:
        >>> Shift().forward(torch.zeros(3), torch.ones(1, 3))
        (tensor([1., 1., 1.]), tensor([0., 0., 0.]))

    References:
        - Dinh, Krueger & Bengio (2015), *NICE: Non-linear independent components estimation*, arXiv:1410.8516.
    """

    num_params = 1

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return x + params[0], torch.zeros_like(x)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return y - params[0], torch.zeros_like(y)


class Affine(ElementwiseMap):
    r"""Affine map (RealNVP, Dinh et al. 2017; MAF/IAF): :math:`y = x e^{s} + t`.

    The raw log-scale :math:`r` is soft-clamped algebraically,
    :math:`s = r / (1 + |r| / c)`: the identity near 0, the scale stays in
    :math:`(e^{-c}, e^{c})`, gradients never vanish abruptly as with a hard
    clamp, and it costs a few cheap elementwise ops (a ``tanh`` clamp was the
    second most expensive op of a MAF density evaluation). :math:`\log|dy/dx| = s`.

    Args:
        log_scale_bound: :math:`c`, the bound of the log-scale.

    Example:
        >>> y, log_derivative = Affine().forward(torch.ones(3), torch.zeros(2, 3))  # zero parameters: identity
        >>> y, log_derivative
        (tensor([1., 1., 1.]), tensor([0., 0., 0.]))

    References:
        - Dinh, Sohl-Dickstein & Bengio (2017), *Density estimation using Real NVP*, arXiv:1605.08803.
        - Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling (2016), *Improved variational inference with inverse
          autoregressive flow*, arXiv:1606.04934.
        - Papamakarios, Pavlakou & Murray (2017), *Masked autoregressive flow for density estimation*, arXiv:1705.07057.
    """

    num_params = 2

    def __init__(self, log_scale_bound: float = 3.0) -> None:
        self.log_scale_bound = float(log_scale_bound)

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return _affine(x, params, self.log_scale_bound, False)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return _affine(y, params, self.log_scale_bound, True)

    def __repr__(self) -> str:
        return f"Affine(log_scale_bound={self.log_scale_bound})"


def _affine_parts(value: Tensor, params: Tensor, bound: float, inverse: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r""":class:`Affine`'s arithmetic: ``(x e^s + t, s)``, or ``((y - t) e^{-s}, -s)`` for the inverse, with
    :math:`s = r / d`, :math:`d = 1 + |r| / c` the soft clamp of the raw log-scale :math:`r` (as
    :func:`~pyro_flows.nn.mlp.soft_clamp`); also the scale factor :math:`e^{\pm s}` and :math:`d`."""
    shift, raw = params.unbind(0)
    denominator = raw.abs().div_(bound).add_(1)
    log_derivative = raw / denominator  # a fresh (contiguous) tensor: exp below is vectorised
    if inverse:
        log_derivative = log_derivative.neg_()
        scale = log_derivative.exp()
        return (value - shift).mul_(scale), log_derivative, scale, denominator
    scale = log_derivative.exp()
    return torch.addcmul(shift, value, scale), log_derivative, scale, denominator


FUNCTION_MIN_ELEMENTS = 8192
"""Up to this many elements per call :class:`Affine` records its plain arithmetic (autograd's own nodes), above it the
one-node :class:`_AffineFunction`. Measured inside a train step (1 thread, interleaved, CPU time; batch 512): the
plain nodes made the step 3-5% faster on MAF D = 8 (4096 elements) and RealNVP D = 8 and 32 (2048 and 8192: the
Function's Python forward and backward cost more there than the kernels they save). Above, the Function keeps fewer
tensors for backward (MAF D = 32, 16384 elements: 3.82 against 4.27 MiB per step, the plain nodes 1.25x Pyro's
peak) and makes fewer passes over memory (1.4-1.8x faster for the map alone, 4096 x 8 to 16384 x 256)."""


def _affine(value: Tensor, params: Tensor, bound: float, inverse: bool) -> tuple[Tensor, Tensor]:
    """:func:`_affine_parts`' value and log-derivative, one autograd node when a gradient is needed on more than
    :data:`FUNCTION_MIN_ELEMENTS` elements (:class:`_AffineFunction`)."""
    # the one-node Function when a graph is recorded on a large enough tensor; else (no graph, a small tensor, or
    # torch.func, which takes no forward(ctx) Function) the bare arithmetic, which autograd and function transforms
    # differentiate as it is
    if (
        torch.is_grad_enabled()
        and (value.requires_grad or params.requires_grad)
        and value.numel() > FUNCTION_MIN_ELEMENTS
        and not function_transformed(value, params)
    ):
        return _AffineFunction.apply(value, params, bound, inverse)
    return _affine_parts(value, params, bound, inverse)[:2]


class _AffineFunction(torch.autograd.Function):
    r""":class:`Affine` in both directions as one autograd node.

    With :math:`\ell = \pm s` the log-derivative, :math:`s = r / d`, :math:`d = 1 + |r|/c`, so
    :math:`ds/dr = d^{-2} = (1 - |s|/c)^2`:

    * forward, :math:`y = x e^{s} + t`: :math:`\bar x = \bar y e^{\ell}`, :math:`\bar t = \bar y`,
      :math:`\bar s = \bar x x + \bar\ell`;
    * inverse, :math:`x = (y - t) e^{-s}`: :math:`\bar y = \bar x e^{\ell}`, :math:`\bar t = -\bar y`,
      :math:`\bar s = -\bar x x - \bar\ell`.

    Eight elementwise ops and their autograd nodes per layer became one node, whose backward is five kernels: it
    keeps the scale :math:`e^{\ell}` and :math:`d^{-2}` from the forward pass, and writes the parameters' gradient
    in their own memory layout (a view of the conditioner's output), so the views back to the conditioner's
    output copy nothing. Under ``create_graph`` (double backward) it recomputes both from :math:`\ell`, an output,
    so the second derivatives are exact (and so when compiled: dynamo takes no ``out=`` into a view). Written in
    the ``forward(ctx, ...)`` style, which skips functorch's
    per-call dispatch (see :class:`~pyro_flows.nn.mlp._SoftClamp`).
    """

    @staticmethod
    def forward(ctx, value: Tensor, params: Tensor, bound: float, inverse: bool) -> tuple[Tensor, Tensor]:
        out, log_derivative, scale, denominator = _affine_parts(value, params, bound, inverse)
        ctx.bound, ctx.inverse = bound, inverse
        ctx.params_layout = torch.empty_like(params, device="meta")  # the gradient's strides (preserve_format)
        x = out if inverse else value
        ctx.save_for_backward(x, log_derivative, scale, denominator.reciprocal_().square_())
        return out, log_derivative

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_log_derivative: Tensor):
        x, log_derivative, scale, slope = ctx.saved_tensors
        # create_graph: differentiable ops on the tracked x and log-derivative only; compiling and function
        # transforms (vmap, jacobian(vectorize=True)): no out= into views
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or function_transformed(grad_out):
            return (
                *_affine_grads(x, log_derivative, grad_out, grad_log_derivative, ctx.bound, ctx.inverse),
                None,
                None,
            )
        layout = ctx.params_layout  # dense: empty_like keeps strides only then
        grad_params = torch.empty_strided(layout.shape, layout.stride(), dtype=grad_out.dtype, device=grad_out.device)
        grad_value = grad_out * scale
        if ctx.inverse:
            torch.neg(grad_value, out=grad_params[0])
            grad_log_scale = torch.addcmul(grad_log_derivative, grad_out, x).neg_()
        else:
            grad_params[0].copy_(grad_out)
            grad_log_scale = torch.addcmul(grad_log_derivative, grad_value, x)
        torch.mul(grad_log_scale, slope, out=grad_params[1])
        return grad_value, grad_params, None, None


def _affine_grads(
    x: Tensor, log_derivative: Tensor, grad_out: Tensor, grad_log_derivative: Tensor, bound: float, inverse: bool
) -> tuple[Tensor, Tensor]:
    """:class:`_AffineFunction`'s gradients by differentiable ops of ``x`` and the log-derivative (double backward)."""
    grad_value = grad_out * log_derivative.exp()
    if inverse:
        grad_shift, grad_log_scale = grad_value.neg(), (grad_out * x + grad_log_derivative).neg()
    else:
        grad_shift, grad_log_scale = grad_out, grad_value * x + grad_log_derivative
    grad_raw = grad_log_scale * (1 - log_derivative.abs() / bound).square()
    return grad_value, torch.stack((grad_shift, grad_raw))


class RationalQuadraticSpline(ElementwiseMap):
    r"""Monotone rational-quadratic spline (Durkan et al. 2019, "Neural Spline Flows").

    On :math:`[-B, B]`, :math:`K` bins with knots :math:`(x_k, y_k)` and
    positive knot derivatives :math:`\delta_k`; in bin :math:`k`, with
    :math:`\xi = (x - x_k)/w_k`, :math:`s_k = h_k / w_k`,

    .. math::
        y = y_k + \frac{h_k\,[s_k \xi^2 + \delta_k \xi(1-\xi)]}
                       {s_k + (\delta_{k+1} + \delta_k - 2 s_k)\,\xi(1-\xi)},
        \qquad
        \frac{dy}{dx} = \frac{s_k^2\,[\delta_{k+1}\xi^2 + 2 s_k \xi(1-\xi) + \delta_k (1-\xi)^2]}
                            {[s_k + (\delta_{k+1} + \delta_k - 2 s_k)\,\xi(1-\xi)]^2}.

    Outside :math:`[-B, B]` the map is the identity (boundary derivatives are
    1, so it is :math:`C^1`). The inverse is closed form: the root in
    :math:`[0, 1]` of the quadratic :math:`a\xi^2 + b\xi + c = 0`, taken as
    :math:`2c / (-b - \sqrt{b^2 - 4ac})` when :math:`b \ge 0` and as
    :math:`(\sqrt{b^2 - 4ac} - b) / 2a` otherwise, so neither form cancels. Parameters per coordinate:
    :math:`K` widths, :math:`K` heights and :math:`K - 1` interior derivatives, :math:`3K - 1` in all.

    The raw parameters are soft-clamped as in :class:`Affine`, :math:`r \mapsto r / (1 + |r| / c)` with
    :math:`c = \log(1/\delta_{\min})`: widths and heights are the softmax of raw values clamped to
    :math:`(-c/2, c/2)` (floored by ``min_bin_size``), the derivatives :math:`\delta = e^{r/(1 + |r|/c)}` lie in
    :math:`(\delta_{\min}, 1/\delta_{\min})`. This bounds how flat the spline can get, which is what bounds the
    float32 round-trip error (an error of one ulp in :math:`y` is one of :math:`\text{ulp}/f'` in :math:`x`):
    unclamped logits and derivatives made derivatives of 1e-5 from raw parameters of unit scale and round-trip
    errors of 1e-3.

    Branch-free: every coordinate goes through the same kernels (clamped into
    the interval, then selected by ``torch.where``), so there is no boolean
    indexing, no host sync, and no NaN from an unselected branch.

    Args:
        bins: :math:`K`.
        bound: :math:`B`.
        min_bin_size: floor of every bin's width and height, as a fraction of :math:`2B`.
        min_derivative: :math:`\delta_{\min}` in :math:`(0, 1)`, floor of the knot derivatives (and
            :math:`1/\delta_{\min}` their ceiling).

    Example:
        >>> spline = RationalQuadraticSpline(bins=8, bound=5.0)
        >>> x, params = torch.randn(10, 4).double(), torch.randn(spline.num_params, 10, 4).double()
        >>> y, log_derivative = spline.forward(x, params)
        >>> x_back, log_derivative_back = spline.inverse(y, params)  # closed form, no bisection
        >>> torch.allclose(x_back, x), torch.allclose(log_derivative_back, -log_derivative)
        (True, True)

    References:
        - Durkan, Bekasov, Murray & Papamakarios (2019), *Neural spline flows*, arXiv:1906.04032.
    """

    def __init__(
        self, bins: int = 8, bound: float = 5.0, min_bin_size: float = 1e-3, min_derivative: float = 1e-3
    ) -> None:
        if bins < 1 or bound <= 0:
            raise ValueError(f"RationalQuadraticSpline needs bins >= 1 and bound > 0, got {bins}, {bound}")
        if not 0 <= min_bin_size * bins < 1:
            raise ValueError(
                f"RationalQuadraticSpline: min_bin_size * bins must be in [0, 1), got {min_bin_size * bins}"
            )
        if not 0 < min_derivative < 1:
            raise ValueError(f"RationalQuadraticSpline: min_derivative must be in (0, 1), got {min_derivative}")
        self.bins, self.bound = int(bins), float(bound)
        self.min_bin_size, self.min_derivative = min_bin_size, min_derivative
        self._clamp = -math.log(min_derivative)  # c: derivatives in (e^-c, e^c), size logits in (-c/2, c/2)
        self.num_params = 3 * self.bins - 1

    def _knot_table(self, params: Tensor) -> Tensor:
        r"""``(3, K + 1, ...)``: x-knots, y-knots and knot derivatives, bins on axis 1.

        The interior knots and derivatives are made first and the fixed ends (:math:`\mp B`, derivative 1) put
        around them by one ``cat``, so that at most one table-sized intermediate is alive with the table.
        """
        K, B = self.bins, self.bound
        raw_sizes, raw_derivatives = params.split((2 * K, K - 1), dim=0)
        ends = params.new_tensor([[-B, B], [-B, B], [1.0, 1.0]]).reshape((3, 2) + (1,) * (params.dim() - 1))
        shape = (3, 1, *params.shape[1:])
        interior = torch.cat(
            (
                self._interior_knots(raw_sizes),
                torch.exp(soft_clamp(raw_derivatives, self._clamp)).unsqueeze(0),  # zero parameters: 1, identity
            ),
            dim=0,
        )
        return torch.cat((ends[:, :1].expand(shape), interior, ends[:, 1:].expand(shape)), dim=1)

    def _interior_knots(self, raw_sizes: Tensor) -> Tensor:
        r"""``(2, K - 1, ...)``: the x- and y-knots strictly inside :math:`(-B, B)` (the ends are exactly
        :math:`\mp B`), from the raw bin widths and heights ``(2K, ...)``."""
        K, B, m = self.bins, self.bound, self.min_bin_size
        sizes = torch.softmax(soft_clamp(raw_sizes.unflatten(0, (2, K)), self._clamp / 2), dim=1)
        sizes = sizes.mul(2 * B * (1 - m * K)).add_(2 * B * m)  # in place: a product by a number saves nothing
        return torch.cumsum(sizes[:, :-1], dim=1).sub_(B)

    @staticmethod
    def _log_derivative(xi: Tensor, slope: Tensor, d0: Tensor, d1: Tensor) -> Tensor:
        one_minus = 1 - xi
        xi_1mxi = xi * one_minus
        denominator = slope + (d1 + d0 - 2 * slope) * xi_1mxi
        numerator = d1 * xi * xi + 2 * slope * xi_1mxi + d0 * one_minus * one_minus
        return 2 * torch.log(slope) + torch.log(numerator) - 2 * torch.log(denominator)

    def _select(self, values: Tensor, params: Tensor, by_y: bool):
        """Clamp into the interval, find each value's bin, gather the knots at both its ends."""
        B = self.bound
        inside = (values >= -B) & (values <= B)
        clamped = values.clamp(-B, B)
        table = self._knot_table(params)
        knots = table[1 if by_y else 0]
        k = (clamped.unsqueeze(0) >= knots[1:-1]).sum(dim=0, keepdim=True).unsqueeze(0).expand(3, 1, *values.shape)
        (x0, y0, d0), (x1, y1, d1) = table.gather(1, k)[:, 0], table.gather(1, k + 1)[:, 0]
        return inside, clamped, x0, y0, x1 - x0, y1 - y0, d0, d1

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        inside, xc, x0, y0, w, h, d0, d1 = self._select(x, params, by_y=False)
        slope = h / w
        xi = ((xc - x0) / w).clamp(0, 1)
        xi_1mxi = xi * (1 - xi)
        y = y0 + h * (slope * xi * xi + d0 * xi_1mxi) / (slope + (d1 + d0 - 2 * slope) * xi_1mxi)
        log_derivative = self._log_derivative(xi, slope, d0, d1)
        return torch.where(inside, y, x), torch.where(inside, log_derivative, torch.zeros_like(log_derivative))

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        inside, yc, x0, y0, w, h, d0, d1 = self._select(y, params, by_y=True)
        slope = h / w
        dy = yc - y0
        curvature = d1 + d0 - 2 * slope
        a = h * (slope - d0) + dy * curvature
        b = h * d0 - dy * curvature
        c = -slope * dy
        root = (b * b - 4 * a * c).clamp_min(0).sqrt()
        # the root in [0, 1], in whichever of its two forms does not cancel
        positive = b >= 0
        numerator = torch.where(positive, 2 * c, root - b)
        denominator = torch.where(positive, -b - root, 2 * a)
        xi = (numerator / torch.where(denominator == 0, torch.ones_like(denominator), denominator)).clamp(0, 1)
        xi = torch.where(dy >= h, torch.ones_like(xi), xi)  # the top knot exactly (the root is a few ulp off there)
        x = x0 + xi * w
        log_derivative = -self._log_derivative(xi, slope, d0, d1)
        return torch.where(inside, x, y), torch.where(inside, log_derivative, torch.zeros_like(log_derivative))

    def __repr__(self) -> str:
        return f"RationalQuadraticSpline(bins={self.bins}, bound={self.bound})"

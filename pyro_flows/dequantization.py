r"""Discrete data through continuous flows: uniform and variational dequantisation (Ho et al. 2019).

Integer data :math:`x \in \{0, \dots, L-1\}^D` (e.g. pixels with :math:`L`
grey levels) have no density; a continuous flow :math:`p` on :math:`[0, 1]^D`
gives them the probability

.. math::
    P(x) = \int_{[0,1)^D} p\Big(\frac{x + u}{L}\Big) L^{-D}\, du
    \;\ge\; \exp \mathbb{E}_{q(u \mid x)}\Big[\log p\Big(\frac{x + u}{L}\Big) - D \log L - \log q(u \mid x)\Big]

for any density :math:`q(u \mid x)` on :math:`[0, 1)^D` (Jensen). Uniform
dequantisation (Theis et al. 2016) takes :math:`q = \mathcal{U}[0, 1)^D`;
variational dequantisation learns :math:`q` as a conditional flow, which
tightens the bound. :class:`Dequantized` wraps a flow into a model of the
integer data whose ``log_prob`` is a one-sample estimate of that bound, so
training it by maximum likelihood (``pf.fit``) maximises the bound and
:func:`~pyro_flows.bits_per_dim` of its ``log_prob`` is the discrete data's
bits per dimension (an upper bound, in expectation).

Dequantisation is not a bijection (it is a surjection from the continuous
space onto the integers), so it lives here, around the flow, and not among
the transforms. The papers are cited in :class:`Dequantized`.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Optional, Union

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, constraints

from .transforms.base import check_shape

if TYPE_CHECKING:
    from .flows.base import Flow, FlowDistribution


def check_pixels(pixels: Tensor, levels: int, where: str) -> Optional[float]:
    """The largest pixel value (None without pixels), after a ValueError unless every pixel is an integer in
    ``[0, levels - 1]``.

    Pixels may have any dtype (``uint8`` as torchvision's ``PILToTensor`` gives, ``long``, or whole floats).
    The message names what was found: NaN or inf pixels, floats in :math:`[0, 1]` (torchvision's ``ToTensor``,
    with the conversion to integers), or the range of the values and ``pixel_levels``.

    Example:
        >>> check_pixels(torch.tensor([[0, 3], [16, 2]], dtype=torch.uint8), 17, "x")
        16.0
        >>> check_pixels(torch.tensor([0.0, 0.5, 1.0]), 256, "x")
        Traceback (most recent call last):
        ...
        ValueError: x: pixels must be integers in [0, 255] (pixel_levels=256); these are floats in [0, 1] ...
        convert them with (x * 255).round().to(torch.uint8), or load them with PILToTensor(); ...
    """
    head = f"{where}: pixels must be integers in [0, {levels - 1}] (pixel_levels={levels})"
    if pixels.is_floating_point() and not bool(torch.isfinite(pixels).all()):
        raise ValueError(f"{head}; {int((~torch.isfinite(pixels)).sum())} are NaN or inf")
    if pixels.numel() == 0:
        return None
    low, high = (float(v) for v in pixels.aminmax())
    fractions = pixels != pixels.round() if pixels.is_floating_point() else None
    fractional = fractions is not None and bool(fractions.any())
    if fractional and 0.0 <= low and high <= 1.0:
        dtype = "torch.uint8" if levels <= 256 else "torch.long"
        raise ValueError(
            f"{head}; these are floats in [{low:g}, {high:g}] (torchvision's ToTensor() gives such): convert them "
            f"with (x * {levels - 1}).round().to({dtype}), or load them with PILToTensor(); a model with "
            "pixel_levels=None takes continuous images"
        )
    if fractions is not None and fractional:
        example = float(pixels[fractions][0])
        raise ValueError(f"{head}; {int(fractions.sum())} are not whole numbers, e.g. {example:g}")
    if low < 0 or high > levels - 1:
        hint = f"; for data in 0..{high:g} build the model with pixel_levels={int(high) + 1}" if low >= 0 else ""
        raise ValueError(f"{head}; these range over [{low:g}, {high:g}]{hint}")
    return high


def uniform_dequantize(
    pixels: Tensor, levels: int, generator: Optional[torch.Generator] = None, dtype: Optional[torch.dtype] = None
) -> Tensor:
    r"""Integer values ``0 .. levels - 1`` spread uniformly over their cells of :math:`[0, 1)`:
    :math:`(x + u) / L`, :math:`u \sim \mathcal{U}[0, 1)` (Theis et al. 2016), in ``dtype`` (default: the default
    float dtype). Computed in float64 and kept below 1, so that :math:`(L - 1 + u) / L` cannot round up to 1 in
    float32.

    Example:
        >>> x = uniform_dequantize(torch.tensor([0.0, 16.0]), 17, torch.Generator().manual_seed(0))
        >>> bool(((x >= 0) & (x < 1)).all()), bool(x[1] >= 16 / 17)
        (True, True)
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    x = pixels.to(torch.float64)
    x = (x + torch.rand(x.shape, generator=generator, dtype=torch.float64)) / levels
    below_one = torch.nextafter(torch.tensor(1.0, dtype=dtype), torch.tensor(0.0, dtype=dtype))
    return x.to(dtype).clamp(max=below_one)


class VariationalDequantizer(nn.Module):
    r"""Learned dequantisation noise :math:`q(u \mid x)` on :math:`(0, 1)^D` (Ho et al. 2019, Flow++).

    ``forward(x)`` returns a reparameterised :math:`u \sim q(\cdot \mid x)` with the
    shape of ``x`` and :math:`\log q(u \mid x)` (batch shape). :math:`q` is
    ``flow``, a conditional flow over :math:`(0, 1)^D` (ending in a
    :class:`~.transforms.Logit` with ``alpha=0``) whose context is the integer
    data flattened and scaled to :math:`[-1, 1]`.

    Args:
        flow: conditional flow over ``D`` features with ``context_features = D``.
        shape: the data's event shape (``D`` elements).
        levels: :math:`L`.

    References
    ----------
    - J. Ho, X. Chen, A. Srinivas, Y. Duan and P. Abbeel.
      *Flow++: Improving Flow-Based Generative Models with Variational Dequantization and
      Architecture Design*. ICML 2019.
      `arXiv:1902.00275 <https://arxiv.org/abs/1902.00275>`__

    Example:
        >>> model = pf.Glow(shape=(1, 4, 4), levels=1, steps=1, hidden_channels=8, pixel_levels=17,
        ...                 dequantization="variational")
        >>> u, log_q = model.dequantizer(torch.randint(0, 17, (5, 1, 4, 4)).float())
        >>> u.shape, log_q.shape, bool(((u > 0) & (u < 1)).all())
        (torch.Size([5, 1, 4, 4]), torch.Size([5]), True)
    """

    def __init__(self, flow: Flow, shape: tuple, levels: int) -> None:
        super().__init__()
        self.flow, self.shape, self.levels = flow, torch.Size(shape), int(levels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        batch = x.shape[: x.dim() - len(self.shape)]
        context = x.reshape(batch + (-1,)) * (2.0 / (self.levels - 1)) - 1.0
        u, log_q = self.flow(context).rsample_and_log_prob()
        return u.reshape(x.shape), log_q


class DequantizedDistribution(Distribution):
    r"""A distribution over integers :math:`\{0, \dots, L-1\}^D` from a continuous one on :math:`[0, 1]^D`.

    ``log_prob(x)`` is a one-sample estimate of the lower bound on
    :math:`\log P(x)` (module docstring), differentiable in the flow's (and the
    dequantiser's) parameters; ``sample`` draws from the continuous
    distribution and quantises: :math:`x = \min(\lfloor L y \rfloor, L - 1)`.

    Example:
        >>> d = pf.Glow(shape=(1, 8, 8), levels=2, steps=1, hidden_channels=8, pixel_levels=17)()
        >>> x = d.sample((3,))
        >>> x.shape, bool((x == x.round()).all() and x.min() >= 0 and x.max() <= 16)
        (torch.Size([3, 1, 8, 8]), True)
        >>> d.log_prob(x).shape
        torch.Size([3])
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(
        self, continuous: FlowDistribution, levels: int, dequantizer: Optional[VariationalDequantizer] = None
    ) -> None:
        self.continuous, self.levels, self.dequantizer = continuous, int(levels), dequantizer
        super().__init__(continuous.batch_shape, continuous.event_shape, validate_args=False)

    @property
    def support(self):
        return constraints.independent(constraints.integer_interval(0, self.levels - 1), len(self.event_shape))

    def _check_value(self, value: Tensor) -> Tensor:
        check_shape("Dequantized.log_prob", value, self.event_shape, "value")
        if not torch.compiler.is_compiling():  # the check would break a compiled graph (pf.compile_flow)
            check_pixels(value, self.levels, "Dequantized.log_prob")
        return value.to(self.continuous.base_dist.mean.dtype)

    def log_prob(self, value: Tensor) -> Tensor:
        x = self._check_value(value)
        dims = self.event_shape.numel()
        if self.dequantizer is None:
            u, log_q = torch.rand_like(x), 0.0
        else:
            u, log_q = self.dequantizer(x)
        y = (x + u) / self.levels
        return self.continuous.log_prob(y) - dims * math.log(self.levels) - log_q

    @torch.no_grad()
    def sample(
        self, sample_shape: Union[torch.Size, list[int], tuple[int, ...]] = (), temperature: float = 1.0
    ) -> Tensor:
        """Integer-valued samples (in the flow's float dtype); ``temperature`` scales the base, as in ``rsample``."""
        y = self.continuous.sample(torch.Size(sample_shape), temperature=temperature)
        return torch.floor(y * self.levels).clamp(0, self.levels - 1)


class Dequantized(nn.Module):
    r"""A model of integer data in :math:`\{0, \dots, L-1\}`: a continuous flow on :math:`[0, 1]`, dequantised.

    ``model(context)`` (``model()`` when unconditional) returns a
    :class:`DequantizedDistribution`; ``model.flow`` is the continuous flow on
    the data scaled to :math:`[0, 1]` and ``model.dequantizer`` is ``None``
    (uniform dequantisation) or a :class:`VariationalDequantizer`.

    References
    ----------
    - L. Theis, A. van den Oord and M. Bethge.
      *A note on the evaluation of generative models*. ICLR 2016.
      `arXiv:1511.01844 <https://arxiv.org/abs/1511.01844>`__
    - J. Ho, X. Chen, A. Srinivas, Y. Duan and P. Abbeel.
      *Flow++: Improving Flow-Based Generative Models with Variational Dequantization and
      Architecture Design*. ICML 2019.
      `arXiv:1902.00275 <https://arxiv.org/abs/1902.00275>`__

    Example:
        >>> model = pf.Glow(shape=(1, 8, 8), levels=2, steps=2, pixel_levels=17)
        >>> model().log_prob(torch.randint(0, 17, (5, 1, 8, 8)).float()).shape
        torch.Size([5])
    """

    def __init__(self, flow: Flow, levels: int, dequantizer: Optional[VariationalDequantizer] = None) -> None:
        super().__init__()
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
            raise ValueError(f"Dequantized: levels must be an integer >= 2, got {levels!r}")
        self.flow, self.levels, self.dequantizer = flow, levels, dequantizer

    @property
    def context_features(self) -> int:
        return self.flow.context_features

    def check_data(self, pixels: Tensor, where: str = "Dequantized") -> None:
        """Check training images once (:func:`~pyro_flows.fit` calls it on the data or their first batch).

        A ValueError unless every pixel is an integer in ``[0, levels - 1]`` (:func:`check_pixels`); a
        ``UserWarning`` when the data use at most half the levels (their largest value + 1 <= ``levels / 2``,
        e.g. scikit-learn's 0..16 digits under 256 levels): such a model spends most of its probability on
        values that never occur, and its bits/dim are not the data's; it names the ``pixel_levels`` to use.

        Example:
            >>> model = pf.Glow(shape=(1, 4, 4), levels=1, steps=1, hidden_channels=4, pixel_levels=256)
            >>> import warnings
            >>> with warnings.catch_warnings(record=True) as caught:
            ...     warnings.simplefilter("always")
            ...     model.check_data(torch.randint(0, 17, (8, 1, 4, 4)), "fit: data")
            >>> print(caught[0].message)  # doctest: +ELLIPSIS
            fit: data: the largest pixel value is 16, far below pixel_levels - 1 = 255; ...
            build the model with pixel_levels=17
        """
        high = check_pixels(pixels, self.levels, where)
        if high is not None and 2 * (high + 1) <= self.levels:
            warnings.warn(
                f"{where}: the largest pixel value is {high:g}, far below pixel_levels - 1 = {self.levels - 1}; the "
                f"model spreads its probability over {self.levels} levels, most of which the data do not use (a "
                f"worse fit, and bits/dim that are not the data's). If the data have {int(high) + 1} levels "
                f"(0..{high:g}), build the model with pixel_levels={int(high) + 1}",
                UserWarning,
                stacklevel=3,
            )

    def forward(self, context: Optional[Tensor] = None) -> DequantizedDistribution:
        continuous = self.flow() if context is None else self.flow(context)
        return DequantizedDistribution(continuous, self.levels, self.dequantizer)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"

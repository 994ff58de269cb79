r"""Affine probability paths for flow matching and their schedulers.

A base sample :math:`x_0 \sim \mathcal N(0, I)` and a data point :math:`x_1` are joined by

.. math:: x_t = \alpha_t\, x_1 + \sigma_t\, x_0, \qquad
          \frac{dx_t}{dt} = \dot\alpha_t\, x_1 + \dot\sigma_t\, x_0, \qquad t \in [0, 1],

(Lipman et al. 2023; Albergo & Vanden-Eijnden 2023; Lipman et al. 2024, *Flow matching guide and code*,
arXiv:2412.06264). A scheduler gives :math:`(\alpha_t, \sigma_t, \dot\alpha_t, \dot\sigma_t)`.
Convention, whatever the scheduler: **time 0 is the base and time 1 the data**, as in
:class:`~pyro_flows.transforms.ContinuousFlow`'s base→data direction :math:`t_0 \to t_1`. Every
scheduler has :math:`\alpha_1 = 1` and :math:`\alpha_0 \approx 0,\ \sigma_0 \approx 1`, so the
marginal of :math:`x_0` is (about) the flow's :class:`~pyro_flows.flows.StandardNormal` base; :class:`VP`'s
:math:`\alpha_0 = e^{-T(1)/2}` is small but not 0 (0.0066 with the default betas): its paths start
at :math:`\mathcal N(\alpha_0 \mathbb E x_1, \alpha_0^2 \operatorname{Cov} x_1 + \sigma_0^2 I)`, and the
sampler starts at :math:`\mathcal N(0, I)`, an error of order :math:`\alpha_0 \|x_1\|`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import NamedTuple, Union

import torch
from torch import Tensor


class Coefficients(NamedTuple):
    r""":math:`(\alpha_t, \sigma_t, \dot\alpha_t, \dot\sigma_t)`, each of ``t``'s shape."""

    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor
    d_sigma: Tensor


class Scheduler(ABC):
    r"""An affine path's schedule: ``scheduler(t)`` is :class:`Coefficients` :math:`(\alpha_t, \sigma_t, \dot\alpha_t,
    \dot\sigma_t)` for times ``t`` in :math:`[0, 1]` (any shape), with :math:`\alpha_1 = 1` (time 1 is the data)."""

    @abstractmethod
    def __call__(self, t: Tensor) -> Coefficients: ...

    def path(self, t: Tensor, x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor]:
        r"""The point :math:`x_t = \alpha_t x_1 + \sigma_t x_0` and the velocity
        :math:`u = \dot\alpha_t x_1 + \dot\sigma_t x_0` (``t`` broadcast against ``x0`` and ``x1``)."""
        alpha, sigma, d_alpha, d_sigma = self(t)
        return alpha * x1 + sigma * x0, d_alpha * x1 + d_sigma * x0

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v:g}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class CondOT(Scheduler):
    r"""Straight paths (conditional optimal transport, Lipman et al. 2023; rectified flow, Liu et al. 2023):

    .. math:: \alpha_t = t, \qquad \sigma_t = 1 - (1 - \sigma_\min)\, t, \qquad
              \frac{dx_t}{dt} = x_1 - (1 - \sigma_\min)\, x_0,

    with :math:`0 \le \sigma_\min < 1` the paths' width at the data end.

    Example:
        >>> c = CondOT(0.1)(torch.tensor([0.0, 0.5, 1.0]))
        >>> c.alpha, c.sigma, c.d_sigma
        (tensor([0.0000, 0.5000, 1.0000]), tensor([1.0000, 0.5500, 0.1000]), tensor([-0.9000, -0.9000, -0.9000]))
    """

    def __init__(self, sigma_min: float = 0.0) -> None:
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"CondOT: sigma_min must be in [0, 1), got {sigma_min}")
        self.sigma_min = float(sigma_min)

    def __call__(self, t: Tensor) -> Coefficients:
        slope = 1.0 - self.sigma_min
        return Coefficients(t, 1.0 - slope * t, torch.ones_like(t), torch.full_like(t, -slope))

    def path(self, t: Tensor, x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor]:
        r"""Two kernels (a training step's hot path): :math:`u = x_1 - (1 - \sigma_\min) x_0` and
        :math:`x_t = x_0 + t\,u`, the same point as :math:`t x_1 + (1 - (1 - \sigma_\min) t) x_0`."""
        velocity = x1 - x0 if self.sigma_min == 0.0 else torch.add(x1, x0, alpha=self.sigma_min - 1.0)
        return torch.addcmul(x0, t, velocity), velocity


class VP(Scheduler):
    r"""The variance-preserving path of score-based diffusion (Song et al. 2021) in flow-matching time
    (Lipman et al. 2023, eq. 19): with :math:`s = 1 - t` and
    :math:`T(s) = \beta_\min s + \tfrac12 (\beta_\max - \beta_\min) s^2`,

    .. math:: \alpha_t = e^{-T(s)/2}, \qquad \sigma_t = \sqrt{1 - \alpha_t^2}, \qquad
              \dot\alpha_t = \tfrac12 \alpha_t\, T'(s), \qquad \dot\sigma_t = -\alpha_t \dot\alpha_t / \sigma_t.

    :math:`\alpha_0 = e^{-T(1)/2} > 0` (see the module's note on the base), and :math:`\dot\sigma_t` grows like
    :math:`(1 - t)^{-1/2}` near the data, so the regression targets there are noisy (the optimal field stays
    bounded: :math:`\sigma_t\dot\sigma_t = -\alpha_t\dot\alpha_t`).

    Example:
        >>> c = VP()(torch.tensor([0.0, 0.5]))
        >>> round(c.alpha[0].item(), 4), torch.allclose(c.alpha ** 2 + c.sigma ** 2, torch.ones(2))
        (0.0066, True)
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        if not 0.0 < beta_min <= beta_max:
            raise ValueError(f"VP: need 0 < beta_min <= beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def __call__(self, t: Tensor) -> Coefficients:
        s, spread = 1.0 - t, self.beta_max - self.beta_min
        integral = self.beta_min * s + 0.5 * spread * s.square()
        alpha = torch.exp(-0.5 * integral)
        sigma = torch.sqrt(-torch.expm1(-integral))
        d_alpha = 0.5 * alpha * (self.beta_min + spread * s)
        return Coefficients(alpha, sigma, d_alpha, -alpha * d_alpha / sigma)


class Cosine(Scheduler):
    r"""The cosine (trigonometric, variance-preserving) path (Nichol & Dhariwal 2021; Albergo &
    Vanden-Eijnden 2023):

    .. math:: \alpha_t = \sin\tfrac{\pi t}{2}, \qquad \sigma_t = \cos\tfrac{\pi t}{2}, \qquad
              \frac{dx_t}{dt} = \tfrac{\pi}{2}\big(\cos\tfrac{\pi t}{2}\, x_1 - \sin\tfrac{\pi t}{2}\, x_0\big).

    Example:
        >>> Cosine()(torch.tensor([0.0, 1.0])).alpha
        tensor([0., 1.])
    """

    def __call__(self, t: Tensor) -> Coefficients:
        angle = 0.5 * math.pi * t
        sin, cos = torch.sin(angle), torch.cos(angle)
        return Coefficients(sin, cos, 0.5 * math.pi * cos, -0.5 * math.pi * sin)


class Polynomial(Scheduler):
    r"""The polynomial convex path (Lipman et al. 2024, *Flow matching guide and code*, §4.8):

    .. math:: \alpha_t = t^n, \qquad \sigma_t = 1 - t^n, \qquad \frac{dx_t}{dt} = n\, t^{n-1} (x_1 - x_0),

    with :math:`n > 0`; :math:`n = 1` is :class:`CondOT` with :math:`\sigma_\min = 0`.

    Example:
        >>> Polynomial(2)(torch.tensor([0.5])).d_alpha
        tensor([1.])
    """

    def __init__(self, n: float = 2.0) -> None:
        if not n > 0:
            raise ValueError(f"Polynomial: the exponent n must be > 0, got {n}")
        self.n = float(n)

    def __call__(self, t: Tensor) -> Coefficients:
        power = t.pow(self.n)
        d_alpha = self.n * t.pow(self.n - 1)
        return Coefficients(power, 1.0 - power, d_alpha, -d_alpha)


SCHEDULERS: dict[str, type[Scheduler]] = {"cond_ot": CondOT, "vp": VP, "cosine": Cosine, "polynomial": Polynomial}


def scheduler_of(scheduler: Union[str, Scheduler], sigma_min: float = 0.0) -> Scheduler:
    """A :class:`Scheduler` from a name in :data:`SCHEDULERS` (default parameters; ``sigma_min`` for ``"cond_ot"``
    only), or the object itself.

    Example:
        >>> scheduler_of("cosine"), scheduler_of("cond_ot", sigma_min=0.1)
        (Cosine(), CondOT(sigma_min=0.1))
    """
    if isinstance(scheduler, Scheduler):
        if sigma_min:
            raise ValueError("sigma_min applies to the 'cond_ot' scheduler by name; pass CondOT(sigma_min) instead")
        return scheduler
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; known: {sorted(SCHEDULERS)} or a Scheduler object")
    if scheduler == "cond_ot":
        return CondOT(sigma_min)
    if sigma_min:
        raise ValueError(f"sigma_min applies to the 'cond_ot' scheduler only, got scheduler={scheduler!r}")
    return SCHEDULERS[scheduler]()

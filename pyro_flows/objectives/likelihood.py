"""Likelihood objectives for :func:`pyro_flows.fit`: the negative log-likelihood, and its regularised form for
continuous flows."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..transforms import ContinuousFlow
from ..transforms.continuous import record_regularization


class NegativeLogLikelihood:
    """The default objective: ``-model(context).log_prob(x).mean()`` (``model()`` when ``context`` is None)."""

    def __call__(self, model: nn.Module, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        distribution = model() if context is None else model(context)
        return -distribution.log_prob(x).mean()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def continuous_layers(model: nn.Module) -> list[ContinuousFlow]:
    """The :class:`~.transforms.ContinuousFlow` layers inside ``model`` (a ``Flow``, maybe DDP-wrapped)."""
    return [m for m in model.modules() if isinstance(m, ContinuousFlow)]


class CNFRegularizedNLL:
    r"""Negative log-likelihood plus the regularisers of Finlay et al. (2020), "How to train your neural ODE".

    .. math:: \mathcal{L} = -\frac{1}{N}\sum_n \log p(x_n \mid c_n)
              + \frac{1}{N}\sum_n \sum_{\text{layers}} \Big(\lambda_K \int \|f\|^2 dt
              + \lambda_J \int \big\|\tfrac{\partial f}{\partial z}\big\|_F^2 dt\Big)

    The integrals come from the same solve as the log-likelihood (each :class:`~.transforms.ContinuousFlow`
    hands them to :func:`~.transforms.continuous.record_regularization`); they favour straight, smooth
    trajectories, which the solver integrates in fewer steps.

    Args:
        kinetic: :math:`\lambda_K`, weight of the kinetic energy.
        jacobian: :math:`\lambda_J`, weight of the Jacobian Frobenius norm.

    Example:
        >>> X = pf.data.two_moons(128, generator=torch.Generator().manual_seed(0))
        >>> flow = pf.CNF(features=2, hidden=(16, 16))
        >>> objective = pf.CNFRegularizedNLL(kinetic=0.01, jacobian=0.01)
        >>> len(pf.fit(flow, X, objective=objective, max_steps=2, progress=False))  # a loss per epoch of one batch
        2
    """

    def __init__(self, kinetic: float = 0.01, jacobian: float = 0.01) -> None:
        if kinetic < 0 or jacobian < 0:
            raise ValueError(f"CNFRegularizedNLL: weights must be >= 0, got kinetic={kinetic}, jacobian={jacobian}")
        self.weights = {"kinetic": float(kinetic), "jacobian": float(jacobian)}

    def __call__(self, model: nn.Module, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        layers = continuous_layers(model)
        if not layers:
            raise ValueError("CNFRegularizedNLL: the model has no ContinuousFlow layer to regularise")
        distribution = model() if context is None else model(context)
        with record_regularization(layers) as solves:
            loss = -distribution.log_prob(x).mean()
        for solve in solves:
            for name, weight in self.weights.items():
                loss = loss + weight * solve[name].mean()
        return loss

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kinetic={self.weights['kinetic']:g}, jacobian={self.weights['jacobian']:g})"

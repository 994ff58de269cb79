"""Continuous normalizing flows: :func:`CNF` and :func:`FFJORD`."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from .. import transforms as T
from ..nn.mlp import check_hidden
from .base import EMBEDDING_FEATURES, Flow, StandardNormal, check_vector_features, class_context


def _continuous_flow(
    name: str,
    features: int,
    context: int,
    hidden: Sequence[int],
    trace: str,
    classes: Optional[int],
    embedding_features: int,
    **kwargs,
) -> Flow:
    """The one ODE layer (conditional twin if a context or labels) and its flow; errors name ``name``."""
    features = check_vector_features(name, features)
    hidden = check_hidden(hidden, name)
    context, embedding = class_context(name, classes, context, embedding_features)
    cls = T.ConditionalContinuousFlow if context else T.ContinuousFlow
    extra: dict[str, Any] = {"context_features": context} if context else {}
    layer = cls(features, hidden=hidden, trace=trace, **extra, **kwargs)
    return Flow(StandardNormal(features), [layer], context, embedding)


def CNF(
    features: int,
    context: int = 0,
    hidden: Sequence[int] = (64, 64),
    trace: str = "exact",
    *,
    classes: Optional[int] = None,
    embedding_features: int = EMBEDDING_FEATURES,
    **kwargs,
) -> Flow:
    r"""A continuous normalizing flow (Chen et al. 2018; FFJORD, Grathwohl et al. 2019): one ODE layer.

    :math:`\frac{dz}{dt} = f(z, t[, c])` from the base :math:`\mathcal{N}(0, I_D)` at :math:`t_0`
    to the data at :math:`t_1`, with a :class:`~.transforms.ContinuousFlow` (conditional twin if
    ``context``) whose :class:`~.nn.VectorField` has ``hidden`` widths. Train it by maximum
    likelihood (``pf.fit(flow, X)``, optionally ``objective=pf.CNFRegularizedNLL(...)``) or by
    flow matching (``objective=pf.FlowMatching()``); likelihoods come from the ODE either way.
    ``kwargs`` go to the layer (:class:`~.transforms.ContinuousFlow`: ``solver``, ``atol``, ``rtol``, ``t0``,
    ``t1``, ``options``, ``adjoint``, ``probe``, ``activation``, ``vector_field``, ``field``, ``steps``,
    ``null_context``; ``field="residual"`` is :class:`~.nn.ResidualVectorField`, the better field for conditional
    flow matching):

    - ``steps=n`` with a fixed-grid ``solver`` (``"euler"``, ``"midpoint"``, ``"heun2"``, ``"rk4"``, ...:
      :data:`~.transforms.continuous.FIXED_SOLVERS`) integrates in exactly ``n`` equal steps, for sampling and
      likelihoods (few-step sampling of a flow-matching or reflowed model; ``steps < 1`` or an adaptive solver is a
      ValueError); :func:`~pyro_flows.fixed_steps` does the same inside a ``with`` block.
    - ``null_context=True`` (conditional flows) adds the learned null context of classifier-free guidance: train
      with ``pf.FlowMatching(context_dropout=p)`` and sample with :func:`~pyro_flows.guided_sample`.

    A CNF is over vectors ``(..., D)`` (``features`` an integer; for images use :func:`Glow` or
    ``RealNVP(shape=...)``). Conditioning as in every vector flow: ``context=F`` takes context
    vectors ``(..., F)``; ``classes=K`` takes integer labels ``(...)`` in ``0 .. K-1``, embedded by a
    learned :class:`~.nn.ClassEmbedding` of ``embedding_features`` (not both; see
    :func:`~.base.class_context`); the vector field sees the context.

    References
    ----------
    - R. T. Q. Chen, Y. Rubanova, J. Bettencourt and D. Duvenaud.
      *Neural Ordinary Differential Equations*. NeurIPS 2018.
      `arXiv:1806.07366 <https://arxiv.org/abs/1806.07366>`__
    - W. Grathwohl, R. T. Q. Chen, J. Bettencourt, I. Sutskever and D. Duvenaud.
      *FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models*. ICLR 2019.
      `arXiv:1810.01367 <https://arxiv.org/abs/1810.01367>`__

    Example:
        >>> flow = CNF(features=2, hidden=(16, 16))
        >>> flow().log_prob(torch.randn(7, 2)).shape
        torch.Size([7])
        >>> CNF(features=2, context=3, trace="hutchinson")(torch.randn(3)).sample((4,)).shape
        torch.Size([4, 2])
        >>> CNF(features=2, classes=3, hidden=(16, 16))(torch.tensor([0, 2])).log_prob(torch.randn(2)).shape
        torch.Size([2])
        >>> CNF(features=2, hidden=(16,), solver="rk4", steps=4)().sample((3,)).shape  # 4 RK4 steps
        torch.Size([3, 2])
    """
    return _continuous_flow("CNF", features, context, hidden, trace, classes, embedding_features, **kwargs)


def FFJORD(
    features: int,
    context: int = 0,
    hidden: Sequence[int] = (64, 64),
    trace: str = "hutchinson",
    *,
    classes: Optional[int] = None,
    embedding_features: int = EMBEDDING_FEATURES,
    **kwargs,
) -> Flow:
    """:func:`CNF` with Hutchinson's trace estimator by default, as in FFJORD (Grathwohl et al. 2019).

    The other arguments (``classes``, ``embedding_features``, the solver's) are :func:`CNF`'s.

    References
    ----------
    - W. Grathwohl, R. T. Q. Chen, J. Bettencourt, I. Sutskever and D. Duvenaud.
      *FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models*. ICLR 2019.
      `arXiv:1810.01367 <https://arxiv.org/abs/1810.01367>`__

    Example:
        >>> FFJORD(features=2, hidden=(16, 16))().log_prob(torch.randn(7, 2)).shape
        torch.Size([7])
    """
    return _continuous_flow("FFJORD", features, context, hidden, trace, classes, embedding_features, **kwargs)

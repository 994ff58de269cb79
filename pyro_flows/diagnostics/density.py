r"""Diagnostics of fitted flows: likelihoods per dimension.

Functions of log-densities (a tensor, a NumPy array, a sequence or one
number), so they apply to any model's scores, or of a model and data
(``bits_per_dim(model, images, context=labels)``: the log-densities are then
computed in evaluation mode, without gradients, in batches):

* :func:`nats_per_dim` — :math:`-\overline{\log p} / D`;
* :func:`bits_per_dim` — :math:`-\overline{\log p} / (D \ln 2)`, optionally
  converted to the discrete likelihood of dequantised integer data.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch

LogProb = Union[torch.Tensor, np.ndarray, Sequence[float], float]


@torch.no_grad()
def model_log_prob(
    model: torch.nn.Module, data: torch.Tensor, context: Optional[torch.Tensor] = None, batch_size: int = 1024
) -> torch.Tensor:
    """``model(context).log_prob(data)`` (``model()`` without context) in eval mode, in batches of rows."""
    if not isinstance(data, torch.Tensor) or data.dim() < 2:
        raise ValueError(f"data must be a tensor of rows (rows, *event_shape), got {getattr(data, 'shape', data)!r}")
    if context is not None and (not isinstance(context, torch.Tensor) or context.shape[:1] != data.shape[:1]):
        raise ValueError("context must be a tensor with one row per data row")
    was_training = model.training
    model.eval()
    try:
        scores = []
        for start in range(0, data.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            distribution = model() if context is None else model(context[rows])
            scores.append(distribution.log_prob(data[rows]))
        return torch.cat(scores)
    finally:
        model.train(was_training)


def _scores(log_prob, dims, context, batch_size) -> tuple[LogProb, int]:
    """``(log-densities, D)`` from either form of the arguments (see the module docstring)."""
    if isinstance(log_prob, torch.nn.Module):
        data = dims
        scores = model_log_prob(log_prob, data, context, batch_size)
        return scores, data[0].numel()
    if context is not None:
        raise ValueError("context goes with a model and its data, not with log-densities")
    return log_prob, dims


def _mean_log_prob(log_prob: LogProb, dims: int) -> float:
    """The mean of the log-densities (float64), after checking ``dims`` and the values."""
    if isinstance(dims, bool) or not isinstance(dims, (int, np.integer)) or dims < 1:
        raise ValueError(f"dims must be a positive integer (the number of dimensions D), got {dims!r}")
    if isinstance(log_prob, torch.Tensor):
        log_prob = log_prob.detach().to("cpu", torch.float64).numpy()
    values = np.asarray(log_prob, dtype=np.float64)
    if values.size == 0:
        raise ValueError("log_prob is empty: need at least one log-density")
    if not np.isfinite(values).all():
        raise ValueError(f"log_prob has {int((~np.isfinite(values)).sum())} NaN or inf values")
    return float(values.mean())


def nats_per_dim(
    log_prob: Union[LogProb, torch.nn.Module],
    dims: Union[int, torch.Tensor],
    *,
    context: Optional[torch.Tensor] = None,
    batch_size: int = 1024,
) -> float:
    r"""Negative mean log-density per dimension, in nats: :math:`-\frac{1}{N D} \sum_n \log p(x_n)`.

    Args:
        log_prob: log-densities :math:`\log p(x_n)` of the rows (any shape; all entries are averaged),
            or a model (then ``dims`` is the data, ``context`` its rows' context).
        dims: :math:`D`, the number of dimensions of one row (or the data).

    Example:
        >>> nats_per_dim([-2.0, -4.0], dims=2)
        1.5
    """
    log_prob, dims = _scores(log_prob, dims, context, batch_size)
    return -_mean_log_prob(log_prob, dims) / dims


def bits_per_dim(
    log_prob: Union[LogProb, torch.nn.Module],
    dims: Union[int, torch.Tensor],
    levels: Optional[int] = None,
    *,
    context: Optional[torch.Tensor] = None,
    batch_size: int = 1024,
) -> float:
    r"""Negative mean log-likelihood per dimension, in bits.

    ``bits_per_dim(model, data, context=...)`` scores ``data`` under a model first.
    A model of integer data (:class:`~pyro_flows.dequantization.Dequantized`, e.g.
    ``pf.Glow``) already returns the discrete log-likelihood (bound): leave
    ``levels`` out for it (giving it raises a ValueError: the dequantisation would count twice).

    Continuous data (``levels=None``):

    .. math:: \text{bits/dim} = -\frac{\overline{\log p(x)}}{D \ln 2}.

    Discrete data dequantised into :math:`[0, 1)`: integer values
    :math:`x \in \{0, \dots, L-1\}^D` (``levels`` :math:`= L`, e.g. 256 for
    8-bit images) are modelled as :math:`x_c = (x + u) / L` with
    :math:`u \sim \mathcal{U}[0, 1)^D`, and ``log_prob`` holds :math:`\log p(x_c)`
    under the continuous density on that scale. The density of the unscaled
    :math:`x + u` is :math:`p(x_c) / L^D`, and by Jensen's inequality

    .. math:: \log P(x) \ge \mathbb{E}_u\big[\log p\big((x + u)/L\big)\big] - D \log L,

    so the returned value is the upper bound on the discrete bits/dim

    .. math:: \text{bits/dim} = \frac{-\overline{\log p(x_c)} + D \log L}{D \ln 2}
              = -\frac{\overline{\log p(x_c)}}{D \ln 2} + \log_2 L,

    where the mean over rows estimates the expectation over :math:`u`. Pass
    ``levels`` only when ``log_prob`` is on the :math:`[0, 1)` scale; for data
    dequantised on the integer scale (:math:`x + u`), leave it ``None``.

    Args:
        log_prob: log-densities of the rows (any shape; all entries are averaged), or a model.
        dims: :math:`D`, the number of dimensions of one row (or, with a model, the data).
        levels: :math:`L`, the number of discrete levels per dimension, or ``None`` for continuous data.

    Example:
        >>> bits_per_dim([-2 * math.log(2)], dims=2)   # p = 1/4 on 2 dims: 1 bit/dim
        1.0
        >>> bits_per_dim([0.0], dims=3, levels=256)    # uniform on [0, 1)^3: 8 bits/dim
        8.0
    """
    if levels is not None and isinstance(log_prob, torch.nn.Module):
        from ..dequantization import Dequantized

        if isinstance(log_prob, Dequantized):
            raise ValueError(
                f"bits_per_dim: the model is Dequantized (levels={log_prob.levels}): its log_prob is already the "
                "discrete data's, so leave levels out (passing it would count the dequantisation twice)"
            )
    log_prob, dims = _scores(log_prob, dims, context, batch_size)
    mean = _mean_log_prob(log_prob, dims)
    if levels is None:
        return -mean / (dims * math.log(2))
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 2:
        raise ValueError(
            f"levels must be an integer >= 2 (the number of discrete values per dimension), got {levels!r}"
        )
    return (-mean + dims * math.log(levels)) / (dims * math.log(2))

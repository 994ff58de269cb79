r"""Diagnostics of fitted flows: likelihoods per dimension.

Plain functions of log-densities (a tensor, a NumPy array, a sequence or one
number), so they apply to any model's scores:

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


def nats_per_dim(log_prob: LogProb, dims: int) -> float:
    r"""Negative mean log-density per dimension, in nats: :math:`-\frac{1}{N D} \sum_n \log p(x_n)`.

    Args:
        log_prob: log-densities :math:`\log p(x_n)` of the rows (any shape; all entries are averaged).
        dims: :math:`D`, the number of dimensions of one row.

    Example:
        >>> nats_per_dim([-2.0, -4.0], dims=2)
        1.5
    """
    return -_mean_log_prob(log_prob, dims) / dims


def bits_per_dim(log_prob: LogProb, dims: int, levels: Optional[int] = None) -> float:
    r"""Negative mean log-likelihood per dimension, in bits.

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
        log_prob: log-densities of the rows (any shape; all entries are averaged).
        dims: :math:`D`, the number of dimensions of one row.
        levels: :math:`L`, the number of discrete levels per dimension, or ``None`` for continuous data.

    Example:
        >>> bits_per_dim([-2 * math.log(2)], dims=2)   # p = 1/4 on 2 dims: 1 bit/dim
        1.0
        >>> bits_per_dim([0.0], dims=3, levels=256)    # uniform on [0, 1)^3: 8 bits/dim
        8.0
    """
    mean = _mean_log_prob(log_prob, dims)
    if levels is None:
        return -mean / (dims * math.log(2))
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 2:
        raise ValueError(
            f"levels must be an integer >= 2 (the number of discrete values per dimension), got {levels!r}"
        )
    return (-mean + dims * math.log(levels)) / (dims * math.log(2))

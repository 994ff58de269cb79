"""Normalisation layers: ActNorm (Glow), flow batch normalisation (RealNVP, MAF) and a fixed Standardize."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .base import FlowTransform


def _batch_statistics(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of each feature over all batch dims."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] < 2:
        raise ValueError(f"batch statistics need at least 2 samples, got input of shape {tuple(x.shape)}")
    var, mean = torch.var_mean(flat, dim=0, unbiased=False)
    return mean, var + eps


class ActNorm(FlowTransform):
    r"""Per-feature (per-channel for images) affine map with data-dependent initialisation (Kingma & Dhariwal 2018).

    .. math:: y = x \odot e^{s} + b, \qquad \log|\det J| = n \sum_c s_c,

    with one :math:`(s_c, b_c)` per feature of a vector (:math:`n = 1`) or per
    channel of a ``(C, H, W)`` image, shared by its :math:`n = HW` pixels (Glow's ActNorm).

    The first call in training mode sets :math:`s, b` so that *that call's*
    outputs have zero mean and unit variance per feature (channel): when the first
    call inverts data (density estimation) the data are standardised on
    their way to the base; when it is a forward call (a VI guide sampling)
    the samples are. After that :math:`s, b` are ordinary parameters. A call
    with a single value per channel (one vector, e.g. ``flow().sample()``) has no
    spread to initialise from: it leaves the layer as it is (the identity when fresh)
    and uninitialised, so the next call with more values initialises it. Once the layer has seen its
    ``initialized`` buffer set it reads it no more (so a compiled flow has no graph break here); loading a
    state dict makes it read the loaded flag again.

    Args:
        features: :math:`D` for vectors, or an image shape ``(C, H, W)``.

    Example:
        >>> layer = ActNorm(3)
        >>> z = layer.inv(5 + 2 * torch.randn(1000, 3))  # first call: initialises
        >>> bool(z.mean(0).abs().max() < 1e-4)
        True
        >>> ActNorm((3, 8, 8)).inv(torch.rand(16, 3, 8, 8)).shape
        torch.Size([16, 3, 8, 8])

    References:
        - Kingma & Dhariwal (2018), *Glow: Generative flow with invertible 1x1 convolutions*, arXiv:1807.03039.
    """

    initialized: Tensor  # buffer

    def __init__(self, features: Union[int, Sequence[int]], eps: float = 1e-6) -> None:
        super().__init__((features,) if isinstance(features, int) else tuple(features))
        if len(self.event_shape) not in (1, 3):
            raise ValueError(f"ActNorm: features must be D or an image shape (C, H, W), got {features!r}")
        channels = self.event_shape[0]
        self.eps = eps
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.shift = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))
        self._seen_initialized = False

    def _per_pixel(self, parameter: Tensor) -> Tensor:
        """A per-channel parameter ``(C,)`` shaped to broadcast over the event."""
        return parameter.reshape(parameter.shape + (1,) * (len(self.event_shape) - 1))

    def _log_det(self, batch_shape: torch.Size) -> Tensor:
        pixels = self.event_shape[1:].numel()
        return (pixels * self.log_scale.sum()).expand(batch_shape)

    @torch.no_grad()
    def _initialize(self, values: Tensor, inverse: bool) -> None:
        channels_last = values.detach().movedim(-len(self.event_shape), -1)
        mean, var = _batch_statistics(channels_last, self.eps)
        log_std = 0.5 * var.log()
        if inverse:  # standardise z = (y - b) e^{-s}
            self.log_scale.copy_(log_std)
            self.shift.copy_(mean)
        else:  # standardise y = x e^{s} + b
            self.log_scale.copy_(-log_std)
            self.shift.copy_(-mean * torch.exp(-log_std))
        self.initialized.fill_(True)
        self._seen_initialized = True

    def _maybe_initialize(self, values: Tensor, inverse: bool) -> None:
        if not self.initializing():
            return
        per_channel = values.numel() // self.event_shape[0]
        if per_channel >= 2:  # one value per channel has no spread: wait for a larger call
            self._initialize(values, inverse)

    def initializing(self) -> bool:
        """Whether a call now may initialise the layer from its values (training mode, ``initialized`` not set);
        when False the layer is the fixed map of its parameters."""
        # ``_seen_initialized`` remembers (in Python) that the buffer was True: an initialised layer reads no tensor
        # on the host, so torch.compile traces it without a graph break; loading a state dict forgets it
        if not self.training or getattr(self, "_seen_initialized", False):  # absent in older pickles
            return False
        if bool(self.initialized):
            self._seen_initialized = True
            return False
        return True

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._seen_initialized = False  # the loaded flag may be False
        super()._load_from_state_dict(*args, **kwargs)

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        self._maybe_initialize(x, inverse=False)
        y = x * self._per_pixel(self.log_scale.exp()) + self._per_pixel(self.shift)
        return y, self._log_det(x.shape[: x.dim() - len(self.event_shape)])

    def _backward(self, y: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        self._maybe_initialize(y, inverse=True)
        x = (y - self._per_pixel(self.shift)) * self._per_pixel(torch.exp(-self.log_scale))
        return x, -self._log_det(y.shape[: y.dim() - len(self.event_shape)])


class BatchNorm(FlowTransform):
    r"""Batch normalisation as a bijection (Dinh et al. 2017; Papamakarios et al. 2017).

    In the data→base direction (the inverse of this base→data layer),

    .. math::
        z = \frac{y - \mu}{\sqrt{\sigma^2 + \epsilon}}\, e^{\gamma} + \beta, \qquad
        \log|\det J| = \sum_i \big(\gamma_i - \tfrac12 \log(\sigma_i^2 + \epsilon)\big).

    In training mode the inverse uses the batch mean and variance of the data
    and updates running averages (``momentum``); in eval mode, in the
    forward (sampling) direction, and for a batch of a single row (which has no
    variance), the running averages are used, so the layer
    is an exact bijection with an exact log-det there.

    Example:
        >>> layer = BatchNorm(3)
        >>> z = layer.inv(torch.randn(100, 3))  # training mode: batch statistics
        >>> _ = layer.eval()                     # now a fixed affine map
        >>> torch.allclose(layer(layer.inv(z)), z, atol=1e-5)
        True

    References:
        - Dinh, Sohl-Dickstein & Bengio (2017), *Density estimation using Real NVP* (batch normalisation as a flow
          layer), arXiv:1605.08803.
        - Papamakarios, Pavlakou & Murray (2017), *Masked autoregressive flow for density estimation*, arXiv:1705.07057.
        - Ioffe & Szegedy (2015), *Batch normalization*, arXiv:1502.03167.
    """

    running_mean: Tensor  # buffers
    running_var: Tensor

    def __init__(self, features: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__((features,))
        self.momentum, self.eps = momentum, eps
        self.log_gamma = nn.Parameter(torch.zeros(features))
        self.beta = nn.Parameter(torch.zeros(features))
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))

    def _statistics(self, y: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        if y is None or not self.training or y.reshape(-1, y.shape[-1]).shape[0] < 2:
            return self.running_mean, self.running_var + self.eps
        mean, var = _batch_statistics(y, self.eps)
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() - self.eps, self.momentum)
        return mean, var

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        mean, var = self._statistics(None)
        log_scale = 0.5 * var.log() - self.log_gamma
        return (x - self.beta) * log_scale.exp() + mean, log_scale.sum().expand(x.shape[:-1])

    def _backward(self, y: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        mean, var = self._statistics(y)
        log_scale = self.log_gamma - 0.5 * var.log()
        return (y - mean) * log_scale.exp() + self.beta, log_scale.sum().expand(y.shape[:-1])


class Standardize(FlowTransform):
    r"""A fixed (non-trainable) per-feature affine map, base→data: :math:`y = \mu + \sigma \odot x`.

    .. math:: y = \mu + \sigma \odot x, \qquad
              \log|\det J_f(x)| = \sum_{i=1}^{D} \log \sigma_i .

    Put last in a flow's base→data layers, it makes the flow model data
    with location :math:`\mu` and scale :math:`\sigma` while the layers before
    it see standardised values :math:`(y - \mu) / \sigma`; its log-det keeps
    densities in the data's own units. ``loc`` and ``scale`` are buffers: they
    are saved in the ``state_dict`` and follow ``.to(device, dtype)``, but an
    optimizer never sees them.

    Args:
        loc: :math:`\mu`, shape ``(D,)``.
        scale: :math:`\sigma`, shape ``(D,)``, finite and positive.

    Example:
        >>> layer = Standardize(torch.tensor([10.0, -1.0]), torch.tensor([100.0, 0.5]))
        >>> layer(torch.tensor([[1.0, 2.0]]))
        tensor([[110.,   0.]])
        >>> y, ladj = layer.call_and_ladj(torch.zeros(1, 2))  # ladj = log 100 + log 0.5
        >>> ladj
        tensor([3.9120])

    References:
        - Papamakarios, Nalisnick, Rezende, Mohamed & Lakshminarayanan (2021), *Normalizing flows for probabilistic
          modeling and inference*, arXiv:1912.02762.
    """

    loc: Tensor  # buffers
    scale: Tensor

    def __init__(self, loc: Tensor, scale: Tensor) -> None:
        loc, scale = torch.as_tensor(loc), torch.as_tensor(scale)
        if loc.dim() != 1 or scale.shape != loc.shape:
            raise ValueError(
                f"Standardize: loc and scale must both have shape (D,), got {tuple(loc.shape)} and {tuple(scale.shape)}"
            )
        if not bool(torch.isfinite(loc).all()) or not bool((torch.isfinite(scale) & (scale > 0)).all()):
            raise ValueError("Standardize: loc must be finite and scale finite and positive")
        super().__init__((loc.shape[0],))
        self.register_buffer("loc", loc.clone())
        self.register_buffer("scale", scale.clone())

    @classmethod
    def from_data(cls, data: Tensor, min_scale: float = 1e-6) -> Standardize:
        r"""The map whose inverse standardises ``data`` ``(N, D)``: column means and standard deviations.

        The standard deviation (``N - 1`` denominator) of each column is floored at ``min_scale`` times the
        largest column's, so constant columns give a finite, invertible map; when every column is constant, at
        ``min_scale`` times the largest of 1 and the columns' absolute means. The floor depends on the spreads
        only: a column far from zero (a mean over ``1 / min_scale`` times its spread) keeps its own spread.
        """
        if data.dim() != 2 or data.shape[0] < 2:
            raise ValueError(f"Standardize.from_data: need data of shape (N >= 2, D), got {tuple(data.shape)}")
        std, mean = torch.std_mean(data, dim=0)
        overflow = ~(torch.isfinite(std) & torch.isfinite(mean))
        if bool(overflow.any()):
            columns = torch.nonzero(overflow).flatten().tolist()
            largest = data[:, overflow].abs().max().item()
            raise ValueError(
                f"Standardize.from_data: the mean or standard deviation of column(s) {columns[:10]} overflows "
                f"{data.dtype} (largest |value| {largest:.3g}); rescale those columns"
            )
        reference = torch.amax(std)
        if not bool(reference > 0):  # every column constant
            reference = torch.amax(mean.abs()).clamp(min=1.0)
        floor = (min_scale * reference).clamp(min=torch.finfo(std.dtype).tiny)
        return cls(mean, torch.maximum(std, floor))

    def _log_det(self, batch_shape: torch.Size) -> Tensor:
        return self.scale.log().sum().expand(batch_shape)

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return self.loc + self.scale * x, self._log_det(x.shape[:-1])

    def _backward(self, y: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return (y - self.loc) / self.scale, -self._log_det(y.shape[:-1])

    def extra_repr(self) -> str:
        return f"features={self.loc.shape[0]}"

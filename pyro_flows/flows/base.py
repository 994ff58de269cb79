"""The flow: a base distribution and a stack of layers as one ``nn.Module``.

``flow(context)`` returns a :class:`FlowDistribution`, a Pyro
``TransformedDistribution`` whose ``log_prob`` and ``rsample_and_log_prob``
take the fused path (each layer's log-det in the same pass as its output).
"""

from __future__ import annotations

import math
from collections.abc import Sequence as SequenceABC
from numbers import Integral
from typing import Optional, Sequence, Union, cast

import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Transform
from torch.distributions.utils import _sum_rightmost

from .. import transforms as T
from ..nn import ClassEmbedding
from ..transforms.base import check_shape
from ..transforms.cache import same_state, state_key
from ..utils import check_device_dtype, reference_tensor

EMBEDDING_FEATURES = 16
"""The default size of a class-conditional flow's label embedding (``embedding_features=``)."""

Context = Union[Tensor, tuple[Tensor, ...]]
"""What a flow is called with: a tensor, or a tuple of tensors for an embedding that takes one (a condition image
with its labels: :class:`~pyro_flows.nn.AlignedContext`)."""


def check_vector_features(name: str, features: int) -> int:
    """``features`` as an int if it is an integer >= 1 (the dimension of a vector flow), else a ValueError.

    An event shape such as ``(C, H, W)`` is refused with a pointer to the image flows.

    Example:
        >>> check_vector_features("NSF", 3)
        3
    """
    if isinstance(features, SequenceABC) and not isinstance(features, str):
        raise ValueError(
            f"{name} is a flow over vectors: features must be an integer >= 1, got the shape {tuple(features)}; "
            "for images use pf.Glow(shape=...) or pf.RealNVP(shape=...)"
        )
    if isinstance(features, bool) or not isinstance(features, Integral) or features < 1:
        raise ValueError(f"{name}: features must be an integer >= 1, got {features!r}")
    return int(features)


def class_context(
    name: str, classes: Optional[int], context: int, embedding_features: int
) -> tuple[int, Optional[ClassEmbedding]]:
    r"""The context size a flow's layers see and the embedding in front of them: one rule for every factory.

    ``classes=K`` makes a class-conditional flow: the flow is called with integer labels of shape
    ``(...)`` in :math:`\{0, \dots, K-1\}`, which a :class:`~.nn.ClassEmbedding` maps to learned vectors
    :math:`e_y \in \mathbb{R}^{E}` (``E = embedding_features``), the layers' context; the distribution's batch
    shape is the labels' shape. Otherwise the layers see ``context`` features as given (no embedding). A flow
    takes one or the other: ``classes`` with ``context > 0`` raises a ValueError, as do ``classes < 2`` and
    ``embedding_features < 1`` (checked by :class:`~.nn.ClassEmbedding`).

    Returns ``(context_features, embedding)``, the last two arguments of :class:`Flow`.

    Example:
        >>> features, embedding = class_context("NSF", classes=10, context=0, embedding_features=4)
        >>> features, embedding(torch.tensor([0, 3])).shape
        (4, torch.Size([2, 4]))
    """
    if classes is None:
        return context, None
    if context:
        raise ValueError(
            f"{name}: a flow is conditioned on class labels (classes=) or a context vector (context=), not both; "
            f"got classes={classes!r}, context={context!r}"
        )
    return embedding_features, ClassEmbedding(classes, embedding_features)


_LOG_2PI = math.log(2 * math.pi)


class StandardNormalDistribution(dist.Independent):
    r"""What :class:`StandardNormal` returns: Pyro's ``Normal(0, 1).to_event(n)``, scored in closed form.

    .. math:: \log p_0(z) = -\tfrac12 \lVert z \rVert^2 - \tfrac{N}{2} \log 2\pi,

    with :math:`N` the number of elements of one event (``event_shape.numel()``): one fused dot product per row
    and two scalar ops, instead of ``Normal.log_prob``'s eight elementwise kernels and the event sum (and their
    autograd nodes), 0.1 ms of a 5 ms MAF D=8 train step. The wrapped ``Normal``'s ``loc`` and ``scale`` are
    :class:`StandardNormal`'s fixed zeros and ones. Shapes: ``value`` ``(..., *event_shape)`` -> ``(...)``
    broadcast with the batch shape.

    Example:
        >>> base = StandardNormal(3)()
        >>> z = torch.randn(5, 3)
        >>> torch.allclose(base.log_prob(z), torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1))
        True
    """

    def log_prob(self, value: Tensor) -> Tensor:
        flat = value.flatten(-len(self.event_shape)) if len(self.event_shape) > 1 else value
        log_density = torch.linalg.vecdot(flat, flat).mul_(-0.5).sub_(0.5 * self.event_shape.numel() * _LOG_2PI)
        batch = self.batch_shape
        if batch and log_density.shape[max(log_density.dim() - len(batch), 0) :] != batch:
            log_density = log_density.expand(torch.broadcast_shapes(log_density.shape, batch))
        return log_density


class StandardNormal(nn.Module):
    r"""The base :math:`\mathcal{N}(0, I)` as a module, so it follows ``.to(device, dtype)``.

    ``features`` is :math:`D` for vectors or an event shape such as ``(C, H, W)``;
    ``forward(batch_shape)`` returns the distribution with that batch shape (a
    :class:`StandardNormalDistribution`, scored in closed form). Its buffers ``loc`` and ``scale`` are zeros and
    ones, registered only to follow ``.to()`` and ``state_dict``: they are not parameters of the density.
    """

    loc: Tensor
    scale: Tensor

    def __init__(self, features: Union[int, Sequence[int]]) -> None:
        super().__init__()
        shape = (features,) if isinstance(features, int) else tuple(features)
        self.register_buffer("loc", torch.zeros(shape))
        self.register_buffer("scale", torch.ones(shape))

    def forward(self, batch_shape: tuple = ()) -> Distribution:
        # validate_args=False: the values scored are the layers' outputs (a NaN there is a NaN log-density, which
        # fit recovers from), never the caller's, which FlowDistribution checks itself
        normal = dist.Normal(self.loc, self.scale, validate_args=False)
        return StandardNormalDistribution(normal, self.loc.dim()).expand(batch_shape)


def _accumulate(total: Union[Tensor, float], ladj: Tensor) -> Union[Tensor, float]:
    """``total + ladj``, the first layer's log-det as it is (no kernel and autograd node adding it to 0)."""
    return ladj if isinstance(total, float) and total == 0.0 else total + ladj


def _fused(t: Transform) -> bool:
    return isinstance(t, (T.FlowTransform, T.ConditionedTransform))


class FlowDistribution(dist.TransformedDistribution):
    r"""A Pyro ``TransformedDistribution`` whose own methods take the fused path.

    :math:`\log p(y) = \log p_0(f^{-1}(y)) + \log|\det J_{f^{-1}}(y)|`: ``log_prob``, ``to_base`` call each
    layer's ``inverse_and_ladj`` once, ``rsample``, ``sample``, ``rsample_and_log_prob``, ``from_base`` its
    ``call_and_ladj`` once, and no layer stores anything. Layers from ``pyro.distributions.transforms`` mix in
    freely (they take the generic path).

    ``log_prob`` of this distribution's own last ``rsample`` (what a Pyro guide scores) is read from that
    sample's pass, with no inverse (sequential for IAF layers), while the layers' parameters, buffers and
    modes and the sample are unchanged (see :func:`~pyro_flows.transforms.cache.state_key`).
    """

    _last_sample: Optional[tuple] = None  # (y, z, sum of log-dets, state key) of the last rsample

    def _check_value(self, value: Tensor) -> None:
        check_shape("FlowDistribution.log_prob", value, self.event_shape, "value")
        if self.batch_shape:  # any batch broadcasts with an unconditional flow's ()
            batch = value.shape[: value.dim() - len(self.event_shape)]
            try:
                torch.broadcast_shapes(batch, self.batch_shape)
            except RuntimeError:
                raise ValueError(
                    f"log_prob: value of batch shape {tuple(batch)} does not broadcast with the "
                    f"distribution's batch shape {tuple(self.batch_shape)}"
                ) from None
        check_device_dtype("log_prob", value, self.base_dist.mean, "value")
        # one reduction read: the sum is finite when every entry is (one kernel, against isfinite's two and its
        # (N, D) boolean tensor: 2 against 19 us for a (512, 8) batch, 1 thread); a non-finite sum (also an
        # overflow of finite entries) is checked entry by entry
        if not math.isfinite(value.sum().item()) and not bool(torch.isfinite(value).all()):
            rows = torch.nonzero(~torch.isfinite(value).reshape(-1, self.event_shape.numel()).all(-1)).flatten()
            raise ValueError(f"log_prob: value has NaN or inf entries (at flattened batch rows {rows[:10].tolist()})")

    def _base_log_prob(self, z: Tensor) -> Tensor:
        return _sum_rightmost(self.base_dist.log_prob(z), len(self.event_shape) - len(self.base_dist.event_shape))

    def _to_base(self, y: Tensor) -> tuple[Tensor, Union[Tensor, float]]:
        """``(f^{-1}(y), log|det J_{f^{-1}}(y)|)``, each layer's log-det summed over the flow's event dims."""
        event_dim, ladj_sum = len(self.event_shape), cast(Union[Tensor, float], 0.0)
        for t in reversed(self.transforms):
            if _fused(t):
                x, ladj = t.inverse_and_ladj(y)
            else:
                x = t.inv(y)
                ladj = -t.log_abs_det_jacobian(x, y)
            ladj_sum = _accumulate(ladj_sum, _sum_rightmost(ladj, event_dim - t.codomain.event_dim))
            y = x
        return y, ladj_sum

    def _from_base(self, z: Tensor) -> tuple[Tensor, Union[Tensor, float]]:
        """``(f(z), log|det J_f(z)|)``, each layer's log-det summed over the flow's event dims."""
        event_dim, ladj_sum = len(self.event_shape), cast(Union[Tensor, float], 0.0)
        for t in self.transforms:
            if _fused(t):
                y, ladj = t.call_and_ladj(z)
            else:
                y = t(z)
                ladj = t.log_abs_det_jacobian(z, y)
            ladj_sum = _accumulate(ladj_sum, _sum_rightmost(ladj, event_dim - t.domain.event_dim))
            z = y
        return z, ladj_sum

    def _state_key(self, *tensors: Tensor) -> Optional[tuple]:
        modules = [t.layer if isinstance(t, T.ConditionedTransform) else t for t in self.transforms]
        contexts = [t.context for t in self.transforms if isinstance(t, T.ConditionedTransform)]
        return state_key([m for m in modules if isinstance(m, nn.Module)], *contexts, *tensors)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._check_value(value)
        batch = value.shape[: value.dim() - len(self.event_shape)]
        if batch.numel() == 0:  # no rows: an empty result (torch's reductions cannot reshape 0 elements)
            return value.new_zeros(torch.broadcast_shapes(batch, self.batch_shape))
        last = self._last_sample
        if last is not None and last[0] is value and same_state(last[3], self._state_key(*last[:2])):
            return self._base_log_prob(last[1]) - last[2]
        z, ladj = self._to_base(value)
        return self._base_log_prob(z) + ladj

    def _base_rsample(self, sample_shape: tuple, temperature: float) -> Tensor:
        z = self.base_dist.rsample(sample_shape)
        if temperature == 1.0:
            return z
        if not temperature > 0:
            raise ValueError(f"sample: temperature must be positive, got {temperature}")
        base = self.base_dist
        while isinstance(base, (dist.Independent, torch.distributions.Independent, dist.ExpandedDistribution)):
            base = base.base_dist
        if not isinstance(base, (torch.distributions.Normal, torch.distributions.MultivariateNormal)):
            raise ValueError(f"sample: temperature needs a Gaussian base distribution, got {type(base).__name__}")
        loc = self.base_dist.mean
        return loc + temperature * (z - loc)

    def rsample(self, sample_shape: tuple = (), temperature: float = 1.0) -> Tensor:
        r"""A reparameterised sample; ``temperature`` :math:`T` scales the Gaussian base around its mean.

        :math:`T < 1` draws from the base :math:`\mathcal{N}(\mu, T^2 \Sigma)`: samples
        of higher density and less diversity (Kingma & Dhariwal 2018, Glow).
        """
        z = self._base_rsample(sample_shape, temperature)
        y, ladj = self._from_base(z)
        key = self._state_key(y, z)
        self._last_sample = None if key is None else (y, z, ladj, key)
        return y

    def sample(self, sample_shape: tuple = (), temperature: float = 1.0) -> Tensor:
        """A sample without gradients (see :meth:`rsample` for ``temperature``)."""
        with torch.no_grad():
            return self.rsample(sample_shape, temperature)

    def to_base(self, value: Tensor) -> Tensor:
        """The base-space point :math:`z = f^{-1}(y)` of ``value`` (e.g. to interpolate in the latent space)."""
        check_shape("FlowDistribution.to_base", value, self.event_shape, "value")
        return self._to_base(value)[0]

    def from_base(self, z: Tensor) -> Tensor:
        """The data-space point :math:`y = f(z)` of a base-space point ``z`` (the inverse of :meth:`to_base`)."""
        check_shape("FlowDistribution.from_base", z, self.base_dist.event_shape, "base point")
        return self._from_base(z)[0]

    def rsample_and_log_prob(self, sample_shape: tuple = ()) -> tuple[Tensor, Tensor]:
        """A reparameterised sample and its log-density in one forward pass."""
        z = self.base_dist.rsample(sample_shape)
        y, ladj = self._from_base(z)
        return y, self._base_log_prob(z) - ladj

    def sample_and_log_prob(self, sample_shape: tuple = ()) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return self.rsample_and_log_prob(sample_shape)


class Flow(nn.Module):
    r"""A normalizing flow: base distribution :math:`p_0` and layers :math:`f_1, \dots, f_K`.

    .. math:: y = f_K \circ \dots \circ f_1(z),\ z \sim p_0, \qquad
              \log p(y \mid c) = \log p_0(z) - \sum_k \log|\det J_{f_k}|.

    Calling the module returns the distribution: ``flow()`` for an
    unconditional flow, ``flow(context)`` for a conditional one, with one
    distribution per context row (batch shape ``context.shape[:-1]``).
    Every parameter and buffer is registered, so ``.to(device, dtype)``,
    ``state_dict`` and ``pyro.module`` work as for any module.

    Args:
        base: the base distribution, an ``nn.Module`` called with the batch
            shape (e.g. :class:`StandardNormal`), or a fixed ``Distribution``.
        transforms: base→data layers: this library's, Pyro's or torch's.
        context_features: size of the context the layers see (0 for unconditional flows).
        embedding: optional module applied to the context first (e.g. a
            :class:`~.nn.ClassEmbedding` of class labels, or a network summarising
            observations); its output has ``context_features`` features.

    Example:
        >>> flow = Flow(StandardNormal(2), [T.AffineCoupling(2), T.Permute(2)])
        >>> flow().log_prob(torch.randn(5, 2)).shape
        torch.Size([5])
    """

    def __init__(
        self,
        base: Union[nn.Module, Distribution],
        transforms: Sequence[Transform],
        context_features: int = 0,
        embedding: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        if embedding is not None and not context_features:
            raise ValueError("Flow: an embedding needs context_features > 0 (the size of its output)")
        self.embedding = embedding
        self.base = base
        self.transforms = list(transforms)
        self.layers = nn.ModuleList(t for t in self.transforms if isinstance(t, nn.Module))
        self.context_features = int(context_features)
        if not self.context_features and any(isinstance(t, T.Conditional) for t in self.transforms):
            raise ValueError("Flow: a layer is conditional but context_features is 0")

    def forward(self, context: Optional[Context] = None) -> FlowDistribution:
        if context is None and not self.context_features and not torch.compiler.is_compiling():
            return self._unconditional_distribution()
        return FlowDistribution(*self.base_and_transforms(context))

    def _unconditional_distribution(self) -> FlowDistribution:
        """A fresh :class:`FlowDistribution` of the unconditional flow, a shallow copy of one built once.

        Building a Pyro ``TransformedDistribution`` asks every layer its domain and shapes, about 0.1 ms a call (2%
        of a MAF D=8 train step); the copy is one dict update. The template is kept while what it is built from
        is the same: the layer objects, a :class:`StandardNormal` base's buffers (their ids and storage, which
        ``.to()``, ``.data =`` and a replaced base change) and torch.distributions' validation default (which a
        distribution reads when it is built). A layer's parameters, buffers and mode are read by the
        layers at call time, not by the distribution. Each call returns its own object: a sample's stored
        pass (``log_prob`` of the last ``rsample``) stays with the distribution that drew it. Any other base is
        built every call (a learned base's parameters enter its distribution's tensors).
        """
        base = self.base
        if type(base) is not StandardNormal:
            return FlowDistribution(*self.base_and_transforms())
        # the storage and torch.distributions' validation default (read by Distribution.__init__) at building
        storage = (base.loc.data_ptr(), base.scale.data_ptr(), Distribution._validate_args)
        key = (base.loc, base.scale, *self.transforms)
        cached = self.__dict__.get("_distribution")  # (key, storage, template); the key holds its objects alive
        if (
            cached is None
            or cached[1] != storage
            or len(cached[0]) != len(key)
            or any(a is not b for a, b in zip(cached[0], key, strict=True))
        ):
            template = FlowDistribution(*self.base_and_transforms())
            cached = self.__dict__["_distribution"] = (key, storage, template)
        distribution = FlowDistribution.__new__(FlowDistribution)
        distribution.__dict__.update(cached[2].__dict__)
        return distribution

    def __getstate__(self):
        # the template of forward() is rebuilt on the first call: pickles, torch.save and deepcopy do not carry it
        return {k: v for k, v in super().__getstate__().items() if k != "_distribution"}

    def embed(self, context: Optional[Context] = None) -> Optional[Tensor]:
        """The context the layers see: ``context`` checked and passed through the ``embedding`` (if any).

        Shape ``(..., context_features)``; ``None`` for an unconditional flow (called with no context).
        Every path that conditions the layers goes through this method (``forward``, :meth:`base_and_transforms`
        and the flow-matching objective), so training, ``log_prob`` and sampling all see the same context.
        Raises a ValueError for a missing, superfluous, misshapen or non-finite context.
        """
        name = type(self).__name__
        if self.context_features == 0:
            if context is not None:
                raise ValueError(f"{name} is unconditional: call it with no context")
            return None
        if context is None:
            expected = getattr(self.embedding, "expected_context", f"a context of shape (..., {self.context_features})")
            raise ValueError(f"{name} is conditional: call it with {expected}")
        # an embedding may take a tuple of tensors (an aligned condition image with its labels: nn.AlignedContext)
        parts: tuple = context if isinstance(context, tuple) and self.embedding is not None else (context,)
        if self.embedding is None:
            check_shape(name, parts[0], (self.context_features,), "context")
        elif not all(isinstance(part, Tensor) for part in parts):
            raise TypeError(f"{name}: expected a torch.Tensor context, got {type(context).__name__}")
        # under torch.compile (pf.compile_flow) the checks would break the graph: compiled calls do not validate
        if not torch.compiler.is_compiling():
            self._check_device_dtype(parts)
            if not all(bool(torch.isfinite(part).all()) for part in parts):
                raise ValueError(f"{name}: the context has NaN or inf entries")
        if self.embedding is None:
            return parts[0]
        embedded = self.embedding(context)
        check_shape(name, embedded, (self.context_features,), "embedded context")
        return embedded

    def _check_device_dtype(self, parts: tuple[Tensor, ...]) -> None:
        """A ValueError naming both devices or dtypes unless every part of the context is on the flow's device and,
        without an embedding (the layers take the context as it is), has the flow's dtype; an embedding checks the
        values it takes (integer class labels, ...) itself."""
        reference = reference_tensor(self)
        if reference is not None:
            for part in parts:
                check_device_dtype(type(self).__name__, part, reference, "context", dtype=self.embedding is None)

    def base_and_transforms(self, context: Optional[Context] = None) -> tuple[Distribution, list[Transform]]:
        """The base distribution (batch shape that of the context) and the layers conditioned on ``context``
        (embedded by :meth:`embed`): what ``forward`` passes to :class:`FlowDistribution`, for a caller that
        adds layers of its own."""
        embedded = self.embed(context)
        if embedded is None:
            batch_shape = torch.Size()
            transforms = self.transforms
        else:
            batch_shape = embedded.shape[:-1]
            transforms = [t.condition(embedded) if isinstance(t, T.Conditional) else t for t in self.transforms]
        base = self.base(batch_shape) if isinstance(self.base, nn.Module) else self.base.expand(batch_shape)
        return base, transforms

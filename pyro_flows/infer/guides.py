"""Normalizing-flow guides for variational inference in Pyro models.

:class:`AutoFlowGuide` replaces ``AutoNormal`` in one line: a flow over the
model's whole unconstrained latent vector. :class:`AmortizedFlowGuide` puts a
conditional flow, conditioned on an encoding of each datum, on per-datum local
latents, so it generalises to new data without refitting.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import ExitStack
from typing import Callable, Optional, Sequence, Union

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoContinuous, AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from pyro.infer.autoguide.utils import helpful_support_errors
from torch import Tensor, nn
from torch.distributions import Distribution, Transform

from .. import transforms as T
from ..flows import Flow, FlowDistribution, build_flow
from ..flows.registry import FLOWS, check_flow_name
from ..nn import MADE, MLP
from ..transforms.cache import same_state

FlowSpec = Union[str, Callable[..., nn.Module]]


def _check_flow_spec(flow: FlowSpec, transforms: int, init_scale: float, output_scale: float = 1.0) -> None:
    if isinstance(flow, str):
        check_flow_name(flow, or_callable=True)
    elif not callable(flow):
        raise TypeError(f"flow must be a name in {', '.join(FLOWS)} or a callable, got {type(flow).__name__}")
    if int(transforms) < 1:
        raise ValueError(f"transforms must be >= 1, got {transforms}")
    if not (isinstance(init_scale, (int, float)) and 0 < init_scale < float("inf")):
        raise ValueError(f"init_scale must be a finite positive number, got {init_scale!r}")
    if not (isinstance(output_scale, (int, float)) and 0 < output_scale < float("inf")):
        raise ValueError(f"output_scale must be a finite positive number, got {output_scale!r}")


def _default_hidden(features: int) -> tuple[int, int]:
    width = max(64, 2 * features)
    return (width, width)


def named_flow(
    name: str, features: int, context: int = 0, transforms: int = 4, hidden: Optional[Sequence[int]] = None, **kwargs
) -> Flow:
    """The library's flow ``name`` with every layer in its one-pass *sampling* direction.

    A guide samples and scores its own samples, never outside points, so the
    layers that a factory inverts for one-pass densities (MAF, autoregressive
    NSF) are used un-inverted: ``"maf"`` gives the IAF and ``"nsf"`` the
    inverse-autoregressive rational-quadratic spline flow (Durkan et al. 2019),
    both one network pass per layer to sample, and ``log q`` of a sample comes
    from the layers' caches (no sequential inverse). Couplings and CNFs are
    used as built. ``hidden=None`` picks two layers of ``max(64, 2 features)``.
    """
    hidden = _default_hidden(features) if hidden is None else tuple(hidden)
    flow = build_flow(name, features, context, transforms=transforms, hidden=hidden, **kwargs)
    layers = [t.layer if isinstance(t, T.Inverse) else t for t in flow.transforms]
    return Flow(flow.base, layers, context)


class ScaledLinear(nn.Module):
    r"""A linear layer whose weight and bias are a fixed factor :math:`c` times its parameters.

    .. math:: y = c\,(\Theta \odot M)\,x + c\,\beta,

    with :math:`\Theta, \beta` the wrapped layer's parameters (divided by :math:`c` at wrapping, so the
    function is unchanged) and :math:`M` its mask, if it is a :class:`~pyro_flows.nn.made.MaskedLinear`.
    ``weight`` and ``bias`` read :math:`c\Theta` and :math:`c\beta`, so code that uses them directly
    (:meth:`~pyro_flows.nn.MADE.sequential`) sees the same layer.

    Under Adam-type optimisers (Pyro's ``Adam``, ``ClippedAdam``), whose step for a parameter is about the
    step size whatever the scale of its gradient, the effective weights :math:`c\Theta` then move by about
    :math:`c` times the step size: a per-layer learning rate that any optimiser the user builds applies,
    with no parameter groups. Shapes: ``(..., in_features) -> (..., out_features)``.

    Example:
        >>> layer = nn.Linear(3, 2)
        >>> scaled = ScaledLinear(layer, 0.1)
        >>> x = torch.randn(4, 3)
        >>> bool(torch.allclose(scaled(x), x @ scaled.weight.T + scaled.bias))
        True
        >>> bool(torch.allclose(scaled.weight, 0.1 * layer.weight))
        True
    """

    def __init__(self, layer: nn.Linear, factor: float) -> None:
        super().__init__()
        if not (isinstance(factor, (int, float)) and 0 < factor < float("inf")):
            raise ValueError(f"ScaledLinear: factor must be a finite positive number, got {factor!r}")
        if not isinstance(layer, nn.Linear) or layer.bias is None:
            raise TypeError(f"ScaledLinear wraps an nn.Linear with a bias, got {type(layer).__name__}")
        self.factor = float(factor)
        with torch.no_grad():
            layer.weight.div_(self.factor)
            layer.bias.div_(self.factor)
        self.layer = layer

    @property
    def weight(self) -> Tensor:
        return self.factor * self.layer.weight

    @property
    def bias(self) -> Tensor:
        return self.factor * self.layer.bias

    def forward(self, x: Tensor) -> Tensor:
        mask = getattr(self.layer, "mask", None)
        weight = self.weight if mask is None else self.weight * mask
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"factor={self.factor:g}"


def scale_conditioner_outputs(module: nn.Module, factor: float) -> int:
    """Wrap the output layer of every :class:`~pyro_flows.nn.MADE` and :class:`~pyro_flows.nn.MLP` in ``module``
    in a :class:`ScaledLinear` of ``factor`` (in place); returns how many were wrapped. ``factor=1`` wraps none.

    Example:
        >>> flow = named_flow("nsf", 3, transforms=2, hidden=(8,))
        >>> scale_conditioner_outputs(flow, 0.1)
        2
    """
    if float(factor) == 1.0:
        return 0
    networks = [m for m in module.modules() if isinstance(m, (MADE, MLP)) and not isinstance(m.output, ScaledLinear)]
    for network in networks:
        network.add_module("output", ScaledLinear(network.output, factor))  # replaces the layer it wraps
    return len(networks)


def _affine_around(loc: Tensor, scale: float) -> T.ActNorm:
    """A learnable elementwise affine layer ``y = loc + scale * x`` (an ActNorm, already initialised)."""
    layer = T.ActNorm(loc.shape[-1]).to(loc)
    with torch.no_grad():
        layer.shift.copy_(loc)
        layer.log_scale.fill_(float(torch.log(torch.tensor(scale, dtype=torch.float64))))
        layer.initialized.fill_(True)
    return layer


class UnitLowerTriangular(T.FlowTransform):
    r"""The linear map :math:`y = L x` with :math:`L` unit lower-triangular (learned), starting at :math:`L = I`.

    .. math:: L = I + \operatorname{tril}(W, -1), \qquad \log|\det J| = 0,

    with the :math:`D(D-1)/2` entries of :math:`W` below the diagonal its parameters,

    and :math:`L^{-1} y` by one triangular solve. Followed by an elementwise
    affine layer :math:`u = \mu + \sigma \odot y` it is the full-rank Gaussian
    map :math:`u = \mu + \operatorname{diag}(\sigma) L x` of Pyro's
    ``AutoMultivariateNormal`` (whose ``scale_tril`` is
    :math:`\operatorname{diag}(\sigma) L`, Kucukelbir et al. 2017), with the same
    starting point.

    Example:
        >>> layer = UnitLowerTriangular(3)
        >>> x = torch.randn(5, 3)
        >>> bool(torch.equal(layer(x), x))  # the identity at the start
        True
    """

    index: Tensor  # buffer

    def __init__(self, features: int) -> None:
        super().__init__((features,))
        self.register_buffer("index", torch.tril_indices(features, features, -1))
        self.weight = nn.Parameter(torch.zeros(self.index.shape[1]))  # the D (D - 1) / 2 entries below the diagonal

    def matrix(self) -> Tensor:
        r""":math:`L`: the identity with ``weight`` below the diagonal (row by row)."""
        features = self.event_shape[0]
        eye = torch.eye(features, dtype=self.weight.dtype, device=self.weight.device)
        return eye.index_put((self.index[0], self.index[1]), self.weight)

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return x @ self.matrix().T, x.new_zeros(x.shape[:-1])

    def _backward(self, y: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        rows = y.reshape(-1, y.shape[-1])
        x = torch.linalg.solve_triangular(self.matrix().T, rows, upper=True, left=False, unitriangular=True)
        return x.reshape(y.shape), y.new_zeros(y.shape[:-1])


def _mark_initialized(module: nn.Module) -> None:
    """Data-dependent initialisation means nothing for a guide's own samples (and would undo a loaded state)."""
    for layer in module.modules():
        if isinstance(layer, T.ActNorm):
            layer.initialized.fill_(True)


def build_guide_flow(
    flow: FlowSpec,
    features: int,
    context: int,
    transforms: int,
    hidden: Optional[Sequence[int]],
    loc: Tensor,
    init_scale: float,
    extra_layers: Sequence[Transform] = (),
    output_scale: float = 1.0,
    **kwargs,
) -> nn.Module:
    """A flow over ``features`` dims that starts as the affine map ``loc + init_scale * z`` of its base.

    Named flows and callables returning a :class:`~pyro_flows.Flow` get
    ``extra_layers`` and a final learnable affine layer appended (all our
    layers start at the identity); any other module a callable returns is
    used as it is. A named flow's conditioners get output layers scaled by
    ``output_scale`` (:func:`scale_conditioner_outputs`; ``extra_layers`` are not scaled).
    """
    module: nn.Module
    if isinstance(flow, str):
        module = named_flow(flow, features, context, transforms, hidden, **kwargs)
        scale_conditioner_outputs(module, output_scale)
    else:
        if kwargs:
            raise TypeError(f"flow keyword arguments {sorted(kwargs)} apply to named flows, not to a callable")
        module = flow(features, context) if context else flow(features)
        if not isinstance(module, nn.Module):
            raise TypeError(f"the flow callable must return an nn.Module, got {type(module).__name__}")
    if isinstance(module, Flow):
        layers: list[Transform] = [*module.transforms, *extra_layers, _affine_around(loc, init_scale)]
        module = Flow(module.base, layers, module.context_features)
    _mark_initialized(module)
    return module.to(loc)


def _unbuilt_on_error(setup: Callable) -> Callable:
    """Leave the guide unbuilt if ``setup`` fails, so the next call raises the same error, not a later one."""

    @functools.wraps(setup)
    def wrapper(guide: AutoGuide, *args, **kwargs) -> None:
        try:
            setup(guide, *args, **kwargs)
        except BaseException:
            guide.prototype_trace = None
            raise

    return wrapper


PATH_GRADIENT_MAX_FEATURES = 64
"""The largest latent dimension for which :class:`AutoFlowGuide` takes the path-derivative gradient by default
(``path_gradient=None``); above it the default is the total gradient. A one-draw step of the flow alone (sample,
``log q``, backward; 4 IAF layers, float64) took 1.68, 1.93 and 2.18 times as long with it at ``D`` = 10, 32, 64
(2-core CPU box, load 6, medians of 6 interleaved repeats); a model's own cost comes on top, the same for both."""

NO_PATH_GRADIENT = (T.SplineAutoregressive, T.SplineCoupling, T.ContinuousFlow)
r"""Layers that keep :class:`AutoFlowGuide` on the total gradient by default. Splines: the path-derivative
gradient carries :math:`\nabla_z \log|\det J_T|`, the splines' curvature, which jumps at every knot; on the
conjugate regression of ``tests/test_guides.py`` it grew from 20 to :math:`10^4` within ten steps and the NSF
guide collapsed (KL 9 to 450 nats, 1.5 with ``output_scale=0.01``), while the affine IAF and RealNVP reached KL
0.005-0.012 (total gradient: 0.11-0.19; ``AutoMultivariateNormal`` 0.02-0.05). Continuous flows: the extra
pass is an ODE solve of ``D + 1`` copies and its backward."""


def path_score(distribution: FlowDistribution, z: Tensor) -> Tensor:
    r"""The score :math:`\nabla_u \log q(u)` of a flow distribution at :math:`u = T(z)`, its parameters held fixed.

    With :math:`h(z) = \log p_0(z) - \log|\det J_T(z)|` the log-density of :math:`u = T(z)` as a function of
    its base point, :math:`\log q(u) = h(T^{-1}(u))`, so

    .. math:: \nabla_u \log q(u) = J_T(z)^{-\top}\, \nabla_z h(z).

    :math:`J_T` and :math:`\nabla_z h` come from one forward pass of each draw repeated :math:`D + 1` times
    (on a new leading axis) and one backward pass (the gradient of :math:`\sum_{i<D} T(z^{(i)})_i + h(z^{(D)})`
    with respect to copy :math:`i < D` is row :math:`\partial T_i / \partial z`, to the last :math:`\nabla_z h`):
    the layers' fused paths, no sequential inverse, no function transform. Shapes: ``z`` ``(..., D)`` ->
    ``(..., D)``; no gradient flows to ``z`` or to the parameters.

    Example:
        >>> flow = named_flow("nsf", 2, transforms=1, hidden=(8,))
        >>> z = torch.randn(3, 2)
        >>> u = flow().from_base(z).requires_grad_(True)
        >>> exact = torch.autograd.grad(flow().log_prob(u).sum(), u)[0]  # through the inverse
        >>> bool(torch.allclose(path_score(flow(), z), exact, atol=1e-5))
        True
    """
    features = z.shape[-1]
    with torch.enable_grad():
        # the copies on a new leading axis, so that the draws' batch shape still lines up with the distribution's
        rows = z.detach().expand((features + 1,) + z.shape).clone().requires_grad_(True)
        u, ladj = distribution._from_base(rows)
        log_density = distribution._base_log_prob(rows) - ladj  # (D + 1, ...)
        pick = torch.eye(features + 1, features, dtype=u.dtype, device=u.device)
        pick = pick.reshape((features + 1,) + (1,) * (z.dim() - 1) + (features,))
        total = (u * pick).sum() + log_density[features].sum()
        (grad,) = torch.autograd.grad(total, rows)
    jacobian = grad[:features].movedim(0, -2)  # (..., D, D): row i is dT_i / dz
    return torch.linalg.solve(jacobian.transpose(-1, -2), grad[features].unsqueeze(-1)).squeeze(-1)


class PathGradientFlowDistribution(FlowDistribution):
    r"""A flow distribution whose ``log_prob`` of its own last ``rsample`` has the path-derivative gradient.

    For :math:`u = T_\phi(\varepsilon)` the gradient of :math:`\log q_\phi(u)` has two parts,

    .. math::
        \frac{d}{d\phi} \log q_\phi(T_\phi(\varepsilon))
        = \underbrace{\nabla_u \log q_{\bar\phi}(u)^\top
          \frac{\partial T_\phi(\varepsilon)}{\partial \phi}}_{\text{path}}
        + \underbrace{\frac{\partial \log q_\phi(u)}{\partial \phi}\Big|_u}_{\text{score}},

    and the score part has expectation zero under :math:`q_\phi`. The "sticking the landing" estimator (Roeder,
    Wu & Duvenaud 2017; for flows Agrawal, Sheldon & Domke 2020, Vaitl et al. 2022) keeps the path part
    only: still unbiased, and of variance zero where :math:`q = p` (the ELBO's integrand is then constant).
    ``log_prob(value)`` for ``value`` the last ``rsample`` (what a Pyro guide scores) returns the surrogate

    .. math:: \operatorname{sg}[\log q(u)] + \operatorname{sg}[w]^\top (u - \operatorname{sg}[u]),
              \qquad w = \nabla_u \log q_{\bar\phi}(u)\ (:func:`path_score`),

    (sg: stop-gradient): the same value, the path gradient. Any other value, or one scored without gradients,
    gets :class:`~pyro_flows.FlowDistribution`'s ``log_prob``. Event shape ``(D,)``.

    Example:
        >>> flow = named_flow("nsf", 2, transforms=1, hidden=(8,))
        >>> q = PathGradientFlowDistribution(*flow.base_and_transforms())
        >>> u = q.rsample((4,))
        >>> bool(torch.allclose(q.log_prob(u), flow().log_prob(u)))
        True
    """

    def log_prob(self, value: Tensor) -> Tensor:
        last = self._last_sample
        own = (
            torch.is_grad_enabled()
            and last is not None
            and last[0] is value
            and same_state(last[3], self._state_key(*last[:2]))
        )
        log_q = super().log_prob(value)
        if not own or last is None:  # (own implies a last sample)
            return log_q
        score = path_score(self, last[1])
        return log_q.detach() + (score * (value - value.detach())).sum(-1)


class AutoFlowGuide(AutoContinuous):
    r"""A normalizing-flow guide over a Pyro model's whole unconstrained latent vector.

    As :class:`~pyro.infer.autoguide.AutoContinuous`, every latent site is
    mapped to the reals by ``biject_to(support).inv`` and concatenated into
    :math:`u \in \mathbb{R}^D`; the guide is

    .. math::
        u = \mu + \sigma \odot L\, f_K \circ \dots \circ f_1(\varepsilon), \quad
        \varepsilon \sim \mathcal{N}(0, I_D), \qquad
        \log q(u) = \log \mathcal{N}(\varepsilon) - \sum_k \log|\det J_{f_k}| - \sum_i \log \sigma_i,

    with :math:`\mu` the ``init_loc_fn`` point, :math:`\log \sigma` starting at
    ``log(init_scale)``, :math:`L` unit lower-triangular starting at :math:`I`
    (:class:`UnitLowerTriangular`; ``full_rank=False`` leaves it out), all
    learnable, and the flow layers starting at the identity, so training starts
    from :math:`\mathcal{N}(\mu, \sigma^2 I)`. With the flow layers at the
    identity the guide *is* Pyro's ``AutoMultivariateNormal``
    (:math:`\operatorname{diag}(\sigma) L` its ``scale_tril``, same start), so
    the flow is never restricted to less than the full-rank Gaussian: without
    :math:`L` the autoregressive conditioners must learn the posterior's linear
    correlations themselves, from noisy single-draw gradients, and leave heavier
    importance-weight tails than the Gaussian (``benchmarks/README.md``, "VI
    guides against AutoMultivariateNormal"). Rezende & Mohamed (2015),
    *Variational inference with normalizing flows*; Kucukelbir et al. (2017), ADVI.

    The flow layers' conditioners have their output layers scaled by ``output_scale`` :math:`c`
    (:class:`ScaledLinear`: weights :math:`c\,\Theta`), so under Adam-type optimisers, whose step for each
    parameter is about the step size whatever its gradient's scale, the flow's non-Gaussian part moves by
    about :math:`c` times the step that the Gaussian part (:math:`\mu, \sigma, L`) takes. With
    :math:`c = 1` (the default before issue 16.14) the flow's tens of thousands of conditioner weights each
    moved by the step size at every step, and on near-Gaussian posteriors the last iterate's means were
    further off than ``AutoMultivariateNormal``'s (0.20-0.25 posterior sd against 0.12, ELBO up to 0.2 nats
    lower). With :math:`c = 0.1` the NSF guide's (the default before the path gradient) ELBO is above the
    Gaussian's on four of five test posteriors, the sd
    errors at most its, the mean errors 0.10-0.19 sd on the near-Gaussian ones (its: 0.09-0.12); PSIS
    :math:`\hat k` is higher than with :math:`c = 1` on three of them, never in a worse band than the
    Gaussian's. Measured against NUTS under one schedule for all (3000 one-draw steps, step size 1e-2
    decaying to 1e-3): ``benchmarks/README.md``, "VI guides against AutoMultivariateNormal".

    The gradient of the ELBO's :math:`-\log q_\phi(u)` term is, where ``path_gradient`` is on, the
    path derivative alone (Roeder, Wu & Duvenaud 2017, "sticking the landing"; for flows Agrawal, Sheldon &
    Domke 2020, Vaitl et al. 2022): with :math:`u = T_\phi(\varepsilon)`,

    .. math::
        \nabla_\phi \log q_{\bar\phi}(T_\phi(\varepsilon))
        = \big(J_T(\varepsilon)^{-\top} \nabla_\varepsilon [\log \mathcal{N}(\varepsilon)
          - \log|\det J_T(\varepsilon)|]\big)^\top \frac{\partial T_\phi(\varepsilon)}{\partial \phi},

    :math:`\bar\phi` held fixed (:class:`PathGradientFlowDistribution`, :func:`path_score`). The dropped score
    term :math:`\partial_\phi \log q_\phi(u)|_u` has expectation zero, so the gradient stays unbiased, and
    the estimator's variance vanishes as :math:`q \to p`, where the total gradient's does not: the last iterate
    stops jittering around a posterior the guide contains. Per draw it costs one more forward and backward pass
    of :math:`D + 1` copies of the draw and an :math:`O(D^3)` solve. ``path_gradient=None`` (the default) turns it
    on for flows of at most :data:`PATH_GRADIENT_MAX_FEATURES` dimensions without spline or continuous layers
    (:data:`NO_PATH_GRADIENT`: on splines it made the guide collapse). On the conjugate regression of the tests
    (600 one-draw steps) the affine IAF and RealNVP guides end 0.005-0.012 nats (KL) from the posterior with it,
    0.11-0.19 without, ``AutoMultivariateNormal`` 0.02-0.05. Against NUTS under the schedule above (medians
    of seeds 0 and 1), the default (IAF, path gradient) against ``AutoMultivariateNormal``: PSIS
    :math:`\hat k` 0.57 / 0.58 (eight schools, non-centred), 0.41 / 0.66 (linear regression), 0.13 / 0.17
    (funnel, non-centred), 0.62 / 0.94 (eight schools, centred), 0.83 / 0.82 (funnel, centred, both above 0.7;
    over four seeds 0.77 / 0.91);
    max mean error 0.06 / 0.12, 0.06 / 0.12, 0.04 / 0.09, 0.41 / 1.48, 0.05 / 0.60 posterior sd; max sd error
    0.19 / 0.38, 0.07 / 0.13, 0.06 / 0.07, 0.55 / 0.79, 0.84 / 0.96; ELBO higher on all five. The NSF on the
    total gradient: :math:`\hat k` 0.63, 0.52, 0.41, 0.66, 1.04, mean errors 0.17, 0.19, 0.10, 0.71, 0.47.

    Sampling uses the flow's one-pass direction (see :func:`named_flow`) and
    ``log q`` of the sample is served by the flow distribution's memo of its last
    sample (never stale: keyed on the parameters' versions): no second pass and no sequential inverse.
    The flow is built on the first call
    (when the latent dimension is known), in the dtype and device of the
    model's values, and registered with ``pyro.module`` (name
    ``"<guide name>.flow"``), so ``pyro.get_param_store().save/load`` round-trip:
    a rebuilt guide picks up loaded values on its first call. Buffers (a
    ``mixing="random"`` permutation) are not in the param store; default flows
    have none that is random. Local latents in a *subsampled* plate are
    rejected (use :class:`AmortizedFlowGuide`); subsampled observations are fine.

    Args:
        model: a Pyro model with continuous latent sites (discrete ones raise a ValueError).
        flow: ``"iaf"`` (the default since issue 16.14: affine inverse-autoregressive layers, Kingma et al.
            2016; ``"maf"`` is the same IAF), ``"nsf"`` (inverse-autoregressive rational-quadratic splines, 8
            bins on :math:`[-5, 5]`; the default before, on the total gradient), ``"realnvp"``, ``"nice"``,
            ``"cnf"``, ``"ffjord"``, or a callable ``latent_dim -> module``: a
            :class:`~pyro_flows.Flow` (the affine layer is appended) or any ``nn.Module``
            whose call returns a distribution over ``(latent_dim,)`` (used as is).
        transforms: number of flow layers (default 4; not for CNFs).
        hidden: hidden widths of the conditioners (default two of ``max(64, 2D)``).
        init_loc_fn: per-site initialisation (Pyro's ``init_to_*``; default ``init_to_median``).
        init_scale: initial scale :math:`\sigma` of the affine layer (default 0.1, as Pyro's autoguides).
        full_rank: put the unit lower-triangular :math:`L` (:math:`D(D-1)/2` parameters, :math:`O(D^2)`
            per draw) before the affine layer (default ``True``); ``False`` for very large :math:`D`. Not
            for a module that is no :class:`~pyro_flows.Flow` (used as is).
        output_scale: :math:`c`, the fixed factor of the conditioners' output layers of a named flow (default
            0.1; 1 for none; no effect on CNFs, whose vector fields have no conditioner, or on callables).
        path_gradient: ``True`` for the path-derivative gradient of ``log q`` (above; needs a
            :class:`~pyro_flows.Flow`), ``False`` for the total gradient, ``None`` (default) for the path
            derivative where it is measured better and cheap (see above); the choice made is
            ``guide.path_gradient`` once the guide is built.
        flow_kwargs: passed to the flow factory (e.g. ``bins``, ``bound``, ``trace``).

    Example:
        >>> guide = AutoFlowGuide(model, flow="nsf", transforms=4)  # doctest: +SKIP
        >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Callable,
        flow: FlowSpec = "iaf",
        transforms: int = 4,
        hidden: Optional[Sequence[int]] = None,
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 0.1,
        full_rank: bool = True,
        output_scale: float = 0.1,
        path_gradient: Optional[bool] = None,
        **flow_kwargs,
    ) -> None:
        _check_flow_spec(flow, transforms, init_scale, output_scale)
        if path_gradient not in (None, True, False):
            raise ValueError(f"path_gradient must be None, True or False, got {path_gradient!r}")
        super().__init__(model, init_loc_fn=init_loc_fn)
        self._path_gradient_arg = path_gradient
        self.path_gradient = False  # decided when the flow is built
        self._full_rank = bool(full_rank)
        self._output_scale = float(output_scale)
        self._flow_spec = flow
        self._transforms = int(transforms)
        self._hidden = hidden
        self._init_scale = float(init_scale)
        self._flow_kwargs = flow_kwargs
        self.flow: Optional[nn.Module] = None

    @_unbuilt_on_error
    def _setup_prototype(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        _reject_subsampled_latents(self.prototype_trace, type(self).__name__)
        loc = self._init_loc()
        self.flow = build_guide_flow(
            self._flow_spec,
            self.latent_dim,
            0,
            self._transforms,
            self._hidden,
            loc,
            self._init_scale,
            extra_layers=[UnitLowerTriangular(self.latent_dim)] if self._full_rank else [],
            output_scale=self._output_scale,
            **self._flow_kwargs,
        )
        self.path_gradient = self._takes_path_gradient(self.flow)

    def _takes_path_gradient(self, flow: nn.Module) -> bool:
        """``path_gradient`` resolved for the built flow: ``None`` is on for a :class:`~pyro_flows.Flow` of at most
        :data:`PATH_GRADIENT_MAX_FEATURES` dimensions with no spline or continuous layer (:data:`NO_PATH_GRADIENT`)."""
        usable = isinstance(flow, Flow)
        if self._path_gradient_arg is None:
            excluded = any(isinstance(layer, NO_PATH_GRADIENT) for layer in flow.modules())
            return usable and not excluded and self.latent_dim <= PATH_GRADIENT_MAX_FEATURES
        if self._path_gradient_arg and not usable:
            raise ValueError(
                f"path_gradient=True needs the flow to be a pyro_flows Flow, got {type(flow).__name__} "
                "(a module used as is: its log-density's parts are not known); pass path_gradient=None or False"
            )
        return bool(self._path_gradient_arg)

    def get_posterior(self, *args, **kwargs) -> Distribution:
        """The flow distribution over the unconstrained latent vector ``(latent_dim,)``; a
        :class:`PathGradientFlowDistribution` where ``path_gradient`` is on."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        assert self.flow is not None, "built by _setup_prototype"
        pyro.module(self._pyro_get_fullname("flow"), self.flow, update_module_params=True)
        if self.path_gradient:
            assert isinstance(self.flow, Flow), "checked by _takes_path_gradient"
            return PathGradientFlowDistribution(*self.flow.base_and_transforms())
        return self.flow()

    @torch.no_grad()
    def quantiles(self, quantiles: Union[Sequence[float], Tensor], *args, num_samples: int = 1000, **kwargs) -> dict:
        """Monte Carlo quantiles of each latent site (no closed form for a flow).

        The quantiles of ``num_samples`` draws of each unconstrained coordinate,
        mapped to the constrained space (exact for elementwise monotone
        bijections, as in :class:`~pyro.infer.autoguide.AutoContinuous`).
        Returns a dict ``site -> (len(quantiles), *site shape)``.
        """
        draws = self.get_posterior(*args, **kwargs).sample((int(num_samples),))
        latents = _coordinate_quantiles(draws, quantiles)
        result: dict = {}
        for latent in latents:
            for site, unconstrained in self._unpack_latent(latent):
                result.setdefault(site["name"], []).append(biject_to(site["fn"].support)(unconstrained))
        return {name: torch.stack(values) for name, values in result.items()}

    @torch.no_grad()
    def median(self, *args, num_samples: int = 1000, **kwargs) -> dict:
        """Monte Carlo median of each latent site: :meth:`quantiles` at 0.5."""
        return {
            name: value[0] for name, value in self.quantiles([0.5], *args, num_samples=num_samples, **kwargs).items()
        }


def _coordinate_quantiles(draws: Tensor, quantiles: Union[Sequence[float], Tensor]) -> Tensor:
    q = torch.as_tensor(quantiles, dtype=draws.dtype, device=draws.device).reshape(-1)
    if not bool(((q >= 0) & (q <= 1)).all()):
        raise ValueError(f"quantiles must lie in [0, 1], got {q.tolist()}")
    return torch.quantile(draws, q, dim=0)


def _reject_subsampled_latents(trace, guide_name: str) -> None:
    for name, site in trace.iter_stochastic_nodes():
        for frame in site["cond_indep_stack"]:
            if frame.full_size is not None and frame.size != frame.full_size:
                raise ValueError(
                    f"{guide_name}: latent site '{name}' is in plate '{frame.name}', subsampled "
                    f"({frame.size} of {frame.full_size}); one latent vector cannot follow the "
                    "subsample. Use AmortizedFlowGuide for per-datum latents."
                )


def _unconstrained_event_dim(site) -> int:
    shape = biject_to(site["fn"].support).inv(site["value"]).shape
    return site["fn"].event_dim + len(shape) - site["value"].dim()


def _delta_site(site, unconstrained: Tensor, plates: dict) -> Tensor:
    """Sample site ``site`` at ``biject_to(support)(unconstrained)`` with the Jacobian as its log-density."""
    transform = biject_to(site["fn"].support)
    value = transform(unconstrained)
    if poutine.get_mask() is False:
        log_density = 0.0
    else:
        log_density = transform.inv.log_abs_det_jacobian(value, unconstrained)
        log_density = sum_rightmost(log_density, log_density.dim() - value.dim() + site["fn"].event_dim)
    with ExitStack() as stack:
        for frame in site["cond_indep_stack"]:
            stack.enter_context(plates[frame.name])
        return pyro.sample(site["name"], dist.Delta(value, log_density=log_density, event_dim=site["fn"].event_dim))


class _LocalSite:
    """Where one local site's per-datum block sits in the unconstrained value: plate axis and shape."""

    def __init__(self, site, plate_dim: int) -> None:
        with helpful_support_errors(site):
            unconstrained = biject_to(site["fn"].support).inv(site["value"])
        self.shape = unconstrained.shape
        event_dim = _unconstrained_event_dim(site)
        self.axis = len(self.shape) - event_dim + plate_dim
        if self.axis < 0:
            raise ValueError(f"local site '{site['name']}' has no batch dimension for its plate (dim {plate_dim})")
        self.rest = self.shape[: self.axis] + self.shape[self.axis + 1 :]
        self.size = self.rest.numel()

    def rows(self, unconstrained: Tensor) -> Tensor:
        """``(N, size)``: the prototype value with the plate axis first, one row per datum."""
        return unconstrained.movedim(self.axis, 0).reshape(unconstrained.shape[self.axis], self.size)

    def value(self, block: Tensor) -> Tensor:
        """Inverse of :meth:`rows` for a block ``lead + (B, size)``: ``lead + shape`` with ``B`` on the plate axis."""
        lead = block.shape[:-2]
        return block.reshape(lead + block.shape[-2:-1] + self.rest).movedim(len(lead), len(lead) + self.axis)


class RowEncoder(nn.Module):
    """The default encoder: each datum ``(B, *obs_shape)`` flattened, then an :class:`~pyro_flows.nn.MLP`."""

    def __init__(self, in_features: int, out_features: int, hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__()
        self.mlp = MLP(in_features, out_features, hidden, zero_init=False)

    def forward(self, rows: Tensor) -> Tensor:
        return self.mlp(rows.reshape(rows.shape[0], -1))


class AmortizedFlowGuide(AutoGuide):
    r"""An amortized flow guide: per-datum local latents from a flow conditioned on the datum.

    For local latents :math:`z_n` (every site in ``local_sites``, all in one
    plate over the data) and observations :math:`x_n`,

    .. math::
        q(z_{1:N}, \theta \mid x_{1:N}) = q_\phi(\theta) \prod_n q_\psi\big(z_n \mid e_\eta(x_n)\big),

    where :math:`e_\eta` is the ``encoder`` (default an MLP), :math:`q_\psi` a
    conditional flow whose layers see the encoding, ending in a
    context-dependent elementwise affine layer (an affine coupling transforming
    every coordinate, its conditioner seeing only the context) and a learnable
    affine layer around the mean initial point, and :math:`q_\phi` an
    :class:`AutoFlowGuide` over the global latents (if any). Kingma & Welling
    (2014); Rezende & Mohamed (2015). The guide works on data it was not
    trained on, of any size: the local plate is rebuilt from the observation
    on every call (subsampled with the model's ``subsample_size``, if any).

    Shapes: the observation tensor's first dimension indexes the data (its
    length is the plate's full size); the encoder maps the selected rows
    ``(B, *obs_shape)`` to ``(B, context_features)``. A local site's per-datum
    block is its unconstrained value with the plate axis removed, flattened;
    the blocks of all local sites are concatenated.

    Args:
        model: a Pyro model.
        local_sites: names of the per-datum latent sites.
        observation: where the guide finds the observed data among the model's
            arguments: a parameter name (``"x"``), a position (``0``) or a callable
            ``(*args, **kwargs) -> Tensor``.
        plate: the data plate's name (default: the one plate all local sites share).
        encoder: an ``nn.Module`` ``(B, *obs_shape) -> (B, context_features)``;
            default a :class:`RowEncoder` with ``encoder_hidden``.
        context_features: size of the encoding.
        flow, transforms, hidden, flow_kwargs: the local conditional flow (as in
            :class:`AutoFlowGuide`; a callable gets ``(features, context_features)``).
        global_flow: the flow of the global latents' :class:`AutoFlowGuide`.
        init_loc_fn, init_scale: initialisation as in :class:`AutoFlowGuide`.

    Example:
        >>> guide = AmortizedFlowGuide(model, local_sites=["z"], observation="x")  # doctest: +SKIP
        >>> guide.get_posterior(x_new).sample((100,))  # (100, N_new, K) per-datum draws  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Callable,
        local_sites: Sequence[str],
        observation: Union[str, int, Callable] = 0,
        plate: Optional[str] = None,
        encoder: Optional[nn.Module] = None,
        context_features: int = 16,
        flow: FlowSpec = "nsf",
        transforms: int = 4,
        hidden: Optional[Sequence[int]] = None,
        encoder_hidden: Sequence[int] = (64, 64),
        global_flow: FlowSpec = "nsf",
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 0.1,
        **flow_kwargs,
    ) -> None:
        _check_flow_spec(flow, transforms, init_scale)
        _check_flow_spec(global_flow, transforms, init_scale)
        if isinstance(local_sites, str) or not local_sites:
            raise ValueError(f"local_sites must be a non-empty list of site names, got {local_sites!r}")
        if not isinstance(observation, (str, int)) and not callable(observation):
            raise TypeError(f"observation must be a parameter name, a position or a callable, got {observation!r}")
        if int(context_features) < 1:
            raise ValueError(f"context_features must be >= 1, got {context_features}")
        if encoder is not None and not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
        super().__init__(InitMessenger(init_loc_fn)(model), create_plates=self._local_plate)
        self._raw_model = (model,)
        self.local_sites = list(local_sites)
        self._observation = observation
        self._plate_name = plate
        self._context_features = int(context_features)
        self._flow_spec, self._global_flow_spec = flow, global_flow
        self._transforms, self._hidden, self._encoder_hidden = int(transforms), hidden, tuple(encoder_hidden)
        self._init_loc_fn, self._init_scale, self._flow_kwargs = init_loc_fn, float(init_scale), flow_kwargs
        self.encoder: Optional[nn.Module] = encoder
        self.local_flow: Optional[nn.Module] = None
        self.global_guide: Optional[AutoFlowGuide] = None

    # -- observation and plate -------------------------------------------------
    def observation(self, *args, **kwargs) -> Tensor:
        """The observation tensor ``(N, *obs_shape)`` among the model's arguments."""
        spec = self._observation
        if callable(spec):
            value = spec(*args, **kwargs)
        elif isinstance(spec, int):
            if spec >= len(args):
                raise ValueError(f"observation={spec}: the model was called with {len(args)} positional arguments")
            value = args[spec]
        else:
            bound = inspect.signature(self._raw_model[0]).bind_partial(*args, **kwargs).arguments
            if spec not in bound:
                raise ValueError(f"observation={spec!r}: no such argument in this call of the model")
            value = bound[spec]
        if not isinstance(value, Tensor) or value.dim() < 1:
            raise ValueError(f"the observation must be a tensor with a data dimension first, got {value!r:.80}")
        return value

    def _local_plate(self, *args, **kwargs) -> pyro.plate:
        frame = self._local_frame
        full_size = frame.full_size or frame.size
        rows = self.observation(*args, **kwargs).shape[0]
        subsample_size = min(frame.size, rows) if frame.size < full_size else None
        return pyro.plate(frame.name, rows, dim=frame.dim, subsample_size=subsample_size)

    # -- prototype ---------------------------------------------------------------
    @_unbuilt_on_error
    def _setup_prototype(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        latents = dict(self.prototype_trace.iter_stochastic_nodes())
        missing = [name for name in self.local_sites if name not in latents]
        if missing:
            raise ValueError(f"local_sites {missing} are not latent sample sites of the model")
        self._local_frame = self._find_local_frame(latents)
        self._local = {name: _LocalSite(latents[name], self._local_frame.dim) for name in self.local_sites}
        rows = self.observation(*args, **kwargs)
        if rows.shape[0] != (self._local_frame.full_size or self._local_frame.size):
            raise ValueError(
                f"the observation has {rows.shape[0]} rows but plate '{self._local_frame.name}' has full size "
                f"{self._local_frame.full_size or self._local_frame.size}"
            )
        init = torch.cat(
            [
                site.rows(biject_to(latents[name]["fn"].support).inv(latents[name]["value"].detach()))
                for name, site in self._local.items()
            ],
            dim=-1,
        )
        if self.encoder is None:
            features = rows[0].numel()
            self.encoder = RowEncoder(features, self._context_features, self._encoder_hidden).to(rows)
        features = init.shape[-1]
        context_affine = T.ConditionalAffineCoupling(
            features,
            mask=torch.ones(features, dtype=torch.bool),
            hidden=_default_hidden(features) if self._hidden is None else self._hidden,
            context_features=self._context_features,
        )
        self.local_flow = build_guide_flow(
            self._flow_spec,
            features,
            self._context_features,
            self._transforms,
            self._hidden,
            init.mean(0),
            self._init_scale,
            extra_layers=[context_affine],
            **self._flow_kwargs,
        )
        if len(latents) > len(self.local_sites):
            self.global_guide = AutoFlowGuide(
                poutine.block(self._raw_model[0], hide=self.local_sites),
                flow=self._global_flow_spec,
                transforms=self._transforms,
                hidden=self._hidden,
                init_loc_fn=self._init_loc_fn,
                init_scale=self._init_scale,
            )

    def _find_local_frame(self, latents: dict):
        stacks = [{f.name: f for f in latents[name]["cond_indep_stack"]} for name in self.local_sites]
        shared = set(stacks[0]).intersection(*stacks[1:])
        if self._plate_name is not None:
            if self._plate_name not in shared:
                raise ValueError(f"plate '{self._plate_name}' does not hold every local site {self.local_sites}")
            return stacks[0][self._plate_name]
        if len(shared) != 1:
            raise ValueError(
                f"the local sites {self.local_sites} share plates {sorted(shared)}; pass plate=<name of the data plate>"
            )
        return stacks[0][shared.pop()]

    def _check_prototype(self, part_trace) -> None:
        for name, _ in part_trace.iter_stochastic_nodes():
            if name in self.local_sites or name not in self.prototype_trace.nodes:
                raise ValueError(f"global guide site '{name}' is local or not a latent of the model")

    # -- the guide ----------------------------------------------------------------
    def _context(self, rows: Tensor) -> Tensor:
        assert self.encoder is not None, "built by _setup_prototype"
        context = self.encoder(rows)
        if context.shape != (rows.shape[0], self._context_features):
            raise ValueError(
                f"the encoder must map {tuple(rows.shape)} to ({rows.shape[0]}, {self._context_features}), "
                f"got {tuple(context.shape)}"
            )
        return context

    def get_posterior(self, *args, **kwargs) -> Distribution:
        """The local flow for every datum of the observation: batch ``(N,)``, event ``(K,)``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        local_flow = self._register()
        return local_flow(self._context(self.observation(*args, **kwargs)))

    def _register(self) -> nn.Module:
        """Register the encoder and the local flow with Pyro's param store; returns the local flow."""
        assert self.encoder is not None and self.local_flow is not None, "built by _setup_prototype"
        pyro.module(self._pyro_get_fullname("encoder"), self.encoder, update_module_params=True)
        pyro.module(self._pyro_get_fullname("local_flow"), self.local_flow, update_module_params=True)
        return self.local_flow

    def forward(self, *args, **kwargs) -> dict:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = self.global_guide(*args, **kwargs) if self.global_guide is not None else {}
        local_flow = self._register()
        frame = self._local_frame
        plate = plates[frame.name]
        with plate as index:
            context = self._context(self.observation(*args, **kwargs).index_select(0, index))
            context = context.reshape(context.shape[:1] + (1,) * (-frame.dim - 1) + context.shape[1:])
            latent = pyro.sample(f"_{self._pyro_name}_local", local_flow(context), infer={"is_auxiliary": True})
        result.update(self._unpack(latent, frame, plates))
        return result

    def _blocks(self, latent: Tensor, trailing: int) -> dict:
        """Per-site unconstrained values from a latent ``lead + (B,) + (1,) * trailing + (K,)``."""
        batch_dim = latent.dim() - 2 - trailing
        flat = latent.reshape(latent.shape[: batch_dim + 1] + latent.shape[-1:])
        values, start = {}, 0
        for name, site in self._local.items():
            values[name] = site.value(flat[..., start : start + site.size])
            start += site.size
        return values

    def _unpack(self, latent: Tensor, frame, plates: dict) -> dict:
        sites = self.prototype_trace.nodes
        blocks = self._blocks(latent, -frame.dim - 1)
        return {name: _delta_site(sites[name], value, plates) for name, value in blocks.items()}

    @torch.no_grad()
    def quantiles(self, quantiles: Union[Sequence[float], Tensor], *args, num_samples: int = 1000, **kwargs) -> dict:
        """Monte Carlo quantiles of every latent site given the data in ``args`` (as in :class:`AutoFlowGuide`)."""
        result = {}
        if self.global_guide is not None:
            result.update(self.global_guide.quantiles(quantiles, *args, num_samples=num_samples, **kwargs))
        draws = self.get_posterior(*args, **kwargs).sample((int(num_samples),))  # (S, N, K)
        latents = _coordinate_quantiles(draws, quantiles)  # (Q, N, K)
        for name, value in self._blocks(latents, 0).items():
            result[name] = biject_to(self.prototype_trace.nodes[name]["fn"].support)(value)
        return result

    @torch.no_grad()
    def median(self, *args, num_samples: int = 1000, **kwargs) -> dict:
        """Monte Carlo median of every latent site: :meth:`quantiles` at 0.5."""
        return {
            name: value[0] for name, value in self.quantiles([0.5], *args, num_samples=num_samples, **kwargs).items()
        }

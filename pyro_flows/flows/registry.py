"""The one registry of flow names: what ``"nsf"``, ``"maf"``, ... mean wherever a flow is named by a string.

:class:`~pyro_flows.DensityEstimator`, the guides (:class:`~pyro_flows.infer.AutoFlowGuide`,
:class:`~pyro_flows.infer.AmortizedFlowGuide`), :class:`~pyro_flows.infer.NPE` and the command line all read
:data:`FLOWS` and build through :func:`build_flow`; a front end that cannot use a flow refuses its name itself.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

from .base import Flow
from .continuous import CNF, FFJORD
from .tabular import IAF, MAF, NICE, NSF, RealNVP

FLOWS: Mapping[str, Callable[..., Any]] = MappingProxyType(
    {"nice": NICE, "realnvp": RealNVP, "maf": MAF, "iaf": IAF, "nsf": NSF, "cnf": CNF, "ffjord": FFJORD}
)
"""Flow names → factories ``(features, context=0, ..., classes=None, embedding_features=16) -> Flow``, in the order
help texts list them."""

CONTINUOUS = frozenset({"cnf", "ffjord"})
"""The names whose flow is one continuous (ODE) layer: they take no ``transforms``."""


def check_flow_name(name: Any, caller: str = "", or_callable: bool = False) -> str:
    """``name`` if :data:`FLOWS` has it, else a ValueError listing the known names.

    ``caller`` prefixes the message; ``or_callable`` adds that the caller also takes a callable.
    """
    if not isinstance(name, str) or name not in FLOWS:
        prefix = f"{caller}: " if caller else ""
        alternative = " or a callable" if or_callable else ""
        raise ValueError(f"{prefix}flow must be one of {', '.join(FLOWS)}{alternative}, got {name!r}")
    return name


def build_flow(name: str, features: int, context: int = 0, *, transforms: Optional[int] = None, **kwargs: Any) -> Flow:
    """The flow ``name`` of :data:`FLOWS` over ``features`` dimensions (conditional on ``context`` features if > 0).

    ``transforms`` is the number of layers (None: the factory's default); a continuous flow
    (:data:`CONTINUOUS`) is one ODE layer and ignores it. Other keyword arguments go to the factory
    (``hidden``, ``bins``, ``mixing``, ``trace``, ``classes``, ``embedding_features``, ...); with ``classes=K``
    the flow is called with integer labels (:func:`~.base.class_context`).

    Example:
        >>> build_flow("nsf", features=3, transforms=2, hidden=(16,))().sample((5,)).shape
        torch.Size([5, 3])
        >>> build_flow("maf", features=3, classes=4)(torch.tensor([0, 3])).sample((5,)).shape
        torch.Size([5, 2, 3])
    """
    factory = FLOWS[check_flow_name(name, "build_flow")]
    if transforms is not None and name not in CONTINUOUS:
        kwargs["transforms"] = transforms
    flow = factory(features, context, **kwargs)
    if not isinstance(flow, Flow):  # e.g. RealNVP(shape=...), an image model
        raise TypeError(
            f"build_flow builds flows over vectors; {name} with {sorted(kwargs)} gave a {type(flow).__name__}"
        )
    return flow

"""Training objectives: what :func:`pyro_flows.fit` minimises.

An objective is a callable ``objective(model, x, context) -> loss`` (a scalar tensor):
:class:`NegativeLogLikelihood` (the default), :class:`CNFRegularizedNLL` for continuous flows, and
:class:`FlowMatching`, which trains a continuous flow's vector field by regression.
"""

from .flow_matching import FlowMatching, conditional_ot_pairing, continuous_flow_of, ot_pairing
from .likelihood import CNFRegularizedNLL, NegativeLogLikelihood, continuous_layers

__all__ = [
    "CNFRegularizedNLL",
    "FlowMatching",
    "NegativeLogLikelihood",
    "conditional_ot_pairing",
    "continuous_flow_of",
    "continuous_layers",
    "ot_pairing",
]

"""Training objectives: what :func:`pyro_flows.fit` minimises.

An objective is a callable ``objective(model, x, context) -> loss`` (a scalar tensor):
:class:`NegativeLogLikelihood` (the default), :class:`CNFRegularizedNLL` for continuous flows, and
:class:`FlowMatching`, which trains a continuous flow's vector field by regression, on the affine paths of a
scheduler (:class:`CondOT`, :class:`VP`, :class:`Cosine`, :class:`Polynomial`) with a coupling
(independent, :func:`ot_pairing`, :func:`sinkhorn_pairing`, or fixed pairs from :func:`reflow_pairs`).
"""

from .couplings import conditional_ot_pairing, ot_pairing, sinkhorn_pairing, sinkhorn_plan
from .flow_matching import COUPLINGS, FlowMatching, continuous_flow_of, guided_sample
from .likelihood import CNFRegularizedNLL, NegativeLogLikelihood, continuous_layers
from .paths import SCHEDULERS, VP, Coefficients, CondOT, Cosine, Polynomial, Scheduler, scheduler_of
from .reflow import reflow_pairs, straightness

__all__ = [
    "CNFRegularizedNLL",
    "COUPLINGS",
    "Coefficients",
    "CondOT",
    "Cosine",
    "FlowMatching",
    "NegativeLogLikelihood",
    "Polynomial",
    "SCHEDULERS",
    "Scheduler",
    "VP",
    "conditional_ot_pairing",
    "continuous_flow_of",
    "continuous_layers",
    "guided_sample",
    "ot_pairing",
    "reflow_pairs",
    "scheduler_of",
    "sinkhorn_pairing",
    "sinkhorn_plan",
    "straightness",
]

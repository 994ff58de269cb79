"""The rule that sizes and trains :class:`~pyro_flows.DensityEstimator` from the table: :func:`tabular_defaults`."""

from __future__ import annotations

from typing import Any

from .flows.registry import CONTINUOUS, check_flow_name

VALIDATION_ROWS = 100
"""Rows the validation split aims at (within 10%..25% of the table): fewer make early stopping chase noise."""
STEPS_PER_EPOCH = 8
"""Optimizer steps an epoch aims at (batch size ``rows / 8``, within 16..256), so patience counts real progress."""
WEIGHT_DECAY = (1e-2, 5e-2)
"""The range of Adam's weight decay: ``DECAY_ROWS / rows`` within it (the affine flows: its top)."""
DECAY_ROWS = 10.0
"""Weight decay times rows: 5e-2 up to 200 rows, 1e-2 from 1000 rows on (smaller tables, a stronger pull towards
the Gaussian)."""
REFIT_ROWS = 400
"""Up to this many rows (where the validation split holds out its largest share, 25%) ``DensityEstimator`` trains
the flow again on all rows for the epochs the validation rows chose: wine (133 rows) NSF -18.30, -18.40, -18.09 →
-17.95, -17.87, -17.86 and NICE -18.53, -18.70, -18.38 → -18.31, -18.27, -18.30 (seeds 0-2; one Gaussian -18.31),
iris NSF -3.21 → -2.88 (seed 0)."""
AFFINE = frozenset({"realnvp", "maf", "iaf"})
"""The flows whose layers scale by :math:`e^{s}` (:class:`~pyro_flows.transforms.maps.Affine`)."""
AFFINE_LOG_SCALE_BOUND = 1.5
"""Their per-layer log-scale bound (the layers' own default is 3)."""


def tabular_defaults(flow: str, rows: int, features: int, context: int = 0) -> dict[str, Any]:
    r"""Architecture and training options of a :class:`~pyro_flows.DensityEstimator` of ``flow`` fitted to a
    table of ``rows`` rows and ``features`` target columns: the values its parameters left at None take.

    Returns ``transforms``, ``hidden``, the :class:`~pyro_flows.FitOptions` fields that depend on the table
    (``batch_size``, ``validation_fraction``, ``weight_decay``; the others are
    :attr:`~pyro_flows.DensityEstimator.fit_options`'), and the factory options ``input_bound`` and, for the affine
    flows, ``log_scale_bound`` (the continuous flows, which the benchmark does not cover, keep their former
    (128, 128) vector field, no weight decay and no ``input_bound``).

    The choices, measured by ``benchmarks/bench_tabular.py`` (held-out log-likelihood per row, standardised
    units, 75/25 split; "before" is 5 layers of (128, 128), batch 256, 10% validation, no weight decay, no input
    bound, no whitening) and explained in ``benchmarks/README.md``:

    * **Start from the Gaussian.** Not a value here: the estimator whitens the standardised targets with a fixed
      Cholesky layer (:class:`~pyro_flows.transforms.preprocessing.Whiten`), so a fresh flow is the fitted
      full-covariance Gaussian; the estimator keeps it (and warns) unless training beats it on the validation
      rows by more than a standard error. Breast cancer (30 columns):
      RealNVP -22.5 → -5.2, MAF -13.2 → -5.7, NICE -23.3 → -9.0 (one Gaussian -9.0).
    * ``input_bound=3``: conditioners see their inputs squashed, :math:`x / (1 + |x| / 3)`, so the shifts and
      scales stop growing outside the training rows (a ReLU network extrapolates them linearly; a MAF scored one
      held-out breast-cancer row 190 nats below the Gaussian). NSF -4.1 → -3.3, RealNVP -7.0 → -5.2 on breast
      cancer (3 seeds).
    * ``weight_decay`` (Adam's L2 penalty: the conditioners' last layers start at zero, so it pulls every
      layer towards the identity, i.e. the whole flow towards the Gaussian): ``10 / rows`` within
      :data:`WEIGHT_DECAY`, 5e-2 up to 200 rows and 1e-2 from 1000 rows on (breast cancer NSF -4.4 at 1e-3 →
      -3.4 at 1e-2; iris NSF -3.45, -3.46 at 1e-2 → -3.21, -2.91 at 5e-2, seeds 0 and 1, one Gaussian -3.24);
      ``hidden`` two layers of ``max(64, 2 * features)`` units (at most 256; a MADE needs about ``features``
      units per layer to connect every variable to all before it), 5 layers.
    * The affine flows (:data:`AFFINE`: RealNVP, MAF, IAF) get ``log_scale_bound=1.5`` (the layers' default is 3)
      and weight decay 5e-2 whatever the rows. On a mixture of thin clusters a flow learns scales of
      :math:`e^{3}` per layer that are right on the clusters and wrong between them: with the former bound a
      held-out row between two clusters landed 45 standard deviations out in the base space, 990 nats below the
      Gaussian, and RealNVP's mean was -6.9 against the Gaussian's -4.7 (the mixture toy). Bounded: RealNVP -3.2
      there; breast cancer RealNVP -4.6 → -3.1, MAF -4.9 → -3.9; diabetes MAF -8.9 → -8.4 (seed 0). NSF's splines
      are bounded by construction (identity outside ``[-bound, bound]``, bounded derivatives): its worst held-out
      row on the mixture is 9 nats below the Gaussian.
    * ``batch_size = rows / 8`` within 16..256, i.e. about eight steps an epoch: with 256-row batches a 100-row
      table took one step an epoch, so ``patience`` epochs were a handful of steps and early stopping kept the
      first epoch (33-49-row tables ended as a Gaussian in disguise).
    * ``validation_fraction``: :data:`VALIDATION_ROWS` rows, within 10% and 25% of the table: 10% of 150 rows is
      15 rows, whose loss is too noisy to stop on.
    * ``DensityEstimator.fit_options``' ``patience=20`` epochs (about 160 steps at eight steps an epoch),
      ``max_epochs=200`` and ``lr=1e-3`` suit these batch sizes: the best epoch on the tables of the benchmark
      comes at 20-100 epochs; the best weights are kept.

    Args:
        flow: a name of :data:`~pyro_flows.flows.FLOWS`.
        rows: rows of the table (validation rows included), >= 1.
        features: target columns, >= 1.
        context: context columns (a conditional model keeps the former weight decay, 1e-2, and the affine layers'
            own log-scale bound: a conditional density can be far narrower than the standardised marginal, so
            the scales the bound of 1.5 allows may be too few).

    Example:
        >>> tabular_defaults("nsf", rows=569, features=30)["batch_size"]
        71
        >>> tabular_defaults("maf", rows=150, features=4)["validation_fraction"]
        0.25
        >>> [tabular_defaults(flow, rows=1000, features=4)["weight_decay"] for flow in ("nsf", "maf")]
        [0.01, 0.05]
    """
    check_flow_name(flow, "tabular_defaults")
    for name, value in (("rows", rows), ("features", features)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"tabular_defaults: {name} must be an integer >= 1, got {value!r}")
    width = min(256, max(64, 2 * features))
    training = {
        "batch_size": min(256, max(16, rows // STEPS_PER_EPOCH)),
        "validation_fraction": min(0.25, max(0.1, VALIDATION_ROWS / rows)),
    }
    if flow in CONTINUOUS:  # not measured here: the vector field keeps its former size and no weight decay
        return {"transforms": 5, "hidden": (128, 128), **training}
    if context:  # p(y | x) is not measured here: the former weight decay, the layers' own log-scale bound
        return {"transforms": 5, "hidden": (width, width), "input_bound": 3.0, **training, "weight_decay": 1e-2}
    if flow in AFFINE:  # scales that cannot blow a row between the training rows far into the tails
        return {
            "transforms": 5,
            "hidden": (width, width),
            "input_bound": 3.0,
            "log_scale_bound": AFFINE_LOG_SCALE_BOUND,
            **training,
            "weight_decay": WEIGHT_DECAY[1],
        }
    training["weight_decay"] = min(WEIGHT_DECAY[1], max(WEIGHT_DECAY[0], DECAY_ROWS / rows))
    return {"transforms": 5, "hidden": (width, width), "input_bound": 3.0, **training}

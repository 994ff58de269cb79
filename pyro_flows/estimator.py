"""``DensityEstimator``: a normalizing flow as a scikit-learn density estimator, unconditional or conditional.

Errors follow one convention: bad data or arguments raise ``ValueError`` naming the problem (rows, shapes,
names); using an estimator before ``fit`` raises :class:`NotFittedError`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, ClassVar, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from . import saving
from .flows import Flow, build_flow
from .flows.registry import FLOWS, check_flow_name
from .nn.mlp import check_hidden
from .train import FitHistory, FitOptions, _split
from .train import fit as fit_flow
from .transforms.normalization import ActNorm, Standardize
from .transforms.preprocessing import Whiten
from .utils import PathLike, draw_seed, nonfinite_rows, seeded_rng

__all__ = ["FLOWS", "DensityEstimator", "NotFittedError"]

SHOWN_ROWS = 10  # how many offending rows an error message names
CHUNK_ROWS = 2048
"""Rows per pass of :meth:`DensityEstimator.log_prob`, :meth:`~DensityEstimator.sample`,
:meth:`~DensityEstimator.encode` and :meth:`~DensityEstimator.decode`: each pass's working memory (the layers'
activations, a few KiB a row for the default NSF) is freed before the next, so scoring or drawing a million rows
costs little more than the result itself."""
TRAINING_PARAMETERS = ("max_epochs", "batch_size", "lr", "weight_decay", "validation_fraction", "patience", "seed")
"""The constructor's parameters that are :class:`~pyro_flows.FitOptions` fields (None: the default)."""
FIT_OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(FitOptions))
"""The names of :class:`~pyro_flows.FitOptions`' fields: a data default with such a name is a training option,
any other (but ``transforms`` and ``hidden``) an option of the flow's factory."""
JSONLike = Union[None, bool, int, float, str, list, dict]
ArrayLike = Union[np.ndarray, Tensor]
Columns = Sequence[Union[int, str]]


class NotFittedError(RuntimeError, ValueError, AttributeError):
    """The estimator is used (``log_prob``, ``sample``, ``save``, ...) before ``fit``.

    A ``ValueError`` and an ``AttributeError`` too, as scikit-learn's own ``NotFittedError`` is.
    """


class _ContextScale(nn.Module):
    """Divides a (centred) context by its columns' standard deviations: the conditioner sees unit-scale inputs."""

    scale: Tensor

    def __init__(self, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.clone())

    def forward(self, context: Tensor) -> Tensor:
        return context / self.scale


def _validation_gain(start: Tensor, trained: Tensor) -> tuple[float, float]:
    """The mean gain in log-likelihood per validation row of the trained flow over the starting one (per-row
    log-densities ``start`` and ``trained``) and its standard error (NaN for one row)."""
    gain = (trained - start).double()
    return float(gain.mean()), float(gain.std() / math.sqrt(len(gain)))


def _warn_kept_start(whiten: bool, rows: int, gain: float, error: float) -> None:
    """The warning of :meth:`DensityEstimator.fit` when the trained flow did not beat the starting flow by more
    than a standard error on ``rows`` validation rows."""
    name = "the fitted Gaussian" if whiten else "the starting flow (a diagonal Gaussian)"
    warnings.warn(
        f"DensityEstimator.fit: training did not beat {name} on the {rows} validation rows by more than a "
        f"standard error (gain {gain:+.4f} ± {error:.4f} nats per row); the estimator keeps {name}, fitted to all "
        "rows. More rows, a larger validation_fraction or a smaller flow may help",
        UserWarning,
        stacklevel=3,
    )


@torch.no_grad()
def _log_probs(model: Flow, validation: Union[Tensor, tuple[Tensor, Tensor]]) -> Tensor:
    """The log-density of each of the ``validation`` rows (``x`` or ``(x, context)``) in eval mode, CHUNK_ROWS at
    a time."""
    x, context = validation if isinstance(validation, tuple) else (validation, None)
    model.eval()
    chunks = []
    for start in range(0, len(x), CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        chunks.append((model() if context is None else model(context[rows])).log_prob(x[rows]))
    model.train()
    return torch.cat(chunks)


class DensityEstimator:
    r"""A normalizing flow fitted by maximum likelihood: a scikit-learn density estimator of :math:`p(y)` or
    :math:`p(y \mid x)`.

    ``fit`` standardises the data: the flow built by the factory ``flow`` (:func:`~pyro_flows.NSF`, ...) gets a
    fixed :class:`~pyro_flows.transforms.Standardize` layer as its last base→data layer,
    :math:`y = \mu + \sigma \odot u`, with the column means and standard deviations :math:`\mu, \sigma` of the
    rows passed to ``fit`` (each floored at ``min_scale`` times the largest column's: see
    :meth:`Standardize.from_data <pyro_flows.transforms.Standardize.from_data>`). Its log-det is part of every
    density, so

    .. math:: \log p(y) = \log p_{\text{flow}}\big((y - \mu) / \sigma\big) - \sum_i \log \sigma_i

    is in the data's own units, and samples come out in the data's units.

    **Conditional density estimation.** ``context`` names columns of ``X`` (names of a DataFrame's columns or of
    ``feature_names``, or indices): the other columns are the targets :math:`y`, and the flow models
    :math:`p(y \mid x)` with the context columns :math:`x` (centred and scaled to unit standard deviation) as
    every layer's context. ``log_prob(X)`` scores each row's targets given its context, ``sample(n, context=C)``
    draws ``n`` targets for each row of context values ``C``.

    **scikit-learn.** The constructor only stores its arguments (checked by ``fit``); ``get_params`` /
    ``set_params`` (the factory's options such as ``bins`` included), ``clone``, ``Pipeline`` (``score_samples``
    too), ``GridSearchCV`` and ``cross_val_score`` (``score`` is the mean log-likelihood: higher is better),
    ``check_is_fitted`` work; ``fit`` sets ``n_features_in_`` and, for a DataFrame with string column names,
    ``feature_names_in_``. scikit-learn itself is not needed.

    **Defaults from the data.** Parameters left at None (``transforms``, ``hidden`` and the training options
    ``max_epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``validation_fraction``, ``patience``) are chosen
    by ``fit`` from the table's rows and dimension (:meth:`_data_defaults`), then from :attr:`fit_options`.
    A keyword given to ``fit`` overrides both for that call.

    **Never worse than the Gaussian on the validation rows.** With a validation split, the flow as built (with
    ``whiten=True`` a fresh coupling or autoregressive flow *is* the fitted full-covariance Gaussian) competes with
    the trained one: unless training gains more than one standard error of the per-row gain in log-likelihood on
    the validation rows, ``fit`` keeps the flow as built, fitted to all rows, sets ``kept_start_`` and warns
    (UserWarning): on tiny tables training often fits only noise. The whitening layer is fitted to the training
    rows only, so that the validation rows judge a Gaussian they did not fit.

    Data far from zero: the column means are taken in float64 from the data as given and kept as ``offset_``
    (float64, saved with the model); every input has them subtracted in float64 before it is cast to the model's
    dtype, and samples get them added back in float64, so that a column such as ``1.7e9 + N(0, 1)`` is not
    coarsened by a float32 cast. ``fit`` warns (``UserWarning``) about a column whose standard deviation spans
    fewer than 16 representable steps at its magnitude, in the data's dtype or, after centring, in the model's.

    Inputs ``X`` are NumPy arrays, torch tensors or DataFrames of shape ``(rows, columns)``; outputs have the
    input's type (NumPy float64 for NumPy input, a tensor of the model's dtype for tensor input; ``sample``
    follows the type ``fit`` saw). The model computes in ``dtype`` (``"float32"`` by default, also for float64
    NumPy data: pass ``dtype="float64"`` or ``torch.float64`` for double precision).

    Args:
        flow: a name of :data:`pyro_flows.flows.FLOWS`: ``"nice"``, ``"realnvp"``, ``"maf"``, ``"iaf"``,
            ``"nsf"``, ``"cnf"`` or ``"ffjord"`` (the continuous flows are one ODE layer, trained by maximum
            likelihood through the ODE: exact but slower; or by flow matching, which never solves the ODE in
            training: ``fit(X, objective=pf.FlowMatching())``; ``log_prob`` and ``sample`` use the ODE either way).
        transforms: number of flow layers (not for the continuous flows); None: from the data.
        hidden: hidden layer sizes of each layer's conditioner network (of the vector field, for CNFs); None:
            from the data.
        context: the columns of ``X`` that condition the density (names or indices); None: none (:math:`p(y)`).
        max_epochs, batch_size, lr, weight_decay, validation_fraction, patience: training options
            (:class:`~pyro_flows.FitOptions`); None: from the data and :attr:`fit_options`.
        seed: fixes the initialisation and the training run (None: one draw from torch's global generator).
        dtype: floating dtype of the model (``"float32"``, ``"float64"`` or a torch dtype).
        min_scale: relative floor of the standardisation's standard deviations (relative to the largest).
        whiten: True puts a fixed full-covariance whitening layer under the flow, so that a fresh flow is the
            fitted Gaussian (:class:`~pyro_flows.transforms.preprocessing.Whiten`); False: the columns are only
            standardised (better on 64-D dequantised digits: 2.33 against 2.78 bits/dim after 30 epochs; a
            fresh flow is a diagonal Gaussian; on wine, NSF -16.5 against -18.3 whitened, see
            ``benchmarks/README.md``).
        refit: after early stopping on the validation split ``fit`` made, train a fresh flow on all rows for the
            number of epochs the validation rows chose (twice the time); None: on tables of at most
            :data:`~pyro_flows.tabular_defaults.REFIT_ROWS` rows, where the split holds out a quarter of them.
        **flow_kwargs: further options of the factory (``bins``, ``bound``, ``mixing``, ...); only JSON-like
            values (numbers, strings, booleans, lists, dicts), so ``save`` can store them.

    Attributes:
        flow\_: the fitted :class:`~pyro_flows.Flow` (its last layer is the ``Standardize``); it models the
            centred targets given the centred context.
        offset\_: the column means of the data passed to ``fit``, a float64 tensor ``(n_features_in_,)``.
        n_features_in\_: number of columns of ``X``, context columns included.
        feature_names_in\_: the column names seen by ``fit`` (a DataFrame's string names or ``feature_names``);
            only set when there were names.
        features\_: number of target columns :math:`D` (the flow's event size).
        context_columns\_, target_columns\_: the indices of the context and target columns of ``X``.
        history\_: the ``FitHistory`` returned by :func:`pyro_flows.fit`.
        kept_start\_: True when training did not beat the flow as it was built (with ``whiten=True``, the
            fitted full-covariance Gaussian) on the validation rows by more than a standard error, so that ``fit``
            kept it (and warned).
        whiten\_: whether the fitted flow has the whitening layer.
        refitted\_: whether the flow was trained again on all rows for the epochs the validation rows chose
            (``history_`` is the validated run's).

    Example:
        >>> X = np.random.default_rng(0).normal(5.0, 100.0, size=(500, 2))
        >>> est = DensityEstimator("realnvp", transforms=2, hidden=(16,), max_epochs=2).fit(X, progress=False)
        >>> est.score_samples(X[:3]).shape
        (3,)
        >>> est.sample(4, seed=0).shape
        (4, 2)
        >>> cond = DensityEstimator("nsf", transforms=2, hidden=(16,), context=[0], max_epochs=2).fit(X, progress=False)
        >>> cond.sample(5, context=X[:3, :1], seed=0).shape  # 5 draws of column 1 for each of 3 values of column 0
        (3, 5, 1)
    """

    # the fitted attributes, set by fit and load only (declared here for type checkers; not set by __init__)
    flow_: Flow
    features_: int
    n_features_in_: int
    offset_: Tensor
    context_columns_: list[int]
    target_columns_: list[int]
    history_: Any
    architecture_: dict[str, Any]
    feature_names_in_: list[str]
    kept_start_: bool
    whiten_: bool
    refitted_: bool

    fit_options: ClassVar[FitOptions] = FitOptions().replace(
        max_epochs=200, validation_fraction=0.1, patience=20, seed=0
    )
    """The defaults of :meth:`fit` that the data do not choose: :class:`~pyro_flows.FitOptions` with four changes.
    ``est.fit(X)`` with no budget should hand back a finished model, as a scikit-learn ``fit`` does, so 10% of
    the rows are held out and training stops 20 epochs after the validation loss last improved (at 200 epochs at
    most), keeping the best epoch's weights; plain :func:`~pyro_flows.fit` trains exactly as asked and holds
    nothing back unasked. ``seed=0``: the same rows give the same model (the command line's ``fit`` relies on
    it), on a random stream of its own (the caller's is left as it was)."""

    def __init__(
        self,
        flow: str = "nsf",
        transforms: Optional[int] = None,
        hidden: Optional[Sequence[int]] = None,
        *,
        context: Optional[Columns] = None,
        max_epochs: Optional[int] = None,
        batch_size: Optional[int] = None,
        lr: Optional[float] = None,
        weight_decay: Optional[float] = None,
        validation_fraction: Optional[float] = None,
        patience: Optional[int] = None,
        seed: Optional[int] = 0,
        dtype: Union[str, torch.dtype] = "float32",
        min_scale: float = 1e-6,
        whiten: bool = True,
        refit: Optional[bool] = None,
        **flow_kwargs: JSONLike,
    ) -> None:
        # stored as given (scikit-learn's convention: fit checks them, clone and set_params rely on it)
        self.flow, self.transforms, self.hidden, self.context = flow, transforms, hidden, context
        self.max_epochs, self.batch_size, self.lr, self.weight_decay = max_epochs, batch_size, lr, weight_decay
        self.validation_fraction, self.patience, self.seed = validation_fraction, patience, seed
        self.dtype, self.min_scale, self.whiten, self.refit = dtype, min_scale, whiten, refit
        self._flow_kwargs: dict[str, Any] = {}
        self._set_flow_kwargs(flow_kwargs)
        self._fitted_on = "numpy"

    # -- scikit-learn's estimator protocol ---------------------------------------------
    @classmethod
    def _parameter_names(cls) -> list[str]:
        import inspect

        parameters = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in parameters if p.name != "self" and p.kind is not p.VAR_KEYWORD]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's arguments by name, the factory's options (``bins``, ...) included."""
        return {**{name: getattr(self, name) for name in self._parameter_names()}, **self._flow_kwargs}

    def set_params(self, **params: Any) -> DensityEstimator:
        """Change constructor arguments; a name that is not a parameter is an option of the flow's factory."""
        names = set(self._parameter_names())
        for name in names & params.keys():
            setattr(self, name, params[name])
        self._set_flow_kwargs({k: v for k, v in params.items() if k not in names})
        return self

    @property
    def flow_kwargs(self) -> dict[str, Any]:
        """The factory's options given to the constructor or ``set_params`` (a copy)."""
        return dict(self._flow_kwargs)

    def __sklearn_tags__(self) -> Any:
        from sklearn.utils import Tags, TargetTags

        return Tags(
            estimator_type="density_estimator",
            target_tags=TargetTags(required=False),
            transformer_tags=None,
            regressor_tags=None,
            classifier_tags=None,
        )

    def __sklearn_is_fitted__(self) -> bool:
        return getattr(self, "flow_", None) is not None

    def __repr__(self) -> str:
        import inspect

        defaults = {n: p.default for n, p in inspect.signature(type(self).__init__).parameters.items()}
        unchanged = lambda k, v: (
            k in defaults and (defaults[k] is v or (type(defaults[k]) is type(v) and defaults[k] == v))
        )
        shown = {k: v for k, v in self.get_params().items() if not unchanged(k, v)}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def _set_flow_kwargs(self, flow_kwargs: dict[str, Any]) -> None:
        """Add factory options, refusing a value a file cannot hold and a name the factory does not take (a typo)
        now rather than at ``fit``."""
        for name, value in flow_kwargs.items():
            _check_json_like(value, name)
        kwargs = {**self._flow_kwargs, **flow_kwargs}
        if flow_kwargs and isinstance(self.flow, str) and self.flow in FLOWS:
            _check_factory_takes(self.flow, kwargs)
        self._flow_kwargs = kwargs

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a floating torch dtype (a ValueError for anything else)."""
        dtype = getattr(torch, self.dtype, None) if isinstance(self.dtype, str) else self.dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"DensityEstimator: dtype must be a floating torch dtype or its name, got {self.dtype!r}")
        return dtype

    def _data_defaults(self, rows: int, features: int, context: int = 0) -> dict[str, Any]:
        """The values of the parameters left at None for a table of ``rows`` rows and ``features`` targets:
        ``transforms``, ``hidden``, fields of :class:`~pyro_flows.FitOptions`, or options of the factory."""
        from .tabular_defaults import tabular_defaults

        return tabular_defaults(self.flow, rows, features, context)

    # -- fitting ----------------------------------------------------------------
    def fit(
        self,
        X: ArrayLike,
        y: None = None,
        *,
        feature_names: Optional[Sequence[str]] = None,
        validation_data: Optional[ArrayLike] = None,
        objective: Any = None,
        resume: Optional[PathLike] = None,
        **options: Any,
    ) -> DensityEstimator:
        """Build a fresh flow for ``X`` ``(rows, columns)`` and fit it by maximum likelihood; returns ``self``.

        ``options`` override the training parameters for this call: any field of :class:`~pyro_flows.FitOptions`
        (``max_epochs``, ``batch_size``, ``lr``, ``validation_fraction``, ``patience``, ``seed``, ``progress``,
        ``weight_decay``, ``schedule``, ``checkpoint``, ``device``, ...); ``validation_data`` (rows with the
        columns of ``X``), ``objective`` and ``resume`` go to :func:`pyro_flows.fit` as they are. A
        ``validation_fraction`` of the rows is held out for early stopping with ``patience`` epochs (the best
        weights are kept). The standardisation uses the mean and standard deviation of all rows of ``X``
        (validation rows included); the whitening layer and NICE's ActNorm only the training rows (a Gaussian
        fitted to the validation rows too would look better on them than it is, and win early stopping).
        ``feature_names`` (e.g. a CSV header; a DataFrame's column names are taken
        by themselves) are kept as ``feature_names_in_`` and saved. ``y`` is ignored (scikit-learn's
        ``fit(X, y=None)``). A failed ``fit`` leaves the estimator as it was.
        """
        flow_name = check_flow_name(self.flow, "DensityEstimator")
        dtype = self.torch_dtype
        if not isinstance(self.whiten, bool):
            raise ValueError(f"DensityEstimator: whiten must be True or False, got {self.whiten!r}")
        if self.refit is not None and not isinstance(self.refit, bool):
            raise ValueError(f"DensityEstimator: refit must be True, False or None, got {self.refit!r}")
        names = _column_names(X, feature_names)
        data = self._check_rows(X, "fit")
        if names is not None and len(names) != data.shape[1]:
            raise ValueError(f"fit: {len(names)} feature names for {data.shape[1]} columns of X")
        if len(data) < 2:
            raise ValueError(f"fit: got {len(data)} sample (row) of X; need at least 2 rows to standardise them")
        context_columns = _resolve_columns(self.context, names, data.shape[1])
        target_columns = [c for c in range(data.shape[1]) if c not in set(context_columns)]
        features = len(target_columns)
        defaults = self._data_defaults(len(data), features, len(context_columns))
        fit_options = self._fit_options(defaults, options)
        if validation_data is None and fit_options.validation_fraction:
            _check_validation_split(len(data), fit_options.validation_fraction)
        offset = data.double().mean(0)  # in float64, from the data as given: the cast comes after centring
        if not bool(torch.isfinite(offset).all()):
            Standardize.from_data(data.double(), float(self.min_scale))  # raises, naming the overflowing columns
        centred = data.double() - offset
        _warn_coarse_columns(data, centred, dtype)
        architecture = self._architecture(defaults)
        seed = draw_seed() if fit_options.seed is None else fit_options.seed
        held_out: Union[None, Tensor, tuple[Tensor, Tensor]] = None
        if validation_data is not None:
            rows = (self._check_rows(validation_data, "fit", data.shape[1]).double() - offset).to(dtype)
            held_out = (rows[:, target_columns], rows[:, context_columns]) if context_columns else rows
        elif not fit_options.validation_fraction:
            fit_options = fit_options.replace(patience=None)
        inputs = centred.to(dtype)
        targets, contexts = inputs[:, target_columns], (inputs[:, context_columns] if context_columns else None)
        if held_out is None and fit_options.validation_fraction:  # the split pyro_flows.fit would make, made here
            (targets, contexts), (rows, row_contexts) = _split(targets, contexts, fit_options.validation_fraction, seed)
            held_out = rows if row_contexts is None else (rows, row_contexts)
            fit_options = fit_options.replace(validation_fraction=0.0)

        def build(rows: Tensor, row_contexts: Optional[Tensor]) -> Flow:
            """A fresh flow (the same weights for the same seed), its whitening layer and ActNorm fitted to rows."""
            with seeded_rng(seed):
                standardize = Standardize.from_data(centred[:, target_columns], float(self.min_scale))
                model = _build(
                    flow_name,
                    architecture,
                    standardize,
                    Standardize.from_data(centred[:, context_columns], float(self.min_scale)).scale
                    if context_columns
                    else None,
                    dtype,
                    Whiten.from_data(standardize.inv(rows.double())) if self.whiten else None,
                )
            if any(isinstance(layer, ActNorm) for layer in model.transforms):  # (NICE's) data-dependent scaling:
                with torch.no_grad():  # initialised from up to CHUNK_ROWS rows, not one batch, so that a fresh flow
                    # is the whitened Gaussian (a batch's noisy statistics cost 1 nat)
                    model.train()(None if row_contexts is None else row_contexts[:CHUNK_ROWS]).log_prob(
                        rows[:CHUNK_ROWS]
                    )
            return model

        # fitted to the training rows only: the validation rows must not have fitted the Gaussian they judge
        model = build(targets, contexts)
        # the fresh flow (with whiten=True: the fitted Gaussian) is a candidate: the trained one must beat it
        start = None if held_out is None or resume is not None else _log_probs(model, held_out)
        history = fit_flow(
            model,
            targets,
            context=contexts,
            objective=objective,
            validation_data=held_out,
            resume=resume,
            options=fit_options.replace(seed=seed),
        )
        all_targets, all_contexts = inputs[:, target_columns], inputs[:, context_columns] if context_columns else None
        kept_start = False
        if start is not None and held_out is not None:
            gain, error = _validation_gain(start, _log_probs(model, held_out))
            if not gain > error:  # NaN (one row, a NaN density) keeps the start too
                # the starting flow again, now fitted to all rows (the validation rows chose it)
                kept_start = True
                _warn_kept_start(self.whiten, len(start), gain, error)
                model = build(all_targets, all_contexts)
        epochs = history.best_epoch
        refitted = False
        if not kept_start and epochs is not None and validation_data is None and fit_options.checkpoint is None:
            refitted = self._refits(len(data))
        if refitted and epochs is not None:  # the validation rows chose the epochs; the flow learns from all rows
            model = build(all_targets, all_contexts)
            fit_flow(
                model,
                all_targets,
                context=all_contexts,
                objective=objective,
                options=fit_options.replace(seed=seed, max_epochs=epochs + 1, patience=None),
            )
        self._set_fitted(
            flow_=model.eval(),
            features_=features,
            n_features_in_=data.shape[1],
            offset_=offset.cpu(),
            context_columns_=context_columns,
            target_columns_=target_columns,
            history_=history,
            architecture_=architecture,
            feature_names_in_=names,
            kept_start_=kept_start,
            whiten_=self.whiten,
            refitted_=refitted,
        )
        self._fitted_on = "torch" if isinstance(X, Tensor) else "numpy"
        return self

    def _refits(self, rows: int) -> bool:
        """``refit``, or for None whether the table has at most ``REFIT_ROWS`` rows."""
        from .tabular_defaults import REFIT_ROWS

        return rows <= REFIT_ROWS if self.refit is None else bool(self.refit)

    def _fit_options(self, defaults: dict[str, Any], options: dict[str, Any]) -> FitOptions:
        """:attr:`fit_options`, then the data's defaults, then the constructor's parameters, then ``options``."""
        given = {name: getattr(self, name) for name in TRAINING_PARAMETERS if getattr(self, name) is not None}
        if self.seed is None:
            given["seed"] = None
        chosen = {k: v for k, v in defaults.items() if k in FIT_OPTION_FIELDS}
        return self.fit_options.replace(**chosen).replace(**given).replace(**options)

    def _architecture(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """``transforms``, ``hidden`` and the factory's options, given or from the data: what ``save`` keeps."""
        transforms = defaults["transforms"] if self.transforms is None else self.transforms
        if isinstance(transforms, bool) or not isinstance(transforms, (int, np.integer)) or transforms < 1:
            raise ValueError(f"DensityEstimator: transforms must be a positive integer, got {transforms!r}")
        hidden = check_hidden(defaults["hidden"] if self.hidden is None else self.hidden, "DensityEstimator")
        chosen = {k: v for k, v in defaults.items() if k not in FIT_OPTION_FIELDS and k not in ("transforms", "hidden")}
        return {"transforms": int(transforms), "hidden": list(hidden), "kwargs": {**chosen, **self._flow_kwargs}}

    def _set_fitted(self, **attributes: Any) -> None:
        """Replace every fitted attribute at once (``feature_names_in_`` exists only when there were names)."""
        for name in FITTED_ATTRIBUTES:
            self.__dict__.pop(name, None)
        self.__dict__.update({k: v for k, v in attributes.items() if v is not None})

    # -- evaluation -------------------------------------------------------------
    @torch.no_grad()
    def log_prob(self, X: ArrayLike) -> ArrayLike:
        r"""Log-density of each row of ``X`` in the data's units, :math:`\log p(y)` or :math:`\log p(y \mid x)`:
        shape ``(rows,)``, the type of ``X``."""
        data = self._fitted_rows(X, "log_prob")
        numpy = not isinstance(X, Tensor)
        # written chunk by chunk into the result: no copy of all of X in the model's dtype, no list of chunks
        out = np.empty(len(data)) if numpy else torch.empty(len(data), dtype=self._dtype, device=self._device)
        for start, distribution, targets in self._chunks(data, "log_prob"):
            _put(out, start, distribution.log_prob(targets))
        return out

    def score_samples(self, X: ArrayLike) -> ArrayLike:
        """:meth:`log_prob` (scikit-learn's name: higher is more typical, an anomaly score's opposite)."""
        return self.log_prob(X)

    def score(self, X: ArrayLike, y: None = None) -> float:
        """Mean log-likelihood of the rows of ``X`` (nats; ``y`` is ignored, as in scikit-learn)."""
        return float(self.log_prob(X).mean())

    def nats_per_dim(self, X: ArrayLike) -> float:
        """Negative mean log-likelihood per target dimension in nats (:func:`pyro_flows.nats_per_dim`)."""
        from .diagnostics.density import nats_per_dim

        log_prob = self.log_prob(X)
        return nats_per_dim(log_prob, self.features_)

    def bits_per_dim(self, X: ArrayLike, levels: Optional[int] = None) -> float:
        """Negative mean log-likelihood per target dimension in bits (:func:`pyro_flows.bits_per_dim`).

        With ``levels``, ``X`` must be data dequantised into ``[0, 1)`` as ``(x + u) / levels``
        and the result bounds the discrete data's bits/dim (see :func:`~pyro_flows.bits_per_dim`).
        """
        from .diagnostics.density import bits_per_dim

        log_prob = self.log_prob(X)
        return bits_per_dim(log_prob, self.features_, levels)

    @torch.no_grad()
    def encode(self, X: ArrayLike) -> ArrayLike:
        """The base-space point :math:`z = f^{-1}(y)` (given the row's context) of each row of ``X``:
        ``(rows, features_)``, the type of ``X``. Standard normal for data from the model."""
        data = self._fitted_rows(X, "encode")
        out = self._empty((len(data), self.features_), numpy=not isinstance(X, Tensor))
        for start, distribution, targets in self._chunks(data, "encode"):
            _put(out, start, distribution.to_base(targets))
        return out

    @torch.no_grad()
    def decode(self, Z: ArrayLike, context: Optional[ArrayLike] = None) -> ArrayLike:
        """The targets :math:`y = f(z)` in the data's units of base-space points ``Z`` ``(rows, features_)``
        (the inverse of :meth:`encode`), given ``context`` values ``(rows, len(context_columns_))`` for a
        conditional model: the type of ``Z``."""
        self._fitted_flow("decode")
        z = self._check_rows(Z, "decode", self.features_, "base points")
        contexts = self._context_rows(context, "decode", len(z))
        out = self._empty((len(z), self.features_), numpy=not isinstance(Z, Tensor))
        for start in range(0, len(z), CHUNK_ROWS):
            chunk = z[start : start + CHUNK_ROWS].to(self._device, self._dtype)
            distribution = self._distribution(None if contexts is None else contexts[start : start + CHUNK_ROWS])
            _put(out, start, self._uncentre(distribution.from_base(chunk)))
        return out

    @torch.no_grad()
    def sample(
        self, n: int, seed: Optional[int] = None, *, context: Optional[ArrayLike] = None, temperature: float = 1.0
    ) -> ArrayLike:
        """``n`` samples ``(n, features_)`` in the data's units (NumPy if fitted on NumPy, else a tensor).

        A conditional model takes ``context``: values of the context columns, ``(rows, len(context_columns_))``,
        and returns ``n`` draws of the targets for each row, ``(rows, n, features_)`` (a 1-D ``context``, one
        row: ``(n, features_)``). ``temperature`` :math:`T` scales the base draws, :math:`z \\sim N(0, T^2 I)`
        (Glow's reduced-temperature sampling: below 1, more typical samples; 1 samples the model). ``seed``
        makes them repeat, on a random stream of their own (the caller's is left as it was); None draws the
        seed from torch's global generator (so ``torch.manual_seed`` makes unseeded samples repeat).
        """
        self._fitted_flow("sample")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"sample: n must be a positive integer, got {n!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"sample: temperature must be a number >= 0, got {temperature!r}")
        one_row = context is not None and np.ndim(context) == 1
        contexts = self._context_rows(_one_row(context) if one_row else context, "sample")
        rows = 1 if contexts is None else len(contexts)
        total, numpy = int(n) * rows, self._fitted_on == "numpy"
        # CHUNK_ROWS draws at a time, written into the result; each chunk's distribution (and the memo of its
        # last sample, see FlowDistribution.log_prob) is dropped with the chunk, so nothing large outlives the call
        out = self._empty((total, self.features_), numpy=numpy)
        with seeded_rng(draw_seed() if seed is None else seed, self._device):
            for start in range(0, total, CHUNK_ROWS):
                stop = min(start + CHUNK_ROWS, total)
                chunk_context = None if contexts is None else contexts[torch.arange(start, stop) // int(n)]
                distribution = self._distribution(chunk_context)
                z = distribution.base_dist.sample(() if contexts is not None else (stop - start,)) * temperature
                _put(out, start, self._uncentre(distribution.from_base(z)))
        return out if contexts is None or one_row else out.reshape(rows, int(n), self.features_)

    # -- the model's view of the data -------------------------------------------------
    def _chunks(self, data: Tensor, method: str):
        """``(start, distribution, targets)`` for each ``CHUNK_ROWS`` rows of ``data`` (all of ``X``'s columns):
        the targets centred and cast, the distribution conditioned on the rows' context."""
        context_columns, target_columns = self.context_columns_, self.target_columns_
        for start in range(0, len(data), CHUNK_ROWS):
            rows = self._centre(data[start : start + CHUNK_ROWS], method, start)
            context = rows[:, context_columns] if context_columns else None
            yield start, self._distribution(context), rows[:, target_columns]

    def _distribution(self, context: Optional[Tensor]) -> Any:
        """The flow's distribution given centred ``context`` rows (batch shape ``(rows,)``), or unconditional."""
        flow = self._fitted_flow("sample")
        return flow() if context is None else flow(context)

    def _context_rows(self, context: Optional[ArrayLike], method: str, rows: Optional[int] = None) -> Optional[Tensor]:
        """Context values ``(rows, len(context_columns_))``, centred and cast, or None for an unconditional model
        (which refuses a context)."""
        columns = self.context_columns_
        if not columns:
            if context is not None:
                raise ValueError(f"{method}: the estimator was fitted without context columns; pass no context")
            return None
        if context is None:
            raise ValueError(
                f"{method}: the estimator models p(targets | context): pass context=, the values of its context "
                f"columns {self._column_labels(columns)}"
            )
        values = self._check_rows(context, method, len(columns), "context")
        if rows is not None and len(values) != rows:
            raise ValueError(f"{method}: context has {len(values)} rows for {rows} rows of base points")
        return self._centre(values, method, columns=columns, what="context")

    def _column_labels(self, columns: list[int]) -> list:
        names = getattr(self, "feature_names_in_", None)
        return [names[c] for c in columns] if names is not None else list(columns)

    def _empty(self, shape: tuple, numpy: bool) -> ArrayLike:
        return np.empty(shape) if numpy else torch.empty(shape, dtype=self._dtype, device=self._device)

    def _centre(
        self, rows: Tensor, method: str, start: int = 0, columns: Optional[list[int]] = None, what: str = "X"
    ) -> Tensor:
        """Rows of ``X`` (or of its ``columns``) as the flow sees them: ``offset_`` subtracted in float64, then cast
        to the model's dtype; a ValueError naming the rows (``start`` is the first one's index) whose values the
        dtype cannot hold (1e39 in float32), which the cast would turn into inf."""
        offset = self.offset_ if columns is None else self.offset_[columns]
        centred = (rows.double() - offset.to(rows.device)).to(self._device, self._dtype)
        bad = nonfinite_rows(centred)
        if bad:
            shown = ", ".join(str(start + row) for row in bad[:SHOWN_ROWS]) + (", ..." if len(bad) > SHOWN_ROWS else "")
            raise ValueError(
                f"{method}: {len(bad)} rows of {what} (rows {shown}) have values too large for the model's dtype "
                f"{str(self._dtype).removeprefix('torch.')} (largest finite {torch.finfo(self._dtype).max:.4g} after "
                "subtracting the column means)"
            )
        return centred

    def _uncentre(self, samples: Tensor) -> Tensor:
        """The flow's target samples in the data's units: the targets' ``offset_`` added back in float64."""
        return samples.double() + self.offset_[self.target_columns_].to(samples.device)

    # -- persistence ----------------------------------------------------------------
    def save(self, path: PathLike) -> None:
        """Write the configuration, weights and standardisation to one file (atomically)."""
        flow = self._fitted_flow("save")
        saving.save(
            {
                "config": {
                    "flow": self.flow,
                    **self.architecture_,
                    "min_scale": float(self.min_scale),
                    "context": self.context_columns_,
                },
                "features": self.features_,
                "feature_names": getattr(self, "feature_names_in_", None),
                "dtype": str(self._dtype).removeprefix("torch."),
                "state_dict": {k: v.detach().cpu() for k, v in flow.state_dict().items()},
                "offset": self.offset_,
                "fitted_on": self._fitted_on,
                "history": _plain_history(self.history_),
                "kept_start": self.kept_start_,
                "refitted": self.refitted_,
            },
            path,
            "DensityEstimator",
        )

    @classmethod
    def load(cls, path: PathLike) -> DensityEstimator:
        """Rebuild an estimator written by :meth:`save` (weights-only loading: a file that would run code is refused).

        Raises ``ValueError`` for a file that is not a saved ``DensityEstimator`` of a known version
        (:mod:`pyro_flows.saving`'s format). The loaded estimator's parameters are the fitted architecture
        (``transforms``, ``hidden`` and options as chosen at ``fit``) and ``context`` the context columns' indices.
        """
        payload = saving.load(path, "DensityEstimator")  # refuses NaN/inf tensors, naming the file
        try:
            estimator = cls._from_payload(payload)
        except (KeyError, TypeError, RuntimeError, ValueError) as error:
            raise ValueError(f"{path} is a damaged DensityEstimator file: {error}") from None
        names = getattr(estimator, "feature_names_in_", None)
        if names is not None and (
            not isinstance(names, (list, tuple))
            or len(names) != estimator.n_features_in_
            or not all(isinstance(name, str) for name in names)
        ):
            shown = f"{len(names)} names" if isinstance(names, (list, tuple)) else type(names).__name__
            raise ValueError(
                f"{path} is a damaged DensityEstimator file: its feature names ({shown}) do not match its "
                f"{estimator.n_features_in_} columns"
            )
        return estimator

    @classmethod
    def _from_payload(cls, payload: dict) -> DensityEstimator:
        config, features = payload["config"], payload["features"]
        context_columns = list(config.get("context") or [])  # absent from files saved before conditional models
        columns = features + len(context_columns)
        estimator = cls(
            config["flow"],
            config["transforms"],
            tuple(config["hidden"]),
            context=context_columns or None,
            dtype=_dtype(payload["dtype"]),
            min_scale=config["min_scale"],
            **config["kwargs"],
        )
        architecture = estimator._architecture({})
        with seeded_rng(0):  # the initial weights are overwritten below: no draw from the caller's stream
            flow = _build(
                check_flow_name(config["flow"], "DensityEstimator.load"),
                architecture,
                Standardize(torch.zeros(features), torch.ones(features)),
                torch.ones(len(context_columns)) if context_columns else None,
                estimator.torch_dtype,
                # files written before the whitening layer have none: they load as they were saved
                Whiten(torch.eye(features)) if any(k.endswith("scale_tril") for k in payload["state_dict"]) else None,
            )
        flow.load_state_dict(payload["state_dict"])
        offset = payload.get("offset")  # absent from files saved before the offset existed: no offset
        if offset is None:
            offset = torch.zeros(columns, dtype=torch.float64)
        if not isinstance(offset, Tensor) or offset.shape != (columns,):
            raise TypeError(f"its offset is not a tensor of shape ({columns},)")
        context_set = set(context_columns)
        estimator._set_fitted(
            flow_=flow.eval(),
            features_=features,
            n_features_in_=columns,
            offset_=offset.double(),
            context_columns_=context_columns,
            target_columns_=[c for c in range(columns) if c not in context_set],
            history_=_restore_history(payload),
            architecture_=architecture,
            feature_names_in_=payload.get("feature_names"),
            kept_start_=bool(payload.get("kept_start", False)),  # absent from files saved before it existed
            whiten_=any(isinstance(layer, Whiten) for layer in flow.transforms),
            refitted_=bool(payload.get("refitted", False)),
        )
        estimator._fitted_on = payload["fitted_on"]
        return estimator

    # -- checks -------------------------------------------------------------------------
    def _fitted_flow(self, method: str) -> Flow:
        flow = getattr(self, "flow_", None)
        if flow is None:
            raise NotFittedError(f"DensityEstimator.{method}: the estimator is not fitted yet; call fit(X) first")
        return flow

    @property
    def _device(self) -> torch.device:
        return next(self._fitted_flow("device").buffers()).device

    @property
    def _dtype(self) -> torch.dtype:
        return next(self._fitted_flow("dtype").buffers()).dtype

    def _fitted_rows(self, X: ArrayLike, method: str) -> Tensor:
        """``X`` checked against the fitted model: its columns (and their names, for a DataFrame)."""
        self._fitted_flow(method)
        names = getattr(self, "feature_names_in_", None)
        given = _column_names(X, None)
        if names is not None and given is not None and list(given) != list(names):
            raise ValueError(f"{method}: X has columns {list(given)}; the estimator was fitted on {list(names)}")
        return self._check_rows(X, method, self.n_features_in_)

    @staticmethod
    def _check_rows(X: ArrayLike, method: str, features: Optional[int] = None, what: str = "X") -> Tensor:
        """``X`` as a float64 tensor ``(rows, features)`` (floating tensors keep their dtype) after the checks."""
        data = _as_tensor(X, method, what)
        if data.dim() != 2:
            raise ValueError(
                f"{method}: {what} must be 2-D (rows, features), got shape {tuple(data.shape)}"
                + (" (use X.reshape(-1, 1) for one feature)" if data.dim() == 1 else "")
            )
        if features is not None and data.shape[1] != features:
            raise ValueError(
                f"{method}: {what} has {data.shape[1]} features, but DensityEstimator is expecting {features} "
                "features as input"
            )
        if data.shape[0] == 0 or data.shape[1] == 0:
            empty = "sample(s)" if data.shape[0] == 0 else "feature(s)"
            raise ValueError(
                f"{method}: {what} has 0 {empty} (shape={tuple(data.shape)}) while a minimum of 1 is required."
            )
        bad = nonfinite_rows(data, CHUNK_ROWS)
        if bad:
            shown = ", ".join(map(str, bad[:SHOWN_ROWS])) + (", ..." if len(bad) > SHOWN_ROWS else "")
            raise ValueError(f"{method}: {len(bad)} rows of {what} have NaN or inf values (rows {shown})")
        return data


FITTED_ATTRIBUTES = (
    "flow_",
    "features_",
    "n_features_in_",
    "offset_",
    "context_columns_",
    "target_columns_",
    "history_",
    "architecture_",
    "feature_names_in_",
    "kept_start_",
    "whiten_",
    "refitted_",
)


def _build(
    name: str,
    architecture: dict[str, Any],
    standardize: Standardize,
    context_scale: Optional[Tensor],
    dtype: torch.dtype,
    whiten: Optional[Whiten] = None,
) -> Flow:
    """The factory's flow with ``whiten`` (if any) and ``standardize`` appended and, for a conditional model, the
    context scaled by ``context_scale`` before the layers see it; in ``dtype``."""
    context = 0 if context_scale is None else len(context_scale)
    model = build_flow(
        name,
        standardize.loc.shape[-1],
        context,
        transforms=architecture["transforms"],
        hidden=tuple(architecture["hidden"]),
        **architecture["kwargs"],
    )
    embedding = None if context_scale is None else _ContextScale(context_scale)
    preprocessing = [standardize] if whiten is None else [whiten, standardize]
    return Flow(model.base, [*model.transforms, *preprocessing], context, embedding).to(dtype)


def _check_factory_takes(flow: str, kwargs: dict[str, Any]) -> None:
    """A TypeError for a keyword argument the factory of ``flow`` does not take (a typo).

    A two-feature, one-layer flow is built on a random stream of its own and thrown away; only an unexpected
    keyword argument is reported here (a value may depend on the data's feature count).
    """
    try:
        with seeded_rng(0):
            build_flow(flow, 2, transforms=1, hidden=(8,), **kwargs)
    except TypeError as error:
        if "unexpected keyword argument" not in str(error):
            raise
        unexpected = str(error).rsplit("unexpected keyword argument", 1)[1].strip()
        raise TypeError(
            f"DensityEstimator: flow {flow!r} takes no keyword argument {unexpected}; "
            f"given {sorted(kwargs)} (see the factory's documentation for its options)"
        ) from None
    except Exception:  # noqa: BLE001 - other values are checked by fit, against the data
        pass


def _column_names(X: Any, feature_names: Optional[Sequence[str]]) -> Optional[list[str]]:
    """``feature_names``, else a DataFrame's column names when they are all strings (scikit-learn's rule)."""
    if feature_names is not None:
        return [str(name) for name in feature_names]
    columns = getattr(X, "columns", None)
    if columns is not None and not isinstance(X, (np.ndarray, Tensor)) and all(isinstance(c, str) for c in columns):
        return list(columns)
    return None


def _resolve_columns(context: Any, names: Optional[list[str]], columns: int) -> list[int]:
    """The indices of the ``context`` columns (names or indices) among ``columns``; at least one column is left."""
    if context is None:
        return []
    if isinstance(context, (str, int, np.integer)) or not isinstance(context, (list, tuple, np.ndarray)):
        raise ValueError(
            f"DensityEstimator: context must be a list of column names or indices (e.g. context=[{context!r}]), "
            f"got {context!r}"
        )
    indices = []
    for column in context:
        if isinstance(column, str):
            if names is None:
                raise ValueError(
                    f"DensityEstimator: context column {column!r} is named, but X has no column names "
                    "(pass a DataFrame, feature_names=, or column indices)"
                )
            if column not in names:
                raise ValueError(f"DensityEstimator: context column {column!r} is not a column of X; X has {names}")
            indices.append(names.index(column))
        elif isinstance(column, (int, np.integer)) and not isinstance(column, bool) and -columns <= column < columns:
            indices.append(int(column) % columns)
        else:
            raise ValueError(
                f"DensityEstimator: context column {column!r} is neither a column name nor an index in [0, {columns})"
            )
    if len(set(indices)) != len(indices):
        raise ValueError(f"DensityEstimator: context names a column twice: {list(context)}")
    if len(indices) >= columns:
        raise ValueError(f"DensityEstimator: context takes all {columns} columns of X; no column is left to model")
    return sorted(indices)


def _check_validation_split(rows: int, fraction: float) -> None:
    """A ValueError, saying how many rows are needed, when ``fraction`` of ``rows`` leaves no validation row or
    no training row (:func:`pyro_flows.fit` holds out ``round(fraction * rows)``)."""
    held_out = round(fraction * rows)
    if 1 <= held_out < rows:
        return
    needed = next(r for r in range(2, 10**9) if 1 <= round(fraction * r) < r)
    raise ValueError(
        f"fit: validation_fraction={fraction} of {rows} rows holds out {held_out} rows; a validation split "
        f"needs at least {needed} rows at this fraction (or pass validation_fraction=0 to train without one)"
    )


def _one_row(context: Any) -> ArrayLike:
    return context.reshape(1, -1) if isinstance(context, (np.ndarray, Tensor)) else np.asarray(context).reshape(1, -1)


def _as_tensor(X: ArrayLike, method: str, what: str = "X") -> Tensor:
    if isinstance(X, Tensor):
        if X.is_complex() or X.dtype == torch.bool:
            raise ValueError(f"{method}: {what} must be real numbers, got a tensor of dtype {X.dtype}")
        return X.detach() if X.is_floating_point() else X.detach().double()
    if hasattr(X, "toarray") or hasattr(X, "tocsr"):  # a SciPy sparse matrix or array
        raise ValueError(f"{method}: {what} is a sparse matrix; sparse input is not supported (pass X.toarray())")
    names = _column_names(X, None)
    array = np.asarray(X)
    if array.dtype.kind == "c":
        raise ValueError(f"{method}: {what} must be real numbers: Complex data not supported (dtype {array.dtype})")
    if array.dtype.kind not in "biuf":
        array = _numeric(array, method, what, names)
    # a copy when the array cannot be shared (read-only, or another dtype/layout): torch needs a writable buffer
    return torch.from_numpy(np.array(array, dtype=np.float64, order="C", copy=not array.flags.writeable or None))


def _numeric(array: np.ndarray, method: str, what: str, names: Optional[list[str]]) -> np.ndarray:
    """An object or string array as float64, or a ValueError naming the first column that is not numeric."""
    try:
        return array.astype(np.float64)
    except (TypeError, ValueError):
        pass
    for column in range(array.shape[-1] if array.ndim == 2 else 0):
        try:
            array[:, column].astype(np.float64)
        except (TypeError, ValueError) as error:
            label = repr(names[column]) if names is not None else str(column)
            example = next(v for v in array[:, column] if not _is_number(v))
            # Python's own distinction: a ValueError for a string that is not a number, a TypeError for another type
            raise type(error)(
                f"{method}: column {label} of {what} is not numeric (e.g. {example!r}: {error}); encode it as numbers"
            ) from None
    raise ValueError(f"{method}: {what} must be an array of real numbers, got dtype {array.dtype}")


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _put(out: ArrayLike, start: int, values: Tensor) -> None:
    """Write ``values`` into the rows of ``out`` from ``start`` on (NumPy float64 or a tensor of their dtype)."""
    if isinstance(out, np.ndarray):
        out[start : start + len(values)] = values.cpu().double().numpy()
    else:
        out[start : start + len(values)] = values


def _warn_coarse_columns(data: Tensor, centred: Tensor, dtype: torch.dtype) -> None:
    """Warn about columns whose standard deviation spans fewer than 16 representable steps at their magnitude:
    in the data's own dtype, or (after centring) in the model's ``dtype``."""
    std = centred.std(0)
    step = torch.maximum(
        torch.finfo(data.dtype).eps * data.abs().amax(0).double(),
        torch.finfo(dtype).eps * centred.abs().amax(0),
    )
    coarse = torch.nonzero((std > 0) & (std < 16 * step)).flatten().tolist()
    if coarse:
        shown = ", ".join(f"{c} (sd {std[c].item():.3g}, step {step[c].item():.3g})" for c in coarse[:SHOWN_ROWS])
        warnings.warn(
            f"DensityEstimator.fit: column(s) {shown} vary by fewer than 16 steps of the floating-point resolution "
            f"at their magnitude ({data.dtype} data, {dtype} model): they are modelled coarsely; pass float64 data "
            "centred nearer zero",
            UserWarning,
            stacklevel=3,
        )


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"unknown dtype {name!r} in a saved DensityEstimator")
    return dtype


def _check_json_like(value: Any, name: str) -> None:
    if not saving.is_plain(value):
        raise ValueError(
            f"DensityEstimator: flow option {name}={value!r} is not a plain value (number, string, bool, list, "
            "dict); it could not be saved"
        )


def _plain_history(history: Any) -> Any:
    """The fit history as plain lists and numbers (what a weights-only file can hold)."""
    if dataclasses.is_dataclass(history) and not isinstance(history, type):
        return dataclasses.asdict(history)
    return history


def _restore_history(payload: dict) -> Any:
    plain = payload["history"]
    return FitHistory(**plain) if isinstance(plain, dict) else plain

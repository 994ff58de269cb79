"""``DensityEstimator``: a normalizing flow as a scikit-learn-like density estimator.

Errors follow one convention: bad data or arguments raise ``ValueError``
naming the problem (rows, shapes, names); using an estimator before ``fit``
raises :class:`NotFittedError`, a ``RuntimeError``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from . import saving
from .flows import Flow, build_flow
from .flows.registry import FLOWS, check_flow_name
from .nn.mlp import check_hidden
from .train import FitHistory, FitOptions
from .train import fit as fit_flow
from .transforms.normalization import Standardize
from .utils import PathLike, draw_seed, nonfinite_rows, seeded_rng

__all__ = ["FLOWS", "DensityEstimator", "NotFittedError"]

SHOWN_ROWS = 10  # how many offending rows an error message names
CHUNK_ROWS = 2048
"""Rows per pass of :meth:`DensityEstimator.log_prob` and :meth:`DensityEstimator.sample`: each pass's
working memory (the layers' activations, a few KiB a row for the default NSF) is freed before the next, so
scoring or drawing a million rows costs little more than the result itself."""
JSONLike = Union[None, bool, int, float, str, list, dict]
ArrayLike = Union[np.ndarray, Tensor]


class NotFittedError(RuntimeError):
    """The estimator is used (``log_prob``, ``sample``, ``save``, ...) before ``fit``."""


class DensityEstimator:
    r"""A normalizing flow fitted by maximum likelihood, with a scikit-learn-like interface.

    ``fit`` standardises the data: the flow built by the factory ``flow``
    (:func:`~pyro_flows.NSF`, ...) gets a fixed :class:`~pyro_flows.transforms.Standardize`
    layer as its last base→data layer, :math:`y = \mu + \sigma \odot x`, with the column means
    and standard deviations :math:`\mu, \sigma` of the rows passed to ``fit``
    (each floored at ``min_scale`` times the largest column's: see :meth:`Standardize.from_data
    <pyro_flows.transforms.Standardize.from_data>`). Its log-det is part of every density, so

    .. math:: \log p(y) = \log p_{\text{flow}}\big((y - \mu) / \sigma\big) - \sum_i \log \sigma_i

    is in the data's own units, and samples come out in the data's units.

    Data far from zero: the column means are taken in float64 from the data as given and kept as
    ``offset_`` (float64, saved with the model); every input has them subtracted in float64 before it is cast
    to the model's dtype, and samples get them added back in float64, so that a column such as
    ``1.7e9 + N(0, 1)`` is not coarsened by a float32 cast (the flow's ``Standardize`` then has
    :math:`\mu \approx 0`). ``fit`` warns (``UserWarning``) about a column whose standard deviation spans
    fewer than 16 representable steps at its magnitude, in the data's dtype (e.g. a float32 tensor of values
    near 1.7e9, whose steps are 128) or, after centring, in the model's: such a column is modelled coarsely.

    Inputs ``X`` are NumPy arrays or torch tensors of shape ``(rows, features)``;
    outputs have the input's type (NumPy float64 for NumPy input, a tensor of the
    model's dtype for tensor input; ``sample`` follows the type ``fit`` saw). The
    model computes in ``dtype`` (float32 by default, also for float64 NumPy data:
    pass ``dtype=torch.float64`` for double precision).

    Errors: ``ValueError`` for bad data or arguments (NaN/inf rows, wrong shapes or
    feature counts, too few rows, a file that is not a saved estimator);
    :class:`NotFittedError` (a ``RuntimeError``) before ``fit``.

    Args:
        flow: a name of :data:`pyro_flows.flows.FLOWS`: ``"nice"``, ``"realnvp"``, ``"maf"``, ``"iaf"``,
            ``"nsf"``, ``"cnf"`` or ``"ffjord"`` (the continuous flows are one ODE layer, trained by maximum
            likelihood through the ODE: exact but slower).
        transforms: number of flow layers (not for the continuous flows).
        hidden: hidden layer sizes of each layer's conditioner network (of the vector field, for CNFs).
        dtype: floating dtype of the model.
        min_scale: relative floor of the standardisation's standard deviations (relative to the largest).
        **flow_kwargs: further options of the factory (``bins``, ``bound``, ``mixing``, ...);
            only JSON-like values (numbers, strings, booleans, lists, dicts), so ``save`` can store them.

    Attributes:
        flow\_: the fitted :class:`~pyro_flows.Flow` (its last layer is the ``Standardize``); set by ``fit``.
            It models the centred data ``X - offset_``.
        offset\_: the column means of the data passed to ``fit``, a float64 tensor ``(features,)``; set by ``fit``.
        features\_: number of features :math:`D`; set by ``fit``.
        history\_: the ``FitHistory`` returned by :func:`pyro_flows.fit`; set by ``fit``.

    Example:
        >>> X = np.random.default_rng(0).normal(5.0, 100.0, size=(500, 2))
        >>> est = DensityEstimator("realnvp", transforms=2, hidden=(16,)).fit(
        ...     X, max_epochs=2, validation_fraction=0.2, progress=False)
        >>> est.score_samples(X[:3]).shape
        (3,)
        >>> est.sample(4, seed=0).shape
        (4, 2)
    """

    fit_options: ClassVar[FitOptions] = FitOptions().replace(
        max_epochs=200, validation_fraction=0.1, patience=20, seed=0
    )
    """The defaults of :meth:`fit`: :class:`~pyro_flows.FitOptions` with four changes. ``est.fit(X)`` with no
    budget should hand back a finished model, as a scikit-learn ``fit`` does, so 10% of the rows are held out
    and training stops 20 epochs after the validation loss last improved (at 200 epochs at most), keeping the
    best epoch's weights; plain :func:`~pyro_flows.fit` trains exactly as asked and holds nothing back
    unasked. ``seed=0``: the same rows give the same model (the command line's ``fit`` relies on it), on a
    random stream of its own (the caller's is left as it was)."""

    def __init__(
        self,
        flow: str = "nsf",
        transforms: int = 5,
        hidden: Sequence[int] = (128, 128),
        *,
        dtype: torch.dtype = torch.float32,
        min_scale: float = 1e-6,
        **flow_kwargs: JSONLike,
    ) -> None:
        check_flow_name(flow, "DensityEstimator")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        for name, value in flow_kwargs.items():
            _check_json_like(value, name)
        self.flow, self.transforms, self.hidden = flow, int(transforms), check_hidden(hidden, "DensityEstimator")
        self.dtype, self.min_scale = dtype, float(min_scale)
        self.flow_kwargs: dict[str, Any] = dict(flow_kwargs)
        self._check_flow_kwargs()
        self.flow_: Optional[Flow] = None
        self.features_: Optional[int] = None
        self.offset_: Optional[Tensor] = None
        self.feature_names_in_: Optional[list[str]] = None
        self.history_: Any = None
        self._fitted_on = "numpy"

    def _check_flow_kwargs(self) -> None:
        """A TypeError now, not at ``fit``, for a keyword argument the factory does not take (a typo).

        A two-feature, one-layer flow is built on a random stream of its own and thrown away; only an
        unexpected keyword argument is reported here (a value may depend on the data's feature count).
        """
        if not self.flow_kwargs:
            return
        try:
            with seeded_rng(0):
                build_flow(self.flow, 2, transforms=1, hidden=self.hidden, **self.flow_kwargs)
        except TypeError as error:
            if "unexpected keyword argument" not in str(error):
                raise
            unexpected = str(error).rsplit("unexpected keyword argument", 1)[1].strip()
            raise TypeError(
                f"DensityEstimator: flow {self.flow!r} takes no keyword argument {unexpected}; "
                f"given {sorted(self.flow_kwargs)} (see the factory's documentation for its options)"
            ) from None
        except Exception:  # noqa: BLE001 - other values are checked by fit, against the data
            pass

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.flow_kwargs.items())
        return f"{type(self).__name__}(flow={self.flow!r}, transforms={self.transforms}, hidden={self.hidden}{extra})"

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
        """Build a fresh flow for ``X`` ``(rows, features)`` and fit it by maximum likelihood; returns ``self``.

        ``options`` change :attr:`fit_options` for this call: any field of :class:`~pyro_flows.FitOptions`
        (``max_epochs``, ``batch_size``, ``lr``, ``validation_fraction``, ``patience``, ``seed``, ``progress``,
        ``weight_decay``, ``schedule``, ``checkpoint``, ``device``, ...); ``validation_data``, ``objective`` and
        ``resume`` go to :func:`pyro_flows.fit` as they are. A ``validation_fraction`` of the rows is held out for
        early stopping with ``patience`` epochs (the best weights are kept; ``patience`` is ignored without
        validation data). ``seed`` fixes the initialisation and the training run (None: one draw from torch's
        global generator). The standardisation uses the mean and standard deviation of all rows of ``X``
        (validation rows included). ``feature_names`` (e.g. a CSV header) are kept as ``feature_names_in_`` and
        saved. ``y`` is ignored (scikit-learn's ``fit(X, y=None)``). A failed ``fit`` leaves the estimator as it was.
        """
        fit_options = self.fit_options.replace(**options)
        data = self._check_rows(X, "fit")
        if feature_names is not None and len(feature_names) != data.shape[1]:
            raise ValueError(f"fit: {len(feature_names)} feature names for {data.shape[1]} features")
        if len(data) < 2:
            raise ValueError(f"fit: need at least 2 rows of X to standardise them, got {len(data)}")
        features = data.shape[1]
        offset = data.double().mean(0)  # in float64, from the data as given: the cast comes after centring
        if not bool(torch.isfinite(offset).all()):
            Standardize.from_data(data.double(), self.min_scale)  # raises, naming the overflowing columns
        centred = data.double() - offset
        _warn_coarse_columns(data, centred, self.dtype)
        seed = draw_seed() if fit_options.seed is None else fit_options.seed
        with seeded_rng(seed):
            model = self._build(features, Standardize.from_data(centred, self.min_scale))
        if validation_data is not None:
            validation_data = (self._check_rows(validation_data, "fit", features).double() - offset).to(self.dtype)
        elif not fit_options.validation_fraction:
            fit_options = fit_options.replace(patience=None)
        history = fit_flow(
            model,
            centred.to(self.dtype),
            objective=objective,
            validation_data=validation_data,
            resume=resume,
            options=fit_options.replace(seed=seed),
        )
        self.flow_, self.features_, self.history_ = model.eval(), features, history
        self.offset_ = offset.cpu()
        self.feature_names_in_ = None if feature_names is None else [str(name) for name in feature_names]
        self._fitted_on = "torch" if isinstance(X, Tensor) else "numpy"
        return self

    def _build(self, features: int, standardize: Standardize) -> Flow:
        """The factory's flow for ``features`` with ``standardize`` appended, in ``self.dtype``."""
        model = build_flow(self.flow, features, transforms=self.transforms, hidden=self.hidden, **self.flow_kwargs)
        return Flow(model.base, [*model.transforms, standardize], model.context_features).to(self.dtype)

    # -- evaluation -------------------------------------------------------------
    @torch.no_grad()
    def log_prob(self, X: ArrayLike) -> ArrayLike:
        """Log-density of each row of ``X`` in the data's units: shape ``(rows,)``, the type of ``X``."""
        flow = self._fitted_flow("log_prob")
        data = self._check_rows(X, "log_prob", self.features_)
        numpy = not isinstance(X, Tensor)
        # written chunk by chunk into the result: no copy of all of X in the model's dtype, no list of chunks
        out = np.empty(len(data)) if numpy else torch.empty(len(data), dtype=self.dtype, device=self._device)
        distribution = flow()
        for start in range(0, len(data), CHUNK_ROWS):
            chunk = self._centre(data[start : start + CHUNK_ROWS])
            log_prob = distribution.log_prob(chunk)
            _put(out, start, log_prob)
        return out

    score_samples = log_prob

    def score(self, X: ArrayLike, y: None = None) -> float:
        """Mean log-likelihood of the rows of ``X`` (nats; ``y`` is ignored, as in scikit-learn)."""
        return float(self.log_prob(X).mean())

    def nats_per_dim(self, X: ArrayLike) -> float:
        """Negative mean log-likelihood per dimension in nats (:func:`pyro_flows.nats_per_dim`)."""
        from .diagnostics.density import nats_per_dim

        log_prob = self.log_prob(X)
        assert self.features_ is not None  # log_prob raised NotFittedError otherwise
        return nats_per_dim(log_prob, self.features_)

    def bits_per_dim(self, X: ArrayLike, levels: Optional[int] = None) -> float:
        """Negative mean log-likelihood per dimension in bits (:func:`pyro_flows.bits_per_dim`).

        With ``levels``, ``X`` must be data dequantised into ``[0, 1)`` as ``(x + u) / levels``
        and the result bounds the discrete data's bits/dim (see :func:`~pyro_flows.bits_per_dim`).
        """
        from .diagnostics.density import bits_per_dim

        log_prob = self.log_prob(X)
        assert self.features_ is not None  # log_prob raised NotFittedError otherwise
        return bits_per_dim(log_prob, self.features_, levels)

    @torch.no_grad()
    def sample(self, n: int, seed: Optional[int] = None) -> ArrayLike:
        """``n`` samples ``(n, features)`` in the data's units (NumPy if fitted on NumPy, else a tensor).

        ``seed`` makes them repeat, on a random stream of their own (the caller's is left as it was); None draws
        the seed from torch's global generator (so ``torch.manual_seed`` makes unseeded samples repeat).
        """
        flow = self._fitted_flow("sample")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"sample: n must be a positive integer, got {n!r}")
        n, features, numpy = int(n), self.features_, self._fitted_on == "numpy"
        assert features is not None  # _fitted_flow raised NotFittedError otherwise
        # CHUNK_ROWS rows at a time, written into the result; each chunk's distribution (and the memo of its
        # last sample, see FlowDistribution.log_prob) is dropped with the chunk, so nothing large outlives the call
        out = np.empty((n, features)) if numpy else torch.empty(n, features, dtype=self.dtype, device=self._device)
        with seeded_rng(draw_seed() if seed is None else seed, self._device):
            for start in range(0, n, CHUNK_ROWS):
                rows = min(CHUNK_ROWS, n - start)
                _put(out, start, self._uncentre(flow().sample((rows,))))
        return out

    def _offset(self, device: torch.device) -> Tensor:
        assert self.features_ is not None  # called after _fitted_flow
        offset = self.offset_ if self.offset_ is not None else torch.zeros(self.features_, dtype=torch.float64)
        return offset.to(device)

    def _centre(self, rows: Tensor) -> Tensor:
        """Rows of the data as the flow sees them: ``offset_`` subtracted in float64, then cast to the model."""
        return (rows.double() - self._offset(rows.device)).to(self._device, self.dtype)

    def _uncentre(self, samples: Tensor) -> Tensor:
        """The flow's samples in the data's units: ``offset_`` added back in float64."""
        return samples.double() + self._offset(samples.device)

    # -- persistence ----------------------------------------------------------------
    def save(self, path: PathLike) -> None:
        """Write the configuration, weights and standardisation to one file (atomically)."""
        flow = self._fitted_flow("save")
        saving.save(
            {
                "config": self._config(),
                "features": self.features_,
                "feature_names": self.feature_names_in_,
                "dtype": str(self.dtype).removeprefix("torch."),
                "state_dict": {k: v.detach().cpu() for k, v in flow.state_dict().items()},
                "offset": self._offset(torch.device("cpu")),
                "fitted_on": self._fitted_on,
                "history": _plain_history(self.history_),
            },
            path,
            "DensityEstimator",
        )

    @classmethod
    def load(cls, path: PathLike) -> DensityEstimator:
        """Rebuild an estimator written by :meth:`save` (weights-only loading: a file that would run code is refused).

        Raises ``ValueError`` for a file that is not a saved ``DensityEstimator`` of a known version
        (:mod:`pyro_flows.saving`'s format).
        """
        payload = saving.load(path, "DensityEstimator")  # refuses NaN/inf tensors, naming the file
        try:
            estimator = cls._from_payload(payload)
        except (KeyError, TypeError, RuntimeError) as error:
            raise ValueError(f"{path} is a damaged DensityEstimator file: {error}") from None
        names = estimator.feature_names_in_
        if names is not None and (
            not isinstance(names, (list, tuple))
            or len(names) != estimator.features_
            or not all(isinstance(name, str) for name in names)
        ):
            shown = f"{len(names)} names" if isinstance(names, (list, tuple)) else type(names).__name__
            raise ValueError(
                f"{path} is a damaged DensityEstimator file: its feature names ({shown}) do not match its "
                f"{estimator.features_} features"
            )
        return estimator

    @classmethod
    def _from_payload(cls, payload: dict) -> DensityEstimator:
        config, features = payload["config"], payload["features"]
        estimator = cls(
            config["flow"],
            config["transforms"],
            config["hidden"],
            dtype=_dtype(payload["dtype"]),
            min_scale=config["min_scale"],
            **config["kwargs"],
        )
        with seeded_rng(0):  # the initial weights are overwritten below: no draw from the caller's stream
            flow = estimator._build(features, Standardize(torch.zeros(features), torch.ones(features)))
        flow.load_state_dict(payload["state_dict"])
        offset = payload.get("offset")  # absent from files saved before the offset existed: no offset
        if offset is not None:
            if not isinstance(offset, Tensor) or offset.shape != (features,):
                raise TypeError(f"its offset is not a tensor of shape ({features},)")
            estimator.offset_ = offset.double()
        estimator.flow_, estimator.features_, estimator.history_ = flow.eval(), features, _restore_history(payload)
        estimator._fitted_on = payload["fitted_on"]
        estimator.feature_names_in_ = payload.get("feature_names")
        return estimator

    def _config(self) -> dict:
        return {
            "flow": self.flow,
            "transforms": self.transforms,
            "hidden": list(self.hidden),
            "min_scale": self.min_scale,
            "kwargs": self.flow_kwargs,
        }

    # -- checks -------------------------------------------------------------------------
    def _fitted_flow(self, method: str) -> Flow:
        if self.flow_ is None:
            raise NotFittedError(f"DensityEstimator.{method}: the estimator is not fitted yet; call fit(X) first")
        return self.flow_

    @property
    def _device(self) -> torch.device:
        return next(self._fitted_flow("device").buffers()).device

    @staticmethod
    def _check_rows(X: ArrayLike, method: str, features: Optional[int] = None) -> Tensor:
        """``X`` as a float64 tensor ``(rows, features)`` (floating tensors keep their dtype) after the checks."""
        data = _as_tensor(X, method)
        if data.dim() != 2:
            raise ValueError(
                f"{method}: X must be 2-D (rows, features), got shape {tuple(data.shape)}"
                + (" (use X.reshape(-1, 1) for one feature)" if data.dim() == 1 else "")
            )
        if features is not None and data.shape[1] != features:
            raise ValueError(f"{method}: expected {features} features, got {data.shape[1]}")
        if data.shape[0] == 0 or data.shape[1] == 0:
            raise ValueError(f"{method}: X has no {'rows' if data.shape[0] == 0 else 'features'}")
        bad = nonfinite_rows(data, CHUNK_ROWS)
        if bad:
            shown = ", ".join(map(str, bad[:SHOWN_ROWS])) + (", ..." if len(bad) > SHOWN_ROWS else "")
            raise ValueError(f"{method}: {len(bad)} rows of X have NaN or inf values (rows {shown})")
        return data


def _as_tensor(X: ArrayLike, method: str) -> Tensor:
    if isinstance(X, Tensor):
        if X.is_complex() or X.dtype == torch.bool:
            raise ValueError(f"{method}: X must be real numbers, got a tensor of dtype {X.dtype}")
        return X.detach() if X.is_floating_point() else X.detach().double()
    array = np.asarray(X)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{method}: X must be an array of real numbers, got dtype {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))


def _like(values: Tensor, numpy: bool) -> ArrayLike:
    return values.cpu().double().numpy() if numpy else values


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

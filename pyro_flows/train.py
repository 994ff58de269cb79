"""The one fitting loop: minibatches, validation and early stopping, checkpoints, recovery, ``torch.distributed``.

:func:`fit` minimises ``objective(model, x, context)`` by Adam. The default
objective is the negative log-likelihood of a flow; flow matching or a
simulation-based-inference loss plug in as other objectives, and the loop knows
nothing about flows beyond that call.

Fault tolerance. Every optimizer step starts from an in-memory copy of the
model's and the optimizer's tensors; a non-finite loss or gradient norm rolls
back to the state *before the last good update* (the update that may have led
into the bad region), halves the learning rate and goes on. Checkpoints hold
everything a run needs to continue bit for bit (weights, optimizer and
scheduler state, position in the data, loss history, RNG states, best weights),
as tensors and plain containers only, so they load with ``weights_only=True``.

Distributed training. Under an initialised ``torch.distributed`` process group
the model is wrapped in ``DistributedDataParallel``: ``model(context)`` in the
objective goes through the wrapper, which all-reduces (averages) the gradients
during ``backward`` even though the forward returns a distribution and the
parameters are used later, in ``log_prob`` (the reducer hooks the parameters'
gradient accumulators, wherever the graph is built). Every parameter must get a
gradient (``find_unused_parameters`` cannot see through a distribution).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler
from torch.utils import _foreach_utils
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset
from tqdm import tqdm

from . import saving
from .objectives import NegativeLogLikelihood
from .utils import Device, PathLike, check_finite_rows, draw_seed, seeded_rng, show_progress

Batch = tuple[Tensor, Optional[Tensor]]
Objective = Callable[[nn.Module, Tensor, Optional[Tensor]], Tensor]
Schedule = Union[None, str, Callable[[torch.optim.Optimizer], LRScheduler]]


@dataclass
class FitHistory:
    """What :func:`fit` did. Indexing, ``len`` and iteration give the training losses.

    Attributes:
        train_loss: mean training loss per epoch (the last entry may be a partial
            epoch, when ``max_steps`` stopped the run inside one).
        validation_loss: validation loss per completed epoch (empty without validation).
        best_epoch: index into ``validation_loss`` of the epoch whose weights were
            restored at the end (None without validation).
        steps: optimizer steps taken in total, including those before a resume.
        stopped_early: whether ``patience`` ended the run.
        recoveries: non-finite losses or gradients recovered from.
    """

    train_loss: list[float] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)
    best_epoch: Optional[int] = None
    steps: int = 0
    stopped_early: bool = False
    recoveries: int = 0

    def __len__(self) -> int:
        return len(self.train_loss)

    def __getitem__(self, index: Union[int, slice]) -> Union[float, list[float]]:
        return self.train_loss[index]

    def __iter__(self) -> Iterator[float]:
        return iter(self.train_loss)


@dataclass(frozen=True)
class FitOptions:
    """How :func:`fit` trains: the one set of training options, with the defaults of a plain ``fit`` call.

    The front ends start from these defaults and change only what their problem needs, each saying why:
    :attr:`pyro_flows.DensityEstimator.fit_options` and :attr:`pyro_flows.infer.NPE.fit_options`.
    ``options.replace(lr=3e-4)`` is a changed copy; ``fit(model, x, options=options, max_epochs=5)`` and the
    front ends' keyword arguments change given options for one call.

    Attributes:
        max_epochs, max_steps: stop after this many epochs / optimizer steps in total
            (counting those before a resume).
        steps_per_epoch: batches per epoch of a ``DataLoader`` (at most) or a callable (default 100).
        batch_size: rows per step (per rank under ``torch.distributed``). With tensor data, a last batch of
            a single row (e.g. 257 rows, ``batch_size=256``) is merged into the batch before it, so every step
            sees at least 2 rows (a ``BatchNorm`` layer's batch statistics need them); with a ``Dataset`` that
            row is left out of the epoch (each epoch another one); other short last batches are kept as they
            are. A ``DataLoader`` batches as it was built (``drop_last=``).
        lr, weight_decay: Adam's.
        schedule: None, ``"cosine"`` (annealed to 0 over the run's steps) or ``optimizer -> LRScheduler``;
            stepped every step.
        clip_grad: maximum gradient norm (None: no clipping).
        validation_fraction: hold out this fraction of the tensor rows (seeded shuffle). The validation
            loss is computed after each epoch in eval mode; the best epoch's weights are restored at the end.
        patience: stop after this many epochs without a better validation loss.
        seed: makes the run deterministic: the split, the shuffles and the model's own randomness
            (dropout, noise, Hutchinson probes) draw from torch's generators seeded by it (``seed + rank``
            under ``torch.distributed``), forked from the caller's, whose random streams are left as they
            were. None: a seed drawn from torch's global generator (one draw, so ``torch.manual_seed``
            makes an unseeded run repeat).
        progress: a tqdm bar (loss, validation loss); None shows it when stderr is a terminal and the
            environment variable ``CI`` is unset.
        checkpoint: file written atomically every ``checkpoint_every`` steps and at the end, by rank 0 only
            (:mod:`pyro_flows.saving`'s format, kind ``"fit"``).
        max_recoveries: non-finite losses or gradients survived (each rolls back to the state before the
            last good update and halves the learning rate, with a warning) before a ``RuntimeError``.
        device: move the model there and train there (default: the model's device).
    """

    max_epochs: int = 100
    max_steps: Optional[int] = None
    steps_per_epoch: Optional[int] = None
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: Schedule = None
    clip_grad: Optional[float] = 5.0
    validation_fraction: float = 0.0
    patience: Optional[int] = None
    seed: Optional[int] = None
    progress: Optional[bool] = None
    checkpoint: Optional[PathLike] = None
    checkpoint_every: int = 500
    max_recoveries: int = 5
    device: Device = None

    def __post_init__(self) -> None:
        """Counts are whole numbers >= 1 (>= 0 for epochs, steps and recoveries; None where optional)."""
        for name in ("max_epochs", "max_steps", "steps_per_epoch", "batch_size", "patience", "checkpoint_every",
                     "max_recoveries"):  # fmt: skip
            value = getattr(self, name)
            least = 0 if name in ("max_epochs", "max_steps", "max_recoveries") else 1
            if value is not None and (not isinstance(value, int) or value < least):
                raise ValueError(f"fit option {name} must be an integer >= {least}, got {value!r}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"fit option validation_fraction must be in [0, 1), got {self.validation_fraction!r}")

    def replace(self, **changes: Any) -> FitOptions:
        """A copy with ``changes``; a TypeError names an unknown option (and lists the options)."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise TypeError(f"unknown fit option {', '.join(unknown)}; the options are {', '.join(names)}")
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- data


def _as_batch(item: Any) -> Batch:
    """A batch from a loader or a callable: ``x`` or ``(x, context)``."""
    if isinstance(item, Tensor):
        return item, None
    if isinstance(item, (tuple, list)) and len(item) in (1, 2) and isinstance(item[0], Tensor):
        context = item[1] if len(item) == 2 else None
        if context is None or isinstance(context, Tensor):
            return item[0], context
    raise TypeError(f"fit: a batch must be a tensor x or a pair (x, context) of tensors, got {type(item).__name__}")


def _single_row_last(rows: int, batch_size: int) -> bool:
    """Whether ``rows`` in batches of ``batch_size`` end in a batch of one row (which batch statistics cannot use)."""
    return rows > batch_size and rows % batch_size == 1


def _check_data(model: nn.Module, x: Tensor, what: str) -> None:
    """``model.check_data(x, what)`` where the model checks its training data (an image model with
    ``pixel_levels``: the pixels' range, :meth:`~pyro_flows.dequantization.Dequantized.check_data`)."""
    check = getattr(model, "check_data", None)
    if callable(check):
        check(x, what)


def _shape(t: Optional[Tensor]) -> Optional[tuple]:
    return None if t is None else tuple(t.shape)


def _describe(value: Any) -> str:
    return f"a tensor of shape {_shape(value)}" if isinstance(value, Tensor) else type(value).__name__


def _check_rows(x: Tensor, context: Optional[Tensor], name: str) -> None:
    """Tensors of rows: ``x`` at least 2-D with at least one row, the same rows in ``x`` and ``context``, finite
    values.

    A context may be 1-D: one class label per row.
    """
    if not isinstance(x, Tensor) or x.dim() < 2 or (context is not None and context.dim() < 1):
        raise ValueError(
            f"fit: {name} must be tensors of rows, (rows, *event_shape) and (rows, context_features) or (rows,) "
            "labels; "
            f"got shapes {_shape(x) if isinstance(x, Tensor) else type(x).__name__} and {_shape(context)}"
        )
    if context is not None and context.shape[0] != x.shape[0]:
        raise ValueError(
            f"fit: {name} and its context must have the same number of rows; got shapes "
            f"{_shape(x)} and {_shape(context)}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"fit: {name} has no rows (shape {_shape(x)}); there is nothing to fit")
    for tensor, what in ((x, name), (context, f"{name} context")):
        if tensor is not None:
            check_finite_rows(tensor, f"fit: {what}")


def _split(x: Tensor, context: Optional[Tensor], fraction: float, seed: int) -> tuple[Batch, Batch]:
    """A seeded random split of the rows into (training, validation)."""
    rows = x.shape[0]
    held_out = round(fraction * rows)
    if held_out < 1 or held_out >= rows:
        raise ValueError(
            f"fit: validation_fraction={fraction} of {rows} rows (data of shape {_shape(x)}) leaves "
            f"{held_out} validation and {rows - held_out} training rows; each needs at least 1"
        )
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed)).to(x.device)
    train, validation = order[held_out:], order[:held_out]
    pick = lambda index: (x[index], None if context is None else context[index])
    return pick(train), pick(validation)


class _TensorSource:
    """Shuffled minibatches of tensor rows, sharded over ranks by a seeded ``DistributedSampler``.

    Epoch ``e`` is a permutation seeded by ``seed + e``, so a run can resume at any batch of any epoch.
    """

    def __init__(self, x: Tensor, context: Optional[Tensor], batch_size: int, seed: int, rank: int, world: int):
        self.x, self.context, self.batch_size = x, context, batch_size
        rows: Any = range(x.shape[0])  # a sequence of row indices: all the sampler needs of a dataset
        self.sampler: DistributedSampler = DistributedSampler(
            rows, num_replicas=world, rank=rank, shuffle=True, seed=seed
        )
        rows_here = len(self.sampler)
        # a last batch of one row joins the batch before it (batch statistics need two rows)
        self.merge_last = _single_row_last(rows_here, batch_size)
        self.steps_per_epoch: Optional[int] = math.ceil(rows_here / batch_size) - int(self.merge_last)

    def epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch)
        order = torch.tensor(list(self.sampler), dtype=torch.long, device=self.x.device)
        chunks = list(order.split(self.batch_size))
        if self.merge_last:
            chunks[-2:] = [torch.cat(chunks[-2:])]
        for index in chunks[start:]:
            yield self.x[index], None if self.context is None else self.context[index]


class _LoaderSource:
    """The batches of a ``DataLoader`` (at most ``steps_per_epoch`` of them per epoch); a pair's second element is
    left out when ``use_context`` is False (a model without context, fed a dataset of ``(image, label)`` pairs)."""

    def __init__(self, loader: DataLoader, steps_per_epoch: Optional[int], use_context: bool):
        self.loader, self.use_context = loader, use_context
        length = len(loader) if hasattr(loader.dataset, "__len__") else None
        self.steps_per_epoch = length if steps_per_epoch is None else min(steps_per_epoch, length or steps_per_epoch)

    def epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        for sampler in (self.loader.sampler, self.loader.batch_sampler):
            set_epoch = getattr(sampler, "set_epoch", None)
            if set_epoch is not None:
                set_epoch(epoch)
        batches = iter(self.loader)  # created (and advanced) now: its shuffling draws from the current RNG state
        for _ in itertools.islice(batches, start):
            pass
        remaining = None if self.steps_per_epoch is None else max(0, self.steps_per_epoch - start)
        return map(self.batch, itertools.islice(batches, remaining))

    def batch(self, item: Any) -> Batch:
        x, context = _as_batch(item)
        return x, context if self.use_context else None


class _CallableSource:
    """``steps_per_epoch`` fresh batches from ``data()`` per epoch."""

    def __init__(self, data: Callable[[], Any], steps_per_epoch: Optional[int]):
        self.data, self.steps_per_epoch = data, steps_per_epoch or 100

    def epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        return (_as_batch(self.data()) for _ in range(start, self.steps_per_epoch))


def _dataset_loader(dataset: Dataset, batch_size: int, seed: int, rank: int, world: int) -> DataLoader:
    """A ``DataLoader`` of ``batch_size`` over a torch ``Dataset`` (as torchvision's: items ``image`` or
    ``(image, label)``), reshuffled each epoch like tensor rows: a ``DistributedSampler`` seeded by ``seed``
    (this rank's share under ``torch.distributed``), dropping a last batch of one row. An ``IterableDataset``
    is batched in its own order."""
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=batch_size)
    if not hasattr(dataset, "__len__"):
        raise TypeError(f"fit: a map-style Dataset needs __len__ to be shuffled; {type(dataset).__name__} has none")
    item = dataset[0]
    first = item[0] if isinstance(item, (tuple, list)) and len(item) in (1, 2) else item
    if not isinstance(first, Tensor):
        parts = ", ".join(type(part).__name__ for part in item) if isinstance(item, (tuple, list)) else None
        raise TypeError(
            "fit: a Dataset's items must be an image tensor or an (image, label) or (image, condition) pair; "
            f"item 0 is {f'({parts})' if parts else type(item).__name__}: give the dataset a transform that makes "
            "tensors (e.g. torchvision's PILToTensor(), which keeps uint8 pixels)"
        )
    sampler: DistributedSampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    drop_last = _single_row_last(len(sampler), batch_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last)


def _sources(
    data: Any,
    context: Optional[Tensor],
    validation_fraction: float,
    validation_data: Any,
    batch_size: int,
    steps_per_epoch: Optional[int],
    seed: int,
    rank: int,
    world: int,
    use_context: bool,
) -> tuple[Any, Optional[Batch]]:
    """The training source and this rank's share of the validation rows (or None); ``use_context=False`` leaves
    out the labels or conditions that a ``DataLoader`` or ``Dataset`` yields (for a model without context)."""
    if validation_fraction and validation_data is not None:
        raise ValueError("fit: pass validation_fraction or validation_data, not both")
    validation = None
    if validation_data is not None:
        validation = _as_batch(validation_data)
        _check_rows(*validation, "validation_data")
    if isinstance(data, Tensor):
        _check_rows(data, context, "data")
        if validation is not None and (validation[1] is None) != (context is None):
            raise ValueError("fit: validation_data must have a context exactly when the training data has one")
        train = (data, context)
        if validation_fraction:
            train, validation = _split(data, context, validation_fraction, seed)
        source: Any = _TensorSource(*train, batch_size, seed + 1, rank, world)
    elif context is not None or validation_fraction:
        raise ValueError(
            "fit: context and validation_fraction go with tensor data; a Dataset, a DataLoader or a callable "
            "yields (x, context) pairs, and validation_data gives it validation rows"
        )
    elif isinstance(data, DataLoader):
        source = _LoaderSource(data, steps_per_epoch, use_context)
    elif isinstance(data, Dataset):
        source = _LoaderSource(_dataset_loader(data, batch_size, seed + 1, rank, world), steps_per_epoch, use_context)
    elif callable(data):
        source = _CallableSource(data, steps_per_epoch)
    else:
        raise TypeError(
            f"fit: data must be a Tensor, a DataLoader or a callable (or a torch Dataset), got {type(data).__name__}"
        )
    if validation is not None:
        validation = (validation[0][rank::world], None if validation[1] is None else validation[1][rank::world])
    return source, validation


# --------------------------------------------------------------------------- distributed


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(t: Tensor) -> Tensor:
    """Sum over ranks (in place); the tensor itself without a process group."""
    if _rank_and_world()[1] > 1:
        dist.all_reduce(t)
    return t


def _broadcast_state(module: nn.Module, buffers_only: bool = False) -> None:
    """Rank 0's parameters and buffers on every rank (e.g. after a data-dependent initialisation)."""
    if _rank_and_world()[1] == 1:
        return
    tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, 0)


def _barrier() -> None:
    if _rank_and_world()[1] > 1:
        dist.barrier()


def _gather(t: Tensor, device: torch.device) -> list[Tensor]:
    """Every rank's copy of ``t`` (same shape on every rank), on the CPU."""
    if _rank_and_world()[1] == 1:
        return [t]
    local = t.to(device)
    copies = [torch.empty_like(local) for _ in range(_rank_and_world()[1])]
    dist.all_gather(copies, local)
    return [c.cpu() for c in copies]


def _shared_seed(seed: Optional[int], device: torch.device) -> int:
    """``seed``, or one drawn from torch's global generator; rank 0's on every rank."""
    value = seed if seed is not None else draw_seed()
    if _rank_and_world()[1] > 1:
        t = torch.tensor(value, dtype=torch.int64, device=device)
        dist.broadcast(t, 0)
        value = int(t)
    return value


# --------------------------------------------------------------------------- state


def _rng_state(device: torch.device) -> Tensor:
    """torch's CPU RNG state (and the device's, for CUDA) as one byte tensor."""
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return torch.cat(states)


def _set_rng_state(state: Tensor, device: torch.device) -> None:
    cpu = torch.get_rng_state().numel()
    torch.set_rng_state(state[:cpu].clone())
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[cpu:].clone(), device)


def _copy_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class _Snapshot:
    """A copy of the model's and the optimizer's tensors, refreshed in place (one fused copy per step).

    The live tensors are read from each module's own dicts (a walk of the module tree with ``model.parameters()``
    costs more than the copy on small models) and compared by identity with those of the last copy: while they
    are the same objects (every step after Adam's first), the refresh is one ``_foreach_copy_``; a tensor replaced
    in a module (a re-registered buffer) or the optimizer's state made anew (a restore) makes fresh copies."""

    def __init__(self) -> None:
        self.sources: list[Tensor] = []  # the live tensors copied: the model's, then the optimizer's state
        self.copies: list[Tensor] = []
        self.keys: list[tuple[Tensor, str]] = []  # (parameter, name) of the optimizer's state tensors
        self.count = 0  # how many of the sources are the model's

    @staticmethod
    def _live(modules: list[nn.Module], optimizer: torch.optim.Optimizer) -> tuple[list[Tensor], list[tuple]]:
        """The modules' parameters and buffers, and the optimizer's state tensors as (parameter, name, tensor)."""
        tensors = [t for m in modules for d in (m._parameters, m._buffers) for t in d.values() if t is not None]
        state = [(p, k, v) for p, s in optimizer.state.items() for k, v in s.items() if isinstance(v, Tensor)]
        return tensors, state

    @torch.no_grad()
    def take(self, modules: list[nn.Module], optimizer: torch.optim.Optimizer) -> None:
        tensors, state = self._live(modules, optimizer)
        sources = tensors + [v for _, _, v in state]
        if len(sources) == len(self.sources) and all(map(operator.is_, sources, self.sources)):
            torch._foreach_copy_(self.copies, sources)
        else:
            self.sources, self.copies = sources, [t.clone() for t in sources]
            self.keys, self.count = [(p, k) for p, k, _ in state], len(tensors)

    @torch.no_grad()
    def restore(self, modules: list[nn.Module], optimizer: torch.optim.Optimizer) -> None:
        torch._foreach_copy_(self._live(modules, optimizer)[0], self.copies[: self.count])
        optimizer.state.clear()
        for (p, k), v in zip(self.keys, self.copies[self.count :], strict=True):
            optimizer.state[p][k] = v.clone()


def _adam(parameters: list[Tensor], lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam with torch's fused kernel (one kernel per tensor for the whole update: on a small model on the CPU
    about 3x faster than ``foreach``, which runs a kernel per operation) where torch has one for every parameter
    (floating point, on a device in torch's list: the CPU from torch 2.4), else ``foreach``."""
    listed = getattr(_foreach_utils, "_get_fused_kernels_supported_devices", lambda: ["cuda"])()
    if all(p.is_floating_point() and p.device.type in listed for p in parameters):
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay, foreach=True)


def _total_norm(grads: list[Tensor]) -> Tensor:
    """The 2-norm of all the gradients together (as ``clip_grad_norm_`` computes it: norms of the tensors by one
    ``foreach`` kernel, then the norm of the norms, on the first gradient's device)."""
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


def _halve_learning_rate(optimizer: torch.optim.Optimizer, scheduler: Optional[LRScheduler]) -> float:
    """Halve every group's learning rate, and the scheduler's base rates so the schedule keeps the halving."""
    for group in optimizer.param_groups:
        group["lr"] *= 0.5
        if "initial_lr" in group:
            group["initial_lr"] *= 0.5
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * 0.5 for lr in scheduler.base_lrs]
    return optimizer.param_groups[0]["lr"]


def _scheduler(
    schedule: Schedule, optimizer: torch.optim.Optimizer, total_steps: Optional[int]
) -> Optional[LRScheduler]:
    if schedule is None:
        return None
    if schedule == "cosine":
        if total_steps is None:
            raise ValueError("fit: schedule='cosine' needs a known number of steps; pass max_steps or steps_per_epoch")
        return CosineAnnealingLR(optimizer, T_max=total_steps)
    if callable(schedule):
        return schedule(optimizer)
    raise ValueError(f"fit: schedule must be None, 'cosine' or a callable optimizer -> LRScheduler, got {schedule!r}")


def _total_steps(max_epochs: int, max_steps: Optional[int], steps_per_epoch: Optional[int]) -> Optional[int]:
    """The run's number of optimizer steps, when known (``max_steps`` or epochs of a known length)."""
    limits = [
        n for n in (max_steps, None if steps_per_epoch is None else max_epochs * steps_per_epoch) if n is not None
    ]
    return min(limits, default=None)


def _device(model: nn.Module, device: Union[None, str, torch.device]) -> torch.device:
    if device is not None:
        model.to(device)
        return torch.device(device)
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if first is None else first.device


# --------------------------------------------------------------------------- the loop


@dataclass
class _Position:
    """Where a run is: everything besides tensors that a checkpoint must restore."""

    seed: int = 0  # the run's base seed: validation split and epoch permutations
    history: FitHistory = field(default_factory=FitHistory)
    epoch: int = 0
    batch: int = 0  # batches of the current epoch consumed
    loss_sum: float = 0.0  # sum over the current epoch's good batches of loss x rows
    loss_rows: float = 0.0
    best_loss: float = math.inf
    bad_epochs: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> _Position:
        return cls(**{**state, "history": FitHistory(**state["history"])})


def _data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` under a process group of several ranks, else itself."""
    if _rank_and_world()[1] == 1:
        return model
    if device.type != "cuda":
        return DistributedDataParallel(model)
    return DistributedDataParallel(
        model, device_ids=[torch.cuda.current_device() if device.index is None else device.index]
    )


class _Loop:
    """One call of :func:`fit`: the model, its optimizer, the data and the run's position."""

    def __init__(self, model, objective, source, validation, optimizer, scheduler, device, options: FitOptions, seed):
        self.model, self.objective, self.source, self.validation = model, objective, source, validation
        self.optimizer, self.scheduler, self.device, self.options = optimizer, scheduler, device, options
        self.rank, self.world = _rank_and_world()
        self.trained = _data_parallel(model, device)
        self.position = _Position(seed=seed)
        self.best_state: Optional[dict[str, Tensor]] = None
        self.epoch_rng = _rng_state(device)
        self.last_good, self.pending = _Snapshot(), _Snapshot()
        self.modules = list(model.modules())  # walked once: the snapshots read their tensors every step
        self.parameters = [p for group in optimizer.param_groups for p in group["params"]]
        self.first_step = True
        self.checked = isinstance(source, _TensorSource)  # tensor data are checked whole, before the run
        self.unchecked = not self.checked  # the model's check_data on the first batch of the other sources
        self.grads: list[Tensor] = []

    # -- checkpoints ------------------------------------------------------------------------------------------
    def save(self) -> None:
        """Write a checkpoint (rank 0 writes; every rank takes part, for the RNG states, and waits)."""
        rng = [_gather(state, self.device) for state in (_rng_state(self.device), self.epoch_rng)]
        if self.rank == 0 and self.options.checkpoint is not None:
            saving.save(
                {
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                    "position": self.position.to_dict(),
                    "best": self.best_state,
                    "rng": rng[0],
                    "epoch_rng": rng[1],
                },
                self.options.checkpoint,
                "fit",
            )
        _barrier()

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.position = _Position.from_dict(state["position"])
        self.best_state = state["best"]
        _set_rng_state(state["rng"][self.rank % len(state["rng"])], self.device)
        self.epoch_rng = state["epoch_rng"][self.rank % len(state["epoch_rng"])]

    # -- steps ------------------------------------------------------------------------------------------------
    def done(self) -> bool:
        p = self.position
        out_of_steps = self.options.max_steps is not None and p.history.steps >= self.options.max_steps
        return out_of_steps or p.epoch >= self.options.max_epochs or p.history.stopped_early

    def step(self, x: Tensor, context: Optional[Tensor]) -> None:
        """One minibatch: forward, backward, clip; then an optimizer step, or a rollback when not finite."""
        p = self.position
        p.batch += 1
        if self.unchecked:
            _check_data(self.model, x, "fit: the first batch of the data")
            self.unchecked = False
        x = x.to(self.device, non_blocking=True)
        context = None if context is None else context.to(self.device, non_blocking=True)
        self.pending.take(self.modules, self.optimizer)
        total, rows, norm, bad_ranks = self.backward(x, context)
        if bad_ranks:  # a data error, not a divergence: nothing to recover from
            self.zero_grad()
            self.data_error(x, context, bad_ranks)
        if not (math.isfinite(total) and math.isfinite(norm)):
            self.zero_grad()
            return self.recover(f"loss ({total / rows:.4g})" if not math.isfinite(total) else f"gradient norm ({norm})")
        self.clip(norm)
        self.optimizer.step()
        self.zero_grad()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.first_step:  # a data-dependent initialisation (ActNorm) saw each rank's own batch: keep rank 0's
            _broadcast_state(self.model)
            self.first_step = False
        self.last_good, self.pending = self.pending, self.last_good
        p.history.steps += 1
        p.loss_sum, p.loss_rows = p.loss_sum + total, p.loss_rows + rows
        if self.options.checkpoint is not None and p.history.steps % self.options.checkpoint_every == 0:
            self.save()

    def data_error(self, x: Tensor, context: Optional[Tensor], bad_ranks: float) -> None:
        """Raise a ValueError naming the batch and its rows with NaN or inf values (on this rank; else the number
        of ranks whose batch has them)."""
        p = self.position
        where = f"fit: batch {p.batch} of epoch {p.epoch + 1} (counting from 1) from the data source"
        for tensor, what in ((x, ""), (context, " (its context)")):
            if tensor is not None and tensor.is_floating_point():
                check_finite_rows(tensor, where + what)
        raise ValueError(f"{where} has NaN or inf values on {int(bad_ranks)} other rank(s)")

    def finite_data(self, x: Tensor, context: Optional[Tensor]) -> Tensor:
        """Whether the batch (``x`` and a floating ``context``) is finite, as a 0-d bool tensor (not read yet)."""
        finite = torch.isfinite(x).all()
        if context is not None and context.is_floating_point():
            finite = finite & torch.isfinite(context).all()
        return finite

    def backward(self, x: Tensor, context: Optional[Tensor]) -> tuple[float, float, float, float]:
        """Gradients of the objective (averaged over ranks); the loss x rows and the rows summed over ranks, the
        gradient norm, and the number of ranks whose batch has a NaN or inf, read in one device-to-host transfer.

        Tensor data were checked whole before the run. The batches of other sources are checked here: under
        ``torch.distributed`` every step (the ranks agree in the same transfer); in one process only when the
        objective raises or its loss or gradient norm is not finite (a NaN in the data that leaves them finite
        trains nothing wrong), so that such a batch is named as a data error, not recovered from as a divergence.

        ``torch.distributions`` argument validation stays as the caller set it. A NaN inside one of the
        library's flows (an overflowing layer) still makes a non-finite loss that the loop recovers from,
        not a ValueError: their base distributions do not validate the values the layers compute.
        """
        finite = None if self.checked or self.world == 1 else self.finite_data(x, context)
        try:
            loss = self.objective(self.trained, x, context)
        except Exception:
            if not self.checked and not bool(self.finite_data(x, context)):  # the objective refused bad data
                self.data_error(x, context, 0)
            raise
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(f"fit: the objective must return a scalar tensor, got {_describe(loss)}")
        loss.backward()
        self.grads = [p.grad for p in self.parameters if p.grad is not None]
        norm = _total_norm(self.grads)
        rows = float(x.shape[0])
        if self.world == 1:
            mean, norm_ = torch.stack([loss.detach().reshape(()), norm.to(loss.device)]).tolist()
            diverged = not (math.isfinite(mean) and math.isfinite(norm_))
            bad = diverged and not self.checked and not bool(self.finite_data(x, context))
            return mean * rows, rows, norm_, float(bad)
        ok = loss.new_ones((), dtype=torch.float64) if finite is None else finite.double()
        sums = _all_sum(torch.stack([loss.detach().double().reshape(()) * rows, ok.new_tensor(rows), ok]))
        total, rows_, oks, norm_ = torch.cat([sums, norm.double().reshape(1).to(sums.device)]).tolist()
        return total, rows_, norm_, self.world - oks

    def zero_grad(self) -> None:
        """``optimizer.zero_grad(set_to_none=True)`` without its profiler scope (a cost on a small model's step)."""
        for p in self.parameters:
            p.grad = None
        self.grads = []

    def clip(self, norm: float) -> None:
        """Scale the gradients to the norm ``clip_grad`` when their norm (``norm``, read already) is above it."""
        clip = self.options.clip_grad
        if clip is not None and norm > clip:
            torch._foreach_mul_(self.grads, clip / (norm + 1e-6))  # clip_grad_norm_'s coefficient

    def recover(self, what: str) -> None:
        """Roll back to the state before the last good update and halve the learning rate."""
        h = self.position.history
        if h.recoveries >= self.options.max_recoveries:
            raise RuntimeError(
                f"fit: non-finite {what} at step {h.steps + 1}, after {h.recoveries} recoveries "
                f"(max_recoveries={self.options.max_recoveries}); each rolled back to the last good state and halved "
                "the learning rate. Check the data and the objective, or lower lr."
            )
        self.last_good.restore(self.modules, self.optimizer)
        lr = _halve_learning_rate(self.optimizer, self.scheduler)
        h.recoveries += 1
        warnings.warn(
            f"fit: non-finite {what} at step {h.steps + 1}; rolled back to the last good state and "
            f"halved the learning rate to {lr:.3g} (recovery {h.recoveries} of at most {self.options.max_recoveries})",
            RuntimeWarning,
            stacklevel=2,
        )

    # -- epochs -----------------------------------------------------------------------------------------------
    def batches(self) -> Iterator[Batch]:
        """This epoch's remaining batches; made under the RNG state of the epoch's start (loaders shuffle with it)."""
        if self.position.batch == 0:
            self.epoch_rng = _rng_state(self.device)
            return self.source.epoch(self.position.epoch, 0)
        now = _rng_state(self.device)
        _set_rng_state(self.epoch_rng, self.device)
        batches = self.source.epoch(self.position.epoch, self.position.batch)
        _set_rng_state(now, self.device)
        return batches

    def train_epoch(self, bar: tqdm) -> bool:
        """Train on the epoch's batches; False when ``max_steps`` stopped it inside the epoch."""
        for x, context in self.batches():
            self.step(x, context)
            bar.update(1)
            if not bar.disable and self.position.loss_rows:
                bar.set_postfix(self.postfix(), refresh=False)
            if self.done() and self.position.batch != self.source.steps_per_epoch:
                return False
        return True

    @torch.no_grad()
    def validate(self) -> float:
        """Mean objective over the validation rows (each rank its share), in eval mode."""
        x, context = self.validation
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        chunks = torch.arange(x.shape[0], device=x.device).split(self.options.batch_size) if len(x) else ()
        for index in chunks:  # a rank may hold no validation rows
            xb = x[index].to(self.device)
            cb = None if context is None else context[index].to(self.device)
            loss = self.objective(self.model, xb, cb)  # a NaN is a bad epoch, not an error
            sums += torch.stack([loss.double() * len(index), sums.new_tensor(len(index))])
        self.model.train()
        total, rows = _all_sum(sums).tolist()
        return total / rows

    def end_epoch(self) -> None:
        p, h = self.position, self.position.history
        h.train_loss.append(p.loss_sum / p.loss_rows if p.loss_rows else math.nan)
        p.loss_sum = p.loss_rows = 0.0
        if self.validation is not None:
            loss = self.validate()
            h.validation_loss.append(loss)
            if loss < p.best_loss:
                p.best_loss, p.bad_epochs, h.best_epoch = loss, 0, p.epoch
                self.best_state = _copy_state(self.model)
            else:
                p.bad_epochs += 1
                h.stopped_early = self.options.patience is not None and p.bad_epochs >= self.options.patience
        p.epoch, p.batch = p.epoch + 1, 0

    def postfix(self) -> dict:
        p, h = self.position, self.position.history
        postfix = {"epoch": p.epoch, "loss": f"{p.loss_sum / p.loss_rows if p.loss_rows else h.train_loss[-1]:.4f}"}
        if h.validation_loss:
            postfix["val"] = f"{h.validation_loss[-1]:.4f}"
        return postfix

    def run(self, bar: tqdm) -> FitHistory:
        self.model.train()
        self.zero_grad()
        self.last_good.take(self.modules, self.optimizer)
        while not self.done():
            if self.train_epoch(bar):
                self.end_epoch()
                if not bar.disable:
                    bar.set_postfix(self.postfix())
        if self.options.checkpoint is not None:
            self.save()
        return self.finish()

    def finish(self) -> FitHistory:
        """Restore the best weights, agree on buffers across ranks, and report (with a partial last epoch)."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        _broadcast_state(self.model, buffers_only=True)
        self.model.eval()
        p = self.position
        history = dataclasses.replace(p.history, train_loss=list(p.history.train_loss))
        if p.batch and p.loss_rows:
            history.train_loss.append(p.loss_sum / p.loss_rows)
        return history


def _resume_state(resume: Optional[PathLike], checkpoint: Optional[PathLike]) -> Optional[dict]:
    """The checkpoint to resume from; None when ``resume`` is this run's own ``checkpoint``, not written yet.

    The two are compared as files (resolved absolute paths), not strings: ``"run.pt"`` and its absolute path
    are the same checkpoint."""
    if resume is None:
        return None
    same = checkpoint is not None and Path(resume).resolve() == Path(checkpoint).resolve()
    if same and not Path(resume).exists():
        return None
    return saving.load(resume, "fit")


def fit(
    model: nn.Module,
    data: Union[Tensor, Dataset, DataLoader, Callable[[], Any]],
    context: Optional[Tensor] = None,
    *,
    objective: Optional[Objective] = None,
    validation_data: Union[None, Tensor, Sequence[Tensor]] = None,
    resume: Optional[PathLike] = None,
    options: Optional[FitOptions] = None,
    **changes: Any,
) -> FitHistory:
    """Fit ``model`` by minimising ``objective(model, x, context)`` over minibatches with Adam.

    Args:
        model: any ``nn.Module``; the default objective calls ``model(context)``
            (``model()`` without context) and takes the result's ``log_prob``.
        data: a tensor of rows ``(rows, *event_shape)`` (with ``context`` rows,
            shuffled each epoch), a torch ``Dataset`` of items ``x`` or ``(x, context)`` (as torchvision's
            ``(image, label)``; batched by ``batch_size`` and shuffled each epoch by a sampler seeded like
            tensor rows), a ``DataLoader`` yielding ``x`` or ``(x, context)``, or a callable returning a
            fresh batch ``x`` or ``(x, context)`` at each step (``steps_per_epoch`` steps an epoch, default
            100). The context is class labels for a model with ``classes=``, condition vectors otherwise;
            a model without context (``context_features == 0``) ignores the labels a ``Dataset`` or
            ``DataLoader`` yields. A model with a ``check_data(x, what)`` method (the image models with
            ``pixel_levels``: pixels must be integers in ``0 .. pixel_levels - 1``) has it called on tensor
            data, or the first batch of the others, before training.
        objective: ``objective(model, x, context) -> scalar``; default :class:`NegativeLogLikelihood`.
        validation_data: validation rows, a tensor or ``(x, context)`` (instead of ``validation_fraction``).
        resume: a checkpoint to continue from with the same optimizer state, schedule, step count, data
            position and RNG states (the same path as ``checkpoint`` starts fresh when the file does not
            exist yet). The data and options should be the same as the interrupted run's.
        options: a :class:`FitOptions` (default ``FitOptions()``); ``changes`` are keyword arguments that
            change it for this call (``max_epochs=``, ``batch_size=``, ``lr=``, ``validation_fraction=``,
            ``patience=``, ``seed=``, ``checkpoint=``, ``device=``, ...: every field of :class:`FitOptions`,
            where each is described).

    Returns:
        :class:`FitHistory`; the model is left in eval mode with the best (or last) weights.

    The caller's state is left alone: torch's random streams are what they were before (the run draws
    from generators seeded by ``seed``, forked from them), and so is ``torch.distributions``' argument
    validation.

    Under an initialised ``torch.distributed`` process group (e.g. ``torchrun``)
    the model trains as ``DistributedDataParallel``, tensor rows are sharded by a
    ``DistributedSampler`` (pass one to a ``DataLoader`` yourself), losses are
    averaged over ranks and every rank ends with the same weights.

    Example:
        >>> import torch, pyro_flows as pf
        >>> flow = pf.RealNVP(features=2, transforms=2, hidden=(16, 16))
        >>> history = pf.fit(flow, torch.randn(512, 2), max_epochs=3, validation_fraction=0.25,
        ...                  seed=0, progress=False)
        >>> len(history.train_loss), len(history.validation_loss), history.steps
        (3, 3, 6)
    """
    if options is not None and not isinstance(options, FitOptions):
        raise TypeError(f"fit: options must be a FitOptions, got {type(options).__name__}")
    o = (options or FitOptions()).replace(**changes)
    rank, world = _rank_and_world()
    device = _device(model, o.device)
    state = _resume_state(resume, o.checkpoint)
    seed = state["position"]["seed"] if state is not None else _shared_seed(o.seed, device)
    use_context = getattr(model, "context_features", None) != 0
    source, validation = _sources(
        data,
        context,
        o.validation_fraction,
        validation_data,
        o.batch_size,
        o.steps_per_epoch,
        seed,
        rank,
        world,
        use_context,
    )
    if isinstance(data, Tensor):
        _check_data(model, data, "fit: data")
    if o.patience is not None and validation is None:
        raise ValueError("fit: patience needs validation data (validation_fraction or validation_data)")
    total = _total_steps(o.max_epochs, o.max_steps, source.steps_per_epoch)
    optimizer = _adam([p for p in model.parameters() if p.requires_grad], o.lr, o.weight_decay)
    scheduler = _scheduler(o.schedule, optimizer, total)
    with seeded_rng(seed + rank, device):  # the run's own random stream; the caller's is restored after it
        loop = _Loop(
            model, objective or NegativeLogLikelihood(), source, validation, optimizer, scheduler, device, o, seed
        )
        if state is not None:
            loop.load(state)
        show = rank == 0 and show_progress(o.progress)
        with tqdm(total=total, initial=loop.position.history.steps, disable=not show, desc="fit", unit="step") as bar:
            return loop.run(bar)

"""Small shared helpers: seeds and private random streams, checks of rows and of devices and dtypes, when to show a
progress bar, and imports of optional packages."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from types import ModuleType
from typing import Iterator, Optional, Union

import torch
from torch import Tensor, nn

PathLike = Union[str, os.PathLike]
Device = Union[None, str, torch.device]


def draw_seed() -> int:
    """A seed for an unseeded call, drawn from torch's global generator.

    An unseeded call is one draw from the caller's random stream, as any of torch's random functions:
    ``torch.manual_seed`` makes it repeat, and two calls in a row differ.
    """
    return int(torch.randint(2**62, ()))


@contextlib.contextmanager
def seeded_rng(seed: int, device: Device = None) -> Iterator[None]:
    """torch's global generators seeded by ``seed`` inside the block, and the caller's states back after it.

    The CPU generator, and ``device``'s when it is a CUDA device (no other device's state is touched, unlike
    ``torch.manual_seed``, which seeds every CUDA device). Code inside the block draws what it would draw after
    ``torch.manual_seed(seed)``; the caller's random stream is unchanged, even when the block raises.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def nonfinite_rows(t: Tensor, chunk_rows: int = 2048) -> list[int]:
    """The indices of the rows (first dim) of ``t`` with a NaN or inf entry, checked ``chunk_rows`` at a time
    (``isfinite`` makes temporaries the size of its input)."""
    rows: list[int] = []
    for start in range(0, t.shape[0], chunk_rows):
        chunk = t[start : start + chunk_rows].reshape(-1, t.shape[1:].numel())
        rows += (torch.nonzero(~torch.isfinite(chunk).all(1)).flatten() + start).tolist()
    return rows


def check_finite_rows(t: Tensor, what: str) -> None:
    """A ValueError naming the first bad row and their count unless every row of ``t`` is finite."""
    rows = nonfinite_rows(t)
    if rows:
        raise ValueError(
            f"{what} has NaN or inf values in row {rows[0]} ({len(rows)} bad rows of {t.shape[0]}: "
            f"rows {rows[:10]}); drop or impute them first"
        )


def first_floating(module: nn.Module) -> Optional[tuple[nn.Module, str]]:
    """Where the first floating-point parameter or buffer of ``module`` (or of a module inside it) lives: its owning
    module and its name there, which ``module.to(...)`` keeps (it replaces buffers by new tensors); None if none."""
    for owner in module.modules():
        for table in (owner._parameters, owner._buffers):
            for name, tensor in table.items():
                if tensor is not None and tensor.is_floating_point():
                    return owner, name
    return None


def reference_tensor(module: nn.Module) -> Optional[Tensor]:
    """A floating-point parameter or buffer of ``module`` (None without one): what its inputs must match in device
    and dtype (:func:`check_device_dtype`). Where it lives is looked up once and kept on the module, so a call
    costs two dict look-ups.

    Example:
        >>> layer = nn.Linear(2, 3).double()
        >>> reference_tensor(layer) is layer.weight, reference_tensor(layer.to(torch.float32)).dtype
        (True, torch.float32)
    """
    where = module.__dict__.get("_reference_at", False)  # False: not looked up yet
    if where is False:
        where = module.__dict__["_reference_at"] = first_floating(module)
    if where is None:
        return None
    owner, name = where
    tensor = owner._parameters.get(name)
    return owner._buffers.get(name) if tensor is None else tensor


def function_transformed(*tensors: Tensor) -> bool:
    """Whether any of ``tensors`` is wrapped by a function transform (``torch.func.vmap``/``grad``/``jacrev``, or the
    batching of ``torch.autograd.functional.jacobian(..., vectorize=True)``).

    Those take neither ``out=`` into views nor autograd Functions in the ``forward(ctx, ...)`` style, so fused
    layers fall back to their plain differentiable arithmetic there.

    Example:
        >>> x = torch.ones(3)
        >>> function_transformed(x), bool(torch.func.vmap(lambda v: torch.tensor(function_transformed(v)))(x).all())
        (False, True)
    """
    if torch.compiler.is_compiling():  # dynamo cannot trace the query (and traces the fused paths itself)
        return False
    functorch = torch._C._functorch
    return any(functorch.is_functorch_wrapped_tensor(t) or functorch.is_legacy_batchedtensor(t) for t in tensors)


def check_device_dtype(name: str, value: Tensor, reference: Tensor, what: str, dtype: bool = True) -> None:
    """A ValueError naming both devices (or both dtypes) and the fix unless ``value`` is on ``reference``'s device
    and, with ``dtype``, has its dtype; ``reference`` is one of the flow's parameters or buffers.

    Attribute comparisons only: no host synchronisation.

    Example:
        >>> check_device_dtype("MAF", torch.zeros(2, dtype=torch.float64), torch.zeros(2), "value")
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: MAF: the value has dtype torch.float64 but the flow has torch.float32; convert the flow with ...
    """
    if value.device != reference.device:
        raise ValueError(
            f"{name}: the {what} is on {value.device} but the flow is on {reference.device}; move the flow with "
            f"flow.to({str(value.device)!r}) or the {what} with .to({str(reference.device)!r})"
        )
    if dtype and value.dtype != reference.dtype:
        raise ValueError(
            f"{name}: the {what} has dtype {value.dtype} but the flow has {reference.dtype}; convert the flow with "
            f"flow.to({value.dtype}) or the {what} with .to({reference.dtype})"
        )


def show_progress(progress: Optional[bool]) -> bool:
    """Whether to show a progress bar: ``progress`` if given, else when stderr is a terminal outside CI."""
    if progress is not None:
        return progress
    return sys.stderr.isatty() and not os.environ.get("CI")


# the pip package and the pyro-flows extra that install each optional top-level module
OPTIONAL = {"sklearn": ("scikit-learn", "sklearn")}


def require(module: str, needed_by: str) -> ModuleType:
    """``importlib.import_module(module)`` for an optional dependency (a key of :data:`OPTIONAL`, or one of its
    submodules); when it is missing, an ImportError that names the extra installing it.

    Example: ``require("sklearn.datasets", "pf.data.digits")`` without scikit-learn raises
    ``ImportError: pf.data.digits needs scikit-learn, which is not installed: pip install "pyro-flows[sklearn]"``.
    """
    package, extra = OPTIONAL[module.partition(".")[0]]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f'{needed_by} needs {package}, which is not installed: pip install "pyro-flows[{extra}]"',
            name=module,
        ) from error

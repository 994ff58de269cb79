"""Small shared helpers: atomic checkpoint files, safe loading and when to show a progress bar."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch

PathLike = Union[str, os.PathLike]


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    A crash mid-write leaves the previous file intact: readers see either the
    old file or the new one, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def safe_load(path: PathLike, map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never code.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (naming
    the file) for one that is not a weights-only checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # any unpickler failure: the file is not ours or would run code
        raise ValueError(
            f"{path} is not a weights-only pyro_flows file (refusing to execute code from it): {error}"
        ) from None


def show_progress(progress: Optional[bool]) -> bool:
    """Whether to show a progress bar: ``progress`` if given, else when stderr is a terminal outside CI."""
    if progress is not None:
        return progress
    return sys.stderr.isatty() and not os.environ.get("CI")

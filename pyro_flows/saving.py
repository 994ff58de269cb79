"""The one file format of pyro_flows: ``fit`` checkpoints, ``DensityEstimator.save`` and ``NPE.save``.

A file is one dict written by ``torch.save``: a header, ``"format": "pyro_flows.<kind>"`` and
``"version": <int>``, next to the kind's own entries, all tensors and plain containers (numbers, strings,
lists, dicts), so it loads with ``torch.load(weights_only=True)``. :func:`save` writes atomically (a temporary
file in the same folder, renamed over the target: a crash mid-write leaves the previous file whole);
:func:`load` reads weights-only (a file that would run code is refused) and checks the header: a file of
another kind, or of a version this pyro_flows does not read, is a ``ValueError`` naming the file and what it is.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .utils import PathLike

PREFIX = "pyro_flows."
VERSIONS = {"fit": 1, "DensityEstimator": 1, "NPE": 1}  # the version of each kind this code writes (and reads)
DESCRIPTIONS = {
    "fit": "a checkpoint written by pyro_flows.fit",
    "DensityEstimator": "a saved pyro_flows DensityEstimator",
    "NPE": "a file written by NPE.save",
}
# the one-string headers that fit checkpoints and NPE files had before this module: read as version 1
LEGACY = {"pyro_flows.fit/1": ("fit", 1), "pyro_flows.NPE/1": ("NPE", 1)}


def save(payload: dict[str, Any], path: PathLike, kind: str) -> Path:
    """Write ``payload`` under the header of ``kind`` (at its current version) to ``path``, atomically.

    Returns the path. ``payload`` must hold tensors and plain containers only (what weights-only loading reads).
    """
    if kind not in VERSIONS:
        raise ValueError(f"save: unknown kind {kind!r}; the kinds are {', '.join(VERSIONS)}")
    if {"format", "version"} & payload.keys():
        raise ValueError("save: 'format' and 'version' are the header's entries, not the payload's")
    return atomic_save({"format": PREFIX + kind, "version": VERSIONS[kind], **payload}, path)


def load(path: PathLike, kind: str, map_location: Any = "cpu") -> dict[str, Any]:
    """The dict written by :func:`save` for ``kind`` (header included), loaded weights-only.

    Raises ``FileNotFoundError`` for a missing file and a ``ValueError`` naming the file for one that is not a
    pyro_flows file of ``kind`` (saying what it is, when it is another kind) or has a version this code does
    not read.
    """
    payload = safe_load(path, map_location)
    found, version = header(payload)
    if found != kind:
        what = f": it is {DESCRIPTIONS[found]}" if found in DESCRIPTIONS else ""
        raise ValueError(f"{path} is not {DESCRIPTIONS[kind]}{what}")
    if version != VERSIONS[kind]:
        raise ValueError(
            f"{path}: unknown {kind} file version {version!r}; this pyro_flows reads version {VERSIONS[kind]} "
            "(a file from a newer pyro_flows needs that version to load)"
        )
    return payload


def is_plain(value: Any) -> bool:
    """Whether ``value`` is made of None, bools, numbers, strings, lists, tuples and str-keyed dicts:
    what a file can hold beside tensors and still load weights-only."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(item) for item in value)
    return isinstance(value, dict) and all(isinstance(k, str) and is_plain(v) for k, v in value.items())


def header(payload: Any) -> tuple[Any, Any]:
    """``(kind, version)`` of a loaded file; ``(None, None)`` for anything without a pyro_flows header."""
    if not isinstance(payload, dict):
        return None, None
    name = payload.get("format")
    if name in LEGACY:
        return LEGACY[name]
    if isinstance(name, str) and name.startswith(PREFIX):
        return name.removeprefix(PREFIX), payload.get("version")
    return None, None


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

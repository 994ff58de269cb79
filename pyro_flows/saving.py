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
import re
import secrets
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from .utils import PathLike

try:
    import fcntl
except ImportError:  # Windows: no flock; stale temporaries are told by their age alone
    fcntl = None  # type: ignore[assignment]

PREFIX = "pyro_flows."
# the version of each kind this code writes (and reads). Version 2: the rational-quadratic spline maps its raw
# parameters to bins and derivatives through a soft clamp (exact float32 round trips where bins are nearly
# flat), so the same weights define another function than in a version-1 file, which is refused rather than
# loaded into a different model.
VERSIONS = {"fit": 2, "DensityEstimator": 2, "NPE": 2}
EARLIER = (
    "was written by pyro_flows 0.1.0 (file version 1), whose spline layers read their parameters differently: "
    "loaded now, the same weights would be another model. Refit it (or load it with pyro_flows 0.1.0)"
)
DESCRIPTIONS = {
    "fit": "a checkpoint written by pyro_flows.fit",
    "DensityEstimator": "a saved pyro_flows DensityEstimator",
    "NPE": "a file written by NPE.save",
}
# the one-string headers that fit checkpoints and NPE files had before this module: version 1
LEGACY = {"pyro_flows.fit/1": ("fit", 1), "pyro_flows.NPE/1": ("NPE", 1)}
# the kinds made only of pyro_flows' own modules, where ±inf makes no sense either (a fit checkpoint or an NPE
# holds the user's modules, whose buffers may hold ±inf on purpose, e.g. an attention mask): NaN is refused in all
FINITE_KINDS = {"DensityEstimator"}


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
    not read, or whose tensors hold NaN (±inf too, in a ``DensityEstimator`` file): see :func:`check_tensors`.
    """
    payload = safe_load(path, map_location)
    found, version = header(payload)
    if found != kind:
        what = f": it is {DESCRIPTIONS[found]}" if found in DESCRIPTIONS else ""
        raise ValueError(f"{path} is not {DESCRIPTIONS[kind]}{what}")
    if version == 1:
        raise ValueError(f"{path} {EARLIER}")
    if version != VERSIONS[kind]:
        raise ValueError(
            f"{path}: unknown {kind} file version {version!r}; this pyro_flows reads version {VERSIONS[kind]} "
            "(a file from a newer pyro_flows needs that version to load)"
        )
    check_tensors(payload, path, finite=kind in FINITE_KINDS)
    return payload


def tensors(value: Any, key: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in ``value`` (nested dicts, lists and tuples) with its key path, e.g. ``state_dict.flow.0.w``."""
    if isinstance(value, torch.Tensor):
        yield key, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from tensors(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from tensors(v, f"{key}[{i}]")


def check_tensors(payload: Any, path: PathLike, finite: bool = False) -> None:
    """Refuse a loaded file whose floating-point tensors hold NaN (or, with ``finite``, ±inf): a ``ValueError``
    naming the file and the entry. NaN weights or optimizer states are what a corrupted file or a diverged
    run leaves; loading them would only give NaN later, far from the cause."""
    for key, tensor in tensors(payload):
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        bad = tensor.isnan() if not finite else ~tensor.isfinite()
        if bool(bad.any()):
            what = "NaN" if bool(tensor.isnan().any()) else "infinite"
            raise ValueError(
                f"{path}: the entry {key!r} holds {what} values ({int(bad.sum())} of {tensor.numel()}); the file is "
                "damaged or was saved from a diverged model, so it is refused"
            )


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


TEMPORARY_NAME = "abcdefghijklmnopqrstuvwxyz0123456789_"  # the characters of a temporary's random part
STALE_AFTER = 10.0  # seconds: a temporary left alone this long, and locked by no writer, is an orphan


def temporary_pattern(path: Path) -> re.Pattern:
    """The names of :func:`atomic_save`'s temporaries for ``path``: ``.<name>.<8 random characters>.tmp``."""
    return re.compile(re.escape(f".{path.name}.") + f"[{TEMPORARY_NAME}]{{8}}" + re.escape(".tmp"))


def _lock(handle: int, blocking: bool = True) -> bool:
    """An exclusive advisory lock on an open file (POSIX ``flock``); whether it was taken (always, elsewhere)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError:
        return False
    return True


def remove_stale_temporaries(path: PathLike) -> list[Path]:
    """Delete the temporaries of :func:`atomic_save` for ``path`` that a killed save left behind; returns them.

    Only files of our own naming next to ``path`` are considered, and only those no writer holds: a save locks
    its temporary while it writes (``flock``; the lock dies with the process), so a temporary that can be locked
    and was not touched for :data:`STALE_AFTER` seconds is an orphan. Without ``flock`` (Windows) a temporary
    counts as stale after an hour.
    """
    path = Path(path)
    pattern = temporary_pattern(path)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            age = now - entry.stat(follow_symlinks=False).st_mtime
            if age < (STALE_AFTER if fcntl is not None else 3600.0):
                continue
            handle = os.open(entry.path, os.O_RDONLY)
            try:
                if _lock(handle, blocking=False):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
            finally:
                os.close(handle)
        except OSError:  # gone meanwhile, or not ours to remove: leave it
            continue
    return removed


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    A crash mid-write leaves the previous file intact: readers see either the
    old file or the new one, never a truncated one. The temporary, ``.<name>.<random>.tmp``, is locked while
    it is written; one that a killed save left behind is removed by the next save of the same path
    (:func:`remove_stale_temporaries`). The file gets the mode of any file the user creates (``0o666`` less the
    umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        random = "".join(secrets.choice(TEMPORARY_NAME) for _ in range(8))
        temporary = path.parent / f".{path.name}.{random}.tmp"
        try:
            handle = os.open(temporary, flags, 0o666)  # the kernel applies the umask, as for any new file
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"atomic_save: no free temporary name next to {path}")
    try:
        with os.fdopen(handle, "wb") as file:
            _lock(file.fileno())
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
            os.replace(temporary, path)  # under the lock: a cleaner never sees this temporary unlocked
    except BaseException:
        temporary.unlink(missing_ok=True)
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

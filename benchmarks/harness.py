"""The timing harness shared by the benchmark scripts: interleaved timing, machine line, Markdown tables.

On a shared machine absolute times drift with the load, so the scripts compare libraries by ratios measured in
one process with the cases interleaved: each round runs every case once, the order rotated from round to round
(A B C, B C A, C A B, ...), after untimed warm-up rounds; the medians (and the least disturbed, smallest times)
of the rounds are compared. Every printed table comes with :func:`machine_line` (date, commit, torch, threads,
load average, device).

Scripts run from ``benchmarks/`` import it as ``from harness import ...``; tests load the scripts with
``benchmarks/`` on ``sys.path``.

>>> timings = interleave({"a": lambda: sum(range(100)), "b": lambda: sum(range(10))}, repeats=3)
>>> [len(timings[name].runs) for name in ("a", "b")]
[3, 3]
>>> ratio(2.0, {"peer": 1.0, "slow": 0.5, "absent": None})
(2.0, 'peer')
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

ALIGN = {"l": "---", "r": "---:", "c": ":---:"}  # markdown_table's align codes and their separator cells


def version(dist: str) -> str:
    """The installed version of distribution ``dist`` (e.g. ``"pyro-ppl"``), or ``"unknown version"``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed(dist)
    except PackageNotFoundError:
        return "unknown version"


def load_line() -> str:
    """The 1-, 5- and 15-minute load averages: ``"load average 0.59 1.26 1.72"`` (``"load average n/a"``)."""
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except (AttributeError, OSError):  # no getloadavg on this platform
        return "load average n/a"


def _commit() -> str:
    """``git rev-parse --short HEAD`` of this checkout, or ``"unknown"`` outside git."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def _device_name(device: str) -> str:
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    if kind == "cpu":
        return f"CPU ({os.cpu_count()} cores)"
    return device


def machine_line(device: str = "cpu") -> str:
    """One line describing the run: UTC date, git commit, torch version, threads, load average, device name.

    >>> "commit" in machine_line() and "load average" in machine_line()
    True
    """
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (
        f"{date}, commit {_commit()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{load_line()}, {_device_name(device)}"
    )


def set_threads(n: int) -> None:
    """Fix torch's intra-op thread count to ``n`` (>= 1) for the timings."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)


@dataclass
class Timing:
    """Seconds per call of one case, one entry per timed round.

    >>> t = Timing([0.3, 0.1, 0.2])
    >>> t.median, t.best
    (0.2, 0.1)
    """

    runs: list[float] = field(default_factory=list)

    @property
    def median(self) -> Optional[float]:
        """The median seconds per call (None before any run)."""
        return statistics.median(self.runs) if self.runs else None

    @property
    def best(self) -> Optional[float]:
        """The smallest seconds per call, i.e. the least disturbed run (None before any run)."""
        return min(self.runs) if self.runs else None

    def add(self, seconds: float) -> None:
        """Record one timed call."""
        self.runs.append(seconds)


def interleave(
    cases: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    sync: Optional[Callable[[], None]] = None,
) -> dict[str, Timing]:
    """Time every case ``repeats`` times, interleaved: round ``r`` runs the cases once each, starting at the
    ``r``-th (rotated), after ``warmup`` untimed rounds. ``sync`` (e.g. ``torch.cuda.synchronize``) is called
    before each clock reading, so asynchronous devices are timed to completion.

    Returns each case's :class:`Timing` (seconds per call), keyed as ``cases``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    names = list(cases)
    timings = {name: Timing() for name in names}
    for round_ in range(-warmup, repeats):
        shift = round_ % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            if sync is not None:
                sync()
            start = time.perf_counter()
            cases[name]()
            if sync is not None:
                sync()
            if round_ >= 0:
                timings[name].add(time.perf_counter() - start)
    return timings


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], align: Optional[Sequence[str]] = None
) -> str:
    """A Markdown table; cells are ``str(cell)``, ``None`` shows as ``n/a``.

    ``align``: one code per column, ``"l"`` (the default), ``"r"`` or ``"c"``.

    >>> print(markdown_table(["lib", "samples/s"], [["ours", 12], ["peer", None]], align="lr"))
    | lib | samples/s |
    |---|---:|
    | ours | 12 |
    | peer | n/a |
    """
    align = ["l"] * len(header) if align is None else list(align)
    if len(align) != len(header) or any(a not in ALIGN for a in align):
        raise ValueError(f"align needs one of {sorted(ALIGN)} per column ({len(header)}), got {align!r}")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(ALIGN[a] for a in align) + "|"]
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"row {i} has {len(row)} cells, the header {len(header)}: {row!r}")
        lines.append("| " + " | ".join("n/a" if cell is None else str(cell) for cell in row) + " |")
    return "\n".join(lines)


def ratio(ours: Optional[float], peers: dict[str, Optional[float]]) -> tuple[Optional[float], Optional[str]]:
    """``ours`` over the best (highest) peer and that peer's name, for rates where higher is better (samples/s).

    Peers without a value are ignored; ``(None, None)`` when ``ours`` or every peer is missing, and the ratio
    is None when the best peer's rate is 0. For times, pass rates (``1 / seconds``).
    """
    present = {name: value for name, value in peers.items() if value is not None}
    if ours is None or not present:
        return None, None
    best = max(present, key=present.__getitem__)
    return (ours / present[best] if present[best] else None), best

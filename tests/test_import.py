"""``import pyro_flows`` stays light: heavy optional packages are imported where used, not at import.

The timing target (``import pyro_flows`` at most 0.3 s more than ``import pyro``, figures in
benchmarks/README.md) is checked in its non-flaky form: which packages a fresh interpreter holds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("arviz", "scipy", "matplotlib", "sklearn", "pandas", "xarray")


def loaded_after(statement: str) -> list[str]:
    """The HEAVY packages in ``sys.modules`` of a fresh interpreter after ``statement``."""
    code = f"{statement}; import sys; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


@pytest.mark.parametrize(
    "statement",
    [
        "import pyro_flows",
        "import pyro_flows.cli",  # `pyro-flows --help` starts fast too
        "import pyro_flows as pf; pf.CNF(2, context=3); pf.NSF(2)().log_prob(pf.NSF(2)().sample((3,)))",
    ],
    ids=["package", "cli", "discrete-flow"],  # an ODE solve imports torchdiffeq, which imports SciPy
)
def test_import_pulls_in_no_heavy_optional_package(statement):
    assert loaded_after(statement) == []


def test_heavy_packages_still_load_where_used():
    """The lazy imports are real: the function that needs SciPy gets it."""
    statement = (
        "import torch; from pyro_flows.diagnostics.calibration import _uniformity_pvalues; "
        "_uniformity_pvalues(torch.randint(0, 11, (50, 2)), 10, 5)"
    )
    assert "scipy" in loaded_after(statement)

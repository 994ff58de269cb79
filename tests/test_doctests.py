"""Every ``>>>`` example in the package's docstrings runs and prints what it says (one test per docstring)."""

from __future__ import annotations

import copy
import doctest
import importlib
import pkgutil

import pyro
import pyro.distributions
import pytest
import torch

import pyro_flows

# Names every example may use without importing them (besides its own module's globals).
GLOBALS = {"torch": torch, "pyro": pyro, "pf": pyro_flows, "T": pyro_flows.transforms, "dist": pyro.distributions}
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
# The package has this many examples at least: the runner cannot pass by finding none.
MIN_EXAMPLES = 150


def _modules() -> list[str]:
    names = [pyro_flows.__name__]
    names += [info.name for info in pkgutil.walk_packages(pyro_flows.__path__, pyro_flows.__name__ + ".")]
    return sorted(names)


def _doctests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = []
    for name in _modules():
        tests += finder.find(importlib.import_module(name), name, extraglobs=GLOBALS)
    return sorted((test for test in tests if test.examples), key=lambda test: test.name)


DOCTESTS = _doctests()


def test_doctests_are_found():
    examples = sum(len(test.examples) for test in DOCTESTS)
    assert examples >= MIN_EXAMPLES, f"found only {examples} docstring examples in {len(DOCTESTS)} docstrings"


@pytest.mark.parametrize("test", [pytest.param(test, id=test.name) for test in DOCTESTS])
def test_docstring_examples(test: doctest.DocTest, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write files
    pyro.clear_param_store()
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    report: list[str] = []
    case = copy.copy(test)
    case.globs = dict(test.globs)  # every run starts from the module's globals, not a previous run's
    with torch.random.fork_rng():  # seeded, and the caller's random stream is left as it was
        torch.manual_seed(0)
        result = runner.run(case, out=report.append)
    if result.failed:
        pytest.fail(f"{result.failed} of {result.attempted} examples of {test.name} failed:\n" + "".join(report))

"""scikit-learn is optional (the ``sklearn`` extra): the core works without it, and what needs it says which extra
to install. The extras in setup.cfg cover what the tutorials import."""

from __future__ import annotations

import ast
import configparser
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from pyro_flows.utils import require

ROOT = Path(__file__).resolve().parents[1]
HINT = 'pip install "pyro-flows[sklearn]"'

# a fresh interpreter in which `import sklearn` fails, as if scikit-learn were not installed
WITHOUT_SKLEARN = """
import sys
sys.modules["sklearn"] = None
import torch, pyro_flows as pf
flow = pf.NSF(2)
print("log_prob", tuple(flow().log_prob(pf.data.two_moons(5)).shape))
for name, call in [("digits", lambda: pf.data.digits()), ("digit_images", pf.data.digit_images),
                   ("c2st", lambda: pf.diagnostics.c2st(torch.randn(20, 2), torch.randn(20, 2)))]:
    try:
        call()
    except ImportError as error:
        print(name, type(error).__name__, error)
    else:
        print(name, "no error")
"""


def run_without_sklearn() -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_SKLEARN], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def test_core_works_without_sklearn_and_its_users_name_the_extra():
    lines = run_without_sklearn()
    assert lines[0] == "log_prob (5,)"  # import pyro_flows and a flow work
    assert lines[1] == f"digits ImportError pf.data.digits needs scikit-learn, which is not installed: {HINT}"
    assert lines[2].startswith("digit_images ImportError pf.data.digits needs scikit-learn") and HINT in lines[2]
    assert lines[3] == f"c2st ImportError pf.diagnostics.c2st needs scikit-learn, which is not installed: {HINT}"


def test_require_returns_the_module_when_installed():
    pytest.importorskip("sklearn")
    assert require("sklearn.datasets", "x").load_digits is not None


def test_require_knows_only_declared_extras():
    with pytest.raises(KeyError):
        require("pandas", "x")  # not an optional dependency of pyro_flows: no extra to name


def extras() -> tuple[list[str], dict[str, list[str]]]:
    """install_requires and the extras of setup.cfg, as requirement names (interpolation resolved)."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")

    def names(text: str) -> list[str]:
        lines = [line.strip() for line in text.splitlines()]
        return [re.split(r"[<>=!~\[ ;]", line)[0].lower() for line in lines if line and not line.startswith("#")]

    found = {name: names(config.get("options.extras_require", name)) for name in config["options.extras_require"]}
    return names(config.get("options", "install_requires")), found


def test_sklearn_is_an_extra_not_a_core_requirement():
    core, extra = extras()
    assert "scikit-learn" not in core
    assert extra["sklearn"] == ["scikit-learn"]
    assert "scikit-learn" in extra["tutorials"] and "scikit-learn" in extra["test"]
    assert set(extra["tutorials"]) <= set(extra["test"])  # the tests execute the notebooks


def notebook_imports() -> set[str]:
    """The top-level modules that the code cells of tutorials/*.ipynb import."""
    found: set[str] = set()
    for path in sorted((ROOT / "tutorials").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] != "code":
                continue
            source = "".join(cell["source"])
            source = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    found.add(node.module.split(".")[0])
    return found


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_tutorials_extra_installs_what_the_notebooks_import():
    """Every module a notebook imports is the standard library's, pyro_flows', or installed by the core
    requirements or the ``tutorials`` extra (directly or as one of their dependencies)."""
    core, extra = extras()
    wanted = {normalise(name) for name in core + extra["tutorials"]}
    closure, todo = set(wanted), list(wanted)
    while todo:  # the installed dependencies of those distributions
        try:
            requires = metadata.requires(todo.pop()) or []
        except metadata.PackageNotFoundError:
            continue
        for requirement in requires:
            if "extra ==" in requirement:
                continue
            name = normalise(re.split(r"[<>=!~\[ ;(]", requirement)[0])
            if name not in closure:
                closure.add(name)
                todo.append(name)
    providers = metadata.packages_distributions()
    modules = notebook_imports()
    assert {"pyro_flows", "sklearn", "torch"} <= modules  # the parser sees the imports
    missing = {
        module: providers.get(module)
        for module in modules - set(sys.stdlib_module_names) - {"pyro_flows"}
        if not {normalise(d) for d in providers.get(module, [])} & closure
    }
    assert not missing, f"tutorials import modules that neither the core nor the tutorials extra installs: {missing}"


def test_the_demo_without_sklearn_is_one_error_line_naming_the_extra(tmp_path):
    script = "import sys; sys.modules['sklearn'] = None\nfrom pyro_flows import cli\nsys.exit(cli.main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", script, "demo", "--quick", "--out", str(tmp_path / "report")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"pyro-flows: error: pf.data.digits needs scikit-learn, which is not installed: {HINT}"
    ]

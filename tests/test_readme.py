"""The README's Python examples run as written (all but the torchrun script)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
RUNNABLE = [block for block in BLOCKS if "init_process_group" not in block]


def test_readme_has_examples():
    assert len(RUNNABLE) >= 3


@pytest.mark.parametrize("index", range(len(RUNNABLE)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write files (model.pt)
    namespace: dict = {}
    exec(compile(RUNNABLE[index], f"README.md python block {index}", "exec"), namespace)


TEXT = README.read_text()
ROOT = README.parent
CPU_TORCH = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


def setup_commands() -> list[str]:
    block = re.search(r"^## Set-up\n.*?^```bash\n(.*?)^```", TEXT, flags=re.S | re.M)
    assert block, "README has no Set-up section with a bash block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_setup_is_two_commands_that_install_cpu_torch_first():
    """One line installs and runs the demo, one installs and runs CI's test command; both take torch from PyTorch's
    CPU index first (PyPI's Linux torch is the CUDA build), and the project install keeps that torch."""
    demo, tests = setup_commands()
    ci_test = re.search(r"^check (python -m pytest .*)$", (ROOT / ".ci" / "run").read_text(), flags=re.M)
    assert ci_test, ".ci/run runs no pytest command"
    for line in (demo, tests):
        assert line.startswith(f"{CPU_TORCH} && pip install -e "), line
    assert demo.endswith("&& pyro-flows demo")
    assert tests.endswith(f"&& {ci_test.group(1)}")
    assert "sklearn" in re.search(r'pip install -e "\.\[(.*?)\]"', demo).group(1).split(",")  # the demo fits digits
    assert "torch==2.13.0" not in TEXT  # the old pin, which resolves to the CUDA build from PyPI


def test_extras_named_in_readme_exist():
    from test_optional_deps import extras

    named = set(re.findall(r'\.\[([\w,-]+)\]"', TEXT)) | set(re.findall(r"pyro-flows\[([\w,-]+)\]", TEXT))
    named = {extra for group in named for extra in group.split(",")}
    assert {"sklearn", "test", "tutorials"} <= named
    assert named <= set(extras()[1]), named - set(extras()[1])


def test_tutorials_are_numbered_contiguously_and_each_listed_once():
    stems = sorted(path.stem for path in (ROOT / "tutorials").glob("*.ipynb"))
    assert [stem[:2] for stem in stems] == [f"{i:02d}" for i in range(len(stems))]
    for stem in stems:
        assert len(re.findall(rf"^- `{stem}`: \S", TEXT, flags=re.M)) == 1, f"README lists {stem} not exactly once"
    toctree = (ROOT / "tutorials" / "index.rst").read_text()
    assert re.findall(r"^   (\d\d_\w+)$", toctree, flags=re.M) == stems

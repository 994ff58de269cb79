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

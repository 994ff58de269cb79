"""The ``pyro-flows`` command line: ``main`` in process and the installed console script."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pyro_flows import cli

NUMBER = r"(-?\d+\.\d+)"


def parse(output: str) -> tuple[float, float, float]:
    match = re.search(rf"held-out log-likelihood\s+flow: {NUMBER} nats\s+Gaussian: {NUMBER} nats", output)
    assert match, output
    improvement = re.search(rf"improvement over the Gaussian: {NUMBER} nats/sample", output)
    assert improvement, output
    return float(match[1]), float(match[2]), float(improvement[1])


def test_demo_main_prints_held_out_log_likelihoods(capsys):
    assert cli.main(["demo", "--epochs", "3"]) == 0
    output = capsys.readouterr().out
    assert "NSF on two moons: 3 epochs" in output
    flow_ll, gaussian_ll, improvement = parse(output)
    assert improvement == pytest.approx(flow_ll - gaussian_ll, abs=2e-3)
    # the Gaussian's held-out log-likelihood on two moons (noise 0.1) is about -1.9 nats
    assert -2.3 < gaussian_ll < -1.6
    assert -10.0 < flow_ll < 0.0


def test_demo_is_deterministic_and_reports_the_fit():
    first = cli.demo("realnvp", epochs=2, seed=3)
    second = cli.demo("realnvp", epochs=2, seed=3)
    assert first["flow"] == "realnvp" and first["epochs"] == 2
    assert first["flow_ll"] == second["flow_ll"]
    assert first["gaussian_ll"] == second["gaussian_ll"]
    assert cli.demo("realnvp", epochs=2, seed=4)["gaussian_ll"] != first["gaussian_ll"]


def test_gaussian_log_likelihood_is_the_fitted_gaussian():
    import torch

    train = torch.randn(4000, 2) * torch.tensor([2.0, 0.5]) + torch.tensor([1.0, -1.0])
    test = torch.randn(4000, 2) * torch.tensor([2.0, 0.5]) + torch.tensor([1.0, -1.0])
    # minus the entropy of N(mu, diag(4, 0.25)): -(log(2 pi e) + log(2 * 0.5))
    expected = -(1.0 + math.log(2 * math.pi))
    assert cli.gaussian_log_likelihood(train, test) == pytest.approx(expected, abs=0.05)


@pytest.mark.parametrize("flow", ["maf", "nice"])
def test_demo_with_other_flows(flow, capsys):
    assert cli.main(["demo", "--flow", flow, "--epochs", "1", "--seed", "1"]) == 0
    assert f"{flow.upper()} on two moons: 1 epochs" in capsys.readouterr().out


def test_bad_arguments_exit_with_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--flow", "bogus"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2


def test_console_script():
    script = Path(sys.executable).parent / "pyro-flows"
    assert script.exists()
    result = subprocess.run(
        [str(script), "demo", "--epochs", "2"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    flow_ll, gaussian_ll, _ = parse(result.stdout)
    assert flow_ll > -10.0 and gaussian_ll < -1.0

"""Smoke test of benchmarks/bench_images.py: a few steps at 8×8 and 28×28; normflows only where installed."""

import importlib.util
import math

import pytest
import torch
from conftest import load_benchmark


def test_pyro_flows_quick():
    bench = load_benchmark("bench_images")
    data = bench.digits_split(test=64)
    assert data[0].shape == (1797 - 64, 1, 8, 8) and data[2].shape == (64, 1, 8, 8)
    runs = bench.compare("class-conditional", ["pyro_flows"], 1, data, 2, 1, 8, 4, 2, 16, 2e-3, 1, log=lambda _: None)
    ours = next(r for r in runs if r.lib == "pyro_flows")
    peer = next(r for r in runs if r.lib == "normflows")
    assert len(ours.throughput) == 1 and ours.median > 0 and ours.parameters > 0  # first chunk not timed
    assert math.isfinite(ours.bits_per_dim) and ours.bits_per_dim > 0
    assert peer.median is None and peer.bits_per_dim is None  # not run: n/a
    text = bench.table(runs, {8: bench.independent_pixels_bits_per_dim(data[0], data[2])})
    assert "n/a" in text and "categorical" in text and "| 8×8 | 1 |" in text


@pytest.mark.parametrize(
    "libs",
    [
        ["pyro_flows"],
        pytest.param(
            ["pyro_flows", "normflows"],
            marks=pytest.mark.skipif(importlib.util.find_spec("normflows") is None, reason="normflows not installed"),
        ),
    ],
    ids=["pyro_flows", "with-normflows"],
)
def test_28x28_rows(libs):
    """28×28 (the upscaled digits): both libraries build Glow at that size, train and report bits/dim; the table
    has 28×28 rows and the throughput ratio when normflows ran."""
    bench = load_benchmark("bench_images")
    data = bench.digits_split(test=16, size=28)
    assert data[0].shape == (1797 - 16, 1, 28, 28) and int(data[0].max()) == 16
    runs = bench.compare("unconditional", libs, 1, data, 2, 1, 4, 4, 2, 4, 2e-3, 1, log=lambda _: None)
    for run in runs:
        ran = run.lib in libs
        assert run.size == 28 and (run.median is not None) == ran and (run.bits_per_dim is not None) == ran
        assert not ran or (run.median > 0 and 0 < run.bits_per_dim < 20)
    text = bench.table(runs, {28: bench.independent_pixels_bits_per_dim(data[0], data[2])})
    pf_row = next(line for line in text.splitlines() if "| pyro_flows |" in line)
    assert pf_row.startswith("| 28×28 | 1 | unconditional")
    assert (pf_row.split("|")[-3].strip() != "") == ("normflows" in libs)  # pf / nf throughput ratio


def test_main_quick_prints_both_sizes(capsys):
    bench = load_benchmark("bench_images")
    args = ["--quick", "--libs", "pyro_flows", "--configs", "unconditional", "--threads", "1", "--train-steps", "2"]
    assert bench.main([*args, "--batch", "4", "--steps", "1", "--hidden-channels", "4"]) == 0
    out = capsys.readouterr().out
    assert "| 8×8 | 1 | unconditional | pyro_flows" in out and "| 28×28 | 1 | unconditional | pyro_flows" in out


def test_bits_per_dim_matches_pf():
    """The benchmark's discrete bits/dim of the continuous flow equals pf.bits_per_dim of the Dequantized model."""
    import pyro_flows as pf

    bench = load_benchmark("bench_images")
    _, _, test_x, test_y = bench.digits_split(test=64)
    torch.manual_seed(0)
    model = bench.build_pyro_flows("class-conditional", 2, 1, 8)
    with torch.no_grad():  # a non-trivial flow: randomise the zero-initialised output layers
        for name, parameter in model.module.named_parameters():
            if "output" in name:
                parameter.normal_(0, 0.05)
    ours = bench.heldout_bits_per_dim(model, test_x, test_y, draws=1, seed=3)
    torch.manual_seed(3)  # Dequantized draws u with torch.rand_like: the same u as a generator seeded 3
    reference = pf.bits_per_dim(model.module, test_x, context=test_y)
    assert 2.0 < ours < 20.0 and abs(ours - reference) < 1e-5


def test_independent_pixels_baseline():
    bench = load_benchmark("bench_images")
    train = torch.tensor([[0.0, 16.0], [0.0, 3.0]]).reshape(2, 1, 1, 2)
    test = torch.tensor([[0.0, 3.0]]).reshape(1, 1, 1, 2)
    # pixel 0: counts 2 + 1 of 19 at level 0; pixel 1: 1 + 1 of 19 at level 3
    expected = -(math.log2(3 / 19) + math.log2(2 / 19)) / 2
    assert abs(bench.independent_pixels_bits_per_dim(train, test) - expected) < 1e-6

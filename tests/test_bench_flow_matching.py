"""Smoke test of benchmarks/bench_flow_matching.py in quick mode: pyro_flows always, torchcfm and flow_matching where
installed (CI installs the test extra, not bench)."""

import math

import torch
from conftest import load_benchmark


def test_quick_run_reports_every_installed_library_and_reflow():
    bench = load_benchmark("bench_flow_matching")
    threads = torch.get_num_threads()
    try:
        lines: list[str] = []
        results = bench.main(["--quick", "--tasks", "normal-checkerboard"], log=lines.append)
    finally:
        torch.set_num_threads(threads)
    (result,) = results
    installed = [lib for lib in bench.LIBS if bench.available(lib)]
    assert set(result.quality) == set(installed) and {"pyro_flows", "pyro_flows-loop"} <= set(installed)
    for lib in installed:
        assert set(result.quality[lib]) == set(bench.COLUMNS)
        assert all(math.isfinite(v) and v >= 0 for v in result.quality[lib].values())
        assert result.speed[lib] and all(v > 0 for v in result.speed[lib])
    assert math.isfinite(result.nll["pyro_flows"])
    if "flow_matching" in installed:  # the same field and the same ODE: NLLs of one order
        assert math.isfinite(result.nll["flow_matching"])
    assert result.target is not None and result.seconds["pyro_flows"]
    assert set(result.reflow) == {"before", "after"} and math.isfinite(result.reflow["after"]["straightness"])
    text = "\n".join(lines)
    assert "SW adaptive" in text and "after reflow" in text and "straightness" in text
    missing = [lib for lib in bench.LIBS if not bench.available(lib)]
    assert all(f"{lib} (not installed)" in text for lib in missing)


def test_the_tasks_and_the_source_density():
    bench = load_benchmark("bench_flow_matching")
    g = torch.Generator().manual_seed(0)
    board = bench.checkerboard(4000, g)
    assert board.abs().max() <= 2
    dark = (torch.floor(board[:, 0]) + torch.floor(board[:, 1])) % 2 == 0  # every point on a dark square
    assert dark.all()
    # the 8 Gaussians' log-density integrates to 1 over a grid covering the ring
    grid = torch.stack(torch.meshgrid(torch.linspace(-4, 4, 401), torch.linspace(-4, 4, 401), indexing="ij"), -1)
    mass = bench.eight_gaussians_log_prob(grid.reshape(-1, 2)).exp().sum() * (8 / 400) ** 2
    assert abs(mass.item() - 1) < 1e-3
    field = bench.MLP(2, (8,))
    x = torch.randn(5, 2)
    torch.testing.assert_close(field(x, torch.tensor(0.3)), field(x, torch.full((5,), 0.3)))

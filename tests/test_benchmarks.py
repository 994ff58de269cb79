"""Smoke test of benchmarks/bench_transforms.py: the pyro_flows side only, in --quick mode (no peers needed)."""

import math

import torch
from conftest import load_benchmark


def test_pyro_flows_quick_row():
    bench = load_benchmark("bench_transforms")
    threads = torch.get_num_threads()
    results = bench.run(rows=["NSF-AR"], dims=[8], libs=["pyro_flows"], threads=1, quick=True, log=lambda _: None)
    assert torch.get_num_threads() == threads  # restored

    ours = [r for r in results if r.lib == "pyro_flows"]
    assert {r.metric for r in ours} == set(bench.METRICS)
    for r in ours:
        assert r.error is None and r.runs and all(v > 0 for v in r.runs), r
        assert r.params and r.params > 0

    # peers that were not run are reported as n/a, not as failures
    peers = [r for r in results if r.lib != "pyro_flows"]
    assert peers and all(r.median is None for r in peers)
    text = bench.table(results)
    assert "n/a" in text and "NSF-AR" in text
    assert bench.ratio(ours + peers) == (None, None)


def test_one_pass_log_prob():
    bench = load_benchmark("bench_transforms")
    torch.manual_seed(0)
    model = bench.build_pyro_flows("MAF", 4)
    assert bench.linear_calls(model, 4) == bench.TRANSFORMS * (len(bench.HIDDEN) + 1)


def test_floor_is_the_rows_bare_conditioners():
    bench = load_benchmark("bench_transforms")
    torch.manual_seed(0)
    for row, features in (("MAF", 8), ("RealNVP", 8), ("NSF-C", 6)):
        floor = bench.build_floor(row, features)
        ours = bench.build_pyro_flows(row, features)
        inputs, outputs = bench.conditioner_shapes(row, features)
        linears = [m for m in floor.module.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == bench.TRANSFORMS * (len(bench.HIDDEN) + 1)
        assert linears[0].in_features == inputs and linears[-1].out_features == outputs
        # the same parameter count as the flow's conditioners: the same matmuls
        count = sum(p.numel() for p in floor.module.parameters())
        assert count == sum(p.numel() for p in ours.module.parameters())
        assert floor.log_prob(torch.randn(5, features)).shape == (5,)
        assert floor.sample(7).shape == (7,)

    results = bench.run(rows=["MAF"], dims=[4], libs=["pyro_flows"], threads=1, quick=True, floor=True, log=print)
    floors = [r for r in results if r.lib == bench.FLOOR]
    assert {r.metric for r in floors} == set(bench.METRICS) and all(r.runs for r in floors)
    assert all(bench.floor_gap([r for r in results if r.metric == m]) > 0 for m in bench.METRICS)
    assert "pyro_flows time / floor" in bench.table(results)


def test_gap_stages_compute_the_flows_loss():
    """The --gap staircase: the inline and layer-by-layer stages are the flow's own -log_prob, not approximations."""
    bench = load_benchmark("bench_transforms")
    for row in ("MAF", "RealNVP"):
        torch.manual_seed(0)
        stages = bench._gap_stages(row, 4)
        for module, _ in stages.values():  # non-zero output layers, so the maps are not the identity
            module.double()
            for p in module.parameters():
                torch.nn.init.normal_(p, std=0.1)
        x = torch.randn(6, 4, dtype=torch.float64)
        losses = [loss(x) for module, loss in stages.values()]
        constant = 0.5 * 4 * math.log(2 * math.pi)  # the stages leave out the base's normalising constant
        torch.testing.assert_close(losses[2] + constant, losses[4])
        torch.testing.assert_close(losses[3] + constant, losses[4])
    assert "x floor" in bench.gap("RealNVP", 4, rounds=1, batch=8)

"""Smoke test of benchmarks/bench_image_fm.py: both models for a second each, tiny, and its bits/dim arithmetic."""

import math

import torch
from conftest import load_benchmark


def test_quick_compare_and_table():
    bench = load_benchmark("bench_image_fm")
    train_x, train_y, test_x, test_y = bench.images_bench.digits_split(test=64)
    data = (train_x, train_y, test_x[:8], test_y[:8])
    results = bench.compare(
        "class-conditional", data, 0.4, 0.2, (4, 8), (1, 1, 8), 16, 2e-3, 1, 1e-2, exact_rows=2, log=lambda _: None
    )
    assert [r.method for r in results] == list(bench.METHODS)
    for r in results:
        assert r.steps > 0 and r.seconds >= 0.4 and r.parameters > 0 and r.images_per_second > 0
        assert math.isfinite(r.bits_per_dim) and r.bits_per_dim > 0 and r.stderr > 0
    flow_matching = results[0]
    assert flow_matching.nfe > 0 and all(math.isfinite(b) for b in flow_matching.exact)
    text = bench.table(results, {8: bench.images_bench.independent_pixels_bits_per_dim(train_x, test_x)})
    assert "flow matching (U-Net)" in text and "Glow" in text and "categorical" in text and "exact-trace" in text


def test_bits_per_dim_match_pf_and_bench_images():
    """Per-row bits/dim average to pf.bits_per_dim's, and Glow's held-out value is bench_images' (same u)."""
    import pyro_flows as pf

    bench = load_benchmark("bench_image_fm")
    log_prob = torch.tensor([-10.0, 25.0, 3.0], dtype=torch.float64)
    assert abs(bench._bits(log_prob, 64).mean().item() - pf.bits_per_dim(log_prob, 64, levels=17)) < 1e-9
    _, _, test_x, test_y = bench.images_bench.digits_split(test=16)
    torch.manual_seed(0)
    glow = bench.build_glow("unconditional", (1, 8, 8), 1, 1, 8)
    reference = bench.images_bench.heldout_bits_per_dim(
        bench.images_bench.Model(glow.module, glow.log_prob), test_x, test_y, draws=2
    )
    assert abs(bench.heldout_bits(glow, test_x, test_y, passes=2).mean().item() - reference) < 1e-5

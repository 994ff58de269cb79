"""Smoke test of benchmarks/bench_density.py: the pyro_flows side only, in --quick mode (no peers needed)."""

import json
import math

import torch
from conftest import load_benchmark


def test_pyro_flows_quick():
    bench = load_benchmark("bench_density")
    threads = torch.get_num_threads()
    results, references = bench.run(libs=["pyro_flows"], threads=1, repeats=1, quick=True, log=lambda _: None)
    assert torch.get_num_threads() == threads  # restored

    ours = {r.dataset: r for r in results if r.lib == "pyro_flows"}
    assert set(ours) == set(bench.DATASETS) == set(references)
    for name, r in ours.items():
        assert r.error is None, r
        assert r.steps == bench.QUICK_STEPS[name] and r.dims == {"moons": 2, "digits": 64}[name]
        assert len(r.seconds) == 1 and r.time > 0 and r.params > 0
        assert math.isfinite(r.ll)
        # even 20-30 steps beat the Gaussian reference: the likelihood is in the data's units, per dimension
        assert r.ll > references[name], (name, r.ll, references[name])

    # peers that were not run are n/a, not failures
    peers = [r for r in results if r.lib != "pyro_flows"]
    assert {r.lib for r in peers} == {"zuko", "nflows"} and all(r.ll is None for r in peers)
    text = bench.table(results, references)
    assert text.count("n/a") >= 2 * 6 and "pyro_flows" in text and "Gaussian" in text


def test_main_writes_table_and_json(tmp_path, capsys):
    bench = load_benchmark("bench_density")
    out = tmp_path / "results.json"
    assert bench.main(["--quick", "--libs", "pyro_flows", "--data", "moons", "--repeats", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| moons | 2 | 30 | pyro_flows |" in printed and "| moons | 2 | 30 | zuko | n/a |" in printed
    saved = json.loads(out.read_text())
    assert [r["lib"] for r in saved["results"]] == list(bench.LIBS) and "moons" in saved["gaussian"]


def test_peer_log_likelihood_in_data_units():
    # a standard normal on the standardised rows is Normal(loc, scale) on the data: -sum(log scale) is the log-det
    bench = load_benchmark("bench_density")
    x = torch.randn(50, 3, dtype=torch.float64) * torch.tensor([10.0, 0.1, 2.0]) + torch.tensor([5.0, -1.0, 0.0])
    loc, scale = bench.standardization(x)
    assert torch.allclose(loc, x.mean(0)) and torch.allclose(scale, x.std(0))
    standard = torch.distributions.Normal(0.0, 1.0)
    got = bench.in_data_units(lambda z: standard.log_prob(z).sum(-1), x, loc, scale)
    want = torch.distributions.Normal(loc, scale).log_prob(x).sum(-1)
    assert torch.allclose(got, want, atol=1e-4)


def test_batches_are_shuffled_epochs():
    bench = load_benchmark("bench_density")
    batches = list(bench.batches(rows=10, batch_size=4, steps=7, seed=0))
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2, 4]
    for epoch in (batches[:3], batches[3:6]):
        assert sorted(torch.cat(epoch).tolist()) == list(range(10))
    assert not torch.equal(torch.cat(batches[:3]), torch.cat(batches[3:6]))


def test_fits_interleaved_rotated_and_seeded_by_repeat(monkeypatch):
    # the fits go through harness.interleave: each repeat runs every library once, the order rotated
    bench = load_benchmark("bench_density")
    calls = []

    def fake_fit(lib, train, test, cfg, steps, seed):
        calls.append((lib, seed))
        if lib == "nflows":
            raise RuntimeError("broken peer")
        return 1.0, 0.5, 7

    monkeypatch.setattr(bench, "fit", fake_fit)
    monkeypatch.setattr(bench, "available", lambda lib: None)
    results, _ = bench.run(datasets=["moons"], repeats=3, quick=True, warmup=0, log=lambda _: None)
    # rounds: (pf, zuko, nflows), (zuko, nflows, pf), (nflows, pf, zuko); nflows fails once and is not refitted
    assert calls == [
        ("pyro_flows", 0),
        ("zuko", 0),
        ("nflows", 0),
        ("zuko", 1),
        ("pyro_flows", 1),
        ("pyro_flows", 2),
        ("zuko", 2),
    ]
    by_lib = {r.lib: r for r in results}
    assert by_lib["nflows"].error == "RuntimeError: broken peer" and by_lib["zuko"].seconds == [1.0] * 3

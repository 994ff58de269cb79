"""benchmarks/bench_transforms.py --compile: the compiled column's ratios and --compile-metrics (no compilation)."""

from conftest import load_benchmark


def _results(bench, rates):
    return [bench.Result("MAF", 8, "train", lib, runs=[rate], batch=512) for lib, rate in rates.items()]


def test_compiled_columns_are_over_eager_best_peer_and_floor():
    bench = load_benchmark("bench_transforms")
    rates = {"pyro_flows": 100.0, "zuko": 80.0, "nflows": 90.0, "pyro": 50.0, bench.COMPILED: 126.0, bench.FLOOR: 140.0}
    results = _results(bench, rates)
    results[4].first_call = 7.0  # seconds: the compile time is the first call less a steady call (512 / 126 s)
    assert bench.ratio(results, lib=bench.COMPILED) == (126.0 / 90.0, "nflows")
    assert bench.floor_gap(results, lib=bench.COMPILED) == 140.0 / 126.0
    summary = bench._compiled_summary(results)
    assert "compiled/eager 1.26x" in summary and "compiled/best peer 1.40x (nflows)" in summary
    assert "compiled time/floor 1.11" in summary and "compiled in 3s" in summary
    header, _, row = bench.table(results).splitlines()
    assert "compiled / best peer" in header and header.rstrip(" |").endswith("compiled time / floor")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[-1] == "1.11" and "1.40 (nflows)" in cells and "1.26" in cells


def test_compile_metrics_restricts_the_compiled_column():
    bench = load_benchmark("bench_transforms")
    results = bench.run(
        rows=["MAF"],
        dims=[4],
        metrics=["log_prob"],
        libs=["pyro_flows"],
        threads=1,
        quick=True,
        check=False,
        log=lambda _: None,
        compiled=True,
        floor=True,
        compile_metrics=["train"],  # log_prob is not compiled: the column reads "not run", nothing is compiled
    )
    by_lib = {r.lib: r for r in results}
    assert by_lib["pyro_flows"].runs and by_lib[bench.FLOOR].runs
    assert by_lib[bench.COMPILED].error == "not run" and not by_lib[bench.COMPILED].runs
    assert bench._compiled_summary(results) == ""


def test_a_compiled_first_call_is_not_a_slow_call(monkeypatch):
    import time

    import torch

    bench = load_benchmark("bench_transforms")
    calls = []

    def build(row, features):  # a "compiled" flow whose first call takes long (the compilation), then is fast
        model = bench.build_pyro_flows(row, features)

        def log_prob(x):
            if not calls:
                time.sleep(0.1)
            calls.append(1)
            return model.log_prob(x)

        return bench.Model(model.module, log_prob, model.sample)

    monkeypatch.setitem(bench.BUILDERS, bench.COMPILED, build)
    # a call over cfg.slow would be timed cfg.slow_repeats (3) times: the 0.1 s compilation must not count as one
    cfg = bench.Config(train_batch=16, eval_batch=16, repeats=4, warmup=2, min_time=0.01, pool=2, slow=0.05)
    torch.set_num_threads(1)
    results = bench.bench_case("MAF", 4, "log_prob", ["pyro_flows", bench.COMPILED], cfg, log=lambda _: None)
    assert len(results[bench.COMPILED].runs) == cfg.repeats  # not cfg.slow_repeats: the warm-up went on
    assert results[bench.COMPILED].first_call >= 0.1 and results[bench.COMPILED].compile_seconds > 0.05

"""Smoke test of benchmarks/bench_vi.py: a tiny --quick configuration, and the like-for-like guide architectures."""

import math

import pyro
import pytest
import torch
from conftest import load_benchmark
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoNormal

import pyro_flows as pf


def _param_count(bench, guide_name: str, model_name: str) -> tuple[int, int]:
    """(trainable parameters in the param store, latent dimension) of a fresh guide after its first call."""
    model, args = bench.problem(model_name)
    pyro.clear_param_store()
    guide = bench.make_guide(guide_name, model, bench.QUICK)
    guide(*args)
    store = pyro.get_param_store()
    return sum(store[name].numel() for name in store.keys() if "prototype" not in name), guide.latent_dim


@pytest.mark.parametrize("model_name", ["funnel", "logistic"])
def test_flows_are_like_for_like(model_name):
    # pyro_flows' guide is Pyro's architecture (same layers, MADE widths, spline parameters per dimension)
    # plus the learnable full-rank affine start around the initial point (AutoMultivariateNormal's loc, scale and
    # unit lower-triangular factor): exactly 2 D + D (D - 1) / 2 more parameters.
    bench = load_benchmark("bench_vi")
    for ours, peer in [("pf-IAF", "AutoIAFNormal"), ("pf-NSF", "AutoNormalizingFlow")]:
        n_ours, dim = _param_count(bench, ours, model_name)
        n_peer, peer_dim = _param_count(bench, peer, model_name)
        assert dim == peer_dim == {"funnel": 10, "logistic": 5}[model_name]
        assert n_ours == n_peer + 2 * dim + dim * (dim - 1) // 2, (ours, n_ours, peer, n_peer)
    pyro.clear_param_store()


def test_quick_run_on_the_funnel():
    bench = load_benchmark("bench_vi")
    cfg = bench.Config(seconds=0.4, checkpoints=2, repeats=2, hidden=(8, 8), transforms=2, eval_samples=200)
    assert bench.marks(cfg) == [0.2, 0.4]
    threads = torch.get_num_threads()
    results = bench.run(["funnel"], ["AutoNormal", "pf-NSF"], cfg, threads=1, log=lambda _: None)
    assert torch.get_num_threads() == threads  # restored
    assert [(r.model, r.guide) for r in results] == [("funnel", "AutoNormal"), ("funnel", "pf-NSF")]
    for r in results:
        assert r.error is None and len(r.runs) == cfg.repeats
        for run in r.runs:
            assert len(run) == cfg.checkpoints
            first, last = run
            assert 0.2 <= first.seconds <= last.seconds and 0.4 <= last.seconds
            assert 1 <= first.steps <= last.steps
            for c in run:
                # the funnel is normalised (log Z = 0): every ELBO is below 0, and on the same draws
                # mean(log w) <= log mean(w) (Jensen), so the IW-ELBO is never below the ELBO
                assert math.isfinite(c.elbo) and c.elbo < 0
                assert c.iw_elbo >= c.elbo
                assert math.isfinite(c.khat)
        assert r.steps_per_second > 0 and r.median("elbo") < 0

    text = bench.table(results, cfg)
    assert "| funnel | AutoNormal |" in text and "ELBO @0.4s" in text and "n/a" not in text
    # no Pyro flow guide ran: nothing to compare with
    assert bench.comparisons(results) == []


def test_failures_are_reported_not_raised(monkeypatch):
    bench = load_benchmark("bench_vi")
    cfg = bench.Config(seconds=0.1, checkpoints=1, repeats=1, hidden=(8, 8), transforms=1, eval_samples=50)
    original = bench.make_guide

    def broken(name, model, cfg):
        if name == "pf-IAF":
            raise RuntimeError("boom")
        return original(name, model, cfg)

    monkeypatch.setattr(bench, "make_guide", broken)
    results = bench.run(["logistic"], ["AutoIAFNormal", "pf-IAF"], cfg, threads=1, log=lambda _: None)
    by = {r.guide: r for r in results}
    assert by["pf-IAF"].error == "RuntimeError: boom" and by["pf-IAF"].median("elbo") is None
    assert by["AutoIAFNormal"].error is None and math.isfinite(by["AutoIAFNormal"].median("elbo"))
    assert "| logistic | pf-IAF | n/a |" in bench.table(results, cfg)


@pytest.mark.parametrize(
    "model_name", ["funnel", "funnel_nc", "eight_schools", "eight_schools_nc", "logistic", "linreg"]
)
def test_models_vectorise_over_particles(model_name):
    # psis and Predictive evaluate thousands of draws in one vectorised pass; a model that broadcasts wrongly
    # under the particle plate would make a (draws x draws x ...) tensor instead (linreg did, under Predictive:
    # 4000 draws took 21 GB), or fall back to a slow loop
    bench = load_benchmark("bench_vi")
    model, args = bench.problem(model_name)
    pyro.clear_param_store()
    guide = AutoNormal(model)
    guide(*args)
    report = pf.diagnostics.psis(model, guide, *args, num_samples=32, vectorize=True)
    assert report.log_weights.shape == (32,) and math.isfinite(report.elbo)
    draws = Predictive(model, guide=guide, num_samples=7, parallel=True)(*args)
    observed = [v for k, v in draws.items() if k in ("y", "x") and model_name not in ("funnel", "funnel_nc")]
    assert all(v.shape[0] == 7 and v.numel() == 7 * args[-1].numel() for v in observed)
    pyro.clear_param_store()


def test_reference_draws_of_a_centred_model_come_from_its_non_centred_twin():
    bench = load_benchmark("bench_vi")
    generator = torch.Generator().manual_seed(0)
    nc = {"mu": torch.randn(6, generator=generator), "tau": torch.rand(6, generator=generator) + 0.1}
    nc["theta_tilde"] = torch.randn(6, 8, generator=generator)
    centred = bench.reference_draws("eight_schools", nc)  # columns mu, log tau, theta_1..8
    assert bench.reference_model("eight_schools") == "eight_schools_nc"
    torch.testing.assert_close(centred[:, 0], nc["mu"].double())
    torch.testing.assert_close(centred[:, 1], nc["tau"].log().double())
    torch.testing.assert_close(centred[:, 2:], (nc["mu"][:, None] + nc["tau"][:, None] * nc["theta_tilde"]).double())
    funnel = bench.reference_draws("funnel", {"v": nc["mu"], "z": nc["theta_tilde"][:, :-1]})
    torch.testing.assert_close(funnel[:, 1:], (nc["theta_tilde"][:, :-1] * torch.exp(nc["mu"][:, None] / 2)).double())


def test_reference_run_scores_guides_against_nuts():
    bench = load_benchmark("bench_vi")
    rc = bench.ReferenceConfig(steps=20, repeats=2, eval_samples=100, warmup=30, draws=60, chains=2)
    references, fits = bench.run_reference(["linreg"], ["AutoMultivariateNormal", "pf-NSF"], rc)
    assert references["linreg"].shape == (120, 5)  # w (3), b, log sigma
    assert [(f.guide, f.seed) for f in fits] == [(g, s) for s in (0, 1) for g in ("AutoMultivariateNormal", "pf-NSF")]
    for f in fits:
        assert len(f.mean) == len(f.sd) == 5 and math.isfinite(f.khat) and f.seconds > 0
        mean_error, sd_error = bench.moment_errors(f, references["linreg"])
        assert mean_error > 0 and sd_error > 0
    # the reference against itself: no error
    ref = references["linreg"]
    itself = bench.Fit("linreg", "x", 0, 1.0, 0.0, 0.0, ref.mean(0).tolist(), ref.std(0).tolist())
    assert bench.moment_errors(itself, ref) == pytest.approx((0.0, 0.0), abs=1e-12)
    text = bench.reference_table(references, fits)
    assert "| linreg | AutoMultivariateNormal |" in text and "| linreg | pf-NSF |" in text and "n/a" not in text
    pyro.clear_param_store()


def test_nuts_draws_are_saved_to_and_loaded_from_the_cache_directory(tmp_path, monkeypatch):
    bench = load_benchmark("bench_vi")
    rc = bench.ReferenceConfig(warmup=10, draws=10, chains=1, nuts_cache=str(tmp_path))
    first = bench.nuts_draws("funnel_nc", rc)
    assert [p.name for p in tmp_path.iterdir()] == ["nuts_funnel_nc_w10_d10_c1_s0.pt"]
    bench.nuts_draws.cache_clear()

    def no_mcmc(*args, **kwargs):
        raise AssertionError("NUTS ran again instead of reading the cache")

    monkeypatch.setattr(bench, "MCMC", no_mcmc)
    again = bench.nuts_draws("funnel_nc", rc)
    assert again.keys() == first.keys() == {"v", "z"}
    for name in first:
        assert torch.equal(again[name], first[name])
    other = bench.ReferenceConfig(warmup=10, draws=12, chains=1, nuts_cache=str(tmp_path))
    with pytest.raises(AssertionError, match="NUTS ran again"):
        bench.nuts_draws("funnel_nc", other)  # another run length is another file
    bench.nuts_draws.cache_clear()


def test_reference_guides_pf_nsf_scales_its_conditioner_outputs_and_pf_nsf_unscaled_does_not():
    bench = load_benchmark("bench_vi")
    model, args = bench.problem("linreg")
    counts = {}
    for name in ("pf-NSF", "pf-NSF-unscaled"):
        pyro.clear_param_store()
        guide = bench.make_reference_guide(name, model)
        guide(*args)
        counts[name] = sum(isinstance(m, pf.infer.guides.ScaledLinear) for m in guide.flow.modules())
    assert counts == {"pf-NSF": 4, "pf-NSF-unscaled": 0}  # one per spline layer's MADE
    pyro.clear_param_store()


def test_reference_guides_take_the_gradient_their_names_say():
    bench = load_benchmark("bench_vi")
    model, args = bench.problem("linreg")
    path = {}
    for name in bench.REFERENCE_GUIDES:
        pyro.clear_param_store()
        guide = bench.make_reference_guide(name, model)
        guide(*args)
        path[name] = getattr(guide, "path_gradient", None)
    assert path == {
        "AutoNormal": None,
        "AutoMultivariateNormal": None,
        "pf-NSF-diagonal": False,
        "pf-NSF-unscaled": False,
        "pf-NSF-total": False,
        "pf-NSF": False,  # the default before issue 16.14: splines stay on the total gradient
        "pf-IAF-total": False,
        "pf-IAF-path": True,  # the default AutoFlowGuide
        "pf-IAF-path-unscaled": True,
        "pf-RealNVP-total": False,
        "pf-RealNVP-path": True,
    }
    with pytest.raises(ValueError, match="unknown guide"):
        bench.make_reference_guide("pf-IAF-other", model)
    pyro.clear_param_store()

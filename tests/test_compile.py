"""The compiled path (pyro_flows.compile_flow): no graph breaks on the fused paths, results equal to eager."""

from __future__ import annotations

import pyro
import pytest
import torch

import pyro_flows as pf

SMALL = dict(features=4, transforms=2, hidden=(8, 8))
PRESETS = {
    "MAF": lambda: pf.MAF(**SMALL),
    "IAF": lambda: pf.IAF(**SMALL),
    "NSF-AR": lambda: pf.NSF(**SMALL, autoregressive=True),
    "NSF-C": lambda: pf.NSF(**SMALL, autoregressive=False),
    "RealNVP": lambda: pf.RealNVP(**SMALL),
    "NICE": lambda: pf.NICE(**SMALL),
}


def _trained_a_little(name: str) -> pf.Flow:
    """A preset with nonzero last layers (a fresh flow is the identity) whose data-dependent layers are initialised."""
    torch.manual_seed(0)
    flow = PRESETS[name]()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    flow().log_prob(torch.randn(32, 4))  # ActNorm (NICE) initialises on its first training call
    return flow


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(PRESETS))
def test_log_prob_and_sample_trace_as_one_graph(name):
    flow = _trained_a_little(name)
    compiled = pf.compile_flow(flow, backend="eager", fullgraph=True)  # fullgraph: a graph break is an error
    x = torch.randn(16, 4)
    torch.testing.assert_close(compiled.log_prob(x), flow().log_prob(x), rtol=1e-5, atol=1e-5)
    torch.manual_seed(1)
    expected = flow().sample((8,))
    torch.manual_seed(1)
    torch.testing.assert_close(compiled.sample(8), expected, rtol=1e-5, atol=1e-5)


def test_glow_traces_as_one_graph():
    """Glow on tiny images (its 3x3 convolutions as matmuls, nn.cnn.dense_conv) compiles with fullgraph=True: the
    convolutions' shift matrices are built without data-dependent shapes (nonzero broke the graph 41 times)."""
    torch.manual_seed(0)
    flow = pf.Glow((1, 4, 4), levels=2, steps=1, hidden_channels=8, pixel_levels=None)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    flow().log_prob(torch.randn(8, 1, 4, 4))  # ActNorm initialises on its first training call
    compiled = pf.compile_flow(flow, backend="eager", fullgraph=True)
    x = torch.randn(8, 1, 4, 4)
    torch.testing.assert_close(compiled.log_prob(x), flow().log_prob(x), rtol=1e-5, atol=1e-5)
    torch.manual_seed(1)
    expected = flow().sample((4,))
    torch.manual_seed(1)
    torch.testing.assert_close(compiled.sample(4), expected, rtol=1e-5, atol=1e-5)


def test_explain_counts_no_graph_break():
    flow = _trained_a_little("NSF-AR")
    with pyro.validation_enabled(False):  # as in CompiledFlow's calls: validating the value reads it on the host
        log_prob = torch._dynamo.explain(lambda x: flow().log_prob(x))(torch.randn(16, 4))
        sample = torch._dynamo.explain(lambda n: flow().sample((n,)))(8)
    assert (log_prob.graph_count, log_prob.graph_break_count) == (1, 0)
    assert (sample.graph_count, sample.graph_break_count) == (1, 0)


def test_compiled_loss_gradients_equal_eager_and_fit_trains():
    flow = _trained_a_little("MAF")
    compiled = pf.compile_flow(flow, backend="aot_eager", fullgraph=True)  # AOTAutograd traces the backward too
    x = torch.randn(32, 4)
    eager = pf.NegativeLogLikelihood()(flow, x)
    eager_grads = torch.autograd.grad(eager, list(flow.parameters()))
    loss = compiled.loss(flow, x)
    grads = torch.autograd.grad(loss, list(flow.parameters()))
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)

    data = torch.randn(128, 4) * 0.5 + 1.0
    before = pf.NegativeLogLikelihood()(flow, data).item()
    history = pf.fit(flow, data, objective=compiled.loss, max_epochs=3, lr=1e-2, seed=0, progress=False)
    assert history.steps > 0
    assert pf.NegativeLogLikelihood()(flow, data).item() < before  # the eager flow's parameters were trained


def test_conditional_flow_compiles():
    torch.manual_seed(0)
    flow = pf.MAF(**SMALL, context=3)
    compiled = pf.compile_flow(flow, backend="eager")
    x, c = torch.randn(16, 4), torch.randn(16, 3)
    torch.testing.assert_close(compiled.log_prob(x, c), flow(c).log_prob(x))
    assert compiled.sample((), c).shape == (16, 4)


def test_inductor_log_prob_equals_eager():
    torch.manual_seed(0)
    flow = pf.MAF(features=3, transforms=1, hidden=(8,))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    compiled = pf.compile_flow(flow, fullgraph=True)  # the default backend, inductor (C++ kernels on CPU)
    x = torch.randn(64, 3)
    with torch.no_grad():
        torch.testing.assert_close(compiled.log_prob(x), flow().log_prob(x), rtol=1e-5, atol=1e-5)


def test_actnorm_reads_its_flag_again_after_loading_a_state_dict():
    layer = pf.transforms.ActNorm(2)
    fresh = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.inv(torch.randn(50, 2) * 3 + 1)
    assert bool(layer.initialized)
    layer.load_state_dict(fresh)  # initialized is False again: the next training call initialises
    z = layer.inv(torch.randn(50, 2) * 5 - 2)
    assert bool(layer.initialized)
    torch.testing.assert_close(z.mean(0), torch.zeros(2), atol=1e-5, rtol=0)


def test_validation_flag_is_left_as_it_was():
    flow = _trained_a_little("MAF")
    before = torch.distributions.Distribution._validate_args
    try:
        for flag in (True, False):
            torch.distributions.Distribution.set_default_validate_args(flag)
            compiled = pf.compile_flow(flow, backend="eager", fullgraph=True)  # torch.compile turns it off
            assert torch.distributions.Distribution._validate_args is flag
            compiled.log_prob(torch.randn(8, 4))
            compiled.sample(3)
            assert torch.distributions.Distribution._validate_args is flag
    finally:
        torch.distributions.Distribution.set_default_validate_args(before)


def test_bad_arguments():
    flow = pf.MAF(**SMALL)
    with pytest.raises(TypeError, match="expected a pyro_flows Flow"):
        pf.compile_flow(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    compiled = pf.compile_flow(flow, backend="eager")
    with pytest.raises(ValueError, match="not the compiled flow"):
        compiled.loss(pf.MAF(**SMALL), torch.randn(4, 4))
    assert "CompiledFlow(Flow, backend='eager')" == repr(compiled)


def _graph_recorder(graphs: list):
    """A torch.compile backend that records each graph's example inputs and runs the graph as traced."""

    def backend(gm, example_inputs):
        graphs.append(example_inputs)
        return gm.forward

    return backend


def _symbolic(example_inputs) -> bool:
    return any(
        isinstance(s, torch.SymInt) for t in example_inputs for s in (t.shape if isinstance(t, torch.Tensor) else (t,))
    )


def test_flows_keep_their_own_static_graphs(monkeypatch):
    from pyro_flows.transforms import base

    monkeypatch.setattr(base, "_REAL_EVENTS", {})  # as in a fresh process: the constraint cache starts empty
    graphs: list = []
    first, second = _trained_a_little("MAF"), _trained_a_little("RealNVP")
    compiled = [pf.compile_flow(flow, backend=_graph_recorder(graphs), fullgraph=True) for flow in (first, second)]
    x = torch.randn(16, 4)
    for _ in range(3):  # the first call compiles once (not again once the constraint cache is filled)
        compiled[0].log_prob(x)
    assert len(graphs) == 1
    compiled[1].log_prob(torch.randn(32, 4))  # another flow, another batch size: its own graph, static shapes
    compiled[0].log_prob(torch.randn(48, 4))  # a new batch size recompiles with static shapes (dynamic=False)
    assert len(graphs) == 3 and not any(_symbolic(g) for g in graphs)
    torch.testing.assert_close(compiled[1].log_prob(x), second().log_prob(x), rtol=1e-5, atol=1e-5)
    assert len(graphs) == 4  # RealNVP at batch 16: its own cache, not the MAF's graph for 16

    dynamic: list = []
    pf.compile_flow(first, backend=_graph_recorder(dynamic), dynamic=True).log_prob(x)  # asked for: symbolic
    assert _symbolic(dynamic[0])

"""Continuous normalizing flows: analytic linear flows, traces, adjoint, regularisers, MLE and flow matching.

The shared contract (round trip, log-det vs autograd, shapes, caching, ...) is checked for
``ContinuousFlow`` and its conditional twin in ``test_contract.py``.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from conftest import per_sample_jacobian, perturb
from torch import nn

import pyro_flows as pf
from pyro_flows import transforms as T
from pyro_flows.data import two_moons
from pyro_flows.demo import gaussian_log_density
from pyro_flows.nn import ResidualVectorField, VectorField
from pyro_flows.nn.vector_field import (
    activation_and_derivative,
    activation_tangents,
    chain_trace,
    fold_constant_inputs,
    input_tangents,
    sequential_jacobian,
    sequential_trace,
    tangents_to_jacobian,
)
from pyro_flows.transforms.continuous import (
    SAFETY,
    exact_divergence,
    hutchinson_divergence,
    record_regularization,
    state_norm,
)

F64 = torch.float64
TIGHT = dict(atol=1e-10, rtol=1e-10)


class LinearField(nn.Module):
    """f(z, t) = A z: the flow is z(t) = expm((t - t0) A) z(t0), the log-det (t1 - t0) tr(A)."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a)

    def forward(self, z, t, context=None):
        return z @ self.a.T


def matrix(d: int, seed: int = 0, scale: float = 0.5) -> torch.Tensor:
    return scale * torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def perturbed_layer(cls=T.ContinuousFlow, seed=0, **kwargs) -> T.ContinuousFlow:
    torch.manual_seed(seed)
    return perturb(cls(3, hidden=(16, 16), **kwargs), scale=0.3, seed=seed).double()


# -- the linear flow -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver, options", [("dopri5", {}), ("rk4", {"step_size": 0.01})], ids=["dopri5", "rk4"])
def test_linear_field_matches_the_analytic_flow_and_log_det(solver, options):
    a, t0, t1 = matrix(3), 0.25, 1.5
    layer = T.ContinuousFlow(3, LinearField(a), t0=t0, t1=t1, solver=solver, options=options, **TIGHT)
    z0 = randn(7, 3)
    y, ladj = layer.call_and_ladj(z0)
    expected = z0 @ torch.linalg.matrix_exp((t1 - t0) * a).T
    atol = 1e-8 if solver == "dopri5" else 1e-7
    torch.testing.assert_close(y, expected, atol=atol, rtol=0)
    # log|det dy/dz0| = (t1 - t0) tr(A): log p(y) = log p0(z0) - (t1 - t0) tr(A)
    torch.testing.assert_close(ladj, torch.full((7,), (t1 - t0) * a.trace().item(), dtype=F64), atol=1e-9, rtol=0)
    # the inverse integrates backwards, t1 -> t0
    x, ladj_inv = layer.inverse_and_ladj(expected.clone())
    torch.testing.assert_close(x, z0, atol=atol, rtol=0)
    torch.testing.assert_close(ladj_inv, -ladj, atol=1e-9, rtol=0)
    assert layer.nfe > 0


def test_linear_field_regularisers_are_the_kinetic_energy_and_frobenius_norm():
    a, t1 = matrix(3, seed=1), 1.0
    layer = T.ContinuousFlow(3, LinearField(a), t1=t1, **TIGHT)
    z0 = randn(5, 3, seed=2)
    layer.call_and_ladj(z0)
    assert sorted(layer.regularization) == ["kinetic"]  # F needs the whole Jacobian: only for a recorded solve
    with record_regularization([layer]):
        layer.call_and_ladj(z0)
    # ∫ ||A z(t)||^2 dt by Simpson's rule on the analytic trajectory
    ts = torch.linspace(0, t1, 2001, dtype=F64)
    speed = torch.stack([(z0 @ (a @ torch.linalg.matrix_exp(t * a)).T).square().sum(-1) for t in ts])
    weights = torch.ones(2001, dtype=F64)
    weights[1:-1:2], weights[2:-1:2] = 4, 2
    kinetic = (weights[:, None] * speed).sum(0) * (t1 / 2000) / 3
    torch.testing.assert_close(layer.regularization["kinetic"], kinetic, atol=1e-7, rtol=1e-7)
    frobenius = torch.full((5,), t1 * a.square().sum().item(), dtype=F64)
    torch.testing.assert_close(layer.regularization["jacobian"], frobenius, atol=1e-8, rtol=0)
    # integrated over |dt|: the backward solve reports the same (positive) values
    with record_regularization([layer]):
        layer.inverse_and_ladj(randn(5, 3, seed=3))
    assert (layer.regularization["kinetic"] > 0).all()
    torch.testing.assert_close(layer.regularization["jacobian"], frobenius, atol=1e-8, rtol=0)


def test_hutchinson_probe_is_fixed_during_a_solve():
    """With f = Az and one fixed Rademacher probe ε, the estimate integrates to t ε^T A ε exactly."""
    a = matrix(3, seed=4)
    layer = T.ContinuousFlow(3, LinearField(a), trace="hutchinson", **TIGHT)
    torch.manual_seed(0)
    _, ladj = layer.call_and_ladj(randn(4000, 3, seed=5))
    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=3)), dtype=F64)
    possible = torch.einsum("pi,ij,pj->p", signs, a, signs)
    assert (ladj[:, None] - possible).abs().min(-1).values.max() < 1e-8
    assert abs(ladj.mean() - a.trace()) < 0.1  # unbiased: averages to tr(A)


# -- traces --------------------------------------------------------------------------------------------------------
def field_and_point(seed=0):
    torch.manual_seed(seed)
    field = perturb(VectorField(4, hidden=(16, 16)), scale=0.3, seed=seed).double()
    z = randn(6, 4, seed=seed).requires_grad_(True)
    return field, z, field(z, torch.tensor(0.3, dtype=F64))


def test_exact_trace_and_frobenius_match_the_autograd_jacobian():
    field, z, f = field_and_point()
    trace, frobenius = exact_divergence(f, z, None, False)
    jacobian = per_sample_jacobian(lambda v: field(v, torch.tensor(0.3, dtype=F64)), z.detach())
    torch.testing.assert_close(trace, jacobian.diagonal(dim1=-2, dim2=-1).sum(-1), atol=1e-12, rtol=0)
    torch.testing.assert_close(frobenius, jacobian.square().sum((-2, -1)), atol=1e-12, rtol=0)
    assert trace.abs().min() > 1e-3  # not vacuous


@pytest.mark.parametrize("cls", [VectorField, ResidualVectorField])
@pytest.mark.parametrize("activation", [nn.SiLU, nn.Tanh, nn.Softplus, nn.ELU])  # ELU: the generic jvp
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_forward_and_jacobian_match_the_field_and_the_autograd_jacobian(cls, activation, dtype):
    torch.manual_seed(0)
    field = perturb(cls(3, hidden=(16, 16), context_features=2, activation=activation), scale=0.5).to(dtype)
    z, c = randn(6, 3, dtype=dtype), randn(6, 2, seed=1, dtype=dtype)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == F64 else dict(atol=2e-5, rtol=1e-5)
    for t in (torch.tensor(0.3, dtype=dtype), torch.rand(6, dtype=dtype)):  # one time, a time per sample
        f, jacobian = field.forward_and_jacobian(z, t, c)
        torch.testing.assert_close(f, field(z, t, c), **tol)
        expected = per_sample_jacobian(lambda v, t=t: field(v, t, c), z)
        assert jacobian.shape == (6, 3, 3) and expected.abs().max() > 0.05  # not vacuous
        torch.testing.assert_close(jacobian, expected, **tol)


def test_activation_derivative_and_tangents_are_the_autograd_ones_with_and_without_a_graph():
    a, tangents = randn(4, 50, seed=3).requires_grad_(True), randn(2, 4, 50, seed=4)
    for activation in (nn.SiLU(), nn.Tanh(), nn.Sigmoid(), nn.Softplus(beta=2.0, threshold=1.0), nn.GELU()):
        expected = torch.autograd.grad(activation(a).sum(), a, create_graph=True)[0]
        y, slope = activation_and_derivative(activation, a)
        torch.testing.assert_close(y, activation(a), atol=1e-14, rtol=0)
        torch.testing.assert_close(slope, expected, atol=1e-14, rtol=0)
        # its own derivative (training through the trace) is the second derivative
        second = torch.autograd.grad(expected.sum(), a)[0]
        torch.testing.assert_close(torch.autograd.grad(slope.sum(), a)[0], second, atol=1e-12, rtol=0)
        for grad in (True, False):  # with a graph, and without
            with torch.set_grad_enabled(grad):
                y, pushed = activation_tangents(activation, a, tangents)
            torch.testing.assert_close(y, activation(a), atol=1e-14, rtol=0)
            torch.testing.assert_close(pushed, tangents * expected, atol=1e-14, rtol=0)
            assert pushed.requires_grad == grad


def test_sequential_jacobian_of_an_mlp_and_its_bad_layers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.SiLU(), nn.Identity(), nn.Linear(8, 3)).double()
    z, side = randn(4, 3), randn(4, 2, seed=1)  # the input is (side, z): z's 3 tangents from entry 2 on
    y, tangents = sequential_jacobian(net, torch.cat([side, z], -1), input_tangents(5, 3, z, start=2))
    torch.testing.assert_close(y, net(torch.cat([side, z], -1)), atol=1e-14, rtol=0)
    expected = per_sample_jacobian(lambda v: net(torch.cat([side, v], -1)), z)
    torch.testing.assert_close(tangents_to_jacobian(tangents, 4), expected, atol=1e-13, rtol=0)
    with pytest.raises(ValueError, match="only nn.Linear layers and elementwise activations, got LayerNorm"):
        sequential_jacobian([nn.LayerNorm(5).double()], torch.cat([side, z], -1), input_tangents(5, 3, z))


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_chain_trace_is_the_trace_of_the_product(depth):
    """tr(W_K S_{K-1} ... S_1 W_1[:, start:start + D]) against the product formed, in values and gradients."""
    widths = [7, 6, 5, 6, 4][: depth - 1]
    shapes = list(zip([*widths, 3], [9, *widths], strict=True))  # (out, in): 9 inputs, z their entries 4..6
    weights = [randn(*shape, seed=k).requires_grad_(True) for k, shape in enumerate(shapes)]
    slopes = [randn(5, w, seed=10 + k).requires_grad_(True) for k, w in enumerate(widths)]
    jacobian = weights[0][:, 4:7].expand(5, -1, -1)
    for weight, slope in zip(weights[1:], slopes, strict=True):
        jacobian = weight @ (slope.unsqueeze(-1) * jacobian)
    expected = jacobian.diagonal(dim1=-2, dim2=-1).sum(-1)
    trace = chain_trace(weights, slopes, start=4).expand(5)
    torch.testing.assert_close(trace, expected, atol=1e-12, rtol=1e-12)
    assert expected.abs().min() > 1e-3  # not vacuous
    for a, b in zip(torch.autograd.grad(trace.sum(), weights + slopes),
                    torch.autograd.grad(expected.sum(), weights + slopes), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="K - 1 slopes"):
        chain_trace(weights, slopes + [slopes[0]] if slopes else [randn(5, 3)])
    with pytest.raises(ValueError, match="no 3 input columns from 8"):
        chain_trace(weights, slopes, start=8)


def test_sequential_trace_of_an_mlp_and_its_bad_layers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Identity(), nn.Linear(8, 8), nn.SiLU(),
                        nn.Softplus(), nn.Linear(8, 3)).double()  # fmt: skip
    z, side = randn(4, 3), randn(4, 2, seed=1)  # the input is (side, z)
    y, trace = sequential_trace(net, torch.cat([side, z], -1), 3, start=2)
    torch.testing.assert_close(y, net(torch.cat([side, z], -1)), atol=1e-14, rtol=0)
    expected = per_sample_jacobian(lambda v: net(torch.cat([side, v], -1)), z).diagonal(dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(trace, expected, atol=1e-13, rtol=0)
    h = torch.cat([side, z], -1)
    with pytest.raises(ValueError, match="starting with a linear layer, got LayerNorm"):
        sequential_trace([nn.LayerNorm(5).double()], h, 3)
    with pytest.raises(ValueError, match="starting with a linear layer, got SiLU"):
        sequential_trace([nn.SiLU(), *net], h, 3)
    with pytest.raises(ValueError, match="end with a linear layer of 3 outputs"):
        sequential_trace([*net, nn.Tanh()], h, 3)


@pytest.mark.parametrize("start", [0, 1, 3])
def test_sequential_trace_with_constant_inputs_in_the_bias(start):
    """Inputs [c[:start], z, c[start:]] with c the same for every row: the output, the trace and their gradients
    (weights and c) equal those of the network on the inputs concatenated."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    z, c = randn(4, 3), randn(3, seed=1).requires_grad_(True)
    h = torch.cat([c[:start].expand(4, -1), z, c[start:].expand(4, -1)], -1)
    y, trace = sequential_trace(net, z, 3, start=start, constant=c)
    expected_y, expected_trace = sequential_trace(net, h, 3, start=start)
    torch.testing.assert_close(y, net(h), atol=1e-14, rtol=0)
    cat = lambda v: torch.cat([c[:start].expand(4, -1), v, c[start:].expand(4, -1)], -1)  # noqa: E731
    expected = per_sample_jacobian(lambda v: net(cat(v)), z).diagonal(dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(trace, expected, atol=1e-13, rtol=0)
    inputs = [*net.parameters(), c]
    grads = torch.autograd.grad(y.square().sum() + trace.sum(), inputs)
    expected_grads = torch.autograd.grad(expected_y.square().sum() + expected_trace.sum(), inputs)
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    weight, bias = fold_constant_inputs(net[0].weight, None, c, start, 3)  # no bias: W^(c) c alone
    torch.testing.assert_close(bias, net[0].weight[:, [k for k in range(6) if not start <= k < start + 3]] @ c)
    with pytest.raises(ValueError, match="3 from z .from column 4. and 3 constant ones, got constant"):
        sequential_trace(net, z, 3, start=4, constant=c)
    with pytest.raises(ValueError, match="and 3 constant ones, got constant .2,."):
        sequential_trace(net, z, 3, start=0, constant=c[:2])


@pytest.mark.parametrize("hidden", [(16,), (16, 16), (8, 16, 8)])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_forward_and_trace_match_the_field_and_the_autograd_trace(hidden, dtype):
    torch.manual_seed(0)
    field = perturb(VectorField(3, hidden=hidden, context_features=2), scale=0.5).to(dtype)
    z, c = randn(6, 3, dtype=dtype), randn(6, 2, seed=1, dtype=dtype)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == F64 else dict(atol=2e-5, rtol=1e-5)
    for t in (torch.tensor(0.3, dtype=dtype), 0.7, torch.rand(6, dtype=dtype)):  # one time, a time per sample
        f, trace = field.forward_and_trace(z, t, c)
        torch.testing.assert_close(f, field(z, t, c), **tol)
        expected = per_sample_jacobian(lambda v, t=t: field(v, t, c), z).diagonal(dim1=-2, dim2=-1).sum(-1)
        assert trace.shape == (6,) and expected.abs().max() > 0.05  # not vacuous
        torch.testing.assert_close(trace, expected, **tol)


class AutogradOnly(nn.Module):
    """The same field without ``forward_and_jacobian``: the layer then takes the trace by autograd."""

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field = field

    def forward(self, z, t, context=None):
        return self.field(z, t, context)


@pytest.mark.parametrize("field", ["concatsquash", "residual"])
@pytest.mark.parametrize("adjoint", [False, True], ids=["direct", "adjoint"])
def test_forward_jacobian_trace_equals_the_autograd_trace_in_values_and_gradients(field, adjoint):
    fast = perturbed_layer(T.ConditionalContinuousFlow, seed=4, field=field, context_features=2, adjoint=adjoint)
    slow = copy.deepcopy(fast)
    slow.vector_field = AutogradOnly(slow.vector_field)
    x0, c0 = randn(5, 3, seed=5), randn(5, 2, seed=6)

    def solve(layer):
        x, c = x0.clone().requires_grad_(True), c0.clone().requires_grad_(True)
        with record_regularization([layer]) as solves:
            y, ladj = layer.inverse_and_ladj(x, c)
        loss = y.square().sum() + ladj.sum() + solves[0]["kinetic"].sum() + solves[0]["jacobian"].sum()
        return (y, ladj, solves[0]["jacobian"], layer.nfe), torch.autograd.grad(loss, [x, c, *layer.parameters()])

    (values_fast, grads_fast), (values_slow, grads_slow) = solve(fast), solve(slow)
    assert values_fast[-1] == values_slow[-1]  # the same steps
    for a, b in zip(values_fast[:-1], values_slow[:-1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    # the adjoint's backward solve is adaptive too (max norm): the two fields' rounding may move a step there
    grad_tol = dict(atol=1e-8, rtol=1e-7) if adjoint else dict(atol=1e-9, rtol=1e-8)
    for a, b in zip(grads_fast, grads_slow, strict=True):
        torch.testing.assert_close(a, b, **grad_tol)
    with torch.no_grad():  # log_prob's path: no graph, the same numbers
        torch.testing.assert_close(fast.inverse_and_ladj(x0, c0)[1], values_slow[1], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
@pytest.mark.parametrize("own_trace", [True, False], ids=["own-trace", "autograd"])
def test_a_solve_without_a_graph_gives_the_same_normal_tensors(trace, own_trace):
    """Under no_grad the field's own trace runs in inference mode, an autograd trace builds its graph inside the
    dynamics: both give the values of a solve with a graph, as tensors that a later graph may use."""
    layer = perturbed_layer(seed=7, trace=trace)
    if not own_trace:
        layer.vector_field = AutogradOnly(layer.vector_field)
    x = randn(6, 3, seed=8)
    torch.manual_seed(0)
    expected = [v.detach() for v in layer.inverse_and_ladj(x)]
    torch.manual_seed(0)  # the same Hutchinson probe
    with torch.no_grad():
        y, ladj = layer.inverse_and_ladj(x)
    assert not (y.is_inference() or ladj.is_inference() or layer.regularization["kinetic"].is_inference())
    torch.testing.assert_close(y, expected[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj, expected[1], atol=1e-12, rtol=0)
    w = torch.ones(6, dtype=F64, requires_grad=True)
    (w * ladj.add_(1.0)).sum().backward()  # modified in place and a constant of a later graph
    torch.testing.assert_close(w.grad, expected[1] + 1.0)


@pytest.mark.parametrize("adjoint", [False, True], ids=["direct", "adjoint"])
def test_trace_only_solve_equals_the_autograd_trace_in_values_and_gradients(adjoint):
    """Outside record_regularization the exact trace comes from ``forward_and_trace`` (no Jacobian)."""
    fast = perturbed_layer(T.ConditionalContinuousFlow, seed=4, context_features=2, adjoint=adjoint)
    slow = copy.deepcopy(fast)
    slow.vector_field = AutogradOnly(slow.vector_field)
    x0, c0 = randn(5, 3, seed=5), randn(5, 2, seed=6)
    calls = []
    trace = fast.vector_field.forward_and_trace
    fast.vector_field.forward_and_trace = lambda *args: calls.append(1) or trace(*args)

    def solve(layer):
        x, c = x0.clone().requires_grad_(True), c0.clone().requires_grad_(True)
        y, ladj = layer.inverse_and_ladj(x, c)
        loss = y.square().sum() + ladj.sum() + layer.regularization["kinetic"].sum()
        grads = torch.autograd.grad(loss, [x, c, *layer.parameters()])
        return (y, ladj, layer.regularization["kinetic"], layer.nfe), grads, sorted(layer.regularization)

    (values_fast, grads_fast, keys), (values_slow, grads_slow, _) = solve(fast), solve(slow)
    assert calls and keys == ["kinetic"] and values_fast[-1] == values_slow[-1]  # the same steps
    for a, b in zip(values_fast[:-1], values_slow[:-1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    for a, b in zip(grads_fast, grads_slow, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-8)


class TimeRecorder(nn.Module):
    """f(z, t) = A z, recording the times it is evaluated at."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a, self.times = nn.Parameter(a), []

    def forward(self, z, t, context=None):
        self.times.append(float(t))
        return z @ self.a.T


@pytest.mark.parametrize("start, end", [(0.0, 1.0), (1.0, 0.0)])
def test_adaptive_solve_ends_on_a_step_at_t1_not_past_it(start, end):
    """torchdiffeq's default steps past t1 and interpolates; ContinuousFlow's last step lands on t1."""
    field = TimeRecorder(matrix(3, seed=2, scale=2.0))
    layer = T.ContinuousFlow(3, field, t0=start, t1=end, atol=1e-6, rtol=1e-6)
    y, ladj = layer.call_and_ladj(randn(4, 3))
    # nothing outside [0, 1] (torchdiffeq evaluates a step's last stage one ulp inside its end)
    assert len(field.times) > 10 and min(field.times) > -1e-12 and 1 - 1e-12 < max(field.times) <= 1.0
    torch.testing.assert_close(ladj, torch.full((4,), (end - start) * field.a.trace().item(), dtype=F64))
    # a user's own step_t is kept (here: none at the end, so the solver may pass it)
    field.times.clear()
    T.ContinuousFlow(
        3, field, t0=start, t1=end, atol=1e-6, rtol=1e-6, options={"step_t": torch.tensor([0.5])}
    ).call_and_ladj(randn(4, 3))
    assert any(abs(t - 0.5) < 1e-12 for t in field.times)


def test_state_norm_is_the_largest_error_of_z_and_the_log_det_per_element():
    state = torch.tensor([[0.5, -3.0, 2.0, 9.0], [0.1, 0.2, -2.5, 9.0]])  # [z (D = 2), log-det, kinetic]
    assert state_norm(state, 2).item() == 3.0  # the regularisation integral does not shrink steps
    assert state_norm(state[:, [0, 2, 1, 3]], 2).item() == 3.0
    # one sample's error is held to the tolerance whatever the batch around it (an RMS would dilute it)
    assert state_norm(torch.cat([state, torch.zeros(1000, 4)]), 2).item() == 3.0


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_mean_converges_to_the_exact_trace(probe):
    field, z, f0 = field_and_point(seed=1)
    exact_trace, exact_frobenius = exact_divergence(f0, z, None, False)
    repeats = 20000
    zs = z.detach().repeat(repeats, 1).requires_grad_(True)
    f = field(zs, torch.tensor(0.3, dtype=F64))
    torch.manual_seed(2)
    eps = torch.randn_like(zs) if probe == "gaussian" else torch.randint_like(zs, 2) * 2 - 1
    trace_est, frobenius_est = hutchinson_divergence(f, zs, eps, False)
    mean = trace_est.reshape(repeats, 6).mean(0)
    sem = trace_est.reshape(repeats, 6).std(0) / math.sqrt(repeats)
    assert ((mean - exact_trace).abs() < 5 * sem + 1e-12).all()
    torch.testing.assert_close(frobenius_est.reshape(repeats, 6).mean(0), exact_frobenius, rtol=0.05, atol=0)


# -- the layer -----------------------------------------------------------------------------------------------------
def test_fresh_layer_is_the_identity():
    layer = T.ContinuousFlow(3)
    x = randn(5, 3, dtype=torch.float32)
    y, ladj = layer.call_and_ladj(x)
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)  # f = 0: only the solver's interpolation rounds
    assert torch.equal(ladj, torch.zeros(5))


@pytest.mark.parametrize("trace, field", [("exact", "concatsquash"), ("hutchinson", "concatsquash"),
                                          ("exact", "residual")])  # fmt: skip
def test_round_trip(trace, field):
    layer = perturbed_layer(trace=trace, field=field, **TIGHT)
    x = 2 * randn(8, 3, seed=6)
    y, ladj = layer.call_and_ladj(x)
    assert (y - x).abs().max() > 0.1
    x_back, ladj_back = layer.inverse_and_ladj(y.clone())
    torch.testing.assert_close(x_back, x, atol=1e-8, rtol=0)
    if trace == "exact":
        torch.testing.assert_close(ladj_back, -ladj, atol=1e-8, rtol=0)


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_adjoint_gradients_equal_direct_gradients(conditional, trace):
    kwargs = dict(trace=trace, atol=1e-9, rtol=1e-9)
    cls = T.ConditionalContinuousFlow if conditional else T.ContinuousFlow
    if conditional:
        kwargs["context_features"] = 2
    direct = perturbed_layer(cls, seed=3, **kwargs)
    adjoint = copy.deepcopy(direct)
    adjoint.adjoint = True
    x0, w = randn(5, 3, seed=7), randn(5, 3, seed=8)
    c0 = randn(5, 2, seed=9) if conditional else None

    def gradients(layer):
        x = x0.clone().requires_grad_(True)
        c = None if c0 is None else c0.clone().requires_grad_(True)
        torch.manual_seed(10)  # the same Hutchinson probes
        with record_regularization([layer]) as solves:
            y, ladj = layer.call_and_ladj(x, c)
        loss = (w * y).sum() + ladj.sum() + solves[0]["kinetic"].sum()
        leaves = [x, *layer.parameters()] + ([] if c is None else [c])
        return torch.autograd.grad(loss, leaves)

    for g_direct, g_adjoint in zip(gradients(direct), gradients(adjoint), strict=True):
        assert g_direct.abs().max() > 1e-6
        torch.testing.assert_close(g_adjoint, g_direct, atol=1e-6, rtol=1e-5)


def test_nfe_and_solver_options_pass_through():
    layer = perturbed_layer(solver="rk4", options={"step_size": 0.1})
    layer.call_and_ladj(randn(4, 3))
    assert layer.nfe == 40  # 10 steps of 4 stages
    layer = perturbed_layer(atol=1e-3, rtol=1e-3)
    layer.call_and_ladj(randn(4, 3))
    loose = layer.nfe
    layer.atol = layer.rtol = 1e-8
    layer.call_and_ladj(randn(4, 3))
    assert layer.nfe > loose


def test_adaptive_solvers_get_the_safety_factor_unless_given(monkeypatch):
    """dopri5 gets SAFETY (0.8), an explicit ``options["safety"]`` wins, a fixed-grid solver gets none."""
    import torchdiffeq

    seen = []
    odeint = torchdiffeq.odeint

    def recording(*args, **kwargs):
        seen.append(kwargs["options"])
        return odeint(*args, **kwargs)

    monkeypatch.setattr(torchdiffeq, "odeint", recording)
    x = randn(4, 3)
    for layer in (perturbed_layer(), perturbed_layer(options={"safety": 0.9}), perturbed_layer(solver="rk4", steps=4)):
        layer.call_and_ladj(x)
    assert [o.get("safety") for o in seen] == [SAFETY, 0.9, None] and SAFETY == 0.8


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="trace"):
        T.ContinuousFlow(2, trace="diagonal")
    with pytest.raises(ValueError, match="probe"):
        T.ContinuousFlow(2, trace="hutchinson", probe="uniform")
    with pytest.raises(ValueError, match="time span"):
        T.ContinuousFlow(2, t0=1.0, t1=1.0)
    with pytest.raises(ValueError, match=r"unknown field 'unet'; known: \['concatsquash', 'residual'\]"):
        T.ContinuousFlow(2, field="unet")
    with pytest.raises(ValueError, match="one common width"):
        ResidualVectorField(2, hidden=(16, 8))
    with pytest.raises(ValueError, match="time_features must be an even integer >= 4"):
        ResidualVectorField(2, time_features=5)


def test_residual_vector_field_is_its_formula():
    """h0 = W0 (z, s), h_l = h_(l-1) + B_l σ(A_l σ(h_(l-1)) + V_l s), f = W_out σ(h_L), s = (e(t), c) with
    e(t) = (cos ω t, sin ω t), ω = 32π, 16π, ..., π (6 of them for 12 features); a fresh field is zero."""
    assert torch.equal(ResidualVectorField(2, (8, 8), 3)(torch.randn(4, 2), 0.5, torch.randn(4, 3)), torch.zeros(4, 2))
    field = perturb(ResidualVectorField(2, hidden=(8, 8), context_features=3).double(), seed=0)
    z, c, t = randn(5, 2), randn(5, 3, seed=1), torch.rand(5, generator=torch.Generator().manual_seed(2), dtype=F64)
    omega = math.pi * 2.0 ** torch.arange(5, -1, -1, dtype=F64)
    angles = t.unsqueeze(-1) * omega
    s = torch.cat([angles.cos(), angles.sin(), c], -1)
    silu = nn.functional.silu
    h = field.input(torch.cat([z, s], -1))
    for inner, lateral, outer in zip(field.inner, field.side, field.outer, strict=True):
        h = h + outer(silu(inner(silu(h)) + lateral(s)))
    torch.testing.assert_close(field(z, t, c), field.output(silu(h)), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(field(z, t[0], c), field(z, t[0].expand(5), c), atol=1e-12, rtol=0)  # one time


# -- factories and objectives --------------------------------------------------------------------------------------
def test_cnf_factory():
    flow = pf.CNF(2, hidden=(8,), trace="hutchinson", solver="rk4", options={"step_size": 0.25})
    (layer,) = flow.transforms
    assert isinstance(layer, T.ContinuousFlow) and layer.trace == "hutchinson" and layer.solver == "rk4"
    assert pf.FFJORD(2).transforms[0].trace == "hutchinson"
    conditional = pf.CNF(2, context=3)
    assert isinstance(conditional.transforms[0], T.ConditionalContinuousFlow)
    assert conditional(torch.randn(4, 3)).log_prob(torch.randn(4, 2)).shape == (4,)


def test_flow_matching_needs_one_continuous_flow_on_a_standard_normal():
    x = torch.randn(8, 2)
    for model in (pf.RealNVP(2), pf.Flow(pf.StandardNormal(2), [T.ContinuousFlow(2), T.ContinuousFlow(2)])):
        with pytest.raises(ValueError, match="exactly one ContinuousFlow"):
            pf.FlowMatching()(model, x, None)
    with pytest.raises(ValueError, match="sigma_min"):
        pf.FlowMatching(sigma_min=1.5)


def test_flow_matching_loss_is_zero_for_the_exact_straight_line_field():
    """Data = the base samples shifted by 2m, over a time span of length 2: the straight paths have the constant
    velocity m, which OT pairing recovers from a shuffled batch (the identity pairing minimises the squared cost)."""
    m = torch.tensor([2.0, -1.0], dtype=F64)

    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = nn.Parameter(m.clone())

        def forward(self, z, t, context=None):
            return self.m.expand_as(z)

    flow = pf.Flow(pf.StandardNormal(2), [T.ContinuousFlow(2, Constant(), t0=0.0, t1=2.0)]).double()
    torch.manual_seed(0)
    z = torch.randn(64, 2, dtype=F64)
    shuffled = (z + 2 * m)[torch.randperm(64, generator=torch.Generator().manual_seed(1))]
    torch.manual_seed(0)  # FlowMatching draws the same z0, which OT pairs with z0 + 2m row by row
    assert pf.FlowMatching(ot_pairing=True)(flow, shuffled, None).item() < 1e-20
    torch.manual_seed(0)
    assert pf.FlowMatching()(flow, shuffled, None).item() > 1.0


def test_regularized_nll_adds_the_weighted_integrals_of_the_same_solve():
    torch.manual_seed(0)
    flow = pf.CNF(2, hidden=(8,))
    perturb(flow, scale=0.3, seed=1)
    x = torch.randn(16, 2)
    loss = pf.CNFRegularizedNLL(kinetic=0.5, jacobian=2.0)(flow, x, None)
    (layer,) = flow.transforms
    regularization = layer.regularization
    nll = -flow().log_prob(x.clone()).mean()
    expected = nll + 0.5 * regularization["kinetic"].mean() + 2.0 * regularization["jacobian"].mean()
    torch.testing.assert_close(loss, expected)
    assert regularization["kinetic"].min() > 0 and regularization["jacobian"].min() > 0
    with pytest.raises(ValueError, match="no ContinuousFlow"):
        pf.CNFRegularizedNLL()(pf.RealNVP(2), x, None)


def test_the_layer_keeps_no_graph_alive_after_a_solve():
    """Issue 16 (noticed): the regularisers kept on the layer are detached; the objective's are attached."""
    flow = pf.CNF(2, hidden=(8,))
    perturb(flow, scale=0.3, seed=1)
    (layer,) = flow.transforms
    flow().log_prob(torch.randn(16, 2)).sum().backward()
    assert all(not value.requires_grad for value in layer.regularization.values())
    x, weight = torch.randn(16, 2), next(flow.parameters())
    loss = pf.CNFRegularizedNLL(kinetic=1.0, jacobian=0.0)(flow, x, None)
    assert all(not value.requires_grad for value in layer.regularization.values()) and layer._recorder is None
    kinetic = layer.regularization["kinetic"].mean()
    plain = pf.CNFRegularizedNLL(kinetic=0.0, jacobian=0.0)(flow, x, None)
    torch.testing.assert_close(loss - plain, kinetic)  # the same solve's integral, added once
    # the kinetic term reaches the parameters' gradient through the recorded, attached integral
    assert not torch.allclose(torch.autograd.grad(loss, weight)[0], torch.autograd.grad(plain, weight)[0])


def _held_out_gain(flow, train, test):
    """Mean held-out log-likelihood over a fitted Gaussian's, the flow's by an accurate solve (dopri5, 1e-5)."""
    layer = flow.transforms[0]
    layer.solver, layer.options, layer.atol, layer.rtol = "dopri5", {}, 1e-5, 1e-5
    with torch.no_grad():
        flow_ll = flow().log_prob(test).mean().item()
    return flow_ll - gaussian_log_density(train, test).mean().item()


@pytest.mark.parametrize(
    "objective, solver, batch_size, steps",
    [
        (None, dict(solver="rk4", options={"step_size": 0.25}), 64, 200),  # MLE, trained with a cheap fixed-step solver
        (pf.FlowMatching(), {}, 256, 400),  # no ODE during training
    ],
    ids=["mle", "flow-matching"],
)
def test_learns_two_moons_better_than_a_gaussian(objective, solver, batch_size, steps):
    generator = torch.Generator().manual_seed(0)
    train, test = two_moons(2000, generator=generator), two_moons(500, generator=generator)
    torch.manual_seed(0)
    flow = pf.CNF(2, hidden=(32, 32), **solver)
    pf.fit(flow, train, objective=objective, max_steps=steps, batch_size=batch_size, lr=1e-2, seed=0, progress=False)
    assert _held_out_gain(flow, train, test) > 0.25  # measured: 0.37 (MLE), 0.40 (flow matching)


def test_flow_matching_loss_is_the_straight_path_regression_with_sigma_min_and_context():
    torch.manual_seed(0)
    flow = pf.CNF(2, context=3, hidden=(8,), t0=1.0, t1=3.0).double()
    perturb(flow, scale=0.3, seed=2)
    (layer,) = flow.transforms
    x, c, sigma = randn(16, 2, seed=11), randn(16, 3, seed=12), 0.1
    torch.manual_seed(5)
    loss = pf.FlowMatching(sigma_min=sigma)(flow, x, c)
    torch.manual_seed(5)  # the same z0 and t
    z0 = torch.randn_like(x)
    t = torch.rand(16, 1, dtype=F64)
    x_t = (1 - (1 - sigma) * t) * z0 + t * x
    velocity = layer.vector_field(x_t, 1.0 + 2.0 * t.squeeze(-1), c)  # time span (1, 3): s = t0 + t (t1 - t0)
    expected = (2.0 * velocity - (x - (1 - sigma) * z0)).square().sum(-1).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in layer.parameters())


def test_conditional_flow_matching_learns_the_context():
    """Two contexts, two clusters: each context's density is higher on its own cluster."""
    generator = torch.Generator().manual_seed(0)
    c = torch.randint(0, 2, (1000, 1), generator=generator).float()
    x = (4 * c - 2) * torch.ones(1, 2) + 0.3 * torch.randn(1000, 2, generator=generator)
    torch.manual_seed(0)
    flow = pf.CNF(2, context=1, hidden=(32, 32))
    pf.fit(flow, x, c, objective=pf.FlowMatching(ot_pairing=True), max_steps=300, lr=1e-2, seed=0, progress=False)
    points = torch.tensor([[-2.0, -2.0], [2.0, 2.0]])
    with torch.no_grad():
        own = flow(torch.tensor([[0.0], [1.0]])).log_prob(points)
        other = flow(torch.tensor([[1.0], [0.0]])).log_prob(points)
    assert (own - other > 3.0).all(), (own, other)

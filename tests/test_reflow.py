"""Rectified flow: fixed-step solvers, straightness, reflow and the sliced Wasserstein distance, by closed forms."""

import contextlib
import math

import pytest
import torch
from conftest import perturb
from torch import nn

import pyro_flows as pf
from pyro_flows.diagnostics import sliced_wasserstein
from pyro_flows.objectives import reflow_pairs, straightness


class Dilation(nn.Module):
    r""":math:`f(x, t) = a x / (1 + a t)`: :math:`x(t) = (1 + a t) x_0`, a straight line at the constant speed
    :math:`a x_0`; :math:`\log|\det \partial x_1 / \partial x_0| = D \log(1 + a)`."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))

    def forward(self, z, t, context=None):
        return self.a * z / (1 + self.a * t)


class Rotation(nn.Module):
    r""":math:`f(x, t) = \omega J x`, :math:`J` the quarter turn: :math:`x(t) = R(\omega t) x_0`, an arc."""

    def __init__(self, omega: float) -> None:
        super().__init__()
        self.omega = nn.Parameter(torch.tensor(omega, dtype=torch.float64))

    def forward(self, z, t, context=None):
        return self.omega * torch.stack((-z[..., 1], z[..., 0]), dim=-1)


def cnf(field: nn.Module) -> pf.Flow:
    return pf.CNF(2, vector_field=field, atol=1e-9, rtol=1e-9).double()


def push(flow: pf.Flow, x0: torch.Tensor, steps=None, solver="euler"):
    layer = flow.transforms[0]
    with torch.no_grad(), pf.fixed_steps(flow, steps, solver) if steps else contextlib.nullcontext():
        return layer.call_and_ladj(x0)


X0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_one_euler_step_is_exact_for_a_straight_constant_speed_field_and_not_for_a_curved_one():
    x1, _ = push(cnf(Dilation(0.7)), X0, steps=1)
    torch.testing.assert_close(x1, 1.7 * X0, rtol=1e-12, atol=1e-12)
    omega = 1.2
    x1, _ = push(cnf(Rotation(omega)), X0, steps=1)
    c, s = math.cos(omega), math.sin(omega)
    exact = torch.stack((c * X0[:, 0] - s * X0[:, 1], s * X0[:, 0] + c * X0[:, 1]), dim=-1)
    assert (x1 - exact).norm(dim=-1).min() > 0.1  # Euler leaves the arc: |(I + ωJ - R(ω)) x0| > 0


def test_fixed_step_likelihood_converges_to_the_adaptive_one_and_the_closed_form():
    a = 0.7
    flow = cnf(Dilation(a))
    x = 1.7 * X0
    exact = torch.distributions.Normal(0.0, 1.0).log_prob(X0).sum(-1) - 2 * math.log(1 + a)
    with torch.no_grad():
        adaptive = flow().log_prob(x)
        with pf.fixed_steps(flow, 32, "rk4"):
            rk4 = flow().log_prob(x)
        errors = []
        for steps in (50, 200):
            with pf.fixed_steps(flow, steps, "euler"):
                errors.append((flow().log_prob(x) - exact).abs().max().item())
    torch.testing.assert_close(adaptive, exact, rtol=0, atol=1e-7)
    torch.testing.assert_close(rk4, exact, rtol=0, atol=1e-7)
    assert errors[1] < errors[0] / 3  # Euler is first order: 4x the steps, ~1/4 of the error


def test_fixed_step_likelihood_of_a_random_cnf_agrees_with_the_adaptive_one():
    torch.manual_seed(0)
    flow = perturb(pf.CNF(2, hidden=(16, 16), atol=1e-9, rtol=1e-9).double(), scale=0.5)
    x = torch.randn(32, 2, dtype=torch.float64)
    with torch.no_grad():
        adaptive = flow().log_prob(x)
        with pf.fixed_steps(flow, 64, "rk4"):
            fixed = flow().log_prob(x)
        with pf.fixed_steps(flow, 1, "euler"):
            coarse = flow().log_prob(x)
    base = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)
    assert (adaptive - base).abs().max() > 0.05  # the flow moves the density
    torch.testing.assert_close(fixed, adaptive, rtol=0, atol=1e-6)
    assert (coarse - adaptive).abs().max() > 1e-3  # one step is not the same integral: the check can fail


def test_straightness_is_zero_for_straight_trajectories_and_the_arc_excess_for_rotations():
    assert abs(straightness(cnf(Dilation(0.7)), base=X0).item()) < 1e-8
    omega = 1.2  # per row: ∫|u|^2 - |x1 - x0|^2 = |x0|^2 (ω^2 - 2 (1 - cos ω))
    expected = X0.square().sum(-1).mean() * (omega**2 - 2 * (1 - math.cos(omega)))
    torch.testing.assert_close(straightness(cnf(Rotation(omega)), base=X0), expected, rtol=1e-6, atol=0)
    assert straightness(cnf(Rotation(omega)), base=X0, steps=64).item() == pytest.approx(expected.item(), rel=1e-5)


def test_reflow_pairs_are_base_draws_and_their_images_by_the_ode():
    flow = cnf(Dilation(0.5))
    pairs = reflow_pairs(flow, base=X0)
    assert pairs.shape == (64, 2, 2)
    torch.testing.assert_close(pairs[:, 0], X0)
    torch.testing.assert_close(pairs[:, 1], 1.5 * X0, rtol=1e-7, atol=1e-7)
    drawn = reflow_pairs(flow, 100, steps=2)
    torch.testing.assert_close(drawn[:, 1], 1.5 * drawn[:, 0], rtol=1e-12, atol=1e-12)  # straight: 2 steps exact
    conditional = pf.CNF(2, context=3, hidden=(8,))
    context = torch.randn(5, 3)
    assert reflow_pairs(conditional, context=context, steps=2).shape == (5, 2, 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 0}, "n must be a positive"),
        ({}, "n must be a positive"),
        ({"base": torch.zeros(4, 3)}, "base must be rows"),
        ({"base": torch.zeros(4, 2), "n": 5}, "base must be rows"),
        ({"n": 4, "steps": 0}, "steps must be an integer >= 1"),
    ],
)
def test_reflow_refuses_bad_arguments(kwargs, match):
    flow = pf.CNF(2, hidden=(8,))
    with pytest.raises(ValueError, match=match):
        reflow_pairs(flow, **kwargs)
    with pytest.raises(ValueError, match=match):
        straightness(flow, **kwargs)


def test_reflow_makes_one_and_two_step_samples_better_on_two_moons():
    g = torch.Generator().manual_seed(0)
    data, held_out = pf.data.two_moons(4000, generator=g), pf.data.two_moons(1000, generator=g)
    z = torch.randn(1000, 2, generator=g)
    torch.manual_seed(0)
    flow = pf.CNF(2, hidden=(64, 64))
    pf.fit(flow, data, objective=pf.FlowMatching(), max_steps=300, batch_size=256, seed=0, progress=False)

    def quality(steps: int) -> float:
        x, _ = push(flow, z, steps)
        return sliced_wasserstein(x, held_out, generator=torch.Generator().manual_seed(1)).item()

    before, straight_before = [quality(k) for k in (1, 2)], straightness(flow, base=z, steps=8).item()
    pairs = reflow_pairs(flow, 2000, steps=8)
    pf.fit(flow, pairs, objective=pf.FlowMatching(coupling="pairs"), max_steps=300, batch_size=256, seed=0,
           progress=False)  # fmt: skip
    after, straight_after = [quality(k) for k in (1, 2)], straightness(flow, base=z, steps=8).item()
    # measured (seed 0): 1 step 0.51 -> 0.23, 2 steps 0.41 -> 0.22, straightness 0.20 -> 0.002
    assert after[0] < 0.7 * before[0] and after[1] < 0.8 * before[1], (before, after)
    assert straight_after < 0.2 * straight_before, (straight_before, straight_after)


def test_any_number_of_reflow_rounds():
    flow = pf.CNF(2, hidden=(16,))
    data = pf.data.two_moons(256, generator=torch.Generator().manual_seed(0))
    pf.fit(flow, data, objective=pf.FlowMatching(), max_steps=20, seed=0, progress=False)
    values = []
    for _ in range(3):
        pairs = reflow_pairs(flow, 256, steps=4)
        pf.fit(flow, pairs, objective=pf.FlowMatching(coupling="pairs"), max_steps=20, seed=0, progress=False)
        values.append(straightness(flow, 128, steps=4).item())
    assert pairs.shape == (256, 2, 2) and torch.isfinite(pairs).all()
    assert all(math.isfinite(v) and v > -1e-6 for v in values)


def test_sliced_wasserstein_of_identical_samples_is_zero():
    x = torch.randn(500, 3, generator=torch.Generator().manual_seed(0))
    assert sliced_wasserstein(x, x).item() == 0.0
    assert sliced_wasserstein(x, x[torch.randperm(500)]).item() == 0.0  # the empirical distribution, not the rows


def test_sliced_wasserstein_of_a_shift_is_the_rms_projected_shift():
    """y = x + s: every sorted projection moves by θ·s, so the estimate is (mean_k (θ_k·s)^2)^(1/2) exactly, whose
    square has mean |s|^2/D over uniform directions (E[θθᵀ] = I/D)."""
    x = torch.randn(1000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    value = sliced_wasserstein(x, x + s, projections=4096, generator=torch.Generator().manual_seed(1))
    directions = torch.randn(3, 4096, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    directions = directions / directions.norm(dim=0)
    torch.testing.assert_close(value, (s @ directions).square().mean().sqrt(), rtol=1e-10, atol=0)
    assert value.item() == pytest.approx(s.norm().item() / math.sqrt(3), rel=0.03)


@pytest.mark.parametrize("m", [2000, 3000])
def test_sliced_wasserstein_between_gaussians_matches_the_analytic_shift(m):
    """N(0, I) vs N(s, I). Per direction θ, W2^2 of two 1-D samples is (difference of means)^2 + W2^2 of the centred
    samples (exactly, for equal sizes: the centred sorted values sum to 0), so with the same directions
    SW(x, y)^2 = mean_k (θ_k·(ȳ - x̄))^2 + SW(x - x̄, y - ȳ)^2; the first term is |s|^2/D over uniform directions and
    the second the O(N^-1/2) sampling error. Unequal sizes go through the interpolated quantiles (≈)."""
    g = torch.Generator().manual_seed(0)
    s = torch.tensor([1.0, 0.5, -1.0, 0.0], dtype=torch.float64)
    x = torch.randn(2000, 4, generator=g, dtype=torch.float64)
    y = torch.randn(m, 4, generator=g, dtype=torch.float64) + s

    def sw(a, b):
        return sliced_wasserstein(a, b, projections=1024, generator=torch.Generator().manual_seed(1))

    directions = torch.randn(4, 1024, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    shift = ((y.mean(0) - x.mean(0)) @ (directions / directions.norm(dim=0))).square().mean()
    shape = sw(x - x.mean(0), y - y.mean(0))
    torch.testing.assert_close(sw(x, y).square(), shift + shape.square(), rtol=1e-10 if m == 2000 else 1e-3, atol=0)
    assert shape.item() < 0.08  # two samples of one law: O(N^-1/2)
    assert sw(x, y).item() == pytest.approx(s.norm().item() / 2, abs=0.03)  # |s| / sqrt(D)

"""``pf.fit``'s lean training step (issue 15, item 7): what was cut from each step keeps its behaviour.

The step trains with torch's fused Adam (the same algorithm as a plain ``torch.optim.Adam`` loop), clips the
gradients only when their norm is above ``clip_grad`` (with ``clip_grad_norm_``'s coefficient), refreshes the
rollback snapshot by identity of the live tensors (a tensor replaced in a module is still rolled back), checks a
loader's batch only when the loss or gradient is not finite, and the flow-matching objective checks its model
once per flow. Seeded runs repeat and resume bit for bit.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

import pyro_flows as pf
from pyro_flows import transforms as T
from pyro_flows.objectives import VP, CondOT, Cosine, Polynomial
from pyro_flows.train import _adam, _Snapshot


def quiet_fit(model, data, **kwargs):
    return pf.fit(model, data, progress=False, **kwargs)


class Quadratic(nn.Module):
    """A parameter vector ``w`` and a buffer ``calls`` that the objective *replaces* (a new tensor object) each call."""

    def __init__(self, start: tuple[float, ...]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(start))
        self.register_buffer("calls", torch.tensor(0.0))


def quadratic(scale: torch.Tensor, nan_at: frozenset[int] = frozenset()):
    """``objective(model, x, context) = (scale * w).sum() + 0.5 |w|^2``: gradient ``scale + w``; NaN at given calls."""

    def objective(model, x, context):
        model.calls = model.calls + 1  # re-registers the buffer: another tensor object than the snapshot's source
        loss = (scale * model.w).sum() + 0.5 * model.w.square().sum()
        return loss * math.nan if int(model.calls) in nan_at else loss

    return objective


# --------------------------------------------------------------------------- Adam and clipping


def test_fit_is_torchs_adam_with_the_fused_kernel_where_torch_has_it():
    """Full-batch NLL steps of pf.fit and of a plain ``torch.optim.Adam`` loop give the same weights."""
    torch.manual_seed(0)
    flow = pf.RealNVP(2, transforms=2, hidden=(8,))
    reference = copy.deepcopy(flow)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    quiet_fit(flow, x, batch_size=64, max_steps=5, lr=1e-2, clip_grad=None, seed=0)
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-2, foreach=False)
    for _ in range(5):
        optimizer.zero_grad()
        (-reference().log_prob(x).mean()).backward()
        optimizer.step()
    for a, b in zip(flow.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    parameters = list(nn.Linear(2, 2).parameters())
    assert _adam(parameters, 1e-3, 0.0).defaults["fused"]  # torch >= 2.4 has a fused Adam on the CPU
    complex_ = [nn.Parameter(torch.zeros(2, dtype=torch.complex64))]  # no fused kernel for these: foreach
    fallback = _adam(complex_, 1e-3, 0.0)
    assert not fallback.defaults["fused"] and fallback.defaults["foreach"]


@pytest.mark.parametrize(("scale", "clipped"), [(2.0, True), (0.5, False)])
def test_gradients_are_clipped_to_clip_grad_only_when_their_norm_is_above_it(tmp_path, scale, clipped):
    """Gradient (3, 4) x scale (norm 5 x scale) at w = 0; after one step Adam's first moment is 0.1 x the gradient
    it was given: clipped to norm 5 by clip_grad_norm_'s coefficient, or untouched."""
    model, path = Quadratic((0.0, 0.0)), tmp_path / "run.pt"
    gradient = torch.tensor([3.0, 4.0]) * scale
    quiet_fit(model, lambda: torch.zeros(2, 1), objective=quadratic(gradient), max_steps=1, steps_per_epoch=1,
              checkpoint=path, seed=0)  # fmt: skip
    moment = torch.load(path, weights_only=True)["optimizer"]["state"][0]["exp_avg"]
    reference = gradient.clone().requires_grad_()
    reference.grad = gradient.clone()
    nn.utils.clip_grad_norm_([reference], 5.0)
    expected = 0.1 * (reference.grad if clipped else gradient)
    torch.testing.assert_close(moment, expected, rtol=1e-6, atol=0)
    assert clipped == (float(expected.norm()) < 0.1 * float(gradient.norm()))


# --------------------------------------------------------------------------- rollback snapshot


def test_a_rollback_restores_a_buffer_that_the_step_replaced_and_adams_state():
    """Calls 1-3 good, call 4 NaN: back to the state before the last good update (after step 2), including the
    buffer the objective re-registers at each call (new tensor objects, not the ones the snapshot copied before)."""
    reference = Quadratic((1.0, -2.0))
    scale = torch.tensor([0.5, 1.5])
    quiet_fit(reference, lambda: torch.zeros(2, 1), objective=quadratic(scale), max_steps=2, steps_per_epoch=2,
              lr=0.1, seed=0)  # fmt: skip
    model = Quadratic((1.0, -2.0))
    with pytest.warns(RuntimeWarning, match=r"non-finite loss \(nan\) at step 4; rolled back .* 0\.05"):
        history = quiet_fit(model, lambda: torch.zeros(2, 1), objective=quadratic(scale, frozenset({4})),
                            max_epochs=1, steps_per_epoch=4, lr=0.1, seed=0)  # fmt: skip
    assert history.recoveries == 1 and history.steps == 3
    assert torch.equal(model.w, reference.w) and float(model.calls) == 2.0 == float(reference.calls)


def test_the_snapshot_copies_in_place_while_the_live_tensors_are_the_same_and_afresh_when_one_is_replaced():
    model = Quadratic((1.0, 2.0))
    optimizer = _adam(list(model.parameters()), 0.1, 0.0)
    model.w.grad = torch.ones(2)
    optimizer.step()
    snapshot, modules = _Snapshot(), list(model.modules())
    snapshot.take(modules, optimizer)
    copies = list(snapshot.copies)
    with torch.no_grad():
        model.w += 1.0
    snapshot.take(modules, optimizer)
    assert all(a is b for a, b in zip(copies, snapshot.copies, strict=True))  # refreshed in place
    assert torch.equal(snapshot.copies[0], model.w.detach()) and not snapshot.copies[0].requires_grad
    model.calls = torch.tensor(7.0)  # a replaced buffer: fresh copies of the new objects
    snapshot.take(modules, optimizer)
    assert snapshot.copies[0] is not copies[0] and float(snapshot.copies[1]) == 7.0
    before = model.w.detach().clone()
    with torch.no_grad():
        model.w.mul_(math.nan)
    optimizer.state[model.w]["exp_avg"].fill_(math.nan)
    snapshot.restore(modules, optimizer)
    assert torch.equal(model.w.detach(), before) and torch.isfinite(optimizer.state[model.w]["exp_avg"]).all()


# --------------------------------------------------------------------------- data checks


def test_a_callables_nan_batch_is_still_a_data_error_when_the_objective_raises_or_diverges():
    x = torch.randn(10, 2)
    x[3, 1] = math.nan
    flow = pf.CNF(2, hidden=(8,))
    for objective in (pf.FlowMatching(), pf.NegativeLogLikelihood()):
        with pytest.raises(ValueError, match=r"batch 1 of epoch 1 .* NaN or inf values in row 3"):
            quiet_fit(flow, lambda: x, objective=objective, max_steps=1, steps_per_epoch=1)

    def refuses(model, x, context):
        if not torch.isfinite(x).all():
            raise RuntimeError("the objective refused the batch")
        return sum(p.sum() for p in model.parameters())

    with pytest.raises(ValueError, match=r"NaN or inf values in row 3"):
        quiet_fit(flow, lambda: x, objective=refuses, max_steps=1, steps_per_epoch=1)


# --------------------------------------------------------------------------- the flow-matching objective


@pytest.mark.parametrize("scheduler", [CondOT(), CondOT(0.2), VP(), Cosine(), Polynomial(3.0)], ids=repr)
def test_a_schedulers_path_is_its_coefficients_affine_combination(scheduler):
    generator = torch.Generator().manual_seed(0)
    t = torch.rand(50, 1, generator=generator, dtype=torch.float64)
    x0, x1 = (torch.randn(50, 3, generator=generator, dtype=torch.float64) for _ in range(2))
    alpha, sigma, d_alpha, d_sigma = scheduler(t)
    x_t, velocity = scheduler.path(t, x0, x1)
    torch.testing.assert_close(x_t, alpha * x1 + sigma * x0)
    torch.testing.assert_close(velocity, d_alpha * x1 + d_sigma * x0)


def test_the_default_flow_matching_loss_is_the_straight_path_regression_for_rows_and_for_pairs():
    torch.manual_seed(0)
    flow = pf.CNF(2, hidden=(8,)).double()
    (layer,) = flow.transforms
    x = torch.randn(16, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for coupling in ("independent", "pairs"):
        torch.manual_seed(3)
        loss = pf.FlowMatching(coupling=coupling)(flow, x if coupling == "pairs" else x[:, 1])
        torch.manual_seed(3)
        z0 = x[:, 0] if coupling == "pairs" else torch.randn(16, 2, dtype=torch.float64)
        t = torch.rand(16, 1, dtype=torch.float64)
        x_t = (1 - t) * z0 + t * x[:, 1]
        expected = (layer.vector_field(x_t, t.squeeze(-1), None) - (x[:, 1] - z0)).square().sum(-1).mean()
        torch.testing.assert_close(loss, expected)


def test_flow_matching_checks_each_flow_once_and_again_when_its_layers_change():
    objective = pf.FlowMatching()
    flow, x = pf.CNF(2, hidden=(8,)), torch.randn(8, 2)
    objective(flow, x)
    with pytest.raises(ValueError, match="exactly one ContinuousFlow"):
        objective(pf.RealNVP(2), x)  # another model: checked
    objective(flow, x)
    flow.transforms.append(T.AffineCoupling(2))  # the same flow, changed: checked again
    with pytest.raises(ValueError, match="must be fixed, unconditional bijections"):
        objective(flow, x)
    # copies and pickles leave the checked flow out, and work
    for clone in (copy.deepcopy(objective), pickle.loads(pickle.dumps(objective))):
        assert clone._checked is None and clone(pf.CNF(2, hidden=(8,)), x).shape == ()


def test_seeded_flow_matching_fits_repeat_and_resume_bit_for_bit(tmp_path):
    x = pf.data.two_moons(256, generator=torch.Generator().manual_seed(0))

    def run(**kwargs) -> nn.Module:
        torch.manual_seed(0)
        flow = pf.CNF(2, hidden=(16, 16))
        quiet_fit(flow, x, objective=pf.FlowMatching(), batch_size=64, seed=3, **kwargs)
        return flow

    whole, again = run(max_steps=8), run(max_steps=8)
    path = tmp_path / "run.pt"
    run(max_steps=5, checkpoint=path)
    torch.manual_seed(0)
    resumed = pf.CNF(2, hidden=(16, 16))
    quiet_fit(resumed, x, objective=pf.FlowMatching(), batch_size=64, seed=3, max_steps=8, resume=path)
    for a, b, c in zip(whole.parameters(), again.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)

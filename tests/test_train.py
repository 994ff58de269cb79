"""Tests of the one fitting loop, ``pyro_flows.fit``: data kinds, objectives, validation and early stopping,
schedules, the progress bar, checkpoints and resume, and recovery from non-finite losses."""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings

import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import pyro_flows as pf
from pyro_flows import FitHistory, NegativeLogLikelihood
from pyro_flows.train import FitOptions

MIX = torch.tensor([[1.0, 0.9], [0.0, 0.4]])


def gaussian_rows(rows: int, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(rows, 2, generator=torch.Generator().manual_seed(seed)) @ MIX + shift


def small_flow(context: int = 0, seed: int = 0) -> pf.Flow:
    torch.manual_seed(seed)
    return pf.RealNVP(2, context=context, transforms=2, hidden=(16, 16))


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def nll(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(-model().log_prob(x).mean())


def checkpoint_lr(path) -> float:
    return torch.load(path, weights_only=True)["optimizer"]["param_groups"][0]["lr"]


def quiet_fit(*args, **kwargs) -> FitHistory:
    return pf.fit(*args, progress=False, **kwargs)


# --------------------------------------------------------------------------- what is fitted


def test_history_is_a_dataclass_that_reads_as_the_training_losses():
    history = quiet_fit(small_flow(), gaussian_rows(128), max_epochs=3, batch_size=64, seed=0)
    assert isinstance(history, FitHistory)
    assert len(history) == 3 and list(history) == history.train_loss and history[-1] == history.train_loss[-1]
    assert history.steps == 6 and history.validation_loss == [] and history.best_epoch is None
    assert not history.stopped_early and history.recoveries == 0


def test_default_objective_is_the_negative_log_likelihood():
    flow, x, c = small_flow(context=3), gaussian_rows(10), torch.randn(10, 3)
    with torch.no_grad():
        assert float(NegativeLogLikelihood()(flow, x, c)) == pytest.approx(float(-flow(c).log_prob(x).mean()))
        plain = small_flow()
        assert float(NegativeLogLikelihood()(plain, x)) == pytest.approx(nll(plain, x))


def test_any_objective_and_any_module_plug_in():
    """The loop knows nothing about flows: least squares on a linear layer, context -> x."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(512, 3, generator=generator)
    weight = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]])
    targets = inputs @ weight.T + 0.01 * torch.randn(512, 2, generator=generator)
    seen = []

    def squared_error(model, x, context):
        seen.append((x.shape, context.shape))
        return (model(context) - x).square().mean()

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    history = quiet_fit(model, targets, inputs, objective=squared_error, max_epochs=60, batch_size=128, lr=0.05, seed=0)
    assert seen[0] == (torch.Size([128, 2]), torch.Size([128, 3]))
    torch.testing.assert_close(model.weight.detach(), weight, atol=0.02, rtol=0)
    assert history.train_loss[-1] < 1e-3 < history.train_loss[0]


class PixelGaussian(nn.Module):
    """An independent Gaussian per pixel, a distribution with event shape (C, H, W)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(shape))
        self.log_scale = nn.Parameter(torch.zeros(shape))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.log_scale.exp()).to_event(3)


def test_rows_of_images():
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 3, 3, generator=generator)
    images = mean + 0.5 * torch.randn(400, 2, 3, 3, generator=generator)
    model = PixelGaussian((2, 3, 3))
    history = quiet_fit(model, images, max_epochs=40, batch_size=100, lr=0.05, validation_fraction=0.25, seed=0)
    assert history.steps == 40 * 3 and len(history.validation_loss) == 40
    torch.testing.assert_close(model.loc.detach(), images.mean(0), atol=0.1, rtol=0)
    torch.testing.assert_close(model.log_scale.exp().detach(), torch.full((2, 3, 3), 0.5), atol=0.1, rtol=0)


def test_dataloader_of_pairs_and_of_rows():
    x, c = gaussian_rows(256), torch.randn(256, 1, generator=torch.Generator().manual_seed(1))
    x = x + 2 * c
    flow = small_flow(context=1)
    with torch.no_grad():
        before = float(NegativeLogLikelihood()(flow, x, c))
    loader = DataLoader(TensorDataset(x, c), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    history = quiet_fit(flow, loader, max_epochs=20, lr=3e-3, seed=0)
    assert history.steps == 20 * 4
    with torch.no_grad():
        assert float(NegativeLogLikelihood()(flow, x, c)) < before - 0.5
    # batches of plain rows, and at most steps_per_epoch of them per epoch
    history = quiet_fit(small_flow(), DataLoader(x, batch_size=32), max_epochs=3, steps_per_epoch=5, seed=0)
    assert history.steps == 15 and len(history.train_loss) == 3


def test_callable_draws_a_fresh_batch_every_step():
    calls = []

    def simulate():
        calls.append(1)
        return torch.randn(64, 2) @ MIX + 1.0

    flow = small_flow()
    history = quiet_fit(
        flow, simulate, max_epochs=8, steps_per_epoch=10, lr=3e-3, validation_data=gaussian_rows(200, 1, 1.0), seed=0
    )
    assert len(calls) == 80 and history.steps == 80 and len(history.validation_loss) == 8
    assert history.validation_loss[-1] < history.validation_loss[0] - 0.3
    assert len(quiet_fit(small_flow(), simulate, max_epochs=1, seed=0).train_loss) == 1
    assert len(calls) == 180  # 100 steps an epoch by default


# --------------------------------------------------------------------------- bad input


class Endless(IterableDataset):
    def __iter__(self):
        while True:
            yield torch.randn(2)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda f, x: quiet_fit(f, x, x[:-1, :1]), ValueError, r"same number of rows.*\(50, 2\) and \(49, 1\)"),
        (lambda f, x: quiet_fit(f, x[:, 0]), ValueError, r"rows.*\(50,\)"),
        (lambda f, x: quiet_fit(f, x.index_fill(0, torch.tensor([7, 9]), math.nan)), ValueError, r"data .*row 7 \(2"),
        (lambda f, x: quiet_fit(f, x, x.index_fill(0, torch.tensor([3]), math.inf)), ValueError, "context .*row 3"),
        (lambda f, x: quiet_fit(f, x, validation_data=x.index_fill(0, torch.tensor([4]), math.nan)), ValueError, "4"),
        (lambda f, x: quiet_fit(f, x[:5], validation_fraction=0.05), ValueError, r"of 5 rows.*\(5, 2\).*0 valid"),
        (lambda f, x: quiet_fit(f, x[:10], validation_fraction=0.99), ValueError, "0 training rows"),
        (lambda f, x: quiet_fit(f, x, validation_fraction=0.2, validation_data=x), ValueError, "not both"),
        (lambda f, x: quiet_fit(f, lambda: x, validation_fraction=0.2), ValueError, "tensor data"),
        (lambda f, x: quiet_fit(f, x, patience=3), ValueError, "patience needs validation"),
        (lambda f, x: quiet_fit(f, x, schedule="linear"), ValueError, "schedule must be"),
        (lambda f, x: quiet_fit(f, DataLoader(Endless(), batch_size=8), schedule="cosine"), ValueError, "max_steps"),
        (lambda f, x: quiet_fit(f, x.tolist()), TypeError, "Tensor, a DataLoader or a callable"),
        (lambda f, x: quiet_fit(f, lambda: {"x": x}), TypeError, "pair"),
        (lambda f, x: quiet_fit(f, x, objective=lambda m, x, c: -m().log_prob(x)), TypeError, r"scalar.*\(50,\)"),
        (lambda f, x: quiet_fit(f, x, batch_size=0), ValueError, "batch_size must be an integer >= 1, got 0"),
        (lambda f, x: quiet_fit(f, x, checkpoint_every=0.5), ValueError, "checkpoint_every"),
    ],
)
def test_bad_input_is_named(call, error, match):
    flow = small_flow()
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    with pytest.raises(error, match=match):
        call(flow, gaussian_rows(50))
    assert all(torch.equal(before[k], v) for k, v in flow.state_dict().items())


# --------------------------------------------------------------------------- validation, schedules, progress


def test_early_stopping_restores_the_best_weights():
    """Training on data at +2 while validating at -2: the validation loss only gets worse."""
    train, validation = gaussian_rows(256, 0, 2.0), gaussian_rows(128, 1, -2.0)
    flow = small_flow()
    history = quiet_fit(flow, train, max_epochs=50, batch_size=64, lr=1e-2, validation_data=validation, patience=3)
    assert history.stopped_early and history.best_epoch == 0
    assert len(history.validation_loss) == len(history.train_loss) == 4 and history.steps == 16
    assert all(a < b for a, b in itertools.pairwise(history.validation_loss))
    assert nll(flow, validation) == pytest.approx(history.validation_loss[0], rel=1e-5)
    assert not flow.training


def test_validation_split_is_held_out_and_the_best_epoch_is_kept():
    data = gaussian_rows(400)
    runs = []
    for _ in range(2):
        flow = small_flow()
        runs.append(
            (flow, quiet_fit(flow, data, max_epochs=12, batch_size=64, lr=3e-3, validation_fraction=0.2, seed=3))
        )
    (flow, history), (twin, again) = runs
    assert history == again and same_weights(flow, twin)  # the seeded split and shuffles repeat
    assert history.steps == 12 * 5  # 320 training rows in batches of 64
    assert not history.stopped_early and len(history.validation_loss) == 12
    assert history.best_epoch == min(range(12), key=history.validation_loss.__getitem__)
    assert history.validation_loss[-1] < history.validation_loss[0] - 0.2


@pytest.mark.parametrize(
    ("schedule", "final_lr"),
    [
        (None, 0.01),
        ("cosine", 0.0),
        (lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5), 0.01 * 0.5**12),
    ],
)
def test_schedules_step_every_optimizer_step(schedule, final_lr, tmp_path):
    path = tmp_path / "run.pt"
    quiet_fit(
        small_flow(), gaussian_rows(192), max_epochs=4, batch_size=64, lr=0.01, schedule=schedule, checkpoint=path
    )
    assert checkpoint_lr(path) == pytest.approx(final_lr, abs=1e-12)


def test_weight_decay_reaches_adam():
    def flat(model, x, context):  # no gradient but the decay's
        return sum(p.sum() for p in model.parameters()) * 0.0

    sizes = {}
    for decay in (0.0, 1.0):
        model = nn.Linear(2, 2)
        nn.init.constant_(model.weight, 1.0)
        quiet_fit(model, gaussian_rows(64), objective=flat, max_epochs=10, batch_size=64, lr=0.05, weight_decay=decay)
        sizes[decay] = float(model.weight.detach().abs().mean())
    assert sizes[0.0] == 1.0 and sizes[1.0] < 0.6


def test_progress_bar(capsys, monkeypatch):
    data = gaussian_rows(128)
    run = lambda progress: pf.fit(
        small_flow(), data, max_epochs=2, batch_size=64, validation_fraction=0.25, progress=progress
    )
    run(True)
    shown = capsys.readouterr().err
    assert "fit" in shown and "loss=" in shown and "val=" in shown and "4/4" in shown
    run(False)
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    run(None)
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("CI")
    run(None)
    assert "loss=" in capsys.readouterr().err


# --------------------------------------------------------------------------- checkpoints and resume


class Killed(Exception):
    """Stands for the process dying mid-run."""


def noisy_nll(model, x, context):
    """The likelihood of slightly jittered rows: the loss depends on torch's RNG, as dequantisation does."""
    return NegativeLogLikelihood()(model, x + 0.01 * torch.randn_like(x), context)


def killed_at(step: int):
    """``noisy_nll`` that dies at training step ``step`` (1-based; validation calls run without grad)."""
    calls = []

    def objective(model, x, context):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == step:
                raise Killed
        return noisy_nll(model, x, context)

    return objective


DATA_KINDS = {
    "tensor": lambda: gaussian_rows(300),
    "loader": lambda: DataLoader(gaussian_rows(240), batch_size=64, shuffle=True),  # shuffled by torch's RNG
    "callable": lambda: lambda: torch.randn(64, 2) @ MIX,
}


@pytest.mark.parametrize(
    ("kind", "interrupt"), [("tensor", "kill"), ("tensor", "max_steps"), ("loader", "kill"), ("callable", "kill")]
)
def test_resumed_run_matches_an_uninterrupted_one(kind, interrupt, tmp_path):
    """Same weights and history, bit for bit: optimizer, schedule, data position, RNG states and best weights."""
    # max_steps also sets the length of a cosine schedule, so that run stops on a step schedule instead
    schedule = "cosine" if interrupt == "kill" else lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, 5, 0.7)
    options = dict(max_epochs=5, batch_size=64, lr=5e-3, schedule=schedule, seed=7, checkpoint_every=3, patience=10)
    options.update(steps_per_epoch=4) if kind == "callable" else None
    options.update(validation_fraction=0.2) if kind == "tensor" else options.update(
        validation_data=gaussian_rows(64, 9)
    )
    reference = small_flow()
    expected = quiet_fit(reference, DATA_KINDS[kind](), objective=noisy_nll, **options)
    assert expected.steps == 20 and len(expected.validation_loss) == 5

    path = tmp_path / "run.pt"
    flow = small_flow()
    if interrupt == "kill":
        with pytest.raises(Killed):
            quiet_fit(flow, DATA_KINDS[kind](), objective=killed_at(11), checkpoint=path, **options)
        assert torch.load(path, weights_only=True)["position"]["history"]["steps"] == 9  # written every 3 steps
    else:
        partial = quiet_fit(flow, DATA_KINDS[kind](), objective=noisy_nll, checkpoint=path, max_steps=10, **options)
        assert partial.steps == 10 and len(partial.train_loss) == 3 and len(partial.validation_loss) == 2
        assert partial.train_loss[:2] == expected.train_loss[:2]
    torch.manual_seed(12345)  # the checkpoint, not the caller's state, decides what comes next
    resumed_flow = small_flow(seed=99)
    resumed = quiet_fit(resumed_flow, DATA_KINDS[kind](), objective=noisy_nll, checkpoint=path, resume=path, **options)
    assert resumed == expected
    assert same_weights(resumed_flow, reference)


def test_checkpoint_is_weights_only_and_resume_checks_its_file(tmp_path):
    path = tmp_path / "sub" / "run.pt"
    flow = small_flow()
    # resume == checkpoint and no file yet: a first run
    history = quiet_fit(flow, gaussian_rows(128), max_epochs=2, batch_size=64, seed=0, checkpoint=path, resume=path)
    state = torch.load(path, weights_only=True)
    assert state["position"]["history"]["steps"] == history.steps == 4
    assert state["position"]["history"]["train_loss"] == history.train_loss
    assert all(torch.equal(v, flow.state_dict()[k]) for k, v in state["model"].items())
    assert [p.name for p in path.parent.iterdir()] == ["run.pt"]  # no temporary files left
    # resuming a finished run with a larger budget continues it
    more = quiet_fit(flow, gaussian_rows(128), max_epochs=3, batch_size=64, seed=0, checkpoint=path, resume=path)
    assert more.steps == 6 and more.train_loss[:2] == history.train_loss
    with pytest.raises(FileNotFoundError):
        quiet_fit(flow, gaussian_rows(128), resume=tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a checkpoint written by pyro_flows.fit"):
        quiet_fit(flow, gaussian_rows(128), resume=tmp_path / "other.pt")


# --------------------------------------------------------------------------- non-finite losses


def failing_at(steps: set[int], gradient: bool = False, poison: bool = False):
    """The likelihood, made non-finite at the given training calls (1-based): the loss, or only its gradient."""
    calls = []

    def objective(model, x, context):
        calls.append(1)
        first = next(model.parameters())
        if poison and len(calls) in steps:  # a forward pass that wrecks the model's state on its way
            with torch.no_grad():
                first.fill_(math.nan)
        loss = NegativeLogLikelihood()(model, x, context)
        if len(calls) not in steps:
            return loss
        if gradient:  # finite value, NaN gradient (d sqrt(u)/du at u = 0 is inf, times 0)
            return loss + torch.sqrt(0.0 * first.sum())
        return loss * math.nan

    return objective


def test_non_finite_loss_rolls_back_to_before_the_last_good_update(tmp_path):
    """Steps 1-3 are good, step 4's loss is NaN: the model and Adam go back to their state after step 2."""
    data = gaussian_rows(256)
    after_two = small_flow()
    quiet_fit(after_two, data, max_steps=2, batch_size=64, lr=1e-2, seed=0)
    flow, path = small_flow(), tmp_path / "run.pt"
    with pytest.warns(RuntimeWarning, match=r"non-finite loss \(nan\) at step 4; rolled back .* 0\.005"):
        history = quiet_fit(
            flow, data, max_epochs=1, batch_size=64, lr=1e-2, seed=0, checkpoint=path,
            objective=failing_at({4}, poison=True),
        )  # fmt: skip
    assert history.recoveries == 1 and history.steps == 3 and len(history.train_loss) == 1
    assert math.isfinite(history.train_loss[0])
    assert same_weights(flow, after_two)
    state = torch.load(path, weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == 5e-3
    assert all(int(s["step"]) == 2 for s in state["optimizer"]["state"].values())  # Adam's moments rolled back too


def test_non_finite_gradients_are_recovered_and_training_goes_on():
    data = gaussian_rows(512)
    flow = small_flow()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = quiet_fit(
            flow, data, max_epochs=6, batch_size=64, lr=5e-3, seed=0, objective=failing_at({5, 9}, gradient=True)
        )
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 2 and all("non-finite gradient norm" in m for m in messages)
    assert "at step 5;" in messages[0] and "at step 8;" in messages[1]  # the 9th call would have been step 8
    assert history.recoveries == 2 and history.steps == 6 * 8 - 2
    assert all(math.isfinite(v) for v in history.train_loss) and history.train_loss[-1] < history.train_loss[0] - 0.3
    assert all(bool(torch.isfinite(p).all()) for p in flow.parameters())


def test_gives_up_after_max_recoveries():
    with pytest.warns(RuntimeWarning) as caught:
        with pytest.raises(
            RuntimeError, match=r"non-finite loss .* at step 3, after 3 recoveries \(max_recoveries=3\)"
        ):
            quiet_fit(
                small_flow(),
                gaussian_rows(256),
                batch_size=32,
                max_recoveries=3,
                objective=failing_at(set(range(3, 99))),
            )
    assert len(caught) == 3


# --------------------------------------------------------------------------- one set of options


def test_fit_options_hold_the_defaults_that_fit_reads():
    defaults = FitOptions()
    assert (defaults.max_epochs, defaults.batch_size, defaults.lr, defaults.validation_fraction) == (
        100,
        256,
        1e-3,
        0.0,
    )
    assert defaults.patience is None and defaults.seed is None and defaults.clip_grad == 5.0
    history = quiet_fit(small_flow(), gaussian_rows(300), max_epochs=2)
    assert history.steps == 2 * 2 and history.validation_loss == []  # 300 rows in batches of 256, nothing held out
    # options given as an object, changed for one call by keyword
    options = FitOptions(max_epochs=3, batch_size=100, validation_fraction=0.2, seed=0, progress=False)
    history = pf.fit(small_flow(), gaussian_rows(300), options=options, max_epochs=1)
    assert history.steps == 3 and len(history.validation_loss) == 1  # 240 training rows in batches of 100
    with pytest.raises(TypeError, match="fit: options must be a FitOptions, got dict"):
        pf.fit(small_flow(), gaussian_rows(300), options={"max_epochs": 1})


def test_fit_options_are_frozen_checked_and_name_unknown_options():
    options = FitOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.lr = 1.0
    assert options.replace(lr=0.5).lr == 0.5 and options.lr == 1e-3
    with pytest.raises(TypeError, match="unknown fit option max_epoch, patiense; the options are max_epochs, "):
        options.replace(max_epoch=3, patiense=2)
    with pytest.raises(TypeError, match="unknown fit option max_epoch"):
        quiet_fit(small_flow(), gaussian_rows(64), max_epoch=3)
    with pytest.raises(ValueError, match="patience must be an integer >= 1, got 0"):
        FitOptions(patience=0)
    with pytest.raises(ValueError, match=r"validation_fraction must be in \[0, 1\), got -0.1"):
        options.replace(validation_fraction=-0.1)


def test_front_ends_derive_their_defaults_from_the_one_options_object():
    """Each front end changes only the options its docstring gives a reason for, and reads nothing else."""
    base = FitOptions()

    def changes(options: FitOptions) -> dict:
        values = {f.name: (getattr(options, f.name), getattr(base, f.name)) for f in dataclasses.fields(base)}
        return {name: value for name, (value, default) in values.items() if value != default}

    assert changes(pf.DensityEstimator.fit_options) == dict(
        max_epochs=200, validation_fraction=0.1, patience=20, seed=0
    )
    assert changes(pf.infer.NPE.fit_options) == dict(
        max_epochs=1000,
        batch_size=512,
        lr=2e-3,
        validation_fraction=0.1,
        patience=40,
        max_steps=8000,
        schedule="cosine",
    )

    class ShortEstimator(pf.DensityEstimator):
        fit_options = pf.DensityEstimator.fit_options.replace(max_epochs=2, batch_size=50, progress=False)

    # batch_size and validation_fraction are chosen from the table unless given (pyro_flows.tabular_defaults)
    short = dict(transforms=1, hidden=(8,), batch_size=50, validation_fraction=0.1)
    est = ShortEstimator("realnvp", **short).fit(gaussian_rows(200))
    assert est.history_.steps == 2 * 4 and len(est.history_.validation_loss) == 2  # 180 rows, batches of 50
    est = ShortEstimator("realnvp", **short).fit(gaussian_rows(200), max_epochs=1, batch_size=90)
    assert est.history_.steps == 2  # keyword arguments change the defaults for one call

    prior = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    theta = prior.sample((200,))

    class ShortNPE(pf.infer.NPE):
        fit_options = pf.infer.NPE.fit_options.replace(max_epochs=1, progress=False)

    npe = ShortNPE(prior, "maf", transforms=1, hidden=(8,)).append_simulations(theta, theta + 0.1).train()
    assert npe.history.steps == 1 and len(npe.history.validation_loss) == 1  # 180 rows in one batch of 200

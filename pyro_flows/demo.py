"""The ``pyro-flows demo``: neural spline flows fitted to built-in two-moons and digits data, scored against a
Gaussian, with a report of figures and metrics (what ``pyro-flows demo`` runs; the CLI only parses arguments)."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import numpy as np
import torch

from .data import DIGITS_LEVELS, digits, two_moons
from .diagnostics import bits_per_dim
from .estimator import DensityEstimator

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class DemoBudget:
    """The demo's neural spline flows and epochs: the full demo takes about a minute on 2 CPU cores, quick seconds."""

    moons_rows: int
    transforms: int
    hidden: tuple[int, ...]
    moons_epochs: int
    digits_epochs: int


FULL = DemoBudget(moons_rows=4000, transforms=4, hidden=(64, 64), moons_epochs=100, digits_epochs=150)
QUICK = DemoBudget(moons_rows=500, transforms=2, hidden=(16,), moons_epochs=2, digits_epochs=2)
REPORT_FILES = ("two_moons.png", "digits_samples.png", "loss_curves.png", "metrics.json")


def gaussian_log_density(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-row log-density of ``test`` under the maximum-likelihood Gaussian of ``train`` (the demo's baseline)."""
    train_t, test_t = torch.as_tensor(train, dtype=torch.float64), torch.as_tensor(test, dtype=torch.float64)
    gaussian = torch.distributions.MultivariateNormal(train_t.mean(0), torch.cov(train_t.T, correction=0))
    return gaussian.log_prob(test_t).numpy()


def split(x: np.ndarray, test_fraction: float, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle the rows of ``x`` and cut off the last ``test_fraction`` as the test set."""
    order = torch.randperm(len(x), generator=generator).numpy()
    cut = len(x) - round(test_fraction * len(x))
    return x[order[:cut]], x[order[cut:]]


def evaluate(
    estimator: DensityEstimator, train: np.ndarray, test: np.ndarray, seconds: float, levels: Optional[int] = None
) -> dict[str, Any]:
    """The demo's numbers for one fitted estimator: held-out log-likelihood against the Gaussian baseline."""
    history, dims = estimator.history_, test.shape[1]
    gaussian = gaussian_log_density(train, test)
    metrics = {
        "flow": estimator.flow,
        "dims": dims,
        "train_rows": len(train),
        "test_rows": len(test),
        "epochs": len(history.train_loss),
        "best_epoch": history.best_epoch + 1,
        "seconds": seconds,
        "train_loss": history.train_loss,
        "validation_loss": history.validation_loss,
        "test_log_likelihood": estimator.score(test),
        "gaussian_test_log_likelihood": float(gaussian.mean()),
        "test_nats_per_dim": estimator.nats_per_dim(test),
    }
    if levels is not None:
        metrics["levels"] = levels
        metrics["test_bits_per_dim"] = estimator.bits_per_dim(test, levels=levels)
        metrics["gaussian_test_bits_per_dim"] = bits_per_dim(gaussian, dims, levels=levels)
    return metrics


def fit_and_evaluate(
    x: np.ndarray, budget: DemoBudget, epochs: int, seed: int, levels: Optional[int] = None
) -> tuple[DensityEstimator, dict[str, Any], np.ndarray]:
    """An NSF fitted on 80% of ``x`` (10% of that for validation) and evaluated on the other 20%.

    Returns the estimator, its metrics and the test rows.
    """
    train, test = split(x, 0.2, torch.Generator().manual_seed(seed))
    estimator = DensityEstimator(flow="nsf", transforms=budget.transforms, hidden=budget.hidden)
    start = time.perf_counter()
    estimator.fit(train, max_epochs=epochs, seed=seed)
    return estimator, evaluate(estimator, train, test, time.perf_counter() - start, levels), test


@contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the demo's small networks run faster so, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _figure(columns: int, size: float = 4.0) -> Figure:
    """A one-row matplotlib figure drawn by the Agg canvas (no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(size * columns, size), layout="constrained")
    FigureCanvasAgg(figure)
    figure.subplots(1, columns)
    return figure


def plot_two_moons(estimator: DensityEstimator, test: np.ndarray, path: Path, seed: int) -> None:
    """Test data, as many samples, and the learned density's contours, side by side."""
    figure = _figure(3)
    data_axes, sample_axes, density_axes = figure.axes
    samples = estimator.sample(len(test), seed=seed)
    low, high = test.min(0) - 0.5, test.max(0) + 0.5
    for axes, points, title in ((data_axes, test, "test data"), (sample_axes, samples, "flow samples")):
        axes.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5)
        axes.set_title(title)
    grid_x, grid_y = np.meshgrid(np.linspace(low[0], high[0], 200), np.linspace(low[1], high[1], 200))
    grid = np.stack((grid_x.ravel(), grid_y.ravel()), axis=-1)
    density = np.exp(estimator.score_samples(grid)).reshape(grid_x.shape)
    density_axes.contourf(grid_x, grid_y, density, levels=20, cmap="viridis")
    density_axes.set_title("learned density")
    for axes in figure.axes:
        axes.set(xlim=(low[0], high[0]), ylim=(low[1], high[1]), aspect="equal")
    figure.savefig(path, dpi=100)


def _mosaic(images: np.ndarray, side: int = 8) -> np.ndarray:
    """``side**2`` flattened 8x8 images tiled row by row into one picture, NaN (drawn blue) between the tiles."""
    tiles = np.pad(
        images[: side * side].reshape(side, side, 8, 8), ((0, 0), (0, 0), (1, 0), (1, 0)), constant_values=np.nan
    )
    return np.pad(tiles.transpose(0, 2, 1, 3).reshape(side * 9, side * 9), ((0, 1), (0, 1)), constant_values=np.nan)


def plot_digits(estimator: DensityEstimator, test: np.ndarray, path: Path, seed: int) -> None:
    """64 test digits next to 64 samples, pixels clipped to the data's range [0, 1]."""
    from matplotlib import colormaps

    figure = _figure(2)
    samples = np.clip(estimator.sample(64, seed=seed), 0.0, 1.0)
    grey = colormaps["gray_r"].with_extremes(bad="lightsteelblue")
    for axes, images, title in zip(figure.axes, (test, samples), ("test digits", "flow samples"), strict=True):
        axes.imshow(_mosaic(images), cmap=grey, vmin=0.0, vmax=1.0)
        axes.set_title(title)
        axes.set_axis_off()
    figure.savefig(path, dpi=100)


def plot_loss_curves(metrics: dict[str, dict[str, Any]], path: Path) -> None:
    """Train and validation loss per epoch, one panel per data set."""
    figure = _figure(len(metrics))
    for axes, (name, m) in zip(figure.axes, metrics.items(), strict=True):
        epochs = np.arange(1, len(m["train_loss"]) + 1)
        axes.plot(epochs, m["train_loss"], label="train")
        if m["validation_loss"]:
            axes.plot(epochs, m["validation_loss"], label="validation")
        axes.axvline(m["best_epoch"], color="grey", linestyle=":", label="best epoch")
        axes.set(title=f"{name} ({m['flow']})", xlabel="epoch", ylabel="negative log-likelihood")
        axes.legend()
    figure.savefig(path, dpi=100)


def demo(out: Path, budget: DemoBudget = FULL, seed: int = 0) -> dict[str, Any]:
    """Fit NSFs on two moons and dequantised digits; write plots and ``metrics.json`` to ``out``; return the metrics."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    moons = two_moons(budget.moons_rows, generator=generator).double().numpy()
    images = digits(generator=generator)[0].double().numpy()
    with _one_thread():
        moons_flow, moons_metrics, moons_test = fit_and_evaluate(moons, budget, budget.moons_epochs, seed)
        digits_flow, digits_metrics, digits_test = fit_and_evaluate(
            images, budget, budget.digits_epochs, seed, DIGITS_LEVELS
        )
        out.mkdir(parents=True, exist_ok=True)
        plot_two_moons(moons_flow, moons_test, out / "two_moons.png", seed)
        plot_digits(digits_flow, digits_test, out / "digits_samples.png", seed)
    plot_loss_curves({"two moons": moons_metrics, "digits": digits_metrics}, out / "loss_curves.png")
    metrics = {
        "seed": seed,
        "seconds": time.perf_counter() - start,
        "two_moons": moons_metrics,
        "digits": digits_metrics,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics

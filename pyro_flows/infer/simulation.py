r"""Simulation: draw parameters from a prior and run a simulator on them, in seeded batches.

:func:`simulate` feeds neural posterior estimation (:class:`~pyro_flows.infer.NPE`) and
simulation-based calibration (:func:`~pyro_flows.diagnostics.sbc`).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import pickle
import random
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator, Literal, Optional, Union, overload

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution

from ..utils import draw_seed, seeded_rng, show_progress

Simulator = Callable[[Tensor], Tensor]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's (CPU), NumPy's and ``random``'s global RNGs seeded inside the block, the caller's states back after it.

    For a simulator that draws from any of them: its draws depend on ``seed`` only, and the caller's random
    streams are what they were before the block, even when it raises.
    """
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with seeded_rng(seed):
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)


def _simulate_batch(simulator: Simulator, theta: Tensor, seed: int) -> Tensor:
    """One batch of simulations under its own seed (run in the main process or a worker)."""
    with seeded(seed):
        x = simulator(theta)
    x = torch.as_tensor(x)
    if x.dim() < 2 or x.shape[0] != theta.shape[0]:
        raise ValueError(
            f"simulate: the simulator must map θ of shape (B, D) to x of shape (B, *x_shape); "
            f"for θ of shape {tuple(theta.shape)} it returned shape {tuple(x.shape)}"
        )
    return x


def _batch_outputs(simulator: Simulator, jobs: list[tuple[Tensor, int]], num_workers: int) -> Iterator[Tensor]:
    """The simulator's output for each ``(theta, seed)`` job, in order: here, or in ``spawn``-started workers."""
    if num_workers == 1:
        yield from (_simulate_batch(simulator, theta, seed) for theta, seed in jobs)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(num_workers, mp_context=context, initializer=_worker_init) as pool:
        futures = [pool.submit(_simulate_batch, simulator, theta, seed) for theta, seed in jobs]
        yield from (future.result() for future in futures)


def _worker_init() -> None:
    torch.set_num_threads(1)  # the parallelism is across processes


def _check_picklable(simulator: Simulator) -> None:
    try:
        pickle.dumps(simulator)
    except Exception as error:
        raise TypeError(
            f"simulate: num_workers > 1 sends the simulator to worker processes, so it must be picklable "
            f"(a module-level function or a class instance, not a lambda or a local function); "
            f"pickling {simulator!r} failed: {error}"
        ) from None


@overload
def simulate(
    simulator: Simulator,
    prior: Distribution,
    num_simulations: int,
    batch_size: int = 1000,
    num_workers: int = 1,
    seed: Optional[int] = None,
    progress: Optional[bool] = None,
    return_invalid: Literal[False] = False,
) -> tuple[Tensor, Tensor]: ...


@overload
def simulate(
    simulator: Simulator,
    prior: Distribution,
    num_simulations: int,
    batch_size: int = 1000,
    num_workers: int = 1,
    seed: Optional[int] = None,
    progress: Optional[bool] = None,
    *,
    return_invalid: Literal[True],
) -> tuple[Tensor, Tensor, Tensor]: ...


def simulate(
    simulator: Simulator,
    prior: Distribution,
    num_simulations: int,
    batch_size: int = 1000,
    num_workers: int = 1,
    seed: Optional[int] = None,
    progress: Optional[bool] = None,
    return_invalid: bool = False,
) -> Union[tuple[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    r"""Draw :math:`\theta_n \sim p(\theta)` and simulate :math:`x_n = \text{simulator}(\theta_n)` in batches.

    ``simulator`` maps a batch ``θ (B, D)`` to ``x (B, *x_shape)``. Batch ``b`` runs with torch's,
    NumPy's and ``random``'s global RNGs seeded by a per-batch seed derived from ``seed``, so the
    output depends on ``seed`` and ``batch_size`` only, not on ``num_workers``; the caller's random
    streams are restored after each batch (None: the seed is one draw from torch's global generator). With
    ``num_workers > 1`` the batches run in ``spawn``-started worker processes (one torch thread
    each): the simulator must be picklable, and a script that calls this needs the usual
    ``if __name__ == "__main__":`` guard.

    Rows whose ``x`` has NaN or inf entries are dropped with a ``RuntimeWarning`` that gives their
    count; ``return_invalid=True`` also returns their θ.

    Args:
        num_simulations: θ drawn from the prior (the rows returned are fewer if some fail).
        progress: a tqdm bar over the simulations; None shows it when stderr is a terminal and
            the environment variable ``CI`` is unset.

    Returns:
        ``(theta, x)`` of shapes ``(N, D)`` and ``(N, *x_shape)``; with ``return_invalid``,
        ``(theta, x, invalid_theta)``, ``invalid_theta`` the ``(num_simulations - N, D)`` failed θ.

    Example:
        >>> prior = pyro.distributions.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> theta, x = simulate(lambda t: t + 0.1 * torch.randn_like(t), prior, 1000, seed=0)
    """
    from tqdm import tqdm

    for name, value in (("num_simulations", num_simulations), ("batch_size", batch_size), ("num_workers", num_workers)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"simulate: {name} must be an integer >= 1, got {value!r}")
    if not callable(simulator):
        raise TypeError(f"simulate: the simulator must be callable, got {type(simulator).__name__}")
    check_prior(prior, "simulate")
    if num_workers > 1:
        _check_picklable(simulator)
    base_seed = seed if seed is not None else draw_seed()
    with seeded(base_seed):
        theta = prior.sample((num_simulations,))
        batch_seeds = torch.randint(2**62, (len(range(0, num_simulations, batch_size)),)).tolist()
    jobs = list(zip(theta.split(batch_size), batch_seeds, strict=True))
    outputs = []
    with tqdm(total=num_simulations, disable=not show_progress(progress), desc="simulate", unit="sim") as bar:
        for (batch, _), output in zip(jobs, _batch_outputs(simulator, jobs, num_workers), strict=True):
            outputs.append(output)
            bar.update(len(batch))
    shapes = {tuple(o.shape[1:]) for o in outputs}
    if len(shapes) > 1:
        raise ValueError(f"simulate: the simulator returned x of different shapes across batches: {sorted(shapes)}")
    x = torch.cat(outputs)
    valid = torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
    invalid = int((~valid).sum())
    if invalid:
        warnings.warn(
            f"simulate: {invalid} of {num_simulations} simulations returned NaN or inf and were excluded "
            "(return_invalid=True returns their θ)",
            RuntimeWarning,
            stacklevel=2,
        )
    if return_invalid:
        return theta[valid], x[valid], theta[~valid]
    return theta[valid], x[valid]


def check_prior(prior: Distribution, name: str) -> None:
    """A TypeError or ValueError naming ``name`` unless ``prior`` is a distribution over vectors θ."""
    if not isinstance(prior, Distribution):
        raise TypeError(f"{name}: the prior must be a torch/Pyro Distribution, got {type(prior).__name__}")
    if len(prior.event_shape) != 1 or len(prior.batch_shape) != 0:
        raise ValueError(
            f"{name}: the prior must have batch shape () and event shape (D,) (θ a vector), got batch shape "
            f"{tuple(prior.batch_shape)} and event shape {tuple(prior.event_shape)}; "
            "for independent parameters use e.g. Uniform(low, high).to_event(1)"
        )

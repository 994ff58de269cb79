"""Glow on 8×8 and 28×28 digits: pf.Glow against normflows' Glow, training throughput and held-out bits/dim.

Images (``--sizes``): 8×8 is scikit-learn's digits; 28×28 is ``pf.data.upscaled_digits()`` (the same
1,797 digits resized bilinearly to MNIST's size, the same 17 grey levels): a built-in stand-in, not MNIST.
297 images are held out (a fixed permutation). Both models are built with the same ``--levels`` L (2: 28 → 14
→ 7), ``--steps`` K and ``--hidden-channels``:

* **pyro_flows**: ``pf.Glow(shape=(1, S, S), levels=L, steps=K, hidden_channels=...,
  pixel_levels=17)`` (its defaults: Glow's split prior, one zero-initialised 3×3 convolution of
  the kept half per level but the last; logit preprocessing with alpha = 0.05); the continuous
  flow on [0, 1], ``model.flow``, is trained. ``--no-split-prior`` builds it with
  ``split_prior=False`` (the factored-out half is standard normal).
* **normflows**: ``nf.MultiscaleFlow`` built as in normflows' Glow example: per level
  K ``nf.flows.GlowBlock(channels, hidden_channels, split_mode="channel",
  scale=True)`` (ActNorm, LU 1×1 convolution, affine coupling with a 3×3/1×1/3×3 CNN) then
  ``nf.flows.Squeeze()``, levels joined by ``nf.flows.Merge()``, a learned diagonal Gaussian
  base per level (its factored-out half is not conditioned on the kept half), and
  ``transform=nf.transforms.Logit(alpha=0.05)`` (the same preprocessing as pf.Glow's).

Configurations: ``unconditional`` (normflows bases: ``DiagGaussian``) and
``class-conditional`` (10 classes; each library conditions the way its Glow does:
pf.Glow embeds the label as context of every coupling and split prior,
normflows' bases are ``ClassCondDiagGaussian``).

Data and objective, identical for both: the digits' integer pixels x in 0..16 are
dequantised as y = (x + u) / 17 with u ~ U[0, 1) (the same u for both), and
each step is one Adam step (``--lr``, ``--batch``, gradient norm clipped at 5) on
-mean log p(y) over the same mini-batch. Bits/dim are the discrete data's, computed
identically for both from log p of the continuous flow:
bits/dim = -(log p(y) - D log 17) / (D ln 2), averaged over the held-out images
and ``--draws`` draws of u (a bound on the discrete bits/dim, see pf.bits_per_dim).
Equal budget: both libraries take the same steps on the same batches (8×8: 400 steps of 128,
28×28: 120 steps of 64 unless ``--train-steps`` / ``--batch`` say otherwise).

Timing (the shared ``harness.interleave``): the libraries train in interleaved chunks of ``--chunk`` steps on
the same batches (A B, B A, A B, ...); images/s is the median over chunks (the first chunk, with ActNorm's
data-dependent initialisation, is a warm-up and not counted). After ``--train-steps`` steps each, the held-out
bits/dim is reported. A peer that is not installed is ``n/a``. The machine line (date, commit, torch, threads,
load average) is printed before and after the runs.

Usage::

    python benchmarks/bench_images.py --threads 1           # 8×8 and 28×28, both configurations
    python benchmarks/bench_images.py --sizes 28 --configs unconditional
    python benchmarks/bench_images.py --quick --libs pyro_flows
    python benchmarks/bench_images.py --profile --sizes 28 --libs normflows   # torch.profiler of a training step
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Timing, interleave, machine_line, markdown_table, ratio, set_threads  # noqa: E402

LIBS = ("pyro_flows", "normflows")
CONFIGS = ("unconditional", "class-conditional")
SIZES = (8, 28)  # 8x8: the digits; 28x28: pf.data.upscaled_digits (bilinear, the same 17 levels)
LEVELS = 17  # grey levels of the digits
CLASSES = 10
ALPHA = 0.05  # logit preprocessing, both libraries
CLIP = 5.0


def available(lib: str) -> bool:
    return importlib.util.find_spec(lib) is not None


@dataclass
class Model:
    """A flow and ``log_prob(y, labels)`` of images y on [0, 1] (labels ignored when unconditional)."""

    module: nn.Module
    log_prob: Callable[[Tensor, Tensor], Tensor]

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def build_pyro_flows(
    config: str,
    levels: int,
    steps: int,
    hidden_channels: int,
    split_prior: bool = True,
    shape: Sequence[int] = (1, 8, 8),
) -> Model:
    import pyro_flows as pf

    classes = CLASSES if config == "class-conditional" else None
    options = {"classes": classes, "pixel_levels": LEVELS, "alpha": ALPHA, "split_prior": split_prior}
    model = pf.Glow(tuple(shape), levels, steps, hidden_channels, **options)
    flow = model.flow
    if classes is None:
        return Model(model, lambda y, labels: flow().log_prob(y))
    return Model(model, lambda y, labels: flow(labels).log_prob(y))


def build_normflows(
    config: str, levels: int, steps: int, hidden_channels: int, shape: Sequence[int] = (1, 8, 8)
) -> Model:
    """normflows' Glow as in its example notebook (``examples/glow.ipynb``), for images of ``shape``."""
    import normflows as nf

    channels, height, width = shape
    conditional = config == "class-conditional"
    bases, merges, flows = [], [], []
    for i in range(levels):  # i = 0 is the coarsest level (sampling direction)
        blocks = [
            nf.flows.GlowBlock(channels * 2 ** (levels + 1 - i), hidden_channels, split_mode="channel", scale=True)
            for _ in range(steps)
        ]
        flows.append([*blocks, nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            scale = 2 ** (levels - i)
            latent = (channels * scale, height // scale, width // scale)
        else:
            latent = (channels * 2 ** (levels + 1), height // 2**levels, width // 2**levels)
        base = nf.distributions.ClassCondDiagGaussian(latent, CLASSES) if conditional else None
        bases.append(base or nf.distributions.DiagGaussian(latent))
    model = nf.MultiscaleFlow(bases, flows, merges, transform=nf.transforms.Logit(ALPHA), class_cond=conditional)
    return Model(model, lambda y, labels: model.log_prob(y, labels if conditional else None))


BUILDERS = {"pyro_flows": build_pyro_flows, "normflows": build_normflows}


def digits_split(test: int = 297, seed: int = 0, size: int = 8) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Integer digit images (0..16) and labels, split by a fixed permutation into (train X, train y, test X, test y).

    ``size=8``: scikit-learn's digits; any other size: :func:`pyro_flows.data.upscaled_digits` (the same images
    resized bilinearly, the same 17 levels), a stand-in for MNIST-sized images.
    """
    from pyro_flows.data import digit_images, upscaled_digits

    images, labels = digit_images() if size == 8 else upscaled_digits(size)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    train, held_out = order[test:], order[:test]
    return images[train], labels[train], images[held_out], labels[held_out]


def discrete_bits_per_dim(log_prob: Tensor, dims: int) -> float:
    """-(mean log p(y) - D log L) / (D ln 2) for log-densities of y = (x + u) / L on [0, 1]^D."""
    return -(log_prob.mean().item() - dims * math.log(LEVELS)) / (dims * math.log(2))


def independent_pixels_bits_per_dim(train: Tensor, test: Tensor) -> float:
    """The baseline: a categorical per pixel fitted on ``train`` (add-one smoothing), bits/dim on ``test``."""
    counts = torch.nn.functional.one_hot(train.long().flatten(1), LEVELS).sum(0) + 1.0  # (D, L)
    log_p = (counts / counts.sum(-1, keepdim=True)).log()
    pixels = test.long().flatten(1)
    return -log_p.gather(1, pixels.T).mean().item() / math.log(2)


def heldout_bits_per_dim(model: Model, images: Tensor, labels: Tensor, draws: int, seed: int = 1) -> float:
    """Discrete bits/dim of held-out images, averaged over ``draws`` uniform dequantisations (seeded: same u)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        log_probs = [
            model.log_prob((images + torch.rand(images.shape, generator=g)) / LEVELS, labels) for _ in range(draws)
        ]
    return discrete_bits_per_dim(torch.cat(log_probs), images[0].numel())


@dataclass
class Run:
    size: int
    threads: int
    config: str
    lib: str
    parameters: int = 0
    timing: Timing = field(default_factory=Timing)  # seconds per image, one entry per timed chunk
    bits_per_dim: Optional[float] = None

    @property
    def throughput(self) -> list[float]:
        """Images/s of each timed chunk."""
        return [1.0 / seconds for seconds in self.timing.runs]

    @property
    def median(self) -> Optional[float]:
        """Images/s of the median chunk."""
        return None if self.timing.median is None else 1.0 / self.timing.median

    @property
    def best(self) -> Optional[float]:
        """Images/s of the fastest (least disturbed) chunk."""
        return None if self.timing.best is None else 1.0 / self.timing.best


def _train_chunk(model: Model, optimizer: torch.optim.Optimizer, batches: Sequence[tuple[Tensor, Tensor]]) -> float:
    """Adam steps on the batches; returns the wall time."""
    parameters = list(model.module.parameters())
    start = time.perf_counter()
    for y, labels in batches:
        loss = -model.log_prob(y, labels).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, CLIP)
        optimizer.step()
    return time.perf_counter() - start


def compare(
    config: str,
    libs: Sequence[str],
    threads: int,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    levels: int,
    steps: int,
    hidden_channels: int,
    train_steps: int,
    chunk: int,
    batch: int,
    lr: float,
    draws: int,
    seed: int = 0,
    log: Callable[[str], None] = print,
    builders: Optional[dict[str, Callable[..., Model]]] = None,
) -> list[Run]:
    """Train every available library's Glow on the same batches in interleaved chunks; throughput and bits/dim."""
    train_x, train_y, test_x, test_y = data
    builders = builders or BUILDERS
    shape = tuple(train_x.shape[1:])
    runs = {lib: Run(shape[-1], threads, config, lib) for lib in LIBS}
    models: dict[str, Model] = {}
    optimizers: dict[str, torch.optim.Optimizer] = {}
    for lib in libs:
        if not available(lib):
            log(f"{lib} is not installed: n/a")
            continue
        torch.manual_seed(seed)
        models[lib] = builders[lib](config, levels, steps, hidden_channels, shape=shape)
        optimizers[lib] = torch.optim.Adam(models[lib].module.parameters(), lr=lr)
        runs[lib].parameters = models[lib].parameters
    g = torch.Generator().manual_seed(seed)
    chunks: list[list[tuple[Tensor, Tensor]]] = []
    for start in range(0, train_steps, chunk):
        chunks.append([])
        for _ in range(min(chunk, train_steps - start)):
            index = torch.randint(len(train_x), (batch,), generator=g)
            u = torch.rand((batch, *shape), generator=g)
            chunks[-1].append(((train_x[index] + u) / LEVELS, train_y[index]))

    def case(lib: str) -> Callable[[], None]:
        pending = iter(chunks)  # each call trains the next chunk: every round, both libraries train the same one

        def train_next_chunk() -> None:
            _train_chunk(models[lib], optimizers[lib], next(pending))

        return train_next_chunk

    if models and len(chunks) > 1:  # the first chunk (ActNorm initialisation, allocator warm-up) is not timed
        timings = interleave({lib: case(lib) for lib in models}, repeats=len(chunks) - 1, warmup=1)
        for lib, timing in timings.items():
            images = [len(c) * batch for c in chunks[1:]]
            runs[lib].timing = Timing([seconds / n for seconds, n in zip(timing.runs, images, strict=True)])
    for lib, model in models.items():
        runs[lib].bits_per_dim = heldout_bits_per_dim(model, test_x, test_y, draws)
        log(
            f"{shape[-1]}x{shape[-1]} threads={threads} {config} {lib}: {_fmt(runs[lib].median)} images/s, "
            f"held-out {runs[lib].bits_per_dim:.3f} bits/dim after {train_steps} steps"
        )
    return list(runs.values())


def _fmt(value: Optional[float], spec: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, spec)


def table(runs: Sequence[Run], baselines: dict[int, float]) -> str:
    """The markdown table of ``runs``, with the independent-pixel baseline of each image size in ``baselines``."""
    header = ["size", "threads", "model", "lib", "parameters", "images/s (median)", "images/s (best)"]
    header += ["held-out bits/dim", "pf / nf throughput", "pf − nf bits/dim"]
    rows: list[list[object]] = []
    for run in runs:
        speed = diff = ""
        if run.lib == "pyro_flows":
            key = (run.size, run.threads, run.config)
            peer = next(r for r in runs if (r.size, r.threads, r.config, r.lib) == (*key, "normflows"))
            value, _ = ratio(run.median, {"normflows": peer.median})
            speed = "" if value is None else f"{value:.2f}"
            if run.bits_per_dim is not None and peer.bits_per_dim is not None:
                diff = f"{run.bits_per_dim - peer.bits_per_dim:+.3f}"
        rows.append(
            [f"{run.size}×{run.size}", run.threads, run.config, run.lib, _fmt(run.parameters or None)]
            + [_fmt(run.median), _fmt(run.best), _fmt(run.bits_per_dim, ".3f"), speed, diff]
        )
    for size, baseline in baselines.items():
        rows.append([f"{size}×{size}", "", "independent per-pixel categorical", *[""] * 4, f"{baseline:.3f}", "", ""])
    return markdown_table(header, rows, align="rrllrrrrrr")


def profile(
    config: str,
    levels: int,
    steps: int,
    hidden_channels: int,
    batch: int,
    size: int = 8,
    lib: str = "pyro_flows",
    iterations: int = 10,
    split_prior: bool = True,
) -> str:
    """torch.profiler table (top ops by self CPU time) of one library's Glow training step on ``size``² images."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    train_x, train_y, _, _ = digits_split(size=size)
    shape = tuple(train_x.shape[1:])
    torch.manual_seed(0)
    options = {"split_prior": split_prior} if lib == "pyro_flows" else {}
    model = BUILDERS[lib](config, levels, steps, hidden_channels, shape=shape, **options)
    optimizer = torch.optim.Adam(model.module.parameters(), lr=1e-3)
    y, labels = (train_x[:batch] + torch.rand(batch, *shape)) / LEVELS, train_y[:batch]
    _train_chunk(model, optimizer, [(y, labels)] * 3)  # initialise and warm up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds = _train_chunk(model, optimizer, [(y, labels)] * iterations)
    head = f"{lib} {size}x{size} {config}: {iterations * batch / seconds:,.0f} images/s under the profiler\n"
    return head + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)


DEFAULTS = {  # per image size: (train steps, chunk, batch); --train-steps, --chunk, --batch override them
    8: (400, 25, 128),
    28: (120, 10, 64),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--libs", nargs="+", default=list(LIBS), choices=LIBS)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="image sizes: 8 (digits), 28 (upscaled)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--levels", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="flow steps per level (K)")
    p.add_argument("--hidden-channels", type=int, default=64)
    p.add_argument(
        "--train-steps", type=int, default=None, help="Adam steps per library (default 8x8: 400, 28x28: 120)"
    )
    p.add_argument("--chunk", type=int, default=None, help="steps per timed chunk (default 8x8: 25, 28x28: 10)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 8x8: 128, 28x28: 64)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--draws", type=int, default=None, help="dequantisation draws for bits/dim (default 8, quick 1)")
    p.add_argument(
        "--no-split-prior",
        action="store_true",
        help="pf.Glow(split_prior=False): a standard normal for the factored-out half, as in normflows' Glow",
    )
    p.add_argument("--quick", action="store_true", help="tiny run (smoke test): 6 steps in chunks of 2, batch 16")
    p.add_argument(
        "--profile", action="store_true", help="profile the training step instead (first --configs, --sizes, --libs)"
    )
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="torch.lu is deprecated")  # normflows' LU 1x1 convolution
    threads = torch.get_num_threads()
    try:
        set_threads(a.threads[0])
        if a.profile:
            batch = a.batch or DEFAULTS.get(a.sizes[0], DEFAULTS[28])[2]
            args = (a.configs[0], a.levels, a.steps, a.hidden_channels, batch, a.sizes[0], a.libs[0])
            print(profile(*args, split_prior=not a.no_split_prior))
            return 0
        builders = dict(BUILDERS)
        if a.no_split_prior:
            builders["pyro_flows"] = functools.partial(build_pyro_flows, split_prior=False)
        runs, baselines, budgets = [], {}, []
        print(machine_line(), flush=True)
        for size in a.sizes:
            data = digits_split(size=size)
            baselines[size] = independent_pixels_bits_per_dim(data[0], data[2])
            steps, chunk, batch = (6, 2, 16) if a.quick else DEFAULTS.get(size, DEFAULTS[28])
            steps, chunk, batch = a.train_steps or steps, a.chunk or chunk, a.batch or batch
            budgets.append(f"{size}x{size}: {steps} steps of batch {batch}")
            for n in a.threads:
                set_threads(n)
                for config in a.configs:
                    runs += compare(
                        config,
                        a.libs,
                        n,
                        data,
                        a.levels,
                        a.steps,
                        a.hidden_channels,
                        steps,
                        chunk,
                        batch,
                        a.lr,
                        a.draws or (1 if a.quick else 8),
                        builders=builders,
                    )
        print()
        print(machine_line())
        print(f"pyro_flows: pf.Glow(split_prior={not a.no_split_prior}); " + "; ".join(budgets))
        print(table(runs, baselines))
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Flow matching with a U-Net against Glow on 8×8 digits at the same wall-clock budget: held-out bits/dim.

Both models learn the same continuous data, the digits' integer pixels x in 0..16 dequantised as
y = (x + u) / 17 with u ~ U[0, 1) (fresh u per batch, drawn from the same seeded stream):

* **flow matching**: ``pf.ImageCNF((1, 8, 8), channels=...)``, one ODE layer whose vector field is a
  ``pf.nn.UNet`` (sinusoidal time embedding, GroupNorm residual blocks, zero-initialised output), then a fixed
  logit with alpha = 0.05 (its default, Glow's preprocessing; ``--no-logit``: none, the ODE on [0, 1]), trained by
  ``pf.FlowMatching()`` (straight paths, independent coupling, in logit space) on the rows y.reshape(N, 64);
* **Glow**: ``pf.Glow((1, 8, 8), levels=2, steps=4, hidden_channels=64, pixel_levels=17)`` as in
  ``bench_images.py``; its continuous flow on [0, 1] (``model.flow``, logit preprocessing with alpha = 0.05) is
  trained by maximum likelihood.

Each is one Adam step per batch (``--lr``, ``--batch``, gradient norm clipped at 5). The two train in interleaved
chunks of ``--chunk`` seconds (A B, B A, ...) until each has used ``--budget`` seconds of training, so each gets
the same wall-clock time on the same machine, whatever its cost per step. ``--configs class-conditional`` conditions
both on the digit's label (a learned embedding: in the U-Net's time embedding; in every coupling and split prior
of Glow).

``--sizes 28`` runs the same at 28×28 on ``pf.data.upscaled_digits`` (the digits resized, 17 levels; Glow with 2
levels, 28 → 14 → 7; a U-Net of widths 16, 32, 32; batch 64, 150 s each).

Held-out bits/dim of the discrete images (297 held out, the split of ``bench_images.py``): the mean over the
images and ``--probes`` evaluation passes of -(log p(y) - D log 17) / (D ln 2), a bound on the discrete bits/dim
(see ``pf.bits_per_dim``); each pass draws a fresh dequantisation u (the same u for both models) and, for the
CNF, a fresh Rademacher probe of Hutchinson's trace estimator, so the mean is also over probes. The CNF's
likelihood is the ODE's (dopri5, ``--tol`` absolute and relative tolerance); ± is the standard error of the mean
over images × passes. ``--exact-rows N`` also scores the first N held-out images with the exact trace (64
vector-Jacobian products per evaluation: slow on a CPU, ~4 s an image per 130 evaluations) next to Hutchinson's on
the same rows.

Usage::

    python benchmarks/bench_image_fm.py                                # 90 s each, unconditional, ~6 min
    python benchmarks/bench_image_fm.py --configs unconditional class-conditional
    python benchmarks/bench_image_fm.py --sizes 28 --probes 1                  # 28×28
    python benchmarks/bench_image_fm.py --quick                        # seconds
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
images_bench = importlib.import_module("bench_images")  # the digits split, Glow's builder, discrete bits/dim
from harness import machine_line, markdown_table, set_threads  # noqa: E402

METHODS = ("flow matching (U-Net)", "Glow")
CONFIGS = images_bench.CONFIGS
LEVELS, CLASSES, CLIP = images_bench.LEVELS, images_bench.CLASSES, images_bench.CLIP
SIZES = images_bench.SIZES  # 8: the digits; 28: pf.data.upscaled_digits
DEFAULTS = {8: (90.0, 128, (16, 32)), 28: (150.0, 64, (16, 32, 32))}  # per size: budget s, batch, U-Net widths


@dataclass
class Trainee:
    """A model under training: its loss on a batch ``(y, labels)`` and its held-out log-density."""

    name: str
    module: nn.Module
    loss: Callable[[Tensor, Tensor], Tensor]
    log_prob: Callable[[Tensor, Tensor], Tensor]
    steps: int = 0
    seconds: float = 0.0

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def build_flow_matching(
    config: str, shape: Sequence[int], channels: Sequence[int], tol: float, alpha: Optional[float] = 0.05
) -> Trainee:
    import pyro_flows as pf

    classes = CLASSES if config == "class-conditional" else None
    flow = pf.ImageCNF(tuple(shape), channels=tuple(channels), classes=classes, alpha=alpha, atol=tol, rtol=tol)
    objective = pf.FlowMatching()

    def distribution(labels: Tensor):
        return flow() if classes is None else flow(labels)

    return Trainee(
        METHODS[0],
        flow,
        lambda y, labels: objective(flow, y.flatten(1), None if classes is None else labels),
        lambda y, labels: distribution(labels).log_prob(y.flatten(1)),
    )


def build_glow(config: str, shape: Sequence[int], levels: int, steps: int, hidden_channels: int) -> Trainee:
    glow = images_bench.build_pyro_flows(config, levels, steps, hidden_channels, shape=tuple(shape))
    return Trainee(METHODS[1], glow.module, lambda y, labels: -glow.log_prob(y, labels).mean(), glow.log_prob)


def _train(trainee: Trainee, optimizer: torch.optim.Optimizer, batches: Callable[[], tuple[Tensor, Tensor]], seconds):
    """Adam steps on fresh batches until ``seconds`` of training have passed (the batch draws are not timed)."""
    parameters = list(trainee.module.parameters())
    spent = 0.0
    while spent < seconds:
        y, labels = batches()
        start = time.perf_counter()
        loss = trainee.loss(y, labels)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, CLIP)
        optimizer.step()
        spent += time.perf_counter() - start
        trainee.steps += 1
    trainee.seconds += spent


def _batches(train_x: Tensor, train_y: Tensor, batch: int, seed: int) -> Callable[[], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)

    def draw() -> tuple[Tensor, Tensor]:
        index = torch.randint(len(train_x), (batch,), generator=g)
        return (train_x[index] + torch.rand((batch, *train_x.shape[1:]), generator=g)) / LEVELS, train_y[index]

    return draw


@dataclass
class Result:
    config: str
    method: str
    parameters: int
    steps: int
    seconds: float
    images_per_second: float
    bits_per_dim: float
    stderr: float
    eval_seconds: float
    nfe: Optional[int] = None
    exact: Optional[tuple[float, float]] = None  # (exact-trace bits/dim, Hutchinson's) on the same rows


def _bits(log_prob: Tensor, dims: int) -> Tensor:
    """Per-row discrete bits/dim of log-densities of y = (x + u) / L on ``dims`` dimensions."""
    return -(log_prob - dims * math.log(LEVELS)) / (dims * math.log(2))


def heldout_bits(trainee: Trainee, images: Tensor, labels: Tensor, passes: int, seed: int = 1) -> Tensor:
    """Per-row bits/dim ``(passes, N)``: each pass a fresh u (seeded: the same for every model) and probe."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return torch.stack(
            [
                _bits(
                    trainee.log_prob((images + torch.rand(images.shape, generator=g)) / LEVELS, labels),
                    images[0].numel(),
                )
                for _ in range(passes)
            ]
        )


def _exact_vs_hutchinson(trainee: Trainee, images: Tensor, labels: Tensor, passes: int) -> tuple[float, float]:
    """Bits/dim of the same rows (the same u) with the exact trace and with Hutchinson's (``passes`` probes)."""
    layer = trainee.module.transforms[0]
    hutchinson = heldout_bits(trainee, images, labels, passes).mean().item()
    layer.trace = "exact"
    try:
        exact = heldout_bits(trainee, images, labels, passes).mean().item()
    finally:
        layer.trace = "hutchinson"
    return exact, hutchinson


def compare(
    config: str,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    budget: float,
    chunk: float,
    channels: Sequence[int],
    glow: tuple[int, int, int],
    batch: int,
    lr: float,
    probes: int,
    tol: float,
    exact_rows: int = 0,
    alpha: Optional[float] = 0.05,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Train both models for ``budget`` seconds each in interleaved chunks; held-out bits/dim of each."""
    train_x, train_y, test_x, test_y = data
    torch.manual_seed(seed)
    shape = tuple(train_x.shape[1:])
    trainees = [build_flow_matching(config, shape, channels, tol, alpha), build_glow(config, shape, *glow)]
    label = f"{shape[1]}×{shape[2]} {config}"
    optimizers = [torch.optim.Adam(t.module.parameters(), lr=lr) for t in trainees]
    streams = [_batches(train_x, train_y, batch, seed) for _ in trainees]
    order = [0, 1]
    while any(t.seconds < budget for t in trainees):
        for i in order:
            _train(trainees[i], optimizers[i], streams[i], min(chunk, budget - trainees[i].seconds))
        order.reverse()
    results = []
    for trainee in trainees:
        start = time.perf_counter()
        bits = heldout_bits(trainee, test_x, test_y, probes)
        elapsed = time.perf_counter() - start
        nfe = trainee.module.transforms[0].nfe if trainee.name == METHODS[0] else None
        result = Result(
            label,
            trainee.name,
            trainee.parameters,
            trainee.steps,
            trainee.seconds,
            trainee.steps * batch / trainee.seconds,
            bits.mean().item(),
            bits.std().item() / math.sqrt(bits.numel()),
            elapsed,
            nfe,
        )
        if exact_rows and trainee.name == METHODS[0]:
            result.exact = _exact_vs_hutchinson(trainee, test_x[:exact_rows], test_y[:exact_rows], probes)
        log(
            f"{label} {trainee.name}: {trainee.steps} steps in {trainee.seconds:.0f} s, held-out "
            f"{result.bits_per_dim:.3f} ± {result.stderr:.3f} bits/dim (evaluated in {elapsed:.0f} s)"
        )
        results.append(result)
    return results


def table(results: Sequence[Result], baselines: dict[int, float]) -> str:
    """The results as a Markdown table; ``baselines``: the independent-pixel bits/dim per image size."""
    head = ["model", "method", "parameters", "training s", "steps", "images/s", "held-out bits/dim", "eval s (NFE)"]
    head.append("FM − Glow bits/dim")
    rows: list[list[object]] = []
    for r in results:
        diff = ""
        if r.method == METHODS[0]:
            peer = next(p for p in results if p.config == r.config and p.method == METHODS[1])
            diff = f"{r.bits_per_dim - peer.bits_per_dim:+.3f}"
        nfe = "" if r.nfe is None else f" ({r.nfe})"
        rows.append(
            [r.config, r.method, f"{r.parameters:,}", f"{r.seconds:.0f}", r.steps, f"{r.images_per_second:,.0f}"]
            + [f"{r.bits_per_dim:.3f} ± {r.stderr:.3f}", f"{r.eval_seconds:.0f}{nfe}", diff]
        )
    for size, baseline in baselines.items():
        rows.append([f"{size}×{size}", "independent per-pixel categorical", "", "", "", "", f"{baseline:.3f}", "", ""])
    lines = [markdown_table(head, rows, align="llrrrrrrr")]
    for r in results:
        if r.exact is not None:
            lines.append(
                f"\n{r.config} {r.method}: exact-trace {r.exact[0]:.3f} vs Hutchinson {r.exact[1]:.3f} bits/dim "
                "on the same held-out rows and dequantisations"
            )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["unconditional"], choices=CONFIGS)
    p.add_argument("--sizes", type=int, nargs="+", default=[8], choices=SIZES, help="8: digits; 28: upscaled digits")
    p.add_argument("--budget", type=float, default=None, help="training s per model (default 90 at 8x8, 150 at 28x28)")
    p.add_argument("--chunk", type=float, default=None, help="seconds per interleaved chunk (default 10, quick 0.5)")
    p.add_argument("--channels", type=int, nargs="+", default=None, help="U-Net widths (default 16 32 [32])")
    p.add_argument("--glow", type=int, nargs=3, default=None, metavar=("LEVELS", "STEPS", "HIDDEN"))
    p.add_argument("--batch", type=int, default=None, help="default 128 at 8x8, 64 at 28x28")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--probes", type=int, default=None, help="evaluation passes (u and probe) (default 4, quick 1)")
    p.add_argument("--tol", type=float, default=1e-4, help="the ODE solver's atol = rtol for the likelihood")
    p.add_argument("--no-logit", action="store_true", help="ImageCNF(alpha=None): the ODE on [0, 1], no logit")
    p.add_argument("--exact-rows", type=int, default=0, help="also score this many held-out images exactly")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    a = p.parse_args(argv)
    q = a.quick
    threads = torch.get_num_threads()
    try:
        set_threads(a.threads)
        print(machine_line(), flush=True)
        results, baselines = [], {}
        for size in a.sizes:
            budget, batch, channels = DEFAULTS[size]
            data = images_bench.digits_split(size=size)
            if q:
                data = (*data[:2], data[2][:16], data[3][:16])
            baselines[size] = images_bench.independent_pixels_bits_per_dim(data[0], data[2])
            for config in a.configs:
                results += compare(
                    config,
                    data,
                    a.budget or (1.0 if q else budget),
                    a.chunk or (0.5 if q else 10.0),
                    a.channels or ((4, 8) if q else channels),
                    tuple(a.glow or ((1, 1, 8) if q else (2, 4, 64))),
                    a.batch or batch,
                    a.lr,
                    a.probes or (1 if q else 4),
                    1e-2 if q else a.tol,
                    a.exact_rows,
                    None if a.no_logit else 0.05,
                )
        print()
        print(table(results, baselines))
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

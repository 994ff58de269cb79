"""The ``pyro-flows`` command line."""

from __future__ import annotations

import argparse
import math
import time
from typing import Optional, Sequence

import torch

from . import flows
from .data import two_moons
from .train import fit

FACTORIES = {"nice": flows.NICE, "realnvp": flows.RealNVP, "maf": flows.MAF, "iaf": flows.IAF, "nsf": flows.NSF}


def gaussian_log_likelihood(train: torch.Tensor, test: torch.Tensor) -> float:
    """Held-out mean log-likelihood of the maximum-likelihood Gaussian fitted on ``train``."""
    mean, covariance = train.mean(0), torch.cov(train.T)
    gaussian = torch.distributions.MultivariateNormal(mean, covariance)
    return float(gaussian.log_prob(test).mean())


def demo(flow: str = "nsf", epochs: int = 40, seed: int = 0) -> dict:
    """Fit a flow on two-moons samples and compare its held-out log-likelihood with a Gaussian's."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train, test = two_moons(2000, generator=generator), two_moons(1000, generator=generator)
    model = FACTORIES[flow](features=2, transforms=4, hidden=(64, 64))
    start = time.perf_counter()
    fit(model, train, max_epochs=epochs, batch_size=256, lr=3e-3, seed=seed)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        flow_ll = float(model().log_prob(test).mean())
    return {
        "flow": flow,
        "epochs": epochs,
        "seconds": seconds,
        "flow_ll": flow_ll,
        "gaussian_ll": gaussian_log_likelihood(train, test),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="pyro-flows", description="Normalizing flows for Pyro.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="fit a flow on built-in two-moons data and report the fit")
    demo_parser.add_argument("--flow", choices=sorted(FACTORIES), default="nsf")
    demo_parser.add_argument("--epochs", type=int, default=40)
    demo_parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = demo(args.flow, args.epochs, args.seed)
    print(f"{result['flow'].upper()} on two moons: {result['epochs']} epochs in {result['seconds']:.1f} s")
    print(f"held-out log-likelihood  flow: {result['flow_ll']:.3f} nats   Gaussian: {result['gaussian_ll']:.3f} nats")
    print(f"improvement over the Gaussian: {result['flow_ll'] - result['gaussian_ll']:.3f} nats/sample")
    return 0 if math.isfinite(result["flow_ll"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

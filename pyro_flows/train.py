"""The one fitting loop: minibatch maximum likelihood for any flow."""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch
from torch import Tensor, nn
from tqdm import tqdm


def negative_log_likelihood(model: nn.Module, x: Tensor, context: Optional[Tensor]) -> Tensor:
    """Mean negative log-likelihood of a batch under ``model(context)``."""
    distribution = model() if context is None else model(context)
    return -distribution.log_prob(x).mean()


def _show_progress(progress: Optional[bool]) -> bool:
    if progress is not None:
        return progress
    return sys.stderr.isatty() and not os.environ.get("CI")


def fit(
    model: nn.Module,
    data: Tensor,
    context: Optional[Tensor] = None,
    *,
    max_epochs: int = 100,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    clip_grad: Optional[float] = 5.0,
    seed: Optional[int] = None,
    progress: Optional[bool] = None,
) -> list[float]:
    """Fit ``model`` to ``data`` (and ``context`` rows) by minibatch Adam; returns the mean loss per epoch.

    Example:
        >>> flow = pyro_flows.RealNVP(features=2)
        >>> history = fit(flow, torch.randn(512, 2), max_epochs=2, progress=False)
    """
    if data.dim() != 2 or (context is not None and context.shape[0] != data.shape[0]):
        raise ValueError(
            f"fit: data must be (rows, features) and context (rows, context_features); got "
            f"{tuple(data.shape)} and {None if context is None else tuple(context.shape)}"
        )
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    if seed is not None:
        torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    history = []
    bar = tqdm(range(max_epochs), disable=not _show_progress(progress), desc="fit")
    for _ in bar:
        order = torch.randperm(data.shape[0], generator=generator).to(data.device)
        total, seen = 0.0, 0
        for batch in order.split(batch_size):
            loss = negative_log_likelihood(model, data[batch], None if context is None else context[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            total, seen = total + loss.item() * len(batch), seen + len(batch)
        history.append(total / seen)
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    model.eval()
    return history

"""``fit`` under ``torchrun``: two CPU processes (gloo) against one process with the same global batch.

This file is also the script the two processes run (``torchrun ... tests/test_distributed.py OUT``):
each rank fits the same RealNVP on its half of every batch, then checks that a gradient taken
through ``fit``'s DistributedDataParallel wrapper is the average of the ranks' gradients, and saves
its history and weights for the test to compare.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import pyro_flows as pf
from pyro_flows.train import NegativeLogLikelihood, _data_parallel

PER_RANK_BATCH = 32
OPTIONS = dict(max_epochs=8, lr=5e-3, validation_fraction=0.2, patience=20, seed=0, progress=False)


def problem() -> tuple[pf.Flow, torch.Tensor]:
    """A small RealNVP and 320 fixed rows (64 held out, 256 for training: 4 global batches of 64 an epoch)."""
    torch.manual_seed(0)
    flow = pf.RealNVP(2, transforms=2, hidden=(16, 16))
    data = torch.randn(320, 2, generator=torch.Generator().manual_seed(1)) @ torch.tensor([[1.0, 0.9], [0.0, 0.4]])
    return flow, data


def gradient_check(flow: pf.Flow, data: torch.Tensor, rank: int) -> dict:
    """Gradients through the wrapper on this rank's rows, the full batch's, and this rank's alone."""
    rows = data[:64]
    reference = copy.deepcopy(flow)
    NegativeLogLikelihood()(reference, rows).backward()
    local = copy.deepcopy(flow)
    NegativeLogLikelihood()(local, rows[rank::2]).backward()
    wrapped = _data_parallel(flow, torch.device("cpu"))  # must outlive the backward pass: its hooks all-reduce
    NegativeLogLikelihood()(wrapped, rows[rank::2]).backward()
    flat = lambda model: torch.cat([p.grad.flatten() for p in model.parameters()])
    return {
        "averaged_error": float((flat(flow) - flat(reference)).abs().max()),
        "local_difference": float((flat(local) - flat(reference)).abs().max()),
    }


def main(out: Path) -> None:
    """One rank of the run (started by torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    flow, data = problem()
    history = pf.fit(flow, data, batch_size=PER_RANK_BATCH, checkpoint=out / "run.pt", checkpoint_every=10, **OPTIONS)
    result = {"history": dataclasses.asdict(history), "state": flow.state_dict()}
    result.update(gradient_check(flow, data, rank))
    # NICE starts with an ActNorm, initialised from the first batch: each rank's own, until fit keeps rank 0's
    torch.manual_seed(0)
    nice = pf.NICE(2, transforms=2, hidden=(16, 16))
    pf.fit(nice, data, batch_size=PER_RANK_BATCH, max_epochs=2, seed=0, progress=False)
    result["nice"] = nice.state_dict()
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun() -> list[str]:
    """The venv's ``torchrun`` (the README's command); ``python -m torch.distributed.run`` is the same program."""
    script = Path(sys.executable).parent / "torchrun"
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def test_two_processes_match_one_with_twice_the_batch(tmp_path):
    command = [
        *torchrun(),
        "--nnodes=1",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        __file__,
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]

    flow, data = problem()
    single = pf.fit(flow, data, batch_size=2 * PER_RANK_BATCH, **OPTIONS)

    # every rank reports the same (rank-averaged) losses and ends with the same weights, ActNorm's too
    assert ranks[0]["history"] == ranks[1]["history"]
    for name in ("state", "nice"):
        assert ranks[0][name].keys() == ranks[1][name].keys()
        assert all(torch.equal(ranks[0][name][k], ranks[1][name][k]) for k in ranks[0][name])
    # ... and they follow the single process with the global batch
    history = ranks[0]["history"]
    assert history["steps"] == single.steps == 8 * 4
    # (measured: 2e-7 apart, float32 sums in another order)
    torch.testing.assert_close(torch.tensor(history["train_loss"]), torch.tensor(single.train_loss), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        torch.tensor(history["validation_loss"]), torch.tensor(single.validation_loss), atol=1e-5, rtol=0
    )
    assert history["train_loss"][-1] < history["train_loss"][0] - 0.3  # it did learn
    for key, value in flow.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][key], value, atol=2e-5, rtol=0)
    # gradients through the wrapper are the average over ranks, not one rank's own
    for result in ranks:
        assert result["averaged_error"] < 1e-5 < 1e-3 < result["local_difference"]
    # one checkpoint, written by rank 0 at the end
    checkpoint = torch.load(tmp_path / "run.pt", weights_only=True)
    assert checkpoint["position"]["history"]["steps"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.pt", "rank1.pt", "run.pt"]


if __name__ == "__main__":
    main(Path(sys.argv[1]))

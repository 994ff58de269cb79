"""The one file format (``pyro_flows.saving``): ``fit`` checkpoints, ``DensityEstimator.save`` and ``NPE.save``
all write it, atomically, and read it weights-only; a file of another kind or version is refused by name."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pyro.distributions as dist
import pytest
import torch

import pyro_flows as pf
from pyro_flows import saving
from pyro_flows.infer import NPE

try:
    import fcntl
except ImportError:  # Windows: the tests that need it are skipped
    fcntl = None  # type: ignore[assignment]

PRIOR = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
TINY = dict(transforms=1, hidden=(8,))


def data(rows: int = 64) -> torch.Tensor:
    return torch.randn(rows, 2, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """One file of each kind, written by the public calls."""
    folder = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    pf.fit(pf.RealNVP(2, **TINY), data(), max_epochs=1, seed=0, checkpoint=folder / "fit.pt", progress=False)
    pf.DensityEstimator("realnvp", **TINY).fit(data(), max_epochs=1, progress=False).save(folder / "estimator.pt")
    theta = PRIOR.sample((64,))
    npe = NPE(PRIOR, "maf", **TINY).append_simulations(theta, theta + 0.1).train(max_epochs=1, progress=False)
    npe.save(folder / "npe.pt")
    return {"fit": folder / "fit.pt", "DensityEstimator": folder / "estimator.pt", "NPE": folder / "npe.pt"}


def open_as(kind: str, path):
    """The public reader of ``kind`` applied to ``path``."""
    if kind == "fit":
        return pf.fit(pf.RealNVP(2, **TINY), data(), max_epochs=2, resume=path, progress=False)
    if kind == "DensityEstimator":
        return pf.DensityEstimator.load(path)
    return NPE.load(path, PRIOR)


def test_every_kind_has_one_header_and_loads_weights_only(files):
    for kind, path in files.items():
        payload = torch.load(path, weights_only=True)  # tensors and plain containers only
        assert (payload["format"], payload["version"]) == (f"pyro_flows.{kind}", saving.VERSIONS[kind])
        assert saving.header(payload) == (kind, 2)
        assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temporary files


@pytest.mark.parametrize("kind", ["fit", "DensityEstimator", "NPE"])
@pytest.mark.parametrize("other", ["fit", "DensityEstimator", "NPE"])
def test_a_file_of_another_kind_is_refused_by_name(files, kind, other):
    if kind == other:
        open_as(kind, files[other])  # its own reader takes it
        return
    with pytest.raises(ValueError, match=rf"{files[other]} is not {saving.DESCRIPTIONS[kind]}: it is "):
        open_as(kind, files[other])


@pytest.mark.parametrize("kind", ["fit", "DensityEstimator", "NPE"])
def test_a_file_of_another_version_is_refused_by_name(files, kind, tmp_path):
    payload = torch.load(files[kind], weights_only=True)
    payload["version"] = 3
    saving.atomic_save(payload, tmp_path / "newer.pt")
    with pytest.raises(
        ValueError, match=rf"{tmp_path / 'newer.pt'}: unknown {kind} file version 3; .* reads version 2"
    ):
        open_as(kind, tmp_path / "newer.pt")


@pytest.mark.parametrize("kind", ["fit", "DensityEstimator", "NPE"])
def test_junk_and_code_are_refused(kind, tmp_path):
    saving.atomic_save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=f"other.pt is not {saving.DESCRIPTIONS[kind]}$"):
        open_as(kind, tmp_path / "other.pt")
    torch.save({"format": f"pyro_flows.{kind}", "version": 1, "code": RunsCode()}, tmp_path / "code.pt")
    with pytest.raises(ValueError, match="code.pt is not a weights-only pyro_flows file"):
        open_as(kind, tmp_path / "code.pt")
    with pytest.raises(FileNotFoundError):
        open_as(kind, tmp_path / "missing.pt")


class RunsCode:
    def __reduce__(self):
        return (print, ("CODE FROM THE FILE RAN",))


@pytest.mark.parametrize("kind, legacy", [("fit", "pyro_flows.fit/1"), ("NPE", "pyro_flows.NPE/1"), ("fit", None)])
def test_files_of_version_1_are_refused_with_the_reason(files, kind, legacy, tmp_path):
    """0.1.0 files (the one-string headers, or version 1) hold spline weights that meant another function:
    loading them would silently give another model."""
    payload = torch.load(files[kind], weights_only=True)
    if legacy is None:
        payload["version"] = 1
    else:
        del payload["version"]
        payload["format"] = legacy
    saving.atomic_save(payload, tmp_path / "old.pt")
    assert saving.header(torch.load(tmp_path / "old.pt", weights_only=True)) == (kind, 1)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'old.pt'} was written by pyro_flows 0.1.0 .* Refit it"):
        open_as(kind, tmp_path / "old.pt")


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path):
    path = saving.save({"x": torch.ones(3)}, tmp_path / "f.pt", "fit")
    with pytest.raises(Exception):  # noqa: B017 (torch.save of a lambda: a pickling error of some type)
        saving.save({"x": lambda: None}, path, "fit")
    assert torch.equal(saving.load(path, "fit")["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["f.pt"]


def test_save_checks_its_kind_and_header():
    with pytest.raises(ValueError, match="unknown kind 'Glow'; the kinds are fit, DensityEstimator, NPE"):
        saving.save({}, "unused.pt", "Glow")
    with pytest.raises(ValueError, match="header's entries"):
        saving.save({"version": 3}, "unused.pt", "fit")


def test_plain_values():
    assert saving.is_plain({"bins": 8, "hidden": [16, 16], "bound": 3.0, "mixing": ("lu", None), "on": True})
    assert not saving.is_plain({"activation": torch.nn.ReLU()})
    assert not saving.is_plain({1: "a"})  # keys must be strings
    assert not saving.is_plain([torch.zeros(1)])


# -- issue 16, item 9: temporaries, modes, resume paths, contents that make no sense ------------------------------
KILLED_SAVE = """
import os, sys, time
from pyro_flows import saving
os.fsync = lambda fd: (print("writing", flush=True), time.sleep(60))  # killed here, the temporary written
saving.atomic_save({"x": __import__("torch").zeros(1000)}, sys.argv[1])
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and flock are POSIX")
def test_a_temporary_left_by_a_killed_save_is_removed_by_the_next_save(tmp_path):
    target = tmp_path / "run.pt"
    child = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(target)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "writing\n"
    child.send_signal(signal.SIGKILL)
    child.wait()
    (orphan,) = tmp_path.glob(".run.pt.*.tmp")  # what the kill left, as in the issue
    os.utime(orphan, (time.time() - 60, time.time() - 60))  # the next save comes later
    # a save in progress (locked) and files of other names are not ours to remove
    busy = tmp_path / ".run.pt.busy0000.tmp"
    others = [tmp_path / ".other.pt.abcd1234.tmp", tmp_path / ".run.pt.x.abcd1234.tmp", tmp_path / "run.pt.tmp"]
    for path in [busy, *others]:
        path.write_bytes(b"")
        os.utime(path, (time.time() - 60, time.time() - 60))
    with open(busy, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        saving.save({"x": torch.ones(2)}, target, "fit")
    assert not orphan.exists() and busy.exists() and all(path.exists() for path in others)
    assert torch.equal(saving.load(target, "fit")["x"], torch.ones(2))
    saving.save({"x": torch.ones(2)}, target, "fit")  # unlocked and old now: an orphan too
    assert not busy.exists()


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_files_get_the_mode_of_any_new_file(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = saving.save({"x": torch.ones(2)}, tmp_path / "f.pt", "fit")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_resume_from_the_absolute_path_of_the_checkpoint_starts_fresh_then_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flow = pf.RealNVP(2, **TINY)
    options = dict(checkpoint="run.pt", resume=tmp_path / "run.pt", seed=0, progress=False)
    first = pf.fit(flow, data(), max_epochs=1, **options)  # the file does not exist yet: a fresh run
    assert (tmp_path / "run.pt").is_file() and len(first.train_loss) == 1
    second = pf.fit(flow, data(), max_epochs=2, **options)  # now it does: resumed after epoch 1
    assert second.train_loss[:1] == first.train_loss and len(second.train_loss) == 2


FIRST_WEIGHTS = {"fit": "model", "DensityEstimator": "state_dict", "NPE": "state_dict"}


@pytest.mark.parametrize("kind", ["fit", "DensityEstimator", "NPE"])
def test_a_file_with_nan_weights_is_refused_by_name(files, kind, tmp_path):
    payload = torch.load(files[kind], weights_only=True)
    key, weight = next((k, t) for k, t in payload[FIRST_WEIGHTS[kind]].items() if t.is_floating_point())
    weight[0] = float("nan")
    saving.atomic_save(payload, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'nan.pt'}: the entry '{FIRST_WEIGHTS[kind]}\.{key}' holds NaN"):
        open_as(kind, tmp_path / "nan.pt")


def test_an_estimator_file_with_infinite_weights_or_wrong_feature_names_is_refused_by_name(files, tmp_path):
    payload = torch.load(files["DensityEstimator"], weights_only=True)
    assert payload["features"] == 2
    for names in (["a"], ["a", "b", "c"], "ab", [1, 2]):
        saving.atomic_save({**payload, "feature_names": names}, tmp_path / "names.pt")
        with pytest.raises(ValueError, match=rf"{tmp_path / 'names.pt'} is a damaged .* feature names"):
            pf.DensityEstimator.load(tmp_path / "names.pt")
    saving.atomic_save({**payload, "feature_names": ["a", "b"]}, tmp_path / "names.pt")
    assert pf.DensityEstimator.load(tmp_path / "names.pt").feature_names_in_ == ["a", "b"]
    state = {k: v.clone() for k, v in payload["state_dict"].items()}
    next(t for t in state.values() if t.is_floating_point()).fill_(float("inf"))
    saving.atomic_save({**payload, "state_dict": state}, tmp_path / "inf.pt")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'inf.pt'}: the entry 'state_dict\..*' holds infinite"):
        pf.DensityEstimator.load(tmp_path / "inf.pt")

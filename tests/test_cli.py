"""The ``pyro-flows`` command line: fit → score → sample, bad input, the demo, and the installed console script."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_flows import cli, demo
from pyro_flows.data import two_moons
from pyro_flows.estimator import DensityEstimator
from pyro_flows.io import write_table

SCRIPT = Path(sys.executable).parent / "pyro-flows"
FIT = ["--flow", "realnvp", "--transforms", "2", "--hidden", "16", "--epochs", "3", "--no-progress"]


class RunsCodeWhenUnpickled:
    """A pickle payload that calls ``print`` when loaded unsafely: a saved model must never do that."""

    def __reduce__(self):
        return (print, ("CODE FROM THE MODEL FILE RAN",))


def moons(rows: int, seed: int = 0) -> np.ndarray:
    return two_moons(rows, generator=torch.Generator().manual_seed(seed)).double().numpy()


def run(argv: list[str]) -> tuple[int, str, str]:
    """``cli.main(argv)`` with stdout and stderr captured (usable outside function-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def read_csv(text: str) -> tuple[list[str], np.ndarray]:
    lines = text.strip().splitlines()
    return lines[0].split(","), np.array([[float(v) for v in line.split(",")] for line in lines[1:]])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict:
    """A RealNVP fitted by ``pyro-flows fit`` on a 300-row CSV with header ``a,b``."""
    folder = tmp_path_factory.mktemp("cli")
    data, csv, model = moons(300), folder / "train.csv", folder / "model.pt"
    write_table(data, csv, header=["a", "b"])
    code, out, err = run(["fit", str(csv), "--out", str(model), "--validation-fraction", "0.2", *FIT])
    assert code == 0, err
    return {"folder": folder, "data": data, "csv": csv, "model": model, "out": out}


def test_fit_prints_a_one_line_summary_and_saves_a_loadable_model(fitted):
    (line,) = fitted["out"].strip().splitlines()
    assert line.startswith("fitted realnvp on 300 rows x 2 columns: train loss ")
    assert "validation loss" in line and "3 epochs" in line and str(fitted["model"]) in line
    estimator = DensityEstimator.load(fitted["model"])
    assert estimator.flow == "realnvp" and estimator.features_ == 2 and len(estimator.history_.train_loss) == 3


def test_score_writes_the_estimators_log_densities(fitted, capsys):
    assert cli.main(["score", str(fitted["model"]), str(fitted["csv"])]) == 0
    header, scores = read_csv(capsys.readouterr().out)
    assert header == ["log_density"] and scores.shape == (300, 1)
    assert np.isfinite(scores).all()
    expected = DensityEstimator.load(fitted["model"]).score_samples(fitted["data"])
    np.testing.assert_allclose(scores[:, 0], expected, rtol=1e-12)  # CSV floats round-trip exactly


def test_sample_writes_rows_under_the_training_header(fitted, capsys):
    argv = ["sample", str(fitted["model"]), "-n", "40", "--seed", "1"]
    assert cli.main(argv) == 0
    header, samples = read_csv(capsys.readouterr().out)
    assert header == ["a", "b"] and samples.shape == (40, 2) and np.isfinite(samples).all()
    assert cli.main(argv) == 0
    assert np.array_equal(read_csv(capsys.readouterr().out)[1], samples)  # seeded: the same rows again


def test_headerless_npy_round_trip_names_columns_x0_x1(tmp_path, capsys):
    data, model = tmp_path / "train.npy", tmp_path / "model.pt"
    np.save(data, moons(200))
    assert cli.main(["fit", str(data), "--out", str(model), "--epochs", "1", *FIT[:6], "--no-progress"]) == 0
    assert "fitted realnvp on 200 rows x 2 columns" in capsys.readouterr().out
    assert cli.main(["sample", str(model), "-n", "5"]) == 0
    header, samples = read_csv(capsys.readouterr().out)
    assert header == ["x0", "x1"] and samples.shape == (5, 2)
    assert cli.main(["score", str(model), str(data)]) == 0
    assert read_csv(capsys.readouterr().out)[1].shape == (200, 1)


def test_skip_nonfinite_scores_bad_rows_as_nan_keeping_row_order(fitted, tmp_path, capsys):
    csv = tmp_path / "new.csv"
    csv.write_text("a,b\n0.5,0.25\nnan,1.0\n1.0,inf\n0.0,0.5\n")
    assert cli.main(["score", str(fitted["model"]), str(csv)]) == 2
    assert "lines 3, 4" in capsys.readouterr().err
    assert cli.main(["score", str(fitted["model"]), str(csv), "--skip-nonfinite"]) == 0
    captured = capsys.readouterr()
    scores = read_csv(captured.out)[1][:, 0]
    assert scores.shape == (4,)
    assert np.isnan(scores[1:3]).all() and np.isfinite(scores[[0, 3]]).all()
    good = DensityEstimator.load(fitted["model"]).score_samples(np.array([[0.5, 0.25], [0.0, 0.5]]))
    np.testing.assert_allclose(scores[[0, 3]], good, rtol=1e-6)
    assert captured.err.strip() == (
        f"pyro-flows: warning: {csv}: 2 of 4 rows have NaN or inf values; their log_density is nan"
    )


def test_a_value_too_large_for_the_models_dtype_is_named_or_scored_nan(fitted, tmp_path, capsys):
    """1e39 is finite in the file but inf in float32: not "NaN or inf", and --skip-nonfinite scores the row nan."""
    csv = tmp_path / "big.csv"
    csv.write_text("a,b\n0.5,0.25\n1e39,1.0\n0.0,0.5\nnan,1\n")
    overflow = (
        f"{csv}, line 3, column 1 ('a'): 1e+39 overflows float32, the model's dtype "
        "(largest finite value 3.402823e+38); 1 of 4 rows have such values (line 3)"
    )
    csv_finite = tmp_path / "big_finite.csv"
    csv_finite.write_text("a,b\n0.5,0.25\n1e39,1.0\n")
    assert cli.main(["score", str(fitted["model"]), str(csv_finite)]) == 2
    assert capsys.readouterr().err == (
        f"pyro-flows: error: {csv_finite}, line 3, column 1 ('a'): 1e+39 overflows float32, the model's dtype "
        "(largest finite value 3.402823e+38); 1 of 2 rows have such values (line 3); "
        "pass --skip-nonfinite to score them nan\n"
    )
    assert cli.main(["score", str(fitted["model"]), str(csv), "--skip-nonfinite"]) == 0
    captured = capsys.readouterr()
    scores = read_csv(captured.out)[1][:, 0]
    assert scores.shape == (4,) and np.isnan(scores[[1, 3]]).all()
    good = DensityEstimator.load(fitted["model"]).score_samples(np.array([[0.5, 0.25], [0.0, 0.5]]))
    np.testing.assert_allclose(scores[[0, 2]], good, rtol=1e-6)
    assert captured.err.splitlines() == [
        f"pyro-flows: warning: {csv}: 1 of 4 rows have NaN or inf values; their log_density is nan",
        f"pyro-flows: warning: {overflow}; their log_density is nan",
    ]
    np.save(tmp_path / "big.npy", np.array([[0.0, 1.0], [0.0, -1e39]]))
    assert cli.main(["fit", str(tmp_path / "big.npy"), "--out", str(tmp_path / "m.pt"), *FIT]) == 2
    assert "big.npy, row 1 (0-based), column 2: -1e+39 overflows float32" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def bad_input(folder: Path, model: Path) -> dict[str, tuple[list[str], str]]:
    """Each bad input's argv and a fragment its error message must contain."""
    files = {
        "ragged.csv": "a,b\n1,2\n3\n",
        "text.csv": "a,b\n1,2\n3,oops\n",
        "nan.csv": "1,2\nnan,4\n",
        "wide.csv": "1,2,3\n4,5,6\n",
        "renamed.csv": "b,a\n1,2\n",
        "notes.pt": "just text\n",
        "underscore.csv": "a,b\n1,2\n1_000,3\n",
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    (folder / "latin1.csv").write_bytes("a,b\n1,2\n3,4\u00e9\n".encode("latin-1"))
    torch.save({"weights": torch.zeros(2)}, folder / "other.pt")
    torch.save(RunsCodeWhenUnpickled(), folder / "exploit.pt")
    return {
        "missing data": (["fit", str(folder / "missing.csv"), "--out", str(folder / "m.pt")], "no such file"),
        "missing model": (["sample", str(folder / "missing.pt"), "-n", "3"], "no such file"),
        "ragged row": (["fit", str(folder / "ragged.csv"), "--out", str(folder / "m.pt")], "line 3: expected 2"),
        "non-numeric": (["score", str(model), str(folder / "text.csv")], "line 3, column 2: 'oops' is not a number"),
        "nan row": (["fit", str(folder / "nan.csv"), "--out", str(folder / "m.pt")], "NaN or inf values (lines 2)"),
        "underscore": (["score", str(model), str(folder / "underscore.csv")], "line 3, column 1: '1_000' is not a"),
        "latin-1": (
            ["score", str(model), str(folder / "latin1.csv")],
            f"{folder / 'latin1.csv'}, line 3: not UTF-8 text (byte 0xe9",
        ),
        "wrong width": (["score", str(model), str(folder / "wide.csv")], "has 3 columns; the model was fitted on 2"),
        "wrong header": (["score", str(model), str(folder / "renamed.csv")], "fitted on ['a', 'b']"),
        "not a model": (["sample", str(folder / "notes.pt"), "-n", "3"], f"{folder / 'notes.pt'} is not a"),
        "swapped arguments": (["score", str(folder / "text.csv"), str(model)], f"{folder / 'text.csv'} is not a"),
        "not an estimator": (
            ["sample", str(folder / "other.pt"), "-n", "3"],
            "not a saved pyro_flows DensityEstimator",
        ),
        "runs code": (["score", str(folder / "exploit.pt"), str(folder / "wide.csv")], "refusing to execute code"),
    }


def test_bad_input_is_one_error_line_and_exit_status_2(fitted, tmp_path, capsys):
    for case, (argv, fragment) in bad_input(tmp_path, fitted["model"]).items():
        assert cli.main(argv) == 2, case
        captured = capsys.readouterr()
        assert captured.out == "" and "CODE FROM THE MODEL FILE RAN" not in captured.out, case
        (line,) = captured.err.strip().splitlines()
        assert line.startswith("pyro-flows: error: ") and fragment in line, (case, line)


def test_nan_rows_are_met_with_the_command_line_flags_not_the_python_keyword(fitted, tmp_path, capsys):
    csv = tmp_path / "nan.csv"
    csv.write_text("a,b\n1,2\nnan,4\n")
    for argv, flag in (
        (["fit", str(csv), "--out", str(tmp_path / "m.pt")], "pass --drop-nonfinite to drop them"),
        (["score", str(fitted["model"]), str(csv)], "pass --skip-nonfinite to score them nan"),
    ):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err == f"pyro-flows: error: {csv}: 1 of 2 rows have NaN or inf values (lines 3); {flag}\n", err


def unwritable_destinations(folder: Path) -> dict[str, tuple[Path, str]]:
    """Each ``--out`` that cannot be written, and a fragment its error must contain."""
    (folder / "a_file.txt").write_text("x\n")
    return {
        "no such folder under /proc": (Path("/proc/forbidden/m.pt"), "cannot create a file in /proc"),
        "an existing directory": (folder, f"--out {folder} is a directory; name a file in it"),
        "a file as the folder": (folder / "a_file.txt" / "m.pt", f"{folder / 'a_file.txt'} is not a directory"),
    }


def test_fit_checks_the_destination_before_training(fitted, tmp_path, monkeypatch, capsys):
    def no_training(*args, **kwargs):
        raise AssertionError("fit trained before checking --out")

    monkeypatch.setattr(DensityEstimator, "fit", no_training)
    for case, (out, fragment) in unwritable_destinations(tmp_path).items():
        assert cli.main(["fit", str(fitted["csv"]), "--out", str(out), *FIT]) == 2, case
        captured = capsys.readouterr()
        (line,) = captured.err.strip().splitlines()
        assert captured.out == "" and line.startswith("pyro-flows: error: ") and fragment in line, (case, line)
    assert (tmp_path / "a_file.txt").read_text() == "x\n"
    # a destination whose folders do not exist yet is fine (save creates them), and checking it creates nothing
    cli.check_destination(tmp_path / "new" / "deeper" / "m.pt", "--out")
    assert not (tmp_path / "new").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a_file.txt"]


def test_demo_checks_its_report_folder_before_fitting(tmp_path, monkeypatch, capsys):
    def no_demo(*args, **kwargs):
        raise AssertionError("the demo ran before checking --out")

    monkeypatch.setattr(cli, "run_demo", no_demo)
    (tmp_path / "a_file.txt").write_text("x\n")
    for out, fragment in (
        (tmp_path / "a_file.txt", "is a file, not a folder"),
        (Path("/proc/forbidden/report"), "cannot create a file in /proc"),
    ):
        assert cli.main(["demo", "--quick", "--out", str(out)]) == 2
        assert fragment in capsys.readouterr().err


def test_sample_into_a_reader_that_stops_early_exits_quietly(fitted):
    """``pyro-flows sample ... | head -2``: no error message; the status a shell gives a tool killed by SIGPIPE."""
    process = subprocess.Popen(
        [str(SCRIPT), "sample", str(fitted["model"]), "-n", "20000", "--seed", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    head = [process.stdout.readline() for _ in range(2)]
    process.stdout.close()  # 20000 rows are far more than a pipe buffers: the writer meets the closed pipe
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == cli.EXIT_BROKEN_PIPE == 141
    assert head[0] == b"a,b\n" and len(head[1].split(b",")) == 2
    assert stderr == b""


def test_usage_errors_and_help(capsys):
    for argv in (["fit", "x.csv", "--flow", "bogus", "--out", "m.pt"], ["sample", "m.pt", "-n", "0"], []):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
    for command, option in (("fit", "--validation-fraction"), ("score", "--skip-nonfinite"), ("sample", "-n N"),
                            ("demo", "--quick")):  # fmt: skip
        with pytest.raises(SystemExit) as info:
            cli.main([command, "--help"])
        assert info.value.code == 0 and option in capsys.readouterr().out


def test_fit_defaults_are_the_estimators_and_every_registered_flow_is_a_choice():
    """The command line keeps no defaults or flow list of its own: DensityEstimator's and the registry's."""
    args = cli.parser().parse_args(["fit", "x.csv", "--out", "m.pt"])
    # None: the estimator chooses from the table (DensityEstimator's None); the seed is the estimator's
    assert (args.epochs, args.batch_size, args.lr, args.validation_fraction, args.patience) == (None,) * 5
    assert (args.transforms, args.hidden, args.context) == (None, None, None)
    assert args.seed == DensityEstimator().seed == 0
    assert cli.parser().parse_args(["fit", "x.csv", "--out", "m.pt", "--flow", "cnf"]).flow == "cnf"


def test_fit_with_a_cnf(tmp_path):
    write_table(moons(120), tmp_path / "x.csv")
    code, out, err = run(["fit", str(tmp_path / "x.csv"), "--out", str(tmp_path / "m.pt"), "--flow", "cnf",
                          "--hidden", "8", "--epochs", "1", "--no-progress"])  # fmt: skip
    assert code == 0, err
    assert out.startswith("fitted cnf on 120 rows") and DensityEstimator.load(tmp_path / "m.pt").flow == "cnf"


def test_gaussian_baseline_is_the_fitted_gaussian():
    rng = np.random.default_rng(0)
    train, test = (rng.normal([1.0, -1.0], [2.0, 0.5], size=(4000, 2)) for _ in range(2))
    # minus the entropy of N(mu, diag(4, 0.25)): -(log(2 pi e) + log(2 * 0.5))
    assert demo.gaussian_log_density(train, test).mean() == pytest.approx(-(1.0 + math.log(2 * math.pi)), abs=0.05)


def check_report(folder: Path) -> dict:
    """Every report file is there; the numbers in metrics.json are finite and in a plausible range."""
    for name in demo.REPORT_FILES:
        assert (folder / name).stat().st_size > 1000, name
    for name in demo.REPORT_FILES[:3]:
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    metrics = json.loads((folder / "metrics.json").read_text())
    moons, digits = metrics["two_moons"], metrics["digits"]
    assert moons["dims"] == 2 and digits["dims"] == 64 and digits["levels"] == 17
    assert digits["train_rows"] + digits["test_rows"] == 1797
    assert -2.5 < moons["gaussian_test_log_likelihood"] < -1.4  # two moons with noise 0.1
    assert math.isfinite(moons["test_log_likelihood"]) and math.isfinite(digits["test_log_likelihood"])
    # bits/dim of 17-level pixels: a uniform model scores log2(17) = 4.09; both models must do better than 6
    assert 0.0 < digits["test_bits_per_dim"] < 6.0 and 0.0 < digits["gaussian_test_bits_per_dim"] < 4.09
    assert len(moons["train_loss"]) == moons["epochs"] == len(moons["validation_loss"])
    return metrics


def test_demo_quick_writes_the_report(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    assert "two moons (2-D, NSF" in output and "digits (64-D" in output and "bits/dim" in output
    check_report(tmp_path)


def test_console_script_reports_bad_input_in_one_line(tmp_path):
    assert SCRIPT.exists()
    (tmp_path / "ragged.csv").write_text("1,2\n3\n")
    result = subprocess.run(
        [str(SCRIPT), "fit", str(tmp_path / "ragged.csv"), "--out", str(tmp_path / "m.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stdout == "" and not (tmp_path / "m.pt").exists()
    assert result.stderr == f"pyro-flows: error: {tmp_path / 'ragged.csv'}, line 2: expected 2 columns, got 1\n"


def test_conditional_fit_samples_per_context_row_and_scores_given_the_context(tmp_path):
    """``fit --context`` models the other columns given these; ``sample --context FILE`` draws ``-n`` rows for
    each context row, with the context in its column; ``score`` scores targets given the row's context."""
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1.0, 600)
    data = np.column_stack([x, 3.0 * x + 0.2 * rng.standard_normal(600)])  # columns (c, y): y | c ~ N(3c, 0.04)
    write_table(data, tmp_path / "t.csv", header=["c", "y"])
    model = tmp_path / "m.pt"
    code, out, err = run(["fit", str(tmp_path / "t.csv"), "--out", str(model), "--context", "c", "--flow", "maf",
                          "--transforms", "2", "--hidden", "16", "--epochs", "60", "--batch-size", "32",
                          "--no-progress"])  # fmt: skip
    assert code == 0, err
    assert "given 1 context columns ['c']" in out
    write_table(np.array([[-1.0], [1.0]]), tmp_path / "ctx.csv", header=["c"])
    code, out, err = run(["sample", str(model), "-n", "500", "--seed", "0", "--context", str(tmp_path / "ctx.csv")])
    assert code == 0, err
    header, rows = read_csv(out)
    assert header == ["c", "y"] and rows.shape == (1000, 2)
    np.testing.assert_array_equal(rows[:500, 0], -1.0)
    assert rows[:500, 1].mean() == pytest.approx(-3.0, abs=0.1) and rows[500:, 1].mean() == pytest.approx(3.0, abs=0.1)
    code, out, _ = run(["sample", str(model), "-n", "500", "--seed", "0", "--context", str(tmp_path / "ctx.csv"),
                        "--temperature", "0.5"])  # fmt: skip
    assert code == 0 and read_csv(out)[1][:500, 1].std() == pytest.approx(0.5 * rows[:500, 1].std(), rel=0.15)
    code, out, err = run(["score", str(model), str(tmp_path / "t.csv")])
    scores = read_csv(out)[1][:, 0]
    assert code == 0 and scores.mean() > 0.0  # best 0.69 (log N(0; 0, 0.2^2)); the marginal of y gets -2.5
    code, _, err = run(["sample", str(model), "-n", "5"])
    assert code == 2 and "pass --context FILE, a table of those columns" in err
    code, _, err = run(["fit", str(tmp_path / "t.csv"), "--out", str(model), "--context", "z", "--epochs", "1"])
    assert code == 2 and "context column 'z' is not a column of X; X has ['c', 'y']" in err


def test_sample_temperature_must_be_a_non_negative_number(fitted, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["sample", str(fitted["model"]), "-n", "3", "--temperature", "-1"])
    assert stop.value.code == 2 and "argument --temperature: must be a number >= 0, got -1" in capsys.readouterr().err
    code, out, err = run(["sample", str(fitted["model"]), "-n", "3", "--temperature", "0"])
    assert code == 0 and np.ptp(read_csv(out)[1], axis=0).max() == 0  # every draw is the image of z = 0


def test_fit_summary_says_when_the_saved_model_is_the_starting_gaussian(tmp_path):
    # 40 rows of a correlated Gaussian: no epoch beats the fitted Gaussian on the 10 validation rows
    rows = (
        np.random.default_rng(0).standard_normal((40, 3)) @ np.array([[1.0, 0, 0], [0.9, 0.4, 0], [0.5, -0.3, 0.2]]).T
    )
    write_table(rows, tmp_path / "train.csv", header=["a", "b", "c"])
    code, out, err = run(["fit", str(tmp_path / "train.csv"), "--out", str(tmp_path / "m.pt"), "--no-progress"])
    assert code == 0, err
    assert "keeps the fitted Gaussian" in err  # the warning, on stderr
    assert out.rstrip().endswith(
        "saved the flow as built (a Gaussian), fitted to all rows: no epoch beat it on the validation rows"
    )
    assert DensityEstimator.load(tmp_path / "m.pt").kept_start_

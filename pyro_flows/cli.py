"""The ``pyro-flows`` command line: a thin layer over :class:`DensityEstimator`, the table readers and built-in data.

``fit`` a flow to a CSV/.npy table, ``score`` rows by log-density, ``sample``
new rows, or run the self-contained ``demo``. Bad input (a missing file, a
ragged or non-numeric table, a file that is not a saved estimator, a
destination that cannot be written, checked before any work starts) ends with a
one-line ``pyro-flows: error: ...`` on stderr and exit status 2. Output cut
short by its reader (``pyro-flows sample ... | head``) ends quietly, as Unix
tools do.
"""

from __future__ import annotations

import argparse
import inspect
import os
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from .demo import FULL, QUICK, REPORT_FILES
from .demo import demo as run_demo
from .estimator import DensityEstimator
from .flows import FLOWS
from .io import SHOWN_ROWS, NonFiniteRowsError, Table, read_table, write_table

EXIT_ERROR = 2
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a tool its reader stopped reading (SIGPIPE)


def _defaults(function: Callable) -> dict[str, Any]:
    """Keyword defaults of ``function``: the library stays the one source of the CLI's defaults."""
    return {name: p.default for name, p in inspect.signature(function).parameters.items() if p.default is not p.empty}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _temperature(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def check_columns(table: Table, columns: Optional[list[str]], features: int, path: Path) -> None:
    """Fail on a table whose width, or header when both have one, differs from the training table's."""
    if table.values.shape[1] != features:
        raise ValueError(f"{path} has {table.values.shape[1]} columns; the model was fitted on {features}")
    if columns is not None and table.columns is not None and table.columns != columns:
        raise ValueError(f"{path} has columns {table.columns}; the model was fitted on {columns}")


def check_destination(path: Path, option: str, folder: bool = False) -> None:
    """Fail now, before any work, on a destination that cannot be written: the work would be lost at the end.

    ``path`` is a file (or, with ``folder``, a folder) that will be written and whose missing parent folders
    will be created; the nearest folder that exists must take a new file.
    """
    if path.is_dir() and not folder:
        raise ValueError(f"{option} {path} is a directory; name a file in it, e.g. {path / 'model.pt'}")
    if path.exists() and not path.is_dir() and folder:
        raise ValueError(f"{option} {path} is a file, not a folder")
    parent = path if folder else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot write {option} {path}: {parent} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ValueError(f"cannot write {option} {path}: cannot create a file in {parent} ({reason})") from None


def _read(path: Path, remedy: str, **options: bool) -> Table:
    """``read_table``, with the command line's flag (``remedy``) instead of the Python keyword in its NaN message."""
    try:
        return read_table(path, **options)
    except NonFiniteRowsError as error:
        raise ValueError(f"{error.summary}; {remedy}") from None


def overflowing_rows(table: Table, dtype: torch.dtype) -> tuple[np.ndarray, str]:
    """Rows with a finite value that ``dtype`` cannot hold (1e39 in float32), and a message naming them.

    Such a value becomes inf when cast to the model's dtype; the flow could not compute its density.
    """
    values = table.values
    cast = torch.from_numpy(values).to(dtype)
    cells = np.isfinite(values) & ~torch.isfinite(cast).numpy()
    rows = np.flatnonzero(cells.any(axis=1))
    if rows.size == 0:
        return rows, ""
    row = int(rows[0])
    column = int(np.flatnonzero(cells[row])[0])
    name = f" ({table.columns[column]!r})" if table.columns is not None else ""
    names = ", ".join(table.row_name(int(r)) for r in rows[:SHOWN_ROWS]) + (", ..." if rows.size > SHOWN_ROWS else "")
    return rows, (
        f"{table.row_name(row)}, column {column + 1}{name}: {float(values[row, column])!r} overflows "
        f"{str(dtype).removeprefix('torch.')}, the model's dtype (largest finite value {torch.finfo(dtype).max:.7g}); "
        f"{rows.size} of {len(values)} rows have such values ({names})"
    )


# --- fit / score / sample ---------------------------------------------------------------------------------------


def fit_command(args: argparse.Namespace) -> int:
    check_destination(args.out, "--out")
    table = _read(args.data, "pass --drop-nonfinite to drop them", drop_nonfinite=args.drop_nonfinite)
    estimator = DensityEstimator(
        flow=args.flow,
        transforms=args.transforms,
        hidden=None if args.hidden is None else tuple(args.hidden),
        context=None if args.context is None else [_column(name) for name in args.context],
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        validation_fraction=args.validation_fraction,
        patience=args.patience,
        seed=args.seed,
    )
    overflow, description = overflowing_rows(table, estimator.torch_dtype)
    if overflow.size:
        raise ValueError(f"{args.data}, {description}")
    start = time.perf_counter()
    estimator.fit(table.values, progress=False if args.no_progress else None, feature_names=table.columns)
    seconds = time.perf_counter() - start
    estimator.save(args.out)
    print(_fit_summary(estimator, table.values.shape, seconds, args.out))
    return 0


def _column(name: str) -> Union[int, str]:
    """A ``--context`` column: a 0-based index when it is a whole number, else a name from the header."""
    return int(name) if name.lstrip("-").isdigit() else name


def _fit_summary(estimator: DensityEstimator, shape: tuple[int, ...], seconds: float, out: Path) -> str:
    history = estimator.history_
    losses = f"train loss {history.train_loss[-1]:.4f}"
    if history.validation_loss:
        best = history.best_epoch
        losses += f", validation loss {history.validation_loss[best]:.4f} (best epoch {best + 1})"
    stopped = ", stopped early" if history.stopped_early else ""
    saved = ""
    if estimator.kept_start_:
        saved = "; saved the flow as built (a Gaussian), fitted to all rows: no epoch beat it on the validation rows"
    elif estimator.refitted_:
        saved = "; saved the flow trained again on all rows for the epochs the validation chose"
    context = estimator.context_columns_
    given = f" given {len(context)} context columns {estimator._column_labels(context)}" if context else ""
    return (
        f"fitted {estimator.flow} on {shape[0]} rows x {shape[1]} columns{given}: {losses}, "
        f"{len(history.train_loss)} epochs{stopped} in {seconds:.1f} s -> {out}{saved}"
    )


def load_model(path: Path) -> tuple[DensityEstimator, int]:
    """A saved estimator and its number of columns, context columns included (a loaded estimator is fitted)."""
    estimator = DensityEstimator.load(path)
    return estimator, estimator.n_features_in_


def score_command(args: argparse.Namespace) -> int:
    """One ``log_density`` per input row, in order.

    With ``--skip-nonfinite``, rows with NaN/inf, or with a value too large for the model's dtype, score ``nan``
    (a warning says how many); without it they are an error naming them.
    """
    skip = "pass --skip-nonfinite to score them nan"
    estimator, features = load_model(args.model)
    table = _read(args.data, skip, keep_nonfinite=args.skip_nonfinite)
    check_columns(table, getattr(estimator, "feature_names_in_", None), features, args.data)
    overflow, description = overflowing_rows(table, estimator.torch_dtype)
    if overflow.size and not args.skip_nonfinite:
        raise ValueError(f"{args.data}, {description}; {skip}")
    finite = np.isfinite(table.values).all(axis=1)
    scored = finite.copy()
    scored[overflow] = False
    if not scored.any():
        reason = "NaN or inf values" if not overflow.size else "NaN, inf or values too large for the model's dtype"
        raise ValueError(f"{args.data}: every one of the {len(scored)} rows has {reason}")
    scores = np.full(len(scored), np.nan)
    scores[scored] = np.asarray(estimator.score_samples(table.values[scored]))
    if not finite.all():
        warnings.warn(
            f"{args.data}: {int((~finite).sum())} of {len(finite)} rows have NaN or inf values; "
            "their log_density is nan",
            stacklevel=2,
        )
    if overflow.size:
        warnings.warn(f"{args.data}, {description}; their log_density is nan", stacklevel=2)
    write_table(scores, sys.stdout, header=["log_density"])
    return 0


def sample_command(args: argparse.Namespace) -> int:
    """``-n`` rows of samples; for a conditional model, ``-n`` rows for each row of ``--context``, in order, with
    the context values in their columns (the training table's column order)."""
    estimator, columns = load_model(args.model)
    names = getattr(estimator, "feature_names_in_", None) or [f"x{i}" for i in range(columns)]
    context_columns, target_columns = estimator.context_columns_, estimator.target_columns_
    if not context_columns:
        if args.context is not None:
            raise ValueError(f"--context: {args.model} was fitted without context columns")
        samples = estimator.sample(args.n, seed=args.seed, temperature=args.temperature)
        write_table(np.asarray(samples), sys.stdout, header=[names[c] for c in target_columns])
        return 0
    context_names = [names[c] for c in context_columns]
    if args.context is None:
        raise ValueError(
            f"{args.model} models its targets given context columns {context_names}: pass --context FILE, "
            "a table of those columns (one sample set per row)"
        )
    table = _read(args.context, "drop or impute them")
    check_columns(table, context_names, len(context_columns), args.context)
    samples = np.asarray(estimator.sample(args.n, seed=args.seed, context=table.values, temperature=args.temperature))
    rows = np.empty((len(table.values) * args.n, columns))
    rows[:, context_columns] = np.repeat(table.values, args.n, axis=0)
    rows[:, target_columns] = samples.reshape(-1, len(target_columns))
    write_table(rows, sys.stdout, header=names)
    return 0


# --- demo -------------------------------------------------------------------------------------------------------


def demo_command(args: argparse.Namespace) -> int:
    check_destination(Path(args.out), "--out", folder=True)
    metrics = run_demo(Path(args.out), QUICK if args.quick else FULL, args.seed)
    for name, m in (("two moons", metrics["two_moons"]), ("digits", metrics["digits"])):
        print(
            f"{name} ({m['dims']}-D, {m['flow'].upper()}, {m['epochs']} epochs, {m['seconds']:.1f} s): "
            f"test log-likelihood {m['test_log_likelihood']:.3f} nats/row, Gaussian "
            f"{m['gaussian_test_log_likelihood']:.3f}"
        )
    d = metrics["digits"]
    print(
        f"digits as {d['levels']}-level pixels: {d['test_bits_per_dim']:.3f} bits/dim, "
        f"Gaussian {d['gaussian_test_bits_per_dim']:.3f}"
    )
    print(f"report in {args.out}/ ({', '.join(REPORT_FILES)}), {metrics['seconds']:.1f} s in all")
    return 0


# --- the parser -------------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows the defaults that say something (not ``None``, not ``False`` of a flag)."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _command(
    commands: argparse._SubParsersAction, name: str, summary: str, run: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` shows every option's default."""
    command = commands.add_parser(name, help=summary, description=summary, formatter_class=_HelpFormatter)
    command.set_defaults(run=run)
    return command


def _add_data_argument(command: argparse.ArgumentParser, what: str) -> None:
    command.add_argument("data", type=Path, help=f"CSV (optional header row) or .npy file: {what}")


def _add_model_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument("model", type=Path, help="a model saved by `pyro-flows fit` (or DensityEstimator.save)")


def _fit_parser(commands: argparse._SubParsersAction) -> None:
    model = _defaults(DensityEstimator.__init__)
    chosen = "default: chosen from the table's rows and columns"
    p = _command(commands, "fit", "fit a flow to a table of numbers and save it", fit_command)
    _add_data_argument(p, "one row per sample")
    p.add_argument("--drop-nonfinite", action="store_true", help="drop rows with NaN or inf instead of failing")
    p.add_argument(
        "--flow", choices=list(FLOWS), default=model["flow"], help="flow family (cnf, ffjord: one ODE layer)"
    )
    p.add_argument("--out", type=Path, required=True, help="where to save the fitted model, e.g. model.pt")
    p.add_argument(
        "--context",
        nargs="+",
        metavar="COLUMN",
        help="model the other columns given these (header names or 0-based indices): p(targets | context)",
    )
    p.add_argument("--transforms", type=_positive_int, metavar="N", help=f"flow layers (not for CNFs); {chosen}")
    p.add_argument("--hidden", type=_positive_int, nargs="+", metavar="W", help=f"hidden widths; {chosen}")
    p.add_argument("--epochs", type=_positive_int, metavar="N", help=f"maximum epochs; {chosen}")
    p.add_argument("--batch-size", type=_positive_int, metavar="N", help=f"rows per step; {chosen}")
    p.add_argument("--lr", type=float, help=f"Adam learning rate; {chosen}")
    p.add_argument(
        "--validation-fraction",
        type=float,
        metavar="F",
        help=f"fraction of rows held out for early stopping (0: none); {chosen}",
    )
    p.add_argument("--patience", type=_positive_int, metavar="N", help=f"epochs without improvement; {chosen}")
    p.add_argument("--seed", type=int, default=model["seed"], help="random seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _score_parser(commands: argparse._SubParsersAction) -> None:
    p = _command(commands, "score", "write each row's log-density (an anomaly score) as CSV to stdout", score_command)
    _add_model_argument(p)
    _add_data_argument(p, "the training table's columns")
    p.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="score rows with NaN, inf or a value too large for the model's dtype as nan "
        "(one output row per input row) instead of failing",
    )


def _sample_parser(commands: argparse._SubParsersAction) -> None:
    p = _command(commands, "sample", "write samples from a fitted model as CSV to stdout", sample_command)
    _add_model_argument(p)
    p.add_argument("-n", type=_positive_int, required=True, help="number of samples (per --context row)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument(
        "--temperature",
        type=_temperature,
        default=_defaults(DensityEstimator.sample)["temperature"],
        metavar="T",
        help="scale of the base draws (below 1: more typical samples)",
    )
    p.add_argument(
        "--context",
        type=Path,
        metavar="FILE",
        help="for a model fitted with --context: a table of the context columns; -n samples for each row",
    )


def _demo_parser(commands: argparse._SubParsersAction) -> None:
    summary = "fit flows on built-in two moons (2-D) and digits (64-D); print test metrics and write a report"
    p = _command(commands, "demo", summary, demo_command)
    p.add_argument("--out", default="pyro_flows_demo", help="report folder (plots and metrics.json)")
    p.add_argument("--quick", action="store_true", help="a tiny budget that runs in seconds (for tests)")
    p.add_argument("--seed", type=int, default=0, help="random seed")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="pyro-flows", description="Normalizing flows for Pyro: fit, score, sample.")
    commands = top.add_subparsers(dest="command", required=True, metavar="{fit,score,sample,demo}")
    for add in (_fit_parser, _score_parser, _sample_parser, _demo_parser):
        add(commands)
    return top


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``pyro-flows``; returns the exit status (0, or 2 with a one-line error on stderr for bad input)."""
    args = parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            status = args.run(args)
            sys.stdout.flush()  # a reader that stopped early is seen here, not at exit
            return status
        except BrokenPipeError:  # the reader stopped reading (`| head`): not an error, nothing more to say
            _discard_stdout()
            return EXIT_BROKEN_PIPE
        except (
            OSError,
            ValueError,
            RuntimeError,
            ImportError,
        ) as error:  # bad input, a fit that diverged, a missing extra
            _report("error", error)
            return EXIT_ERROR


def _discard_stdout() -> None:
    """Point stdout's file descriptor at /dev/null, so that Python's flush at exit does not fail on the closed pipe."""
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (captured output): nothing will be flushed to it
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, descriptor)
    finally:
        os.close(devnull)


def _report(kind: str, message: object) -> None:
    """One line ``pyro-flows: KIND: message`` on stderr."""
    print(f"pyro-flows: {kind}: {' '.join(str(message).split()) or type(message).__name__}", file=sys.stderr)


def _show_warning(message: object, *args: Any, **kwargs: Any) -> None:
    _report("warning", message)


if __name__ == "__main__":
    raise SystemExit(main())

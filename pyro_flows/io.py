"""Reading and writing tables of numbers: CSV and ``.npy`` files.

:func:`read_table` returns a :class:`Table` (float64 values and, for a CSV
with a header row, the column names); every malformed input is a
``ValueError`` that names the file, the line or row and the column.
:func:`write_table` writes CSV to a path or an open text file (e.g.
``sys.stdout``).
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, TextIO, Union

import numpy as np
import torch

PathLike = Union[str, os.PathLike]
SHOWN_ROWS = 5  # how many offending rows an error message names


@dataclass(frozen=True)
class Table:
    """A 2-D table of numbers read from a file.

    Attributes:
        values: float64 array of shape ``(rows, columns)``.
        columns: the names from the CSV header row, or ``None`` when the file has none (always for ``.npy``).
        lines: for a CSV, the file's (1-based) line number of each row of ``values``, for messages that
            name a row; ``None`` for ``.npy`` (rows are then named by their 0-based index).

    A table unpacks like a tuple: ``values, columns = read_table("data.csv")``.

    Example:
        >>> table = Table(np.zeros((2, 2)), ["x", "y"])
        >>> values, columns = table
        >>> values.shape, columns
        ((2, 2), ['x', 'y'])
    """

    values: np.ndarray
    columns: Optional[list[str]] = None
    lines: Optional[np.ndarray] = field(default=None, compare=False, repr=False)

    def __iter__(self) -> Iterator:
        return iter((self.values, self.columns))

    def row_name(self, row: int) -> str:
        """How messages name row ``row`` of ``values``: ``line N`` (CSV) or ``row N (0-based)``."""
        return f"line {self.lines[row]}" if self.lines is not None else f"row {row} (0-based)"


class NonFiniteRowsError(ValueError):
    """Rows with NaN or inf values, named; ``summary`` is the message without the remedy.

    The message ends with the Python remedy (``drop_nonfinite=True``); a front end with
    its own spelling of it (the command line's ``--drop-nonfinite``) uses ``summary``.
    """

    def __init__(self, summary: str, remedy: str = "pass drop_nonfinite=True to drop them") -> None:
        super().__init__(f"{summary}; {remedy}")
        self.summary = summary


def read_table(path: PathLike, drop_nonfinite: bool = False, keep_nonfinite: bool = False) -> Table:
    """Read a 2-D table of numbers from a ``.csv`` or ``.npy`` file.

    * ``.csv``: comma separated; blank lines are skipped. The first row is a
      header when none of its cells is a number (its cells become
      :attr:`Table.columns`); otherwise it is data. Every row must have as many
      cells as the first one, and every data cell must be a plain decimal number
      such as ``-1.5e3`` (``nan`` and ``inf`` parse, and are then caught by the
      finiteness check; Python-only spellings such as ``1_000`` and non-ASCII
      digits are refused). The file must be UTF-8 (a byte order mark is allowed).
    * ``.npy``: a numeric array (no pickles); 1-D arrays are one column.

    Rows with NaN or inf values are an error naming them, unless
    ``drop_nonfinite=True`` (they are dropped with a warning saying how many) or
    ``keep_nonfinite=True`` (they are kept, for a caller that handles them row by row).

    Returns:
        a :class:`Table` with float64 ``values`` of shape ``(rows, columns)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown extension, a CSV that is not UTF-8 (file, line and byte),
            a ragged row (line number, expected and actual cell counts), a non-numeric
            cell (line and column), NaN/inf rows (:class:`NonFiniteRowsError`), an empty
            table, or an ``.npy`` array that is not 1-D/2-D numeric.

    Example:
        >>> write_table(np.array([[1.0, 2.0], [3.0, 4.0]]), "data.csv", header=["x", "y"])
        >>> values, columns = read_table("data.csv")
        >>> values.shape, columns
        ((2, 2), ['x', 'y'])
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise ValueError(f"{path}: unknown file type {suffix!r}; expected one of {', '.join(_READERS)}")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if drop_nonfinite and keep_nonfinite:
        raise ValueError("read_table: drop_nonfinite and keep_nonfinite exclude each other")
    values, columns, row_names = _READERS[suffix](path)
    if keep_nonfinite:
        return Table(np.ascontiguousarray(values, dtype=np.float64), columns, row_names)
    values, row_names = _finite_rows(values, drop_nonfinite, path, row_names)
    return Table(values, columns, row_names)


def write_table(array: Union[np.ndarray, torch.Tensor, Sequence], file: Union[PathLike, TextIO], header=None) -> None:
    """Write a 1-D (one column) or 2-D array as CSV to a path or an open text file.

    Floats are written in their shortest round-trip form (``read_table`` reads
    back exactly the same values); ``header`` (column names) becomes the first row.

    Example:
        >>> import sys
        >>> write_table(np.array([[1.0, 0.5], [2.0, 1e-8]]), sys.stdout, header=["x", "y"])
        x,y
        1.0,0.5
        2.0,1e-08
    """
    values = _as_2d(array)
    if header is not None and len(header) != values.shape[1]:
        raise ValueError(f"write_table: {len(header)} header names for {values.shape[1]} columns")
    if isinstance(file, (str, os.PathLike)):
        with open(file, "w", newline="", encoding="utf-8") as handle:
            _write_rows(values, handle, header)
    else:
        _write_rows(values, file, header)


# -- CSV ----------------------------------------------------------------------


def _is_number(cell: str) -> bool:
    """Whether Python's ``float`` reads ``cell`` (lenient: decides only whether a first row is a header)."""
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _number(cell: str) -> float:
    """``cell`` as a float if it is a plain decimal number (``float`` alone also reads ``1_000``, non-ASCII digits)."""
    text = cell.strip()
    if "_" in text or not text.isascii():
        raise ValueError(cell)
    return float(text)


def _records(path: Path) -> list[tuple[int, list[str]]]:
    """The non-blank rows of a CSV file with their (1-based) line numbers."""
    raw = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = bom + error.start
        line = raw.count(b"\n", 0, offset) + 1
        raise ValueError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{raw[offset]:02x} at offset {offset}); save the file as UTF-8"
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    return [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]


def _parse_row(row: list[str], width: int, line: int, path: Path) -> list[float]:
    if len(row) != width:
        raise ValueError(f"{path}, line {line}: expected {width} columns, got {len(row)}")
    values = []
    for column, cell in enumerate(row, 1):
        try:
            values.append(_number(cell))
        except ValueError:
            raise ValueError(f"{path}, line {line}, column {column}: {cell.strip()!r} is not a number") from None
    return values


def _read_csv(path: Path) -> tuple[np.ndarray, Optional[list[str]], np.ndarray]:
    records = _records(path)
    if not records:
        raise ValueError(f"{path}: the file has no rows")
    first = records[0][1]
    columns = [cell.strip() for cell in first] if not any(map(_is_number, first)) else None
    data = records[1:] if columns is not None else records
    if not data:
        raise ValueError(f"{path}: the file has a header but no data rows")
    width = len(first)
    values = np.array([_parse_row(row, width, line, path) for line, row in data], dtype=np.float64)
    return values.reshape(len(data), width), columns, np.array([line for line, _ in data])


# -- .npy -----------------------------------------------------------------------


def _read_npy(path: Path) -> tuple[np.ndarray, None, None]:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{path}: not a plain numeric .npy array ({error})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        kind = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
        raise ValueError(f"{path}: expected a numeric array, got {kind}")
    if array.ndim not in (1, 2) or array.size == 0:
        raise ValueError(f"{path}: expected a non-empty 1-D or 2-D array, got shape {array.shape}")
    return _as_2d(array), None, None


_READERS = {".csv": _read_csv, ".npy": _read_npy}


# -- shared -----------------------------------------------------------------------


def _as_2d(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    values = np.asarray(array)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise ValueError(f"expected a 1-D or 2-D array, got shape {values.shape}")
    return values


def _finite_rows(
    values: np.ndarray, drop: bool, path: Path, line_numbers: Optional[np.ndarray]
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """``values`` as float64 and their line numbers; rows with NaN/inf dropped with a warning (``drop``) or named
    in a :class:`NonFiniteRowsError`.

    Rows are named by their file line numbers when known (CSV), else by 0-based row index.
    """
    values = np.ascontiguousarray(values, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if bad.size == 0:
        return values, line_numbers
    if drop:
        if bad.size == len(values):
            raise ValueError(f"{path}: every one of the {bad.size} rows has NaN or inf values")
        warnings.warn(f"{path}: dropped {bad.size} of {len(values)} rows with NaN or inf values", stacklevel=3)
        kept = None if line_numbers is None else np.delete(line_numbers, bad)
        return np.delete(values, bad, axis=0), kept
    where, names = ("lines", line_numbers[bad]) if line_numbers is not None else ("rows (0-based)", bad)
    shown = ", ".join(map(str, names[:SHOWN_ROWS])) + (", ..." if bad.size > SHOWN_ROWS else "")
    raise NonFiniteRowsError(f"{path}: {bad.size} of {len(values)} rows have NaN or inf values ({where} {shown})")


def _write_rows(values: np.ndarray, handle: TextIO, header: Optional[Sequence[str]]) -> None:
    writer = csv.writer(handle, lineterminator="\n")
    if header is not None:
        writer.writerow(header)
    if values.dtype.kind == "b":
        values = values.astype(np.int64)
    writer.writerows([str(v) for v in row] for row in values)

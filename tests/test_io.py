"""Tests of ``pyro_flows.io``: CSV and ``.npy`` tables, with every malformed input named."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch

from pyro_flows.io import NonFiniteRowsError, Table, read_table, write_table


def write(tmp_path, text: str, name: str = "data.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_with_header(tmp_path):
    table = read_table(write(tmp_path, "x, y ,z\n1,2,3\n4.5,-6e-3,7\n"))
    assert isinstance(table, Table)
    assert table.columns == ["x", "y", "z"]
    assert table.values.dtype == np.float64
    np.testing.assert_array_equal(table.values, [[1, 2, 3], [4.5, -0.006, 7]])


def test_csv_without_header_and_blank_lines(tmp_path):
    values, columns = read_table(write(tmp_path, "1,2\n\n3,4\n\n"))
    assert columns is None
    np.testing.assert_array_equal(values, [[1, 2], [3, 4]])


def test_one_column_csv_and_byte_order_mark(tmp_path):
    path = tmp_path / "one.csv"
    path.write_bytes("\ufeffscore\n0.5\n1.5\n".encode())
    values, columns = read_table(path)
    assert columns == ["score"]
    np.testing.assert_array_equal(values, [[0.5], [1.5]])


def test_ragged_row_names_line_and_counts(tmp_path):
    path = write(tmp_path, "a,b,c\n1,2,3\n\n4,5\n")
    with pytest.raises(ValueError, match=re.escape("line 4: expected 3 columns, got 2")):
        read_table(path)


def test_non_numeric_cell_names_line_and_column(tmp_path):
    with pytest.raises(ValueError, match=re.escape("line 3, column 2: 'oops' is not a number")):
        read_table(write(tmp_path, "1,2\n3,4\n5,oops\n"))
    with pytest.raises(ValueError, match=re.escape("line 1, column 1: '' is not a number")):
        read_table(write(tmp_path, ",2\n3,4\n"))  # a first row with numbers is data, not a header


@pytest.mark.parametrize("cell", ["1_000", "1_0.5", "\u0661", "\uff12"])  # Python-only spellings, non-ASCII digits
def test_python_only_number_spellings_are_not_numbers(tmp_path, cell):
    assert float(cell)  # Python's float reads each of them
    with pytest.raises(ValueError, match=re.escape(f"line 3, column 2: {cell!r} is not a number")):
        read_table(write(tmp_path, f"a,b\n1,2\n3,{cell}\n"))
    with pytest.raises(ValueError, match=re.escape(f"line 1, column 1: {cell!r} is not a number")):
        read_table(write(tmp_path, f"{cell},2\n3,4\n"))  # still data, not a header named {cell}


def test_a_csv_that_is_not_utf8_names_the_file_line_and_byte(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("x,y\n1,2\n3,4 \u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 3: not UTF-8 text (byte 0xe9 at offset 12)")):
        read_table(path)
    path.write_bytes(b"\xef\xbb\xbf" + "x,caf\u00e9\n1,2\n".encode("latin-1"))  # offsets count the byte order mark
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 1: not UTF-8 text (byte 0xe9 at offset 8)")):
        read_table(path)


def test_nonfinite_rows_error_has_a_summary_without_the_python_remedy(tmp_path):
    with pytest.raises(NonFiniteRowsError) as info:
        read_table(write(tmp_path, "x,y\n1,2\nnan,3\n"))
    assert str(info.value).endswith("(lines 3); pass drop_nonfinite=True to drop them")
    assert info.value.summary == f"{tmp_path / 'data.csv'}: 1 of 2 rows have NaN or inf values (lines 3)"


def test_tables_know_the_line_of_each_row(tmp_path):
    path = write(tmp_path, "x,y\n1,2\n\nnan,3\n4,5\n")
    assert read_table(path, keep_nonfinite=True).lines.tolist() == [2, 4, 5]
    with pytest.warns(UserWarning, match="dropped 1 of 3"):
        table = read_table(path, drop_nonfinite=True)
    assert table.lines.tolist() == [2, 5] and table.row_name(1) == "line 5"
    np.save(tmp_path / "a.npy", np.zeros((2, 2)))
    table = read_table(tmp_path / "a.npy")
    assert table.lines is None and table.row_name(1) == "row 1 (0-based)"


def test_nonfinite_rows_are_named_by_line(tmp_path):
    path = write(tmp_path, "x,y\n1,2\nnan,3\n4,5\n6,inf\n7,-inf\n")
    with pytest.raises(ValueError, match=re.escape("3 of 5 rows have NaN or inf values (lines 3, 5, 6)")):
        read_table(path)


def test_many_nonfinite_rows_are_abbreviated(tmp_path):
    path = write(tmp_path, "".join(f"{i},nan\n" for i in range(8)))
    with pytest.raises(ValueError, match=re.escape("(lines 1, 2, 3, 4, 5, ...)")):
        read_table(path)


def test_drop_nonfinite_drops_with_a_warning(tmp_path):
    path = write(tmp_path, "x,y\n1,2\nnan,3\n4,5\n6,inf\n")
    with pytest.warns(UserWarning, match="dropped 2 of 4 rows"):
        values, columns = read_table(path, drop_nonfinite=True)
    np.testing.assert_array_equal(values, [[1, 2], [4, 5]])
    assert columns == ["x", "y"]


def test_all_rows_nonfinite_is_an_error_even_when_dropping(tmp_path):
    with pytest.raises(ValueError, match="every one of the 2 rows"):
        read_table(write(tmp_path, "nan,1\n2,inf\n"), drop_nonfinite=True)


@pytest.mark.parametrize("text, message", [("", "no rows"), ("\n\n", "no rows"), ("x,y\n", "header but no data")])
def test_empty_csv(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        read_table(write(tmp_path, text))


def test_npy_two_and_one_dimensional(tmp_path):
    array = np.arange(6, dtype=np.int32).reshape(3, 2)
    np.save(tmp_path / "a.npy", array)
    table = read_table(tmp_path / "a.npy")
    assert table.columns is None and table.values.dtype == np.float64
    np.testing.assert_array_equal(table.values, array)
    np.save(tmp_path / "b.npy", np.array([1.5, 2.5], dtype=np.float32))
    np.testing.assert_array_equal(read_table(tmp_path / "b.npy").values, [[1.5], [2.5]])


def test_npy_nonfinite_rows_are_named_by_index(tmp_path):
    array = np.zeros((5, 2))
    array[1, 0], array[4, 1] = np.nan, np.inf
    np.save(tmp_path / "a.npy", array)
    with pytest.raises(ValueError, match=re.escape("rows (0-based) 1, 4")):
        read_table(tmp_path / "a.npy")
    with pytest.warns(UserWarning, match="dropped 2 of 5"):
        assert read_table(tmp_path / "a.npy", drop_nonfinite=True).values.shape == (3, 2)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((2, 2, 2)), "1-D or 2-D array, got shape"),
        (np.zeros((0, 3)), "non-empty"),
        (np.array(["a", "b"]), "numeric array"),
        (np.array([1 + 2j]), "numeric array"),
    ],
)
def test_npy_bad_arrays(tmp_path, array, message):
    np.save(tmp_path / "a.npy", array)
    with pytest.raises(ValueError, match=message):
        read_table(tmp_path / "a.npy")


def test_npy_pickles_are_refused(tmp_path):
    np.save(tmp_path / "a.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a plain numeric .npy"):
        read_table(tmp_path / "a.npy")


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown file type '.txt'"):
        read_table(write(tmp_path, "1,2\n", "data.txt"))
    with pytest.raises(FileNotFoundError):
        read_table(tmp_path / "missing.csv")


def test_write_then_read_round_trips_exactly(tmp_path):
    values = np.random.default_rng(0).normal(size=(20, 3)) * np.array([1e-12, 1.0, 1e9])
    write_table(values, tmp_path / "out.csv", header=["a", "b,c", "d"])
    table = read_table(tmp_path / "out.csv")
    np.testing.assert_array_equal(table.values, values)  # bit-exact
    assert table.columns == ["a", "b,c", "d"]  # a name with a comma is quoted


def test_write_to_an_open_text_file_and_one_column():
    buffer = io.StringIO()
    write_table(torch.tensor([0.5, -2.0]), buffer)
    assert buffer.getvalue() == "0.5\n-2.0\n"
    buffer = io.StringIO()
    write_table(np.array([[1, 2]]), buffer, header=["i", "j"])
    assert buffer.getvalue() == "i,j\n1,2\n"


def test_write_float32_shortest_form():
    buffer = io.StringIO()
    write_table(np.array([[0.1, 1e-3]], dtype=np.float32), buffer)
    assert buffer.getvalue() == "0.1,0.001\n"


def test_write_checks_header_and_shape(tmp_path):
    with pytest.raises(ValueError, match="2 header names for 3 columns"):
        write_table(np.zeros((1, 3)), tmp_path / "o.csv", header=["a", "b"])
    with pytest.raises(ValueError, match="1-D or 2-D"):
        write_table(np.zeros((1, 2, 3)), tmp_path / "o.csv")

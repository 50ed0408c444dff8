"""quantlab.tables.markdown_table: exact output, formats, headers, alignment, missing values, bad input."""
from __future__ import annotations

import doctest

import numpy as np
import pytest

from quantlab import tables
from quantlab.tables import MISSING, markdown_table

ROWS = [{"code": "linear", "bits": 8, "error": 0.012345},
        {"code": "dynamic", "bits": 4, "error": 2.5e-5}]


def test_small_table_exactly():
    # floats: 3 significant digits; numeric columns right-aligned, text left; no trailing newline
    assert markdown_table(ROWS, ["code", "bits", "error"]) == (
        "| code | bits | error |\n"
        "|---|---:|---:|\n"
        "| linear | 8 | 0.0123 |\n"
        "| dynamic | 4 | 2.5e-05 |")


def test_columns_choose_and_order_the_keys():
    assert markdown_table(ROWS, ["error", "code"]).splitlines()[:3] == [
        "| error | code |", "|---:|---|", "| 0.0123 | linear |"]


def test_format_specs_and_callables():
    rows = [{"a": 1, "b": 0.5, "n": 1234567}, {"a": 2, "b": 0.25, "n": 12}]
    table = markdown_table(rows, ["a", "b", "n"], {"b": ".1%", "n": ",", "a": lambda a: f"#{a}"})
    assert table.splitlines()[2:] == ["| #1 | 50.0% | 1,234,567 |", "| #2 | 25.0% | 12 |"]
    # a spec applies to every value of its column, ints included
    assert markdown_table([{"x": 3}], ["x"], {"x": ".2f"}).splitlines()[-1] == "| 3.00 |"
    # the callable gets the value itself
    seen = []
    markdown_table(ROWS, ["error"], formats={"error": lambda v: seen.append(v) or "."})
    assert seen == [0.012345, 2.5e-5]


def test_numpy_scalars_are_numbers():
    table = markdown_table([{"x": np.float32(0.123456), "i": np.int64(7), "u": np.uint8(3)}], ["x", "i", "u"])
    assert table.splitlines()[1:] == ["|---:|---:|---:|", "| 0.123 | 7 | 3 |"]


def test_headers():
    table = markdown_table(ROWS, ["code", "error"], headers={"error": "relative error"})
    assert table.splitlines()[0] == "| code | relative error |"
    # a | in the text is escaped, so that it does not end the cell
    table = markdown_table([{"x": "a|b"}], ["x"], headers={"x": "max|x|"})
    assert table.splitlines() == [r"| max\|x\| |", "|---|", r"| a\|b |"]


def test_missing_values():
    rows = [{"data": "v", "error": None, "note": "x"}, {"data": "m", "error": 0.5}]
    # None and an absent key show as MISSING and are never formatted; they do not decide the alignment
    table = markdown_table(rows, ["data", "error", "note"], {"error": ".1%", "note": str.upper})
    assert table.splitlines()[1:] == ["|---|---:|---|", f"| v | {MISSING} | X |", f"| m | 50.0% | {MISSING} |"]
    assert MISSING == "–"
    assert markdown_table([{"a": None}], ["a"]).splitlines()[1] == "|---|"  # no value: left


def test_alignment():
    rows = [{"block": 64, "flag": True, "ratio": 1.5}, {"block": "tensor", "flag": False, "ratio": 2.0}]
    # a column mixing numbers and text is left-aligned, and so are bools
    assert markdown_table(rows, ["block", "flag", "ratio"]).splitlines()[1] == "|---|---|---:|"
    align = {"block": "right", "flag": "center", "ratio": "left"}
    table = markdown_table(rows, ["block", "flag", "ratio"], align=align)
    assert table.splitlines()[1] == "|---:|:---:|---|"
    assert table.splitlines()[2] == "| 64 | True | 1.5 |"


def test_no_rows_and_any_iterable():
    assert markdown_table([], ["a", "b"], headers={"b": "B"}) == "| a | B |\n|---|---|"
    assert markdown_table((r for r in ROWS), ["code"]) == "| code |\n|---|\n| linear |\n| dynamic |"


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(columns="code"), TypeError, "string"),
    (dict(columns=[]), ValueError, "at least one column"),
    (dict(columns=["code", "code"]), ValueError, "duplicate"),
    (dict(rows=[{"code": "a"}, ("b",)]), TypeError, "row 1 is a tuple"),
    (dict(columns=["code", "typo"]), ValueError, r"no row holds the columns \['typo'\]"),
    (dict(formats={"typo": ".1f"}), ValueError, r"formats name columns .*\['typo'\]"),
    (dict(headers={"typo": "T"}), ValueError, r"headers name columns .*\['typo'\]"),
    (dict(align={"typo": "left"}), ValueError, r"align name columns .*\['typo'\]"),
    (dict(align={"bits": "middle"}), ValueError, "align must be one of"),
    (dict(formats={"bits": 3}), TypeError, "format specs or callables"),
    (dict(formats={"code": ".2%"}), ValueError, "column 'code' of row 0: cannot format 'linear' with '.2%'"),
    (dict(formats={"bits": lambda b: b}), TypeError, "column 'bits' of row 0: the format returned a int"),
    (dict(headers={"bits": 8}), TypeError, "must be str"),
    (dict(headers={"code": "two\nlines"}), ValueError, "line break"),
    (dict(rows=[{"code": "two\r\nlines", "bits": 1, "error": 0.1}]), ValueError, "line break"),
])
def test_bad_input_is_rejected(kwargs, error, match):
    arguments = {"rows": ROWS, "columns": ["code", "bits", "error"], **kwargs}
    with pytest.raises(error, match=match):
        markdown_table(**arguments)


def test_module_example():
    failed, attempted = doctest.testmod(tables)
    assert (failed, attempted) == (0, 1)

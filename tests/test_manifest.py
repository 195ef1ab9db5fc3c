"""Manifest reading and validation: every kind of problem, named by row and column, all reported at once."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_SIZE, make_dataset

from harmonize_core import demo_data
from harmonize_core.errors import InputError
from manifests import RunSettings, demo, validate_manifest

HEADER = "id,content,style,mask,tau,size,pass1_iters,pass2_iters,preset,notes"


def _write_item(folder: Path, name: str, mask: np.ndarray | None = None) -> tuple[str, str, str]:
    item = demo_data.make_item(seed=len(name), height=TINY_SIZE)
    (folder / f"{name}-c.png").write_bytes(demo_data.encode(item.composite, "PNG"))
    (folder / f"{name}-s.jpg").write_bytes(demo_data.encode(item.painting, "JPEG"))
    (folder / f"{name}-m.png").write_bytes(demo_data.encode(item.mask if mask is None else mask, "PNG"))
    return f"{name}-c.png", f"{name}-s.jpg", f"{name}-m.png"


@pytest.fixture
def problem_manifest(tmp_path) -> Path:
    """A manifest with one valid row and one row per kind of problem (rows numbered as a spreadsheet shows)."""
    c, s, m = _write_item(tmp_path, "ok")
    height, width = TINY_SIZE, TINY_SIZE * 4 // 3
    small_mask = np.zeros((40, 40), np.uint8)
    small_mask[10:20, 10:20] = 255
    _, _, mismatch = _write_item(tmp_path, "mm", mask=small_mask)
    _, _, empty = _write_item(tmp_path, "em", mask=np.zeros((height, width), np.uint8))
    speck = np.zeros((height, width), np.uint8)
    speck[20, 30] = 255
    _, _, tiny = _write_item(tmp_path, "tn", mask=speck)
    (tmp_path / "corrupt.jpg").write_bytes((tmp_path / s).read_bytes()[:200])
    rows = [
        f"good,{c},{s},{m},2.5,,,,quick,a note",   # 2
        f"../evil,{c},{s},{m},,,,,,",              # 3 unsafe id
        f"dup,{c},{s},{m},,,,,,",                  # 4 duplicate
        f"dup,{c},{s},{m},,,,,,",                  # 5 duplicate
        f"missing,nope.png,{s},{m},,,,,,",         # 6 missing file
        f"corrupt,{c},corrupt.jpg,{m},,,,,,",      # 7 unreadable image
        f"mismatch,{c},{s},{mismatch},,,,,,",      # 8 size mismatch
        f"empty,{c},{s},{empty},,,,,,",            # 9 empty mask
        f"badvals,{c},{s},{m},-1,abc,,,,",         # 10 bad tau and size
        f"badvals2,{c},{s},{m},,,2.5,,rapid,",     # 11 bad iterations and preset
        f"nomask,{c},{s},,,,,,,",                  # 12 empty cell
        f"toosmall,{c},{s},{m},,8,,,,",            # 13 size out of range
        f"speck,{c},{s},{tiny},,32,,,,",           # 14 mask vanishes at the working size
    ]
    path = tmp_path / "manifest.csv"
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return path


def test_every_problem_is_reported_at_once_with_row_and_column(problem_manifest):
    report = validate_manifest(str(problem_manifest), RunSettings(preset="quick"))
    found = {(p.row, p.column) for p in report.problems}
    expected = {(3, "id"), (4, "id"), (5, "id"), (6, "content"), (7, "style"), (8, "mask"),
                (9, "mask"), (10, "tau"), (10, "size"), (11, "pass1_iters"), (11, "preset"), (12, "mask"),
                (13, "size"), (14, "mask")}
    assert found == expected
    messages = {(p.row, p.column): p.message for p in report.problems}
    assert "unsafe item id" in messages[3, "id"]
    assert "duplicate id 'dup' (also on row 5)" in messages[4, "id"]
    assert "file not found" in messages[6, "content"] and "nope.png" in messages[6, "content"]
    assert "not a readable image" in messages[7, "style"]
    assert messages[8, "mask"] == ("size 40x40 differs from the content's and the style's 64x48; the composite, "
                                   "the painting and the mask must have the same size")
    assert "mask is empty" in messages[9, "mask"]
    assert "tau" in messages[10, "tau"] and "whole number" in messages[11, "pass1_iters"]
    assert "unknown preset 'rapid'" in messages[11, "preset"]
    assert ">= 32" in messages[13, "size"]
    assert "vanishes at the working size 32x24" in messages[14, "mask"]
    (good,) = report.items
    assert good.id == "good" and good.extra == {"notes": "a note"} and good.to_record()["extra"] == {"notes": "a note"}
    assert report.extra_columns == ["notes"] and report.extras[3] == {"notes": ""}  # kept, not a problem
    assert not report.warnings and good.warnings == ()
    assert report.row_count == 13 and not report.fatal and not report.ok
    assert sorted(report.invalid_rows()) == list(range(3, 15))


def test_valid_rows_carry_digests_and_resolved_configs(problem_manifest):
    report = validate_manifest(str(problem_manifest), RunSettings(preset="paper", overrides={"tau": "1", "size": 64}))
    (good,) = report.items
    folder = problem_manifest.parent
    assert good.row == 2 and good.files["content"].uri == str(folder / "ok-c.png")
    for column, name in (("content", "ok-c.png"), ("style", "ok-s.jpg"), ("mask", "ok-m.png")):
        assert good.files[column].sha256 == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    # The row's preset cell (quick) replaces the run's preset; its tau cell beats the run's tau; size comes from the run.
    assert good.config.pass1.iterations == 60 and good.config.pass2.tau == 2.5 and good.config.sizing.size == 64


def test_table_lists_every_problem(problem_manifest):
    table = validate_manifest(str(problem_manifest)).table()
    lines = table.splitlines()
    assert "14 problem(s); 12 of 13 rows invalid, 1 valid" in lines[0]
    assert lines[1].split() == ["row", "id", "column", "problem"]
    assert len(lines) == 2 + 14
    assert any(line.split()[:3] == ["8", "mismatch", "mask"] for line in lines)


def test_missing_columns_are_fatal_and_all_named(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,content,extra\nx,a.png,1\n")
    report = validate_manifest(str(path))
    assert report.fatal and not report.items
    missing = [p for p in report.problems if "missing required column" in p.message]
    assert missing and missing[0].column == "style, mask"
    assert report.extra_columns == ["extra"] and len(report.problems) == 1  # an unknown column is kept, not a problem


def test_unreadable_or_empty_manifest_raises_input_error(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        validate_manifest(str(tmp_path / "absent.csv"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InputError, match="empty"):
        validate_manifest(str(tmp_path / "empty.csv"))
    (tmp_path / "header.csv").write_text("id,content,style,mask\n")
    report = validate_manifest(str(tmp_path / "header.csv"))
    assert report.fatal and report.problems[-1].message == "the manifest has no rows"


def test_paths_are_relative_to_the_manifest_not_the_working_directory(tmp_path, monkeypatch):
    manifest = make_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    report = validate_manifest("data/manifest.csv")
    assert report.ok and [i.id for i in report.items] == ["a", "b"]
    assert report.items[0].files["mask"].uri == str(Path("data/a/mask.png"))
    absolute = tmp_path / "abs.csv"
    absolute.write_text(f"id,content,style,mask\nz,{manifest.parent}/a/composite.png,{manifest.parent}/a/painting.jpg,"
                        f"{manifest.parent}/a/mask.png\n")
    assert validate_manifest(str(absolute)).ok


def test_only_ids_limits_the_rows_checked_but_duplicates_count_every_row(problem_manifest):
    report = validate_manifest(str(problem_manifest), only_ids=["good", "missing", "dup"])
    assert {p.row for p in report.problems if p.row is not None} == {4, 5, 6}
    assert [i.id for i in report.items] == ["good"]
    report = validate_manifest(str(problem_manifest), only_ids=["good", "ghost", "phantom"])
    assert report.fatal and not report.items  # nothing runs: the selection no longer matches the manifest
    assert [(p.row, p.column, p.message) for p in report.problems] == [
        (None, "id", "selected id(s) not in the manifest: ghost, phantom; they may have been renamed or removed "
                     "since they were selected")]


def test_manifest_on_s3_resolves_paths_against_its_prefix(s3, tmp_path):
    folder = make_dataset(tmp_path / "data").parent
    for path in sorted(folder.rglob("*.*")):
        s3.put_object(Bucket="data", Key=f"sets/one/{path.relative_to(folder)}", Body=path.read_bytes())
    text = (folder / "manifest.csv").read_text().replace("b/composite.png", "s3://data/sets/one/b/composite.png")
    s3.put_object(Bucket="data", Key="sets/one/manifest.csv", Body=text.encode())
    report = validate_manifest("s3://data/sets/one/manifest.csv")
    assert report.ok, report.table()
    a, b = report.items
    assert a.files["style"].uri == "s3://data/sets/one/a/painting.jpg"
    assert b.files["content"].uri == "s3://data/sets/one/b/composite.png"
    assert a.files["mask"].sha256 == hashlib.sha256((folder / "a" / "mask.png").read_bytes()).hexdigest()
    s3.delete_object(Bucket="data", Key="sets/one/b/mask.png")
    report = validate_manifest("s3://data/sets/one/manifest.csv")
    assert [(p.row, p.column) for p in report.problems] == [(3, "mask")]
    assert "s3://data/sets/one/b/mask.png: not found" in report.problems[0].message


def test_example_manifest_is_what_the_demo_writes():
    example = Path(__file__).resolve().parents[1] / "manifests" / "examples" / "demo.csv"
    assert example.read_text() == demo.manifest_text(demo.manifest_rows())


def test_a_rows_preset_never_switches_the_runs_backbone():
    from manifests.schema import RunSettings, resolve_config

    run = RunSettings(preset="quick", overrides={})
    paper_row = resolve_config(run, {"preset": "paper"})
    assert paper_row.sizing.size == 700 and paper_row.pass1.iterations == 1000  # the row's preset applies...
    assert paper_row.backbone == resolve_config(run, {}).backbone  # ...but the network stays the run's

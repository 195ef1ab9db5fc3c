"""Validation a curator can live with: extra columns kept, case-insensitive ids, warnings (typos, grey masks,
changes outside the mask, nothing pasted), strict mode, tau lists, and the input index that spares unchanged inputs
a second read (locally and on S3)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import make_dataset
from PIL import Image, ImageFilter

from harmonize_core import demo_data
from harmonize_core.errors import InputError
from manifests import RunSettings, check_run_settings, parse_tau_list, tau_label, validate_manifest
from manifests.checks import GREY_WARN_FRACTION, OUTSIDE_WARN_FRACTION
from tasks import storage

HEIGHT = 96  # px: big enough for the mask and consistency checks to mean something, small enough to be fast
HEADER = "id,content,style,mask"
IMAGE_SUFFIXES = (".png", ".jpg")


def _save(folder: Path, name: str, array: np.ndarray) -> str:
    fmt = "JPEG" if name.endswith(".jpg") else "PNG"
    (folder / name).write_bytes(demo_data.encode(array, fmt))
    return name


def _item_files(folder: Path, name: str, seed: int = 1, *, composite: np.ndarray | None = None,
                mask: np.ndarray | None = None, mask_name: str = "m.png") -> str:
    """Write one demo item (optionally with its composite or mask replaced); return its manifest cells."""
    item = demo_data.make_item(seed, height=HEIGHT)
    cells = (_save(folder, f"{name}-c.png", item.composite if composite is None else composite),
             _save(folder, f"{name}-s.jpg", item.painting),
             _save(folder, f"{name}-{mask_name}", item.mask if mask is None else mask))
    return ",".join(cells)


def _manifest(folder: Path, lines: list[str], header: str = HEADER) -> str:
    path = folder / "manifest.csv"
    path.write_text("\n".join([header, *lines]) + "\n")
    return str(path)


def test_unknown_columns_are_kept_and_a_likely_typo_is_a_warning(tmp_path):
    cells = _item_files(tmp_path, "a")
    manifest = _manifest(tmp_path, [f"a,{cells},5,wikiart,\"nice, isn't it\",,x7,"],
                         header=" ID, Content ,style,MASK,pass1_iter,Source,notes,,,")
    report = validate_manifest(manifest)
    assert report.ok and not report.clean
    (item,) = report.items
    assert report.extra_columns == ["pass1_iter", "Source", "notes", "column_9"]
    assert item.extra == {"pass1_iter": "5", "Source": "wikiart", "notes": "nice, isn't it", "column_9": "x7"}
    assert item.to_record()["extra"] == item.extra and item.config.pass1.iterations == 60  # not applied
    assert [(w.row, w.column, w.message) for w in report.warnings] == [
        (None, "pass1_iter", "unknown column 'pass1_iter' kept as an extra column; did you mean pass1_iters?"),
        (None, "column_9", "a column without a name is kept as the extra column 'column_9'; give it a name in the "
                           "header")]
    assert item.warnings == ()  # file-level warnings are the report's, not the row's
    strict = validate_manifest(manifest, strict_warnings=True)
    assert not strict.ok and not strict.warnings and [i.id for i in strict.items] == ["a"]
    assert strict.problems[0].message.endswith("(a warning; strict makes it an error)")


def test_a_misspelt_required_column_is_named_in_the_fatal_problem(tmp_path):
    manifest = _manifest(tmp_path, [f"a,{_item_files(tmp_path, 'a')}"], header="id,content,style,masks")
    report = validate_manifest(manifest)
    assert report.fatal
    assert report.problems[0].message.endswith("('masks' may be misspelt)")


def test_ids_that_differ_only_in_case_collide(tmp_path):
    cells = _item_files(tmp_path, "a")
    report = validate_manifest(_manifest(tmp_path, [f"Cat-01,{cells}", f"ok,{cells}", f"cat-01,{cells}"]))
    assert [i.id for i in report.items] == ["ok"]
    assert {(p.row, p.message) for p in report.problems} == {
        (2, "duplicate id 'Cat-01' (also on row 4 as 'cat-01'); ids must be unique regardless of case (some file "
            "systems ignore case)"),
        (4, "duplicate id 'cat-01' (also on row 2 as 'Cat-01'); ids must be unique regardless of case (some file "
            "systems ignore case)")}


def _percent(message: str) -> float:
    return float(re.match(r"([0-9.]+)%", message).group(1)) / 100


@pytest.fixture
def warned_manifest(tmp_path) -> str:
    """One clean row and one row per warning: tight mask, nothing pasted, grey mask, feathered mask."""
    item = demo_data.make_item(1, height=HEIGHT)
    columns = np.nonzero(item.mask.any(axis=0))[0]
    half = item.mask.copy()
    half[:, (columns[0] + columns[-1]) // 2:] = 0  # drawn too tight: the object's right half is left out
    grey = (item.mask // 255 * 200).astype(np.uint8)  # a grey object, above the 0.5 split
    feathered = np.asarray(Image.fromarray(item.mask).filter(ImageFilter.GaussianBlur(3)))
    rows = [f"clean,{_item_files(tmp_path, 'clean')}",
            f"jpegmask,{_item_files(tmp_path, 'jm', mask_name='m.jpg')}",
            f"tight,{_item_files(tmp_path, 'tight', mask=half)}",
            f"unpasted,{_item_files(tmp_path, 'up', composite=item.painting)}",
            f"grey,{_item_files(tmp_path, 'grey', mask=grey)}",
            f"feathered,{_item_files(tmp_path, 'soft', mask=feathered)}"]
    return _manifest(tmp_path, rows)


def test_warnings_flag_rows_but_never_stop_them(warned_manifest):
    report = validate_manifest(warned_manifest)
    assert report.ok and not report.clean
    assert [i.id for i in report.items] == ["clean", "jpegmask", "tight", "unpasted", "grey", "feathered"]
    found = {(w.item_id, w.column): w.message for w in report.warnings}
    assert set(found) == {("tight", "mask"), ("unpasted", "content"), ("grey", "mask"), ("feathered", "mask")}
    assert "lie outside the dilated mask" in found["tight", "mask"]
    assert _percent(found["tight", "mask"]) > 10 * OUTSIDE_WARN_FRACTION  # about half the object is outside
    assert found["unpasted", "content"].startswith("the composite equals the painting on 100.0% of the mask")
    assert found["grey", "mask"].startswith("100.0% of the mask is grey")
    assert _percent(found["feathered", "mask"]) > GREY_WARN_FRACTION
    items = {i.id: i for i in report.items}
    assert items["clean"].warnings == () and items["jpegmask"].warnings == ()
    assert items["tight"].warnings == (f"mask: {found['tight', 'mask']}",)
    assert items["grey"].to_record()["warnings"] == [f"mask: {found['grey', 'mask']}"]
    lines = report.table().splitlines()
    assert lines[0].endswith("6 rows, all valid; 4 warning(s)") and len(lines) == 2 + 4
    assert all(" warning: " in line for line in lines[2:])


def test_strict_turns_warnings_into_errors(warned_manifest):
    report = validate_manifest(warned_manifest, strict_warnings=True)
    assert [i.id for i in report.items] == ["clean", "jpegmask"] and not report.warnings
    assert sorted(report.invalid_rows()) == [4, 5, 6, 7]
    assert all(p.severity == "error" and p.message.endswith("strict makes it an error)") for p in report.problems)
    table = report.table()
    assert "4 problem(s); 4 of 6 rows invalid, 2 valid" in table and "warning:" not in table


def test_tau_values_and_labels():
    assert parse_tau_list("1;5;10") == (1.0, 5.0, 10.0)
    assert parse_tau_list(" auto; 5 ;5.0;AUTO;") == ("auto", 5.0)
    assert parse_tau_list("2.5") == (2.5,) and parse_tau_list("") == () and parse_tau_list(None) == ()
    with pytest.raises(ValueError, match=r"bad tau value 'x' in the list '1;x': not a number"):
        parse_tau_list("1;x")
    with pytest.raises(ValueError, match=r"bad tau value '-2' in the list '1;-2': tau must be a positive"):
        parse_tau_list("1;-2")
    assert [tau_label(v) for v in (5.0, 2.5, "auto", 0.1, 1e-5, 1e20, 10)] == [
        "5", "2.5", "auto", "0.1", "1e-05", "1e20", "10"]
    with pytest.raises(InputError, match="bad tau value 'x'"):
        check_run_settings(RunSettings(overrides={"tau": "5;x"}))


def test_a_tau_list_gives_variants_and_the_first_value_runs_by_default(tmp_path):
    cells = _item_files(tmp_path, "a")
    manifest = _manifest(tmp_path, [f"list,{cells},1;5;10", f"auto,{cells},auto; 5 ;5.0", f"one,{cells},2",
                                    f"run,{cells},", f"bad,{cells},1;x"], header=HEADER + ",tau")
    report = validate_manifest(manifest, RunSettings(overrides={"tau": "1;5"}))
    items = {i.id: i for i in report.items}
    assert [(i, items[i].config.pass2.tau, items[i].tau_variants) for i in items] == [
        ("list", 1.0, (1.0, 5.0, 10.0)), ("auto", "auto", ("auto", 5.0)), ("one", 2.0, ()), ("run", 1.0, (1.0, 5.0))]
    assert items["list"].to_record()["tau_variants"] == [1.0, 5.0, 10.0]
    variants = items["list"].variant_configs()
    assert {label: config.pass2.tau for label, config in variants.items()} == {"1": 1.0, "5": 5.0, "10": 10.0}
    assert variants["5"].pass1 == items["list"].config.pass1
    ((row, column, message),) = [(p.row, p.column, p.message) for p in report.problems]
    assert (row, column) == (6, "tau") and message.startswith("bad tau value 'x' in the list '1;x'")


def _count_image_reads(monkeypatch) -> list[str]:
    """Patch ``storage.read_bytes`` to record every image it reads (manifests and index records not counted)."""
    reads: list[str] = []
    original = storage.read_bytes

    def counting(uri: str) -> bytes:
        if str(uri).endswith(IMAGE_SUFFIXES):
            reads.append(str(uri))
        return original(uri)

    monkeypatch.setattr(storage, "read_bytes", counting)
    return reads


def test_the_index_spares_unchanged_inputs_a_second_read(tmp_path, monkeypatch):
    manifest = str(make_dataset(tmp_path / "data", ids=("a", "b"), overrides={}))  # the size comes from the run
    index = str(tmp_path / "index")
    first = validate_manifest(manifest, index=index)
    assert first.ok and len(storage.list_uris(index)) == 6 + 2 * 2  # six files, two rows x (mask check, consistency)
    reads = _count_image_reads(monkeypatch)
    second = validate_manifest(manifest, index=index)
    assert reads == [] and [i.to_record() for i in second.items] == [i.to_record() for i in first.items]
    painting = tmp_path / "data" / "a" / "painting.jpg"
    os.utime(painting, ns=(painting.stat().st_atime_ns, painting.stat().st_mtime_ns + 10**9))  # touched, same bytes
    validate_manifest(manifest, index=index)
    assert reads == [str(painting)]  # re-digested; the row's analysis is found by its (unchanged) digests
    reads.clear()
    mask = tmp_path / "data" / "b" / "mask.png"
    pixels = np.asarray(Image.open(mask)).copy()
    pixels[np.nonzero(pixels.any(axis=1))[0][::2]] = 0  # every other row of the object cut out
    mask.write_bytes(demo_data.encode(pixels, "PNG"))
    changed = validate_manifest(manifest, index=index)
    folder = tmp_path / "data" / "b"
    assert sorted(reads) == sorted(str(folder / n) for n in ("composite.png", "mask.png", "painting.jpg"))
    assert changed.items[1].files["mask"].sha256 == storage.sha256_bytes(mask.read_bytes())
    reads.clear()
    assert validate_manifest(manifest, RunSettings(overrides={"size": 40}), index=index).ok
    assert sorted(reads) == [str(tmp_path / "data" / i / "mask.png") for i in "ab"]  # the size check needs the masks
    reads.clear()
    assert validate_manifest(manifest).ok and len(reads) == 6  # no index: every file is read, once


def test_the_index_works_on_s3(s3, tmp_path, monkeypatch):
    folder = make_dataset(tmp_path / "data", ids=("a", "b")).parent
    for path in sorted(folder.rglob("*.*")):
        s3.put_object(Bucket="data", Key=f"set/{path.relative_to(folder)}", Body=path.read_bytes())
    manifest, index = "s3://data/set/manifest.csv", "s3://results/index"
    assert validate_manifest(manifest, index=index).ok
    reads = _count_image_reads(monkeypatch)
    assert validate_manifest(manifest, index=index).ok and reads == []
    s3.put_object(Bucket="data", Key="set/a/composite.png", Body=demo_data.encode(
        demo_data.make_item(7, height=48).composite, "PNG"))
    report = validate_manifest(manifest, index=index)
    assert sorted(reads) == [f"s3://data/set/a/{n}" for n in ("composite.png", "mask.png", "painting.jpg")]
    # Same size, another picture: the composite now differs from the painting everywhere, outside the mask too.
    assert report.ok and [(w.item_id, w.column) for w in report.warnings] == [("a", "mask")]


def test_storage_stat_reports_without_reading(tmp_path, s3):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert storage.stat(str(path)) == {"size": 3, "mtime_ns": path.stat().st_mtime_ns}
    assert storage.stat(str(tmp_path / "absent")) is None and storage.stat(str(tmp_path)) is None
    s3.put_object(Bucket="data", Key="k/f.bin", Body=b"abcd")
    found = storage.stat("s3://data/k/f.bin")
    assert set(found) == {"size", "etag", "last_modified"} and found["size"] == 4 and found["etag"]
    assert storage.stat("s3://data/k/absent") is None

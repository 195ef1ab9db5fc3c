"""Stage-level truth, on tiny items through the real flow (random weights, 48 px, 3 iterations per pass):

- an item's readable copies (``<out>/<id>[/tau-<v>]/<stage>.png|json``) always come from one computation: a stage
  that recomputes, is restored from the cache or fails leaves no older copy of a later stage beside it;
- a diverging optimisation fails its item with one line, once (never retried);
- waits say what they wait for: a killed run's stage lock (whose, since when, when its lease lapses) or the device
  (behind which item), and a stage's seconds never include them.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from pathlib import Path

import pytest
from conftest import TEST_BACKBONE, TEST_WEIGHTS, TINY_OVERRIDES, make_dataset
from PIL import Image

from flows.harmonize import ItemsFailed, harmonize_manifest
from flows.summary import read_summary
from harmonize_core.passes import stages as core_stages
from harmonize_core.passes.stages import STAGES
from tasks import stages as stage_tasks
from tasks import waits
from tasks.storage import locks

SHARED = ("dilate", "pass1", "blend")
PER_TAU = ("pass2", "reconstruct")


def run(manifest: Path, out: Path, **options):
    """Run the flow; return (final state, the summary rows by (id, variant))."""
    state = harmonize_manifest(manifest=str(manifest), out=str(out), backbone=TEST_BACKBONE, weights=TEST_WEIGHTS,
                               device="cpu", return_state=True, **options)
    result = state.result(raise_on_failure=False)
    uri = result["summary"] if isinstance(result, dict) else result.summary_uri
    return state, {(row["id"], row["variant"]): row for row in read_summary(uri)}


def copies(folder: Path) -> dict[str, tuple[int, int] | None]:
    """Return the stage copies under an item folder (not the report's thumbnails, named by their digest):
    {relative path: (width, height) of a PNG, None for JSON}."""
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.stem in STAGES):
        relative = path.relative_to(folder).as_posix()
        found[relative] = Image.open(path).size if path.suffix == ".png" else None
    return found


def names(stages: tuple[str, ...], variants: tuple[str, ...] = ("",)) -> set[str]:
    return {f"{variant}{'/' if variant else ''}{stage}.{ext}" for stage in stages for variant in variants
            for ext in ("png", "json")}


def broken(message: str):
    def stage(*args, **kwargs):
        raise RuntimeError(message)

    return stage


def test_readable_copies_always_come_from_one_computation(prefect_api, tmp_path, monkeypatch):
    manifest = make_dataset(tmp_path / "data", ids=("a",), overrides={**TINY_OVERRIDES, "tau": "1;5"})
    out, taus = tmp_path / "out", ("tau-1", "tau-5")
    state, _ = run(manifest, out)
    assert state.is_completed()
    first = copies(out / "a")
    assert set(first) == names(SHARED) | names(PER_TAU, taus)
    assert {size for size in first.values() if size} == {(48, 36)}

    # A curator shrinks the item, and pass 1 now fails: the new dilate.png is the only copy left.
    manifest.write_text(manifest.read_text().replace(",48,3,3,", ",40,3,3,"))
    real_pass1 = stage_tasks.core.pass1
    monkeypatch.setattr(stage_tasks.core, "pass1", broken("pass 1 broke"))
    state, rows = run(manifest, out)
    assert state.is_failed()
    assert copies(out / "a") == {"dilate.png": (40, 30), "dilate.json": None}
    assert {key: row["error"] for key, row in rows.items()} == {
        ("a", tau): "pass1: RuntimeError: pass 1 broke" for tau in taus}
    assert rows["a", "tau-1"]["dilate_uri"] == str(out / "a" / "dilate.png") and rows["a", "tau-1"]["pass1_uri"] == ""

    # Fixed: every copy is back, all at the new size.
    monkeypatch.setattr(stage_tasks.core, "pass1", real_pass1)
    state, _ = run(manifest, out)
    assert state.is_completed()
    second = copies(out / "a")
    assert set(second) == set(first) and {size for size in second.values() if size} == {(40, 30)}

    # Back to 48 px, with one more pass 2 iteration, and pass 2 failing: the shared stages' copies are restored from
    # the cache (each restore clears the 40 px copies after it), and the failed pass 2 leaves no copy after it.
    manifest.write_text(manifest.read_text().replace(",40,3,3,", ",48,3,4,"))
    monkeypatch.setattr(stage_tasks.core, "pass2", broken("pass 2 broke"))
    prefect_api.clear()
    state, rows = run(manifest, out)
    assert state.is_failed() and prefect_api.runs() == []  # nothing computed: restored from the cache, then failed
    third = copies(out / "a")
    assert third == {path: size for path, size in first.items() if path in names(SHARED)}
    assert {row["error"] for row in rows.values()} == {"pass2: RuntimeError: pass 2 broke"}
    assert {row["cached"] for row in rows.values()} == {"dilate;pass1;blend"}


def test_a_copy_restored_from_the_cache_clears_the_later_copies(tmp_path):
    from flows.item import settle
    from tasks import storage

    out, item_folder = str(tmp_path / "out"), tmp_path / "out" / "a"
    item_folder.mkdir(parents=True)
    for relative in names(STAGES):  # an older computation's copies
        (item_folder / relative).write_text("older")
    png, metrics = b"dilate of this computation", b'{"stage": "dilate"}'
    record = {"stage": "dilate", "uri": storage.object_uri(out, storage.sha256_bytes(png), "png"),
              "sha256": storage.sha256_bytes(png), "metrics_uri": storage.object_uri(out, "m", "json"),
              "item_uri": "elsewhere"}
    storage.write_bytes(record["uri"], png)
    storage.write_bytes(record["metrics_uri"], metrics)
    settled = settle("dilate", record, {"id": "a"}, out)
    assert settled["item_uri"] == str(item_folder / "dilate.png")
    assert {path.name for path in item_folder.iterdir()} == names(("dilate",))
    assert (item_folder / "dilate.png").read_bytes() == png
    (item_folder / "pass1.png").write_text("pass1 of this computation")
    settle("dilate", record, {"id": "a"}, out)  # the copy is already this computation's: nothing else moves
    assert (item_folder / "pass1.png").read_text() == "pass1 of this computation"


def test_discarding_a_stage_clears_later_stages_in_the_right_folders(tmp_path):
    item_folder = tmp_path / "out" / "a"
    for relative in names(STAGES) | names(PER_TAU, ("tau-1", "tau-5")) | {"notes.txt", "tau-1/notes.txt"}:
        (item_folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (item_folder / relative).write_text("x")
    out = str(tmp_path / "out")
    item = {"id": "a", "variant": "tau-5"}
    removed = stage_tasks.discard_copies(out, item, "pass2", including=False)  # a variant stage: its own folder
    assert sorted(Path(uri).relative_to(item_folder).as_posix() for uri in removed) == [
        "tau-5/reconstruct.json", "tau-5/reconstruct.png"]
    removed = stage_tasks.discard_copies(out, item, "blend")  # a shared stage: the item folder and every variant
    assert len(removed) == 2 + 4 + 4 + 2
    left = {p.relative_to(item_folder).as_posix() for p in item_folder.rglob("*") if p.is_file()}
    assert left == names(("dilate", "pass1")) | {"notes.txt", "tau-1/notes.txt"}


def test_a_diverging_pass_fails_its_item_once_with_one_line(prefect_api, tmp_path, monkeypatch):
    manifest = make_dataset(tmp_path / "data", ids=("wild",))
    calls, real_pass1 = [], core_stages.pass1

    def counted(*args, **kwargs):
        calls.append(1)
        return real_pass1(*args, **kwargs)

    monkeypatch.setattr(stage_tasks.core, "pass1", counted)
    state, rows = run(manifest, tmp_path / "out", overrides={"pass1.learning_rate": 1e9})
    assert state.is_failed() and isinstance(state.result(raise_on_failure=False), ItemsFailed)
    row = rows["wild", ""]
    assert row["status"] == "failed" and calls == [1]  # a DivergedError is never retried
    assert re.fullmatch(r"pass1: the loss exploded \(style_relu\d_1 [0-9.e+]+; total [0-9.e+]+ = [0-9.e+]+ x its start "
                        r"[0-9.e+-]+, limit 1000 x\) at evaluation 1 of 3; the optimisation diverged and is not "
                        r"retried: lower pass1\.learning_rate \(now 1e\+09\) or check this item's images",
                        row["error"]), row["error"]
    assert row["dilate_uri"] and row["pass1_uri"] == ""
    assert set(copies(tmp_path / "out" / "wild")) == names(("dilate",))


class _Lines(logging.Handler):
    """The pipeline's progress lines, as the CLI prints them."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "harmonize_progress", False):
            self.lines.append(record.getMessage())


@pytest.fixture
def progress_lines():
    handler = _Lines()
    logging.getLogger("prefect").addHandler(handler)
    yield handler.lines
    logging.getLogger("prefect").removeHandler(handler)


def test_a_rerun_says_it_waits_for_a_killed_runs_stage_lock_not_for_the_device(prefect_api, tmp_path, monkeypatch,
                                                                                  progress_lines):
    monkeypatch.setenv(locks.LEASE_ENV, "4")
    monkeypatch.setattr(waits, "NOTICE_SECONDS", 1.0)
    manifest, out = make_dataset(tmp_path / "data", ids=("a",)), tmp_path / "out"
    killed = locks.StorageLockManager(str(out), lease=4)
    killed._stop.set()  # it never renews: its process was killed
    real_create, planted = locks._LocalLeases.create, []

    def create(self, key, body):  # the killed run took dilate's lock a moment before this run reached it
        if key.startswith("dilate-") and not planted:
            planted.append(key)
            with waits.waiting_in(waits.StageWaits(who="item 1/1 a", stage="dilate", run_id="killed-run")):
                assert killed.acquire_lock(key, "killed-holder")
        return real_create(self, key, body)

    monkeypatch.setattr(locks._LocalLeases, "create", create)
    started = time.monotonic()
    state, rows = run(manifest, out)
    assert state.is_completed() and time.monotonic() - started > 4
    whose = re.escape(f"run killed-run (item 1/1 a dilate, pid {os.getpid()} on {socket.gethostname()})")
    dilate = [line for line in progress_lines if line.startswith("item 1/1 a: dilate")]
    assert len(dilate) == 3, dilate
    waiting = re.fullmatch(rf"item 1/1 a: dilate waiting for its stage lock, held by {whose} for (\d) s: last renewed "
                           r"(\d) s ago, so it lapses in (\d) s unless renewed \(lease 4 s\)", dilate[0])
    assert waiting, dilate[0]
    held, renewed, lapses = (int(number) for number in waiting.groups())  # said after 1 s, polled every <= 1 s
    assert held == renewed and 1 <= held <= 3 and held + lapses in (3, 4, 5)
    assert re.fullmatch(rf"item 1/1 a: dilate took over its stage lock from {whose}, silent for [45] s \(lease 4 s\)",
                        dilate[1]), dilate[1]
    assert re.fullmatch(rf"item 1/1 a: dilate done \(0\.\d s, after [4-6] s waiting for its stage lock held by "
                        rf"{whose}\)", dilate[2]), dilate[2]
    assert not any("device" in line for line in progress_lines)
    assert float(rows["a", ""]["dilate_s"]) < 1  # its own seconds, not the wait


def test_an_item_waiting_for_the_device_names_the_item_in_front(prefect_api, tmp_path, monkeypatch, progress_lines):
    monkeypatch.setattr(waits, "NOTICE_SECONDS", 0.5)
    manifest = make_dataset(tmp_path / "data", ids=("a", "b"))

    real_pass1 = core_stages.pass1

    def slow_pass1(*args, **kwargs):  # holds the device 1.5 s longer than the core's own (timed) work
        time.sleep(1.5)
        return real_pass1(*args, **kwargs)

    monkeypatch.setattr(stage_tasks.core, "pass1", slow_pass1)
    state, rows = run(manifest, tmp_path / "out")
    assert state.is_completed()
    waiting = [line for line in progress_lines if ": pass1 waiting" in line]  # (a pass 2 may wait for it too)
    assert len(waiting) == 1, progress_lines
    behind = re.match(r"item \d/2 (\w): ", waiting[0]).group(1)
    front = {"a": "b", "b": "a"}[behind]
    me, other = f"item {'ab'.index(behind) + 1}/2 {behind}", f"item {'ab'.index(front) + 1}/2 {front}"
    assert re.fullmatch(rf"{me}: pass1 waiting for the device \(cpu\) behind {other} pass1 for [01] s", waiting[0])
    done = next(line for line in progress_lines if line.startswith(f"{me}: pass1 done"))
    assert re.fullmatch(rf"{me}: pass1 done \(\d+\.\d s, after [12] s waiting for the device behind {other} pass1\)",
                        done), done
    assert float(rows[behind, ""]["pass1_s"]) < 1.5  # the core's own seconds: neither the wait nor the sleep

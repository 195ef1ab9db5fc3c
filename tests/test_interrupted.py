"""Interrupted runs tell the truth (flows.run_record): a run killed outright, one stopped by an exception, one still
running; ids that left the manifest in status.csv and ``--only-failed``; a bounded report for thousands of bad rows.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TEST_BACKBONE, TEST_WEIGHTS, make_dataset

from flows import run_record
from flows.cli.main import main
from flows.report import build as report_build
from flows.summary import (
    STATUS_COLUMNS,
    STATUS_NAME,
    SUMMARY_NAME,
    read_summary,
    rerun_ids,
    to_csv,
    update_status,
    write_row,
    write_summary,
)
from tasks import storage

ROOT = Path(__file__).resolve().parents[1]
RUN = "run-killed"
STARTED = "2030-01-01T10:00:00Z"
KILL_TIMEOUT_S = 180  # the real-kill test waits this long at most for the first item's record


def dead_pid() -> int:
    """A pid whose process has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def planned(item_id: str, row: int) -> dict:
    return {"id": item_id, "variant": "", "row": row, "tau": "", "warnings": "", "content_uri": "",
            "style_uri": "", "mask_uri": "", "outputs": "", "extra": {"notes": f"note {item_id}"}}


def write_started(out: str, run_id: str, ids: list[str], pid: int, started: str = STARTED) -> None:
    record = {"run_id": run_id, "manifest": "/data/manifest.csv", "started": started, "host": socket.gethostname(),
              "pid": pid, "process_started": run_record._process_started(pid), "invalid": 0,
              "planned": [planned(item_id, n + 2) for n, item_id in enumerate(ids)]}
    storage.write_bytes(storage.run_uri(out, run_id, run_record.STARTED_NAME), json.dumps(record).encode())


def status_of(out: str) -> dict[str, dict[str, str]]:
    return {row["id"]: row for row in read_summary(storage.join(out, STATUS_NAME))}


def test_report_after_a_killed_run_says_so_names_what_never_finished_and_updates_status(tmp_path, capsys):
    out = str(tmp_path / "out")
    # status.csv before the run: d completed by an older run; c updated by another run after this one started
    blank = dict.fromkeys(STATUS_COLUMNS, "")
    older = {**blank, "id": "d", "status": "completed", "last_run": "older-run", "updated": "2029-12-31T00:00:00Z"}
    later = {**blank, "id": "c", "status": "completed", "last_run": "later-run", "updated": "2030-01-01T11:00:00Z"}
    storage.write_bytes(storage.join(out, STATUS_NAME), to_csv([older, later], STATUS_COLUMNS))

    write_started(out, RUN, ["a", "b", "c", "d"], dead_pid())
    write_summary(storage.run_uri(out, RUN, SUMMARY_NAME), [])  # written at the start; the kill came before the next
    for item_id, row in (("a", 2), ("b", 3), ("c", 4)):
        write_row(out, RUN, {"id": item_id, "row": row, "status": "completed", "total_s": 1.0})

    assert main(["report", "--out", out]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(f"warning: run {RUN} did not finish: 1 of 4 planned output(s) never finished "
                                   "(status unfinished); the run was stopped (killed, or its machine lost)")
    summary = {r["id"]: r for r in read_summary(storage.run_uri(out, RUN, SUMMARY_NAME))}
    assert {i: r["status"] for i, r in summary.items()} == {"a": "completed", "b": "completed", "c": "completed",
                                                             "d": "unfinished"}
    assert summary["d"]["error"].startswith("never finished: the run was stopped") and summary["d"]["notes"] == "note d"
    after = status_of(out)
    assert (after["d"]["status"], after["d"]["last_run"]) == ("unfinished", RUN)  # no longer the old completed
    assert (after["c"]["last_run"], after["a"]["last_run"]) == ("later-run", RUN)  # a newer result is kept
    assert rerun_ids(storage.join(out, STATUS_NAME)) == ["d"]

    page = storage.read_bytes(captured.out.strip()).decode()
    assert "This run did not finish.</strong>" in page and "1 of 4 planned outputs never finished" in page
    assert '<li class="s-unfinished"><b>1</b> unfinished</li>' in page and '<li class="s-failed"><b>0</b> failed' in page
    cards = page.split('<article class="card ')[1:]
    assert cards[0].startswith("s-unfinished") and '<span class="badge">unfinished</span> d ' in cards[0]
    assert "--only-failed" in page and "/data/manifest.csv" in page


def test_a_run_still_running_is_not_marked_in_status(tmp_path, capsys):
    out = str(tmp_path / "out")
    write_started(out, "live", ["a", "b"], os.getpid())  # this very process: alive, same host
    write_row(out, "live", {"id": "a", "row": 2, "status": "completed"})
    assert main(["report", "--out", out, "--run", "live"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("warning: run live has not finished yet: 1 of 2 planned output(s) have no result yet")
    assert "the run is still running (process" in captured.err
    page = storage.read_bytes(captured.out.strip()).decode()
    assert "This run is still running.</strong>" in page and "1 of 2 planned outputs have no result yet" in page
    assert not storage.exists(storage.join(out, STATUS_NAME))
    assert [r["status"] for r in read_summary(storage.run_uri(out, "live", SUMMARY_NAME))] == ["completed", "unfinished"]


def test_a_run_stopped_by_an_exception_records_its_end_and_the_unfinished_items(prefect_api, tmp_path, monkeypatch):
    import flows.harmonize as harmonize

    manifest = make_dataset(tmp_path / "data", ids=("a", "b", "c"))
    out = str(tmp_path / "out")

    def one_then_lost(records, out, spec, target, run_id, on_rows):
        row = {"id": records[0]["id"], "row": records[0]["row"], "status": "completed", "total_s": 1.0}
        write_row(out, run_id, row)
        on_rows([row])
        raise RuntimeError("device lost\nsecond line")

    monkeypatch.setattr(harmonize, "run_items_here", one_then_lost)
    state = harmonize.harmonize_manifest(manifest=str(manifest), out=out, backbone=TEST_BACKBONE, weights=TEST_WEIGHTS,
                                         device="cpu", return_state=True)
    assert state.is_failed()
    run_id = report_build.latest_run(out)
    ended = json.loads(storage.read_bytes(storage.run_uri(out, run_id, run_record.ENDED_NAME)))
    assert (ended["outcome"], ended["reason"]) == ("stopped", "RuntimeError: device lost")
    rows = {r["id"]: r for r in read_summary(storage.run_uri(out, run_id, SUMMARY_NAME))}
    assert {i: r["status"] for i, r in rows.items()} == {"a": "completed", "b": "unfinished", "c": "unfinished"}
    assert rows["b"]["error"] == ("never finished: the run stopped before it finished: RuntimeError: device lost; "
                                  "rerun it (--only-failed)")
    assert rows["b"]["content_uri"].endswith("b/composite.png")
    assert {i: r["status"] for i, r in status_of(out).items()} == {"a": "completed", "b": "unfinished",
                                                                   "c": "unfinished"}
    page = storage.read_bytes(storage.run_uri(out, run_id, "report.html")).decode()
    assert "This run did not finish.</strong>" in page and "2 of 3 planned outputs never finished" in page
    assert "The run stopped before it finished: RuntimeError: device lost." in page


def test_ids_that_left_the_manifest_are_marked_and_only_failed_skips_them(tmp_path, capsys):
    out = str(tmp_path / "out")
    update_status(out, "run-1", [{"id": "gone", "status": "failed", "error": "boom"},
                                 {"id": "kept", "status": "failed", "error": "boom"}])
    update_status(out, "run-2", [], manifest_ids={"kept", "new"})
    marked = status_of(out)
    assert run_record.parse_time(marked["gone"]["left_manifest"]) is not None and marked["kept"]["left_manifest"] == ""
    assert marked["gone"]["status"] == "failed"  # its last status is kept beside the mark
    assert rerun_ids(storage.join(out, STATUS_NAME)) == ["kept"]
    since = marked["gone"]["left_manifest"]
    update_status(out, "run-3", [], manifest_ids={"kept"})
    assert status_of(out)["gone"]["left_manifest"] == since  # when it was first seen gone
    update_status(out, "run-4", [], manifest_ids={"kept", "gone"})
    assert status_of(out)["gone"]["left_manifest"] == ""  # back in the manifest

    # --only-failed on a status.csv whose every failed id left the manifest: one warning line, nothing run
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("id,content,style,mask\nother,c.png,s.png,m.png\n")
    assert main(["run", str(manifest), "--out", out, "--only-failed", storage.join(out, STATUS_NAME)]) == 0
    captured = capsys.readouterr()
    assert captured.err == (f"warning: skipping 2 id(s) of {storage.join(out, STATUS_NAME)} no longer in "
                            f"{manifest}: gone, kept\n")
    assert "nothing to rerun" in captured.out


def test_thousands_of_invalid_rows_make_a_bounded_report(tmp_path):
    out = str(tmp_path / "out")
    rows = [{"id": "", "row": n + 2, "status": "invalid", "error": "id: missing; content: missing"} for n in range(3000)]
    rows += [{"id": f"x{n}", "row": 4000 + n, "status": "invalid", "error": f"content: file not found: x{n}.png"}
             for n in range(20)]
    rows.append({"id": "ok", "row": 9999, "status": "completed"})
    write_summary(storage.run_uri(out, "many", SUMMARY_NAME), rows)
    started = time.perf_counter()
    first = report_build.build_report(out, "many")
    seconds = time.perf_counter() - started
    pages = glob.glob(str(Path(first).parent / "report*.html"))
    assert len(pages) == 1 and seconds < 30
    page = Path(first).read_text()
    assert page.count('<article class="card s-invalid') == report_build.INVALID_CARDS
    assert '<li class="s-invalid"><b>3020</b> invalid</li>' in page  # the counts cover every row
    assert "2,920 more invalid rows are not shown as cards (the first 100 are)" in page
    assert '<td class="n">2,900</td><td>102, 103, 104, 105, 106&hellip;</td><td class="e">id: missing; content: missing' in page
    assert '<td class="n">11</td><td></td><td>11 other distinct problem(s)' in page
    assert len(read_summary(storage.run_uri(out, "many", SUMMARY_NAME))) == 3021  # the summary keeps every row


@pytest.mark.slow
def test_a_really_killed_run_is_reported_unfinished(prefect_api, tmp_path, capsys):
    """``harmonize run`` in a subprocess, SIGKILLed once its first item's record exists; then ``harmonize report``."""
    from prefect.settings import PREFECT_API_URL

    manifest = make_dataset(tmp_path / "data", ids=("a", "b", "c"))
    text = manifest.read_text().splitlines()
    header = text[0].split(",")
    slow = [",".join("4000" if header[i] == "pass1_iters" else cell for i, cell in enumerate(line.split(",")))
            for line in text[2:]]
    manifest.write_text("\n".join([text[0], text[1], *slow]) + "\n")  # b and c take minutes; a seconds
    out = tmp_path / "out"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_TO_API_ENABLED": "false",
           "PREFECT_HOME": str(tmp_path / "prefect-home")}
    command = [sys.executable, "-m", "flows.cli", "run", str(manifest), "--out", str(out), "--workers", "1",
               "--backbone", TEST_BACKBONE, "--weights", TEST_WEIGHTS, "--device", "cpu"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while not glob.glob(str(out / "runs" / "*" / "items" / "*.json")):
            assert process.poll() is None and time.monotonic() < deadline, "the run ended or stalled before item a"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the run and anything it started
        process.wait()
    assert main(["report", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "did not finish: 2 of 3 planned output(s) never finished" in captured.err
    assert "the run was stopped (killed, or its machine lost)" in captured.err
    run_id = report_build.latest_run(str(out))
    rows = {r["id"]: r["status"] for r in read_summary(storage.run_uri(str(out), run_id, SUMMARY_NAME))}
    assert rows == {"a": "completed", "b": "unfinished", "c": "unfinished"}
    assert {i: r["status"] for i, r in status_of(str(out)).items()} == rows
    page = storage.read_bytes(captured.out.strip()).decode()
    assert "This run did not finish.</strong>" in page and "2 of 3 planned outputs never finished" in page


def test_ctrl_c_ends_a_command_with_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    out = str(tmp_path / "out")
    write_summary(storage.run_uri(out, "r", SUMMARY_NAME), [])
    monkeypatch.setattr(report_build, "build_report", interrupted)
    assert main(["report", "--out", out]) == 130
    assert capsys.readouterr().err == (f"harmonize: interrupted (Ctrl-C); `harmonize report --out {out}` shows what "
                                       "finished and what did not\n")

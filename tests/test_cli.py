"""The ``harmonize`` command: exit codes (0 ok, 1 items failed or rows invalid, 2 user error) and one-line errors.

Commands run in-process through ``main(argv)`` (flows against the session's Prefect test API); one runs as a
subprocess, a fresh interpreter as a user runs it, to show the real entry point prints no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_BACKBONE, TEST_WEIGHTS, TINY_SIZE, make_dataset

from flows.cli.main import main
from flows.summary import read_summary
from harmonize_core.passes.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
TEST_FLAGS = ["--backbone", TEST_BACKBONE, "--weights", TEST_WEIGHTS, "--device", "cpu"]


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harmonize: error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_validate_exit_codes_and_table(tiny_manifest, capsys):
    assert main(["validate", str(tiny_manifest)]) == 0
    assert "2 rows, all valid" in capsys.readouterr().out
    (tiny_manifest.parent / "b" / "mask.png").unlink()
    (tiny_manifest.parent / "a" / "painting.jpg").write_bytes(b"garbage")
    assert main(["validate", str(tiny_manifest)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "2 problem(s); 2 of 2 rows invalid, 0 valid" in lines[0]
    assert lines[2].split()[:3] == ["2", "a", "style"] and "not a readable image" in lines[2]
    assert lines[3].split()[:3] == ["3", "b", "mask"] and "file not found" in lines[3]


def test_user_errors_are_one_line_with_exit_code_2(tmp_path, tiny_manifest, capsys):
    assert main(["run", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys.readouterr().err, "nope.csv", "manifest not found")
    assert main(["run", str(tiny_manifest), "--out", str(tmp_path / "out"), "--size", "8"]) == 2
    assert_one_line_error(capsys.readouterr().err, "run settings", "sizing.size must be >= 32")
    assert main(["validate", str(tiny_manifest), "--tau", "-2"]) == 2
    assert_one_line_error(capsys.readouterr().err, "run settings", "tau must be a positive number")
    assert not (tmp_path / "out").exists()


def test_installed_entry_point_prints_one_line_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(tmp_path / "nope.csv")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert_one_line_error(done.stderr, "nope.csv", "file not found")


@pytest.mark.parametrize("command", [["serve", "MANIFEST", "--out", "OUT"], ["deploy", "--pool", "p"],
                                     ["worker", "--pool", "p", "--gpus", "0"],
                                     ["run", "MANIFEST", "--out", "OUT", "--pool", "p"]])
def test_fleet_commands_refuse_to_start_without_a_prefect_server(tiny_manifest, tmp_path, command):
    argv = [str(tiny_manifest) if a == "MANIFEST" else str(tmp_path / "out") if a == "OUT" else a for a in command]
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILES_PATH")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    done = subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert_one_line_error(done.stderr, "no Prefect server configured", "PREFECT_API_URL")


def test_run_reports_failures_then_only_failed_reruns_them(prefect_api, tmp_path, capsys):
    manifest = make_dataset(tmp_path / "data", ids=("a", "b"))
    mask = manifest.parent / "b" / "mask.png"
    saved = mask.read_bytes()
    mask.write_bytes(b"not a png")
    out = tmp_path / "out"
    assert main(["run", str(manifest), "--out", str(out), *TEST_FLAGS]) == 1
    err = capsys.readouterr().err
    assert "not a readable image" in err and "Traceback" not in err
    assert err.count("not a readable image") == 1  # listed once, at validation; the end counts it
    assert "1 invalid row(s), listed above" in err
    assert "item 1/1 a: reconstruct done" in err  # per-item, per-stage progress
    summary = err.split("--only-failed ")[-1].splitlines()[0].strip()
    assert "report: " in err
    assert [(r["id"], r["status"]) for r in read_summary(summary)] == [("a", "completed"), ("b", "invalid")]

    mask.write_bytes(saved)  # the curator fixes the row
    prefect_api.clear()
    assert main(["run", str(manifest), "--out", str(out), "--only-failed", summary, *TEST_FLAGS]) == 0
    out_text = capsys.readouterr().out
    assert "1 items completed" in out_text
    assert set(prefect_api.runs()) == {(s, "b") for s in STAGES}
    assert main(["run", str(manifest), "--out", str(out), *TEST_FLAGS]) == 0  # everything cached now
    assert "2 items completed (2 with cached stages)" in capsys.readouterr().out
    prefect_api.clear()
    assert main(["run", str(manifest), "--out", str(out), "--refresh", *TEST_FLAGS]) == 0
    assert set(prefect_api.runs()) == {(s, i) for s in STAGES for i in "ab"}


def test_strict_run_refuses_invalid_rows(prefect_api, tiny_manifest, tmp_path, capsys):
    (tiny_manifest.parent / "a" / "mask.png").unlink()
    assert main(["run", str(tiny_manifest), "--out", str(tmp_path / "out"), "--strict", *TEST_FLAGS]) == 2
    err = capsys.readouterr().err
    assert "harmonize: error: 1 problem(s) and --strict is set; first: " in err
    assert "row 2, column mask" in err and "Traceback" not in err
    assert prefect_api.runs() == []


def test_one_delegates_to_the_core_cli(tmp_path, tiny_manifest):
    folder = tiny_manifest.parent / "a"
    code = main(["one", "--content", str(folder / "composite.png"), "--style", str(folder / "painting.jpg"),
                 "--mask", str(folder / "mask.png"), "--out", str(tmp_path / "one"), "--size", str(TINY_SIZE),
                 "--pass1-iters", "2", "--pass2-iters", "2", *TEST_FLAGS])
    assert code == 0
    assert {p.name for p in (tmp_path / "one").iterdir()} >= {f"{s}.png" for s in STAGES}


def test_demo_builds_its_dataset_and_runs_it(prefect_api, tmp_path, capsys):
    argv = ["demo", "--out", str(tmp_path / "demo"), "--size", str(TINY_SIZE), "--pass1-iters", "2",
            "--pass2-iters", "2", "--weights", TEST_WEIGHTS, "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 items completed" in printed and "open the report in a browser: " in printed
    report = Path(printed.split("open the report in a browser: ")[1].splitlines()[0])
    assert report.is_file() and report.name == "report.html"
    manifest = (tmp_path / "demo" / "inputs" / "manifest.csv").read_text().splitlines()
    assert manifest[0] == "id,content,style,mask,size,pass1_iters,pass2_iters,tau"
    assert manifest[1].endswith(f",{TINY_SIZE},2,2,1")  # demo flags shape the demo manifest's cells
    for item_id in ("demo-01", "demo-02", "demo-03"):
        assert (tmp_path / "demo" / "results" / item_id / "reconstruct.png").is_file()


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["validate", "--help"], ["demo", "--help"],
                                  ["serve", "--help"]])
def test_help_exits_cleanly(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0 and "usage: harmonize" in capsys.readouterr().out

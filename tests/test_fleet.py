"""The fleet as users run it, with real processes: a Prefect server, GPU workers, runs that compete or lose a machine.

Everything runs on the CPU: each "machine" is a ``harmonize worker`` supervisor pinned to a fake GPU id
(``CUDA_VISIBLE_DEVICES``), its rows carry ``<host>-gpu<id>``, and ``HARMONIZE_COMPUTE_LOG`` journals every stage that
really computed, whichever process computed it. These tests are slow (a server, worker processes, a flow-run
process per shard, and a zombie-detection delay); CI runs them.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import TEST_BACKBONE, TEST_WEIGHTS, make_dataset

from flows.summary import read_summary
from harmonize_core.stages import STAGES

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
POOL = "fleet-test"
ZOMBIE_SECONDS = 40  # heartbeats come every 30 s (Prefect's minimum); a shard silent for 40 s is crashed
RUN_FLAGS = ["--backbone", TEST_BACKBONE, "--weights", TEST_WEIGHTS, "--device", "cpu"]
HOST = socket.gethostname()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def harmonize(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def descendants(pid: int) -> list[int]:
    """Return ``pid`` and every process below it (read from /proc)."""
    found = [pid]
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except OSError:
            continue
        for child in children:
            found += descendants(int(child))
    return found


def kill_machine(process: subprocess.Popen) -> None:
    """SIGKILL a machine's whole process tree at once: supervisor, worker, flow run (a machine that vanishes)."""
    for pid in descendants(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        for pid in reversed(descendants(process.pid)):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            kill_machine(process)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real ``prefect server start`` on loopback with SQLite, the pool and deployments applied once."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_LOGGING_TO_API_ENABLED": "false"}
    env.pop("PREFECT_API_KEY", None)
    process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                "--port", str(port)], env=env, cwd=ROOT, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "prefect server did not start"
                time.sleep(1)
        done = subprocess.run(harmonize("deploy", "--pool", POOL, "--zombie-seconds", str(ZOMBIE_SECONDS)),
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr
        assert f"shards: harmonize-shard/{POOL}" in done.stdout
        yield env
    finally:
        stop(process)


@pytest.fixture
def fleet(server, tmp_path):
    """Start fake-GPU machines on demand; returns (start(gpu) -> process, env, compute log path)."""
    log = tmp_path / "computed.jsonl"
    env = {**server, "HARMONIZE_COMPUTE_LOG": str(log)}
    machines: list[subprocess.Popen] = []

    def start(gpu: str) -> subprocess.Popen:
        machine = subprocess.Popen(harmonize("worker", "--pool", POOL, "--gpus", gpu, "--no-coordinator"),
                                   env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        machines.append(machine)
        return machine

    yield start, env, log
    for machine in machines:
        stop(machine)


def computed(log: Path) -> collections.Counter:
    entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return collections.Counter((e["stage"], e["item"]) for e in entries)


def summary_of(stdout: str) -> list[dict[str, str]]:
    line = next(line for line in stdout.splitlines() if "summary: " in line and line.rstrip().endswith(".csv"))
    return read_summary(line.rsplit("summary: ", 1)[1].strip())


def test_two_gpu_workers_share_a_manifest_and_compute_each_stage_once(fleet, tmp_path):
    start, env, log = fleet
    ids = tuple(f"i{n}" for n in range(6))
    manifest = make_dataset(tmp_path / "data", ids=ids)
    start("0")
    start("1")
    done = subprocess.run(harmonize("run", str(manifest), "--out", str(tmp_path / "out"), "--pool", POOL,
                                    *RUN_FLAGS), env=env, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = summary_of(done.stdout)
    assert sorted(r["id"] for r in rows) == list(ids) and {r["status"] for r in rows} == {"completed"}
    assert {r["worker"] for r in rows} == {f"{HOST}-gpu0", f"{HOST}-gpu1"}  # both machines ran items
    assert computed(log) == {(stage, item): 1 for stage in STAGES for item in ids}
    assert "report: " in done.stdout


def test_a_machine_killed_mid_item_loses_nothing(fleet, tmp_path):
    start, env, log = fleet
    ids = ("k0", "k1", "k2")
    # pass 1 long enough (tens of evaluations) that the kill lands inside it, the rest short
    manifest = make_dataset(tmp_path / "data", ids=ids, overrides={"size": "64", "pass1_iters": "40",
                                                                     "pass2_iters": "5"})
    doomed = start("0")
    run = subprocess.Popen(harmonize("run", str(manifest), "--out", str(tmp_path / "out"), "--pool", POOL,
                                     *RUN_FLAGS), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    victim = None
    while victim is None:  # machine A finished a dilate: it is now inside that item's pass 1
        assert time.monotonic() < deadline and run.poll() is None, "machine A never started an item"
        time.sleep(0.5)
        entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        victim = next((e["item"] for e in entries if e["stage"] == "dilate"), None)
    kill_machine(doomed)
    start("1")
    stdout, stderr = run.communicate(timeout=900)
    assert run.returncode == 0, stderr[-3000:]
    rows = {r["id"]: r for r in summary_of(stdout)}
    assert sorted(rows) == list(ids) and {r["status"] for r in rows.values()} == {"completed"}
    assert rows[victim]["worker"] == f"{HOST}-gpu1"  # finished on the surviving machine ...
    assert "dilate" in rows[victim]["cached"].split(";")  # ... reusing what the lost machine had finished
    assert "resubmitting" in stderr
    assert all(count == 1 for (stage, _), count in computed(log).items() if stage == "dilate")


def test_two_concurrent_runs_compute_each_pass_once(tmp_path):
    manifest = make_dataset(tmp_path / "data", ids=("a", "b", "c"))
    log = tmp_path / "computed.jsonl"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "HARMONIZE_COMPUTE_LOG": str(log)}
    env.pop("PREFECT_API_URL", None)
    command = harmonize("run", str(manifest), "--out", str(tmp_path / "out"), *RUN_FLAGS)
    runs = [subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=900) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    summaries = [summary_of(stdout) for stdout, _ in outputs]
    for item in ("a", "b", "c"):
        for stage in ("pass1", "pass2"):
            cached = [stage in {r["id"]: r for r in rows}[item]["cached"].split(";") for rows in summaries]
            assert sorted(cached) == [False, True], (item, stage, cached)  # computed by one run, a hit in the other
    assert computed(log) == {(stage, item): 1 for stage in STAGES for item in ("a", "b", "c")}

"""No process of a run outlives it: a real ``harmonize run`` (Prefect's local ephemeral API server as a subprocess)
killed with SIGKILL, or sent SIGINT (Ctrl-C: it ends interrupted, or normally when it had just finished), leaves no
child process behind (read from /proc)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TEST_BACKBONE, TEST_WEIGHTS, make_dataset

from flows import lifeline

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")]
ROOT = Path(__file__).resolve().parents[1]


def process_table() -> dict[int, tuple[int, int, str]]:
    """Return {pid: (parent pid, start time, command line)} of every live process (zombies left out)."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fields = Path(f"/proc/{name}/stat").read_bytes().rsplit(b")", 1)[1].split()
            command = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if fields[0] not in (b"Z", b"X"):
            table[int(name)] = (int(fields[1]), int(fields[19]), command)
    return table


def tree(root: int) -> dict[int, tuple[int, str]]:
    """Return {pid: (start time, command line)} of every live descendant of ``root``."""
    table, found, queue = process_table(), {}, [root]
    while queue:
        parent = queue.pop()
        for pid, (ppid, started, command) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = (started, command)
                queue.append(pid)
    return found


def survivors(processes: dict[int, tuple[int, str]], within: float) -> dict[int, str]:
    """Return the processes of ``processes`` (same pid and start time) still alive after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        table = process_table()
        alive = {pid: command for pid, (started, command) in processes.items()
                 if pid in table and table[pid][1] == started}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    """One Prefect home (database) for this module's runs: only the first run pays for creating the database."""
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture
def start_run(tmp_path, prefect_home):
    """Start ``harmonize run`` as a user would (a fresh interpreter, no server, so Prefect starts its local API as a
    subprocess); return it and its stderr file. Stops it at the end of the test if still running."""
    started: list[subprocess.Popen] = []

    def start(pass1_iters: str) -> tuple[subprocess.Popen, Path]:
        manifest = make_dataset(tmp_path / "data", ids=("a",), overrides={"size": "48", "pass1_iters": pass1_iters,
                                                                           "pass2_iters": "3"})
        env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
        env["PREFECT_HOME"] = str(prefect_home)
        log = tmp_path / "stderr.txt"
        with open(log, "wb") as stream:
            process = subprocess.Popen(
                [sys.executable, "-m", "flows.cli", "run", str(manifest), "--out", str(tmp_path / "out"),
                 "--backbone", TEST_BACKBONE, "--weights", TEST_WEIGHTS, "--device", "cpu"],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stream)
        started.append(process)
        return process, log

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_until_running(process: subprocess.Popen, log: Path, timeout: float = 240) -> dict[int, tuple[int, str]]:
    """Wait until the run has its Prefect server and watchdog and an item has started; return its process tree."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        processes = tree(process.pid)
        commands = " ".join(command for _, command in processes.values())
        if "uvicorn" in commands and "lifeline.py" in commands and "dilate done" in log.read_text():
            return processes
        time.sleep(0.5)
    raise AssertionError(f"the run did not start within {timeout} s: {log.read_text()}")


@pytest.mark.parametrize(("how", "exit_codes"), [(signal.SIGKILL, {-signal.SIGKILL}), (signal.SIGINT, {0, 130})],
                         ids=["SIGKILL", "SIGINT"])
def test_a_stopped_run_leaves_no_process_behind(start_run, how, exit_codes):
    process, log = start_run(pass1_iters="100000")  # pass 1 runs until its tolerances stop it (seconds)
    processes = wait_until_running(process, log)
    assert sorted("uvicorn" in command for _, command in processes.values()) == [False, True]  # server, watchdog
    process.send_signal(how)
    assert process.wait(timeout=120) in exit_codes  # Ctrl-C: 130, or 0 when the run had just finished
    assert survivors(processes, within=lifeline.GRACE_SECONDS + 10) == {}


def test_the_watchdog_ends_every_descendant_it_saw_even_a_grandchild_that_ignores_sigterm(tmp_path):
    """The mechanism alone: a parent with a child and a grandchild (which ignores SIGTERM) is killed; its watchdog
    ends both, the grandchild with SIGKILL after the grace period."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import subprocess, sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from flows.lifeline import guard_children\n"
        "guard_children()\n"
        "grandchild = 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'\n"
        "child = f'import subprocess, sys, time; subprocess.Popen([sys.executable, \"-c\", {grandchild!r}]); "
        "time.sleep(600)'\n"
        "subprocess.Popen([sys.executable, '-c', child])\n"
        "time.sleep(600)\n")
    parent, processes = subprocess.Popen([sys.executable, str(script)]), {}
    try:
        deadline = time.monotonic() + 60
        while len(processes := tree(parent.pid)) < 3 and time.monotonic() < deadline:  # watchdog, child, grandchild
            time.sleep(0.2)
        assert len(processes) == 3, processes
        time.sleep(2 * lifeline.POLL_SECONDS + 0.5)  # the watchdog has seen the grandchild
        parent.kill()
        parent.wait()
        started = time.monotonic()
        assert survivors(processes, within=lifeline.GRACE_SECONDS + 10) == {}
        assert time.monotonic() - started >= lifeline.GRACE_SECONDS - 1  # the grandchild needed the SIGKILL
    finally:
        parent.kill()
        parent.wait()
        for pid in survivors(processes, within=0):
            os.kill(pid, signal.SIGKILL)

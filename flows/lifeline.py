"""No process of a command outlives it: a watchdog that ends a command's child processes when the command dies.

``harmonize run`` without a server uses Prefect's local ephemeral API: a ``uvicorn`` subprocess that Prefect starts
(``prefect.server.api.server.SubprocessASGIServer``) and stops from an ``atexit`` hook. A normal exit and Ctrl-C
run that hook; a killed run (SIGKILL, the out-of-memory killer, SIGTERM) does not, and the server kept running,
holding its port and Prefect's database. Linux's ``PR_SET_PDEATHSIG`` does not fit: Prefect spawns the server
itself (no hook to set it), and the signal fires when the spawning *thread* ends, which for a server started by one
of Prefect's worker threads can be long before the run ends.

So ``guard_children()`` starts one small watchdog per command: this file run as a script by the same Python
(standard library only, ``-I -S``). Every ``POLL_SECONDS`` it records the command's descendants from ``/proc`` (pid
and start time, so a reused pid is never mistaken for one of them). When the command is gone, whatever the cause
(the watchdog's parent changes), it sends SIGTERM to each recorded process still alive, SIGKILL to those left after
``GRACE_SECONDS``, and exits. It ignores SIGINT: Ctrl-C reaches the whole foreground process group, and the
command's own clean-up (Prefect's ``atexit``) goes first; the watchdog then only sweeps what is left. A process the
command starts and loses within one poll is not seen; Prefect's server lives for the whole run. Without ``/proc``
(not Linux) the guard does nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_SECONDS = 0.5
GRACE_SECONDS = 5.0
PROC = "/proc"
_watchdog: subprocess.Popen | None = None


def process_start_time(pid: int) -> int | None:
    """Return the start time (clock ticks since boot) of a live process, None when it is gone or a zombie."""
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as stream:
            fields = stream.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in (b"Z", b"X") else int(fields[19])


def _children(pid: int) -> list[int]:
    """Return the direct children of ``pid`` (``/proc/<pid>/task/*/children``, else a scan of ``/proc``)."""
    try:
        threads = os.listdir(f"{PROC}/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for thread in threads:
        try:
            with open(f"{PROC}/{pid}/task/{thread}/children", "rb") as stream:
                found.extend(int(child) for child in stream.read().split())
        except FileNotFoundError:
            return _children_by_scan(pid)
        except OSError:
            continue
    return found


def _children_by_scan(pid: int) -> list[int]:
    found = []
    for name in os.listdir(PROC):
        if name.isdigit():
            try:
                with open(f"{PROC}/{name}/stat", "rb") as stream:
                    if int(stream.read().rsplit(b")", 1)[1].split()[1]) == pid:
                        found.append(int(name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def descendants(pid: int, exclude: int | None = None) -> dict[int, int]:
    """Return ``{pid: start time}`` of every live descendant of ``pid`` (children first), leaving out ``exclude``."""
    found: dict[int, int] = {}
    queue = _children(pid)
    while queue:
        child = queue.pop(0)
        if child == exclude or child in found:
            continue
        started = process_start_time(child)
        if started is not None:
            found[child] = started
            queue.extend(_children(child))
    return found


def _alive(known: dict[int, int]) -> dict[int, int]:
    return {pid: started for pid, started in known.items() if process_start_time(pid) == started}


def end_all(known: dict[int, int], grace: float = GRACE_SECONDS) -> dict[int, int]:
    """SIGTERM every process of ``known`` still alive, SIGKILL those left after ``grace`` seconds; return the ones
    that still had to be killed."""
    for pid in _alive(known):
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    while _alive(known) and time.monotonic() < deadline:
        time.sleep(0.1)
    stubborn = _alive(known)
    for pid in stubborn:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return stubborn


def watch(parent: int, poll: float = POLL_SECONDS) -> None:
    """Record ``parent``'s descendants until it is gone (this process's parent changes), then end them all."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    me, known = os.getpid(), {}
    while os.getppid() == parent:
        known = {**_alive(known), **descendants(parent, exclude=me)}
        time.sleep(poll)
    end_all(known)


def guard_children() -> int | None:
    """Start this process's watchdog (once per process) so that no child of it outlives it; return the watchdog's
    pid, or None where there is no ``/proc`` to watch with."""
    global _watchdog
    if not os.path.isdir(f"{PROC}/self/task"):
        return None
    if _watchdog is None or _watchdog.poll() is not None:
        _watchdog = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__), str(os.getpid())],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     close_fds=True)
    return _watchdog.pid


if __name__ == "__main__":
    watch(int(sys.argv[1]))

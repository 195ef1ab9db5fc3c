"""What a run set out to do and whether it ended: ``runs/<run_id>/started.json`` and ``runs/<run_id>/ended.json``.

The manifest flow writes ``started.json`` before its first item runs: when, where (host and process), the manifest,
and one planned row per output it is going to produce (id, variant, row, tau, inputs, extra cells). It writes
``ended.json`` when it ends: ``finished``, or ``stopped`` with the one-line reason (an interrupt, a crash of the flow
itself). A run killed outright (SIGKILL, a lost machine) writes no end, so a report rebuilt from storage can still
tell the truth: ``run_state`` reads both records (and, on the same host, whether the run's process still lives) and
``unfinished_rows`` gives a row with status ``unfinished`` and a one-line reason for every planned output that has
no result. Runs written before these records existed have neither file and are reported as before.

Kept free of torch and Prefect imports: the report (``flows.report``) reads it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tasks import storage

from .lifeline import PROC, process_start_time

STARTED_NAME = "started.json"
ENDED_NAME = "ended.json"
UNFINISHED = "unfinished"  # a planned output with no result: the run stopped (or is still running)
FINISHED, STOPPED = "finished", "stopped"  # ended.json outcomes
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # UTC, as status.csv's ``updated``
PLANNED_COLUMNS = ("id", "variant", "row", "tau", "warnings", "content_uri", "style_uri", "mask_uri", "outputs")


def utc_now() -> str:
    """Return the current UTC time as ``TIME_FORMAT`` text."""
    return time.strftime(TIME_FORMAT, time.gmtime())


def planned_row(item: dict[str, Any], out: str) -> dict[str, Any]:
    """Return the planned row of one output: an item record (one variant of it, ``flows.item.variant_items``)
    reduced to what a summary row of an output that never finished can say (``PLANNED_COLUMNS`` and ``extra``)."""
    tau = ((item.get("config") or {}).get("pass2") or {}).get("tau")
    files = item.get("files") or {}
    variant = item.get("variant") or ""
    return {"id": item["id"], "variant": variant, "row": item.get("row", ""), "tau": "" if tau is None else tau,
            "warnings": ";".join(item.get("warnings") or []),
            **{f"{name}_uri": ref.get("uri", "") for name, ref in files.items()},
            "outputs": storage.join(out, item["id"], *([variant] if variant else [])),
            "extra": dict(item.get("extra") or {})}


def record_start(out: str, run_id: str, manifest: str, planned: list[dict[str, Any]], invalid: int) -> str:
    """Write ``runs/<run_id>/started.json`` (time, host, process, manifest, planned rows); return its URI."""
    record = {"run_id": run_id, "manifest": manifest, "started": utc_now(), "host": socket.gethostname(),
              "pid": os.getpid(), "process_started": _process_started(os.getpid()), "invalid": invalid,
              "planned": planned}
    uri = storage.run_uri(out, run_id, STARTED_NAME)
    storage.write_bytes(uri, json.dumps(record, default=str).encode())
    return uri


def record_end(out: str, run_id: str, outcome: str, reason: str = "") -> str:
    """Write ``runs/<run_id>/ended.json`` (``finished``, or ``stopped`` with ``reason``); return its URI."""
    uri = storage.run_uri(out, run_id, ENDED_NAME)
    storage.write_bytes(uri, json.dumps({"ended": utc_now(), "outcome": outcome, "reason": reason}).encode())
    return uri


@dataclass
class RunState:
    """What storage says about one run: its start and end records (None when absent) and whether it still runs.

    ``alive``: True when its process still runs on this host, False when it does not, None when unknown (no start
    record, or the run's process is on another host).
    """

    run_id: str
    started: dict[str, Any] | None = None
    ended: dict[str, Any] | None = None
    alive: bool | None = None
    planned: list[dict[str, Any]] = field(default_factory=list)

    @property
    def recorded(self) -> bool:
        """True when the run wrote a start record (runs before these records existed did not)."""
        return self.started is not None

    @property
    def finished(self) -> bool:
        """True when the run recorded that it ended normally (or, with no start record, nothing says otherwise)."""
        return not self.recorded or (self.ended or {}).get("outcome") == FINISHED

    @property
    def running(self) -> bool:
        """True when no end is recorded and the run's process still runs on this host."""
        return self.recorded and self.ended is None and self.alive is True

    def how_it_ended(self) -> str:
        """Return one line on why the run has no result for some outputs ("" when it finished)."""
        if self.finished:
            return ""
        started = self.started or {}
        where = f"process {started.get('pid', '?')} on {started.get('host', '?')}"
        if self.ended is not None:
            return f"the run stopped before it finished: {self.ended.get('reason') or 'no reason recorded'}"
        if self.alive is True:
            return f"the run is still running ({where}, started {started.get('started', '?')})"
        if self.alive is False:
            return (f"the run was stopped (killed, or its machine lost) without recording an end ({where}, "
                    f"started {started.get('started', '?')})")
        return (f"the run recorded no end: it was stopped, or is still running ({where}, started "
                f"{started.get('started', '?')})")

    def unfinished_reason(self) -> str:
        """Return the one-line error of an output of this run that has no result."""
        if self.finished:
            return "no result came back for this output although the run finished; rerun it"
        if self.running:
            return "no result yet: " + self.how_it_ended()
        return "never finished: " + self.how_it_ended() + "; rerun it (--only-failed)"


def run_state(out: str, run_id: str) -> RunState:
    """Return the ``RunState`` of ``run_id`` under ``out`` from its records (both optional)."""
    state = RunState(run_id=run_id, started=_read_json(storage.run_uri(out, run_id, STARTED_NAME)),
                     ended=_read_json(storage.run_uri(out, run_id, ENDED_NAME)))
    if state.started is not None:
        state.planned = list(state.started.pop("planned", None) or [])
        if state.ended is None:
            state.alive = process_alive(state.started)
    return state


def unfinished_rows(state: RunState, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return an ``unfinished`` row (planned cells, one-line reason) for each planned output missing from ``rows``."""
    done = {(str(r.get("id") or ""), str(r.get("variant") or "")) for r in rows}
    reason = state.unfinished_reason()
    return [{**planned, "status": UNFINISHED, "error": reason} for planned in state.planned
            if (str(planned.get("id") or ""), str(planned.get("variant") or "")) not in done]


def process_alive(started: dict[str, Any]) -> bool | None:
    """Return whether the process that wrote ``started`` still runs: None when it ran on another host."""
    if started.get("host") != socket.gethostname() or not isinstance(started.get("pid"), int):
        return None
    pid = started["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    except OSError:
        return None
    if not os.path.isdir(PROC):
        return True  # no /proc to tell a reused pid or a zombie apart
    now = _process_started(pid)  # None: gone or a zombie
    return now is not None and now == started.get("process_started")


def parse_time(text: str) -> datetime | None:
    """Return a ``TIME_FORMAT`` text as an aware UTC datetime, or None when it is not one."""
    try:
        return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC)
    except (TypeError, ValueError):
        return None


def _process_started(pid: int) -> str | None:
    """Return a live process's start time in clock ticks since boot, as text (Linux ``/proc``), or None."""
    ticks = process_start_time(pid)
    return None if ticks is None else str(ticks)


def _read_json(uri: str) -> dict[str, Any] | None:
    if not storage.exists(uri):
        return None
    try:
        value = json.loads(storage.read_bytes(uri))
    except ValueError:
        return None  # a record cut short: treated as absent
    return value if isinstance(value, dict) else None

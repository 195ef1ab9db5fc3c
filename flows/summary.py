"""The run summary and the dataset status.

- ``<out>/runs/<run_id>/items/<id>[__<variant>].json``: one finished row, written the moment it is final (by the
  item task, wherever it ran), so a killed run or a lost machine never loses a finished row;
- ``<out>/runs/<run_id>/summary.csv``: every row of the run (``COLUMNS``, then the manifest's extra columns),
  rewritten while the run goes on and at its end;
- ``<out>/runs/<run_id>/started.json``/``ended.json``: what the run planned and how it ended (``flows.run_record``);
  ``rebuild_summary`` turns a planned output with no result into an ``unfinished`` row;
- ``<out>/status.csv``: one row per id (and variant) across all runs: last status, last run, final output,
  warnings, and since when an id is no longer in the manifest (``left_manifest``); updated at the end of every
  run (and by a report rebuilt after a run that did not finish) under a storage lock, so two runs ending together
  lose nothing.

Both CSVs are written spreadsheet-safe and read back exactly (``flows.csvsafe``).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from harmonize_core.errors import InputError
from harmonize_core.passes.stages import STAGES
from manifests import Problem, ValidationReport
from tasks import storage

from .csvsafe import read_csv, to_csv_bytes
from .run_record import UNFINISHED, RunState, run_state, unfinished_rows, utc_now

SUMMARY_NAME = "summary.csv"
STATUS_NAME = "status.csv"
ARTIFACT_KEY = "harmonize-run-summary"  # artifact keys: lowercase letters, digits and dashes only
COMPLETED, FAILED, INVALID = "completed", "failed", "invalid"
QUALITY_COLUMNS: tuple[str, ...] = ("quality_style", "quality_structure", "quality_seam")
INPUT_COLUMNS: tuple[str, ...] = ("content_uri", "style_uri", "mask_uri")
COLUMNS: tuple[str, ...] = (
    "id", "variant", "row", "status", "error", "warnings", "cached", "worker", "tau", *QUALITY_COLUMNS,
    *(f"{stage}_s" for stage in STAGES), "total_s", "pass1_loss", "pass2_loss",
    "final_uri", *(f"{stage}_uri" for stage in STAGES), *INPUT_COLUMNS, "outputs",
)
STATUS_COLUMNS: tuple[str, ...] = ("id", "variant", "status", "error", "warnings", "tau", *QUALITY_COLUMNS,
                                   "final_uri", "last_run", "updated", "left_manifest")
RERUN_STATUSES = (FAILED, INVALID, UNFINISHED)
STATUSES = (COMPLETED, FAILED, INVALID, UNFINISHED)
ARTIFACT_MAX_ROWS = 1000  # the UI table artifact: failed, invalid and unfinished rows first (summary.csv has all)
EXTRA_PREFIX = "manifest_"  # an extra manifest column whose name a summary column already uses


def invalid_rows(report: ValidationReport) -> list[dict[str, Any]]:
    """Return a summary row (status invalid, every problem in one line) for each invalid manifest row."""
    rows = []
    for number, problems in sorted(report.invalid_rows().items()):
        message = "; ".join(_describe(p) for p in problems)
        rows.append({"id": problems[0].item_id, "row": number, "status": INVALID, "error": message,
                     "extra": dict(report.extras.get(number, {}))})
    return rows


def _describe(problem: Problem) -> str:
    return f"{problem.column}: {problem.message}" if problem.column else problem.message


def flatten(row: dict[str, Any]) -> dict[str, Any]:
    """Return ``row`` with its manifest extras (``row["extra"]``) as columns of their own (prefixed on a clash)."""
    flat = {key: value for key, value in row.items() if key != "extra"}
    for name, value in (row.get("extra") or {}).items():
        flat[f"{EXTRA_PREFIX}{name}" if name in COLUMNS else name] = value
    return flat


def row_order(row: dict[str, Any]) -> tuple:
    """Return the sort key of a row: manifest row, then id, then variant."""
    return (int(row.get("row") or 0), str(row.get("id") or ""), str(row.get("variant") or ""))


def to_csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> bytes:
    """Return ``rows`` as spreadsheet-safe CSV bytes (``flows.csvsafe``): ``columns`` first, then any other keys in
    first-seen order."""
    flat = [flatten(row) for row in rows]
    extra = list(dict.fromkeys(k for row in flat for k in row if k not in columns))
    return to_csv_bytes(flat, [*columns, *extra])


def write_summary(uri: str, rows: list[dict[str, Any]]) -> str:
    """Write ``rows`` (ordered by manifest row) as the summary CSV at ``uri``; return ``uri``."""
    storage.write_bytes(uri, to_csv(sorted(rows, key=row_order), COLUMNS))
    return uri


def read_summary(uri: str) -> list[dict[str, str]]:
    """Return the rows of a ``summary.csv`` or ``status.csv`` (local or ``s3://``) as dicts of strings, every cell
    as it was given to the writer (``flows.csvsafe.read_csv``; missing cells "")."""
    return read_csv(storage.read_bytes(uri))


def read_summary_or_empty(uri: str) -> list[dict[str, str]]:
    """Return a summary's rows (``read_summary``), or none when it was never written."""
    return read_summary(uri) if storage.exists(uri) else []


def rerun_ids(uri: str) -> list[str]:
    """Return the ids a summary or ``status.csv`` lists as failed, invalid or unfinished (what ``--only-failed``
    reruns), leaving out ids ``status.csv`` marks as no longer in the manifest (``left_manifest``)."""
    return rerun_selection(uri)[0]


def rerun_selection(uri: str, manifest_ids: set[str] | None = None) -> tuple[list[str], list[str]]:
    """Return (ids to rerun, ids skipped) of a summary or ``status.csv`` for ``--only-failed``.

    Rerun: failed, invalid or unfinished ids. Skipped: those of them that ``status.csv`` marks ``left_manifest``
    or, when ``manifest_ids`` is given, that are not among them. Raises ``InputError`` for a CSV without a status
    column.
    """
    rows = read_summary(uri)
    if rows and "status" not in rows[0]:
        raise InputError(f"{uri}: not a run summary or status.csv (no status column)")
    wanted = dict.fromkeys(r["id"] for r in rows if r.get("status") in RERUN_STATUSES and r.get("id"))
    gone = {r["id"] for r in rows if r.get("left_manifest") and r.get("id")}
    gone |= set(wanted) - manifest_ids if manifest_ids is not None else set()
    return [i for i in wanted if i not in gone], [i for i in wanted if i in gone]


def write_row(out: str, run_id: str, row: dict[str, Any]) -> str:
    """Write one final row as ``<out>/runs/<run_id>/items/<id>[__<variant>].json``; return its URI."""
    uri = storage.row_uri(out, run_id, row["id"], row.get("variant") or "")
    storage.write_bytes(uri, json.dumps(row, sort_keys=True, default=str).encode())
    return uri


def read_finished_rows(out: str, run_id: str) -> list[dict[str, Any]]:
    """Return every finished row written under ``<out>/runs/<run_id>/items/`` (any order)."""
    prefix = storage.run_uri(out, run_id, storage.ROWS_DIR)
    return [json.loads(storage.read_bytes(uri)) for uri in storage.list_uris(prefix) if uri.endswith(".json")]


def artifact_table(rows: list[dict[str, Any]], limit: int = ARTIFACT_MAX_ROWS) -> list[dict[str, Any]]:
    """Return at most ``limit`` rows (failed, invalid and unfinished ones first, then by manifest row) trimmed to
    the columns worth a glance in the UI (id, status, error, times, scores, output)."""
    keep = ("id", "variant", "status", "error", "cached", "worker", "total_s", *QUALITY_COLUMNS, "final_uri")
    chosen = sorted(rows, key=lambda r: (r.get("status") == COMPLETED, row_order(r)))[:limit]
    return [{key: row.get(key, "") for key in keep} for row in sorted(chosen, key=row_order)]


def counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Return ``{completed, failed, invalid, unfinished}`` row counts."""
    return {status: sum(r.get("status") == status for r in rows) for status in STATUSES}


def publish_artifact(rows: list[dict[str, Any]], summary_uri: str) -> None:
    """Create the run's table artifact (key ``harmonize-run-summary``; at most ``ARTIFACT_MAX_ROWS`` rows)."""
    from prefect.artifacts import create_table_artifact

    c = counts(rows)
    description = f"{c[COMPLETED]} completed, {c[FAILED]} failed, {c[INVALID]} invalid"
    description += f", {c[UNFINISHED]} unfinished" if c[UNFINISHED] else ""
    if len(rows) > ARTIFACT_MAX_ROWS:
        description += f"; the table shows {ARTIFACT_MAX_ROWS} of {len(rows)} rows, problems first"
    create_table_artifact(table=artifact_table(rows), key=ARTIFACT_KEY, description=f"{description}; summary: {summary_uri}")


def status_row(row: dict[str, Any], run_id: str, now: str) -> dict[str, Any]:
    """Return the ``status.csv`` row of one summary row (``left_manifest`` empty: the run just saw it)."""
    return {**{key: row.get(key, "") for key in STATUS_COLUMNS}, "last_run": run_id, "updated": now,
            "left_manifest": ""}


def update_status(out: str, run_id: str, rows: list[dict[str, Any]], *, since: str | None = None,
                  manifest_ids: set[str] | None = None) -> str:
    """Merge this run's rows into ``<out>/status.csv``; return its URI.

    Each row replaces the one of its id and variant, unless ``since`` (a ``TIME_FORMAT`` time: a report rebuilt
    after the run) is given and that row was updated after it by another run. ``manifest_ids`` (every id of the
    run's manifest): a row whose id is not among them gets ``left_manifest`` (the time this was first seen), one
    whose id is among them loses it. The read-modify-write holds the output storage's lock on ``status`` so
    concurrent runs do not lose rows.
    """
    from tasks.storage.locks import lock_manager_for

    uri = storage.join(out, STATUS_NAME)
    locks, holder = lock_manager_for(out), f"status-{uuid.uuid4()}"
    locks.acquire_lock("status", holder)
    try:
        merged = {(r["id"], r.get("variant", "")): r for r in (read_summary(uri) if storage.exists(uri) else [])}
        now = utc_now()
        for row in rows:
            key = (str(row.get("id") or ""), str(row.get("variant") or ""))
            old = merged.get(key)
            newer = old is not None and since is not None and old.get("last_run") != run_id and old.get("updated", "") > since
            if key[0] and not newer:
                merged[key] = status_row(row, run_id, now)
        if manifest_ids is not None:
            for (item_id, _), row in merged.items():
                row["left_manifest"] = "" if item_id in manifest_ids else (row.get("left_manifest") or now)
        ordered = sorted(merged.values(), key=lambda r: (r["id"], r.get("variant", "")))
        storage.write_bytes(uri, to_csv(ordered, STATUS_COLUMNS))
    finally:
        locks.release_lock("status", holder)
    return uri


def rebuild_summary(out: str, run_id: str) -> tuple[RunState, list[dict[str, Any]]]:
    """Rewrite a run's ``summary.csv`` from storage; return the run's ``RunState`` and the summary's rows.

    Rows: every finished row under ``runs/<run_id>/items/`` (a killed run's rows may be newer than its last
    summary), the invalid rows of the last summary, and an ``unfinished`` row for each planned output with no
    result (``flows.run_record``). When the run did not finish and is not running here, ``status.csv`` is updated
    with its rows too (never over a row another run updated after this one started).
    """
    state = run_state(out, run_id)
    summary_uri = storage.run_uri(out, run_id, SUMMARY_NAME)
    rows: list[dict[str, Any]] = read_finished_rows(out, run_id)
    if not rows and not state.recorded:  # an old run killed before its first row: its last summary is all there is
        return state, read_summary_or_empty(summary_uri)
    known = {(str(r.get("id") or ""), str(r.get("variant") or "")) for r in rows}
    earlier = read_summary(summary_uri) if storage.exists(summary_uri) else []
    rows += [r for r in earlier if r.get("status") == INVALID
             or ((r.get("id") or "", r.get("variant") or "") not in known and r.get("status") != UNFINISHED)]
    rows += unfinished_rows(state, rows)
    write_summary(summary_uri, rows)
    if state.recorded and not state.finished and not state.running:
        update_status(out, run_id, rows, since=state.started.get("started"))
    return state, rows


def describe_end(state: RunState, rows: list[dict[str, Any]]) -> str:
    """Return one line on a run that did not finish (its outputs never finished, how it ended), or ""."""
    if state.finished:
        return ""
    missing = sum(r.get("status") == UNFINISHED for r in rows)
    if state.running:
        return (f"run {state.run_id} has not finished yet: {missing} of {len(state.planned)} planned output(s) have "
                f"no result yet (status {UNFINISHED}); {state.how_it_ended()}")
    return (f"run {state.run_id} did not finish: {missing} of {len(state.planned)} planned output(s) never "
            f"finished (status {UNFINISHED}); {state.how_it_ended()}")

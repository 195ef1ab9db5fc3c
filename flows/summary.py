"""The run summary and the dataset status.

- ``<out>/runs/<run_id>/items/<id>[__<variant>].json``: one finished row, written the moment it is final (by the
  item task, wherever it ran), so a killed run or a lost machine never loses a finished row;
- ``<out>/runs/<run_id>/summary.csv``: every row of the run (``COLUMNS``, then the manifest's extra columns),
  rewritten while the run goes on and at its end;
- ``<out>/status.csv``: one row per id (and variant) across all runs: last status, last run, final output,
  warnings; updated at the end of every run under a storage lock, so two runs ending together lose nothing.

Both CSVs are written spreadsheet-safe and read back exactly (``flows.csvsafe``).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from harmonize_core.errors import InputError
from harmonize_core.stages import STAGES
from manifests import Problem, ValidationReport
from tasks import storage

from .csvsafe import read_csv, to_csv_bytes

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
                                   "final_uri", "last_run", "updated")
RERUN_STATUSES = (FAILED, INVALID)
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


def rerun_ids(uri: str) -> list[str]:
    """Return the ids a summary or ``status.csv`` lists as failed or invalid (what ``--only-failed`` reruns)."""
    rows = read_summary(uri)
    if rows and "status" not in rows[0]:
        raise InputError(f"{uri}: not a run summary or status.csv (no status column)")
    return list(dict.fromkeys(r["id"] for r in rows if r.get("status") in RERUN_STATUSES and r.get("id")))


def write_row(out: str, run_id: str, row: dict[str, Any]) -> str:
    """Write one final row as ``<out>/runs/<run_id>/items/<id>[__<variant>].json``; return its URI."""
    uri = storage.row_uri(out, run_id, row["id"], row.get("variant") or "")
    storage.write_bytes(uri, json.dumps(row, sort_keys=True, default=str).encode())
    return uri


def read_rows(out: str, run_id: str) -> list[dict[str, Any]]:
    """Return every finished row written under ``<out>/runs/<run_id>/items/`` (any order)."""
    prefix = storage.run_uri(out, run_id, storage.ROWS_DIR)
    return [json.loads(storage.read_bytes(uri)) for uri in storage.list_uris(prefix) if uri.endswith(".json")]


def artifact_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the rows trimmed to the columns worth a glance in the UI (id, status, error, times, scores, output)."""
    keep = ("id", "variant", "status", "error", "cached", "worker", "total_s", *QUALITY_COLUMNS, "final_uri")
    return [{key: row.get(key, "") for key in keep} for row in sorted(rows, key=row_order)]


def counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Return ``{completed, failed, invalid}`` row counts."""
    return {status: sum(r.get("status") == status for r in rows) for status in (COMPLETED, FAILED, INVALID)}


def publish_artifact(rows: list[dict[str, Any]], summary_uri: str) -> None:
    """Create the run's table artifact (key ``harmonize-run-summary``)."""
    from prefect.artifacts import create_table_artifact

    c = counts(rows)
    description = f"{c[COMPLETED]} completed, {c[FAILED]} failed, {c[INVALID]} invalid; summary: {summary_uri}"
    create_table_artifact(table=artifact_table(rows), key=ARTIFACT_KEY, description=description)


def status_row(row: dict[str, Any], run_id: str, now: str) -> dict[str, Any]:
    """Return the ``status.csv`` row of one summary row."""
    return {**{key: row.get(key, "") for key in STATUS_COLUMNS}, "last_run": run_id, "updated": now}


def update_status(out: str, run_id: str, rows: list[dict[str, Any]]) -> str:
    """Merge this run's rows into ``<out>/status.csv`` (newest wins per id and variant); return its URI.

    The read-modify-write holds the output storage's lock on ``status`` so concurrent runs do not lose rows.
    """
    from tasks.locks import lock_manager_for

    uri = storage.join(out, STATUS_NAME)
    locks, holder = lock_manager_for(out), f"status-{uuid.uuid4()}"
    locks.acquire_lock("status", holder)
    try:
        merged = {(r["id"], r.get("variant", "")): r for r in (read_summary(uri) if storage.exists(uri) else [])}
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for row in rows:
            if row.get("id"):
                merged[(row["id"], row.get("variant") or "")] = status_row(row, run_id, now)
        ordered = sorted(merged.values(), key=lambda r: (r["id"], r.get("variant", "")))
        storage.write_bytes(uri, to_csv(ordered, STATUS_COLUMNS))
    finally:
        locks.release_lock("status", holder)
    return uri

"""The run summary: one row per item, written as ``<out>/runs/<run_id>/summary.csv`` and a Prefect table artifact."""

from __future__ import annotations

import csv
import io
from typing import Any

from harmonize_core.stages import STAGES
from manifests import Problem, ValidationReport
from tasks import storage

SUMMARY_NAME = "summary.csv"
ARTIFACT_KEY = "harmonize-run-summary"  # artifact keys: lowercase letters, digits and dashes only
COMPLETED, FAILED, INVALID = "completed", "failed", "invalid"
COLUMNS: tuple[str, ...] = (
    "id", "row", "status", "error", "cached",
    *(f"{stage}_s" for stage in STAGES), "total_s", "pass1_loss", "pass2_loss", "tau",
    "final_uri", *(f"{stage}_uri" for stage in STAGES), "outputs",
)
RERUN_STATUSES = (FAILED, INVALID)


def invalid_rows(report: ValidationReport) -> list[dict[str, Any]]:
    """Return a summary row (status invalid, every problem in one line) for each invalid manifest row."""
    rows = []
    for number, problems in sorted(report.invalid_rows().items()):
        message = "; ".join(_describe(p) for p in problems)
        rows.append({"id": problems[0].item_id, "row": number, "status": INVALID, "error": message})
    return rows


def _describe(problem: Problem) -> str:
    return f"{problem.column}: {problem.message}" if problem.column else problem.message


def write_summary(uri: str, rows: list[dict[str, Any]]) -> str:
    """Write ``rows`` as CSV (the ``COLUMNS``, rows ordered by manifest row) to ``uri``; return ``uri``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: (r.get("row") or 0, r.get("id") or "")):
        writer.writerow({key: "" if row.get(key) is None else row.get(key) for key in COLUMNS})
    storage.write_bytes(uri, buffer.getvalue().encode())
    return uri


def read_summary(uri: str) -> list[dict[str, str]]:
    """Return the rows of a ``summary.csv`` (local or ``s3://``) as dicts of strings."""
    text = storage.read_bytes(uri).decode("utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def rerun_ids(uri: str) -> list[str]:
    """Return the ids of a summary's failed or invalid items (what ``--only-failed`` reruns)."""
    return [row["id"] for row in read_summary(uri) if row.get("status") in RERUN_STATUSES and row.get("id")]


def artifact_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the rows trimmed to the columns worth a glance in the UI (id, status, error, times, losses, output)."""
    keep = ("id", "status", "error", "cached", "total_s", "pass1_loss", "pass2_loss", "final_uri")
    return [{key: row.get(key, "") for key in keep} for row in sorted(rows, key=lambda r: r.get("row") or 0)]


def publish_artifact(rows: list[dict[str, Any]], summary_uri: str) -> None:
    """Create the run's table artifact (key ``harmonize-run-summary``)."""
    from prefect.artifacts import create_table_artifact

    counts = {status: sum(r["status"] == status for r in rows) for status in (COMPLETED, FAILED, INVALID)}
    description = (f"{counts[COMPLETED]} completed, {counts[FAILED]} failed, {counts[INVALID]} invalid; "
                   f"summary: {summary_uri}")
    create_table_artifact(table=artifact_table(rows), key=ARTIFACT_KEY, description=description)

"""A run's progress as it happens: Prefect's progress artifact (outputs done of total) and a summary kept current.

Every finished row is already durable on its own (``<out>/runs/<run_id>/items/``); ``RunProgress`` adds the view
over the whole run: the progress artifact is updated at every finished row, and ``summary.csv`` is rewritten at
most every ``WRITE_EVERY_SECONDS`` (a 10,000-item run would otherwise rewrite it 10,000 times) and at the end.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger

from tasks import storage
from tasks.stages import PROGRESS

from .summary import COMPLETED, FAILED, SUMMARY_NAME, write_summary

WRITE_EVERY_SECONDS = 15.0
PERCENT = 100.0


class RunProgress:
    """Collects a run's rows, mirrors them in a progress artifact and in ``summary.csv`` (see the module doc)."""

    def __init__(self, out: str, run_id: str, expected: int, rows: list[dict[str, Any]] | None = None) -> None:
        from prefect.artifacts import create_progress_artifact

        self.out, self.run_id, self.expected = out, run_id, expected
        self.rows: list[dict[str, Any]] = list(rows or [])
        self.summary_uri = storage.run_uri(out, run_id, SUMMARY_NAME)
        self._written = 0.0
        self._seen: set[tuple[str, str]] = set()
        self._artifact = create_progress_artifact(progress=0.0, key="harmonize-run-progress",
                                                  description=self._describe())

    def _describe(self) -> str:
        failed = sum(r.get("status") == FAILED for r in self.rows)
        return f"{self.done()} of {self.expected} outputs done ({failed} failed)"

    def done(self) -> int:
        """Return how many expected outputs have a final row."""
        return sum(r.get("status") in (COMPLETED, FAILED) for r in self.rows)

    def has(self, row: dict[str, Any]) -> bool:
        """Return True when a row for this id and variant was already added."""
        return (str(row.get("id")), str(row.get("variant") or "")) in self._seen

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Record finished rows (ignoring ones already seen), update the artifact and maybe the summary."""
        from prefect.artifacts import update_progress_artifact

        fresh = [row for row in rows if not self.has(row)]
        if not fresh:
            return
        for row in fresh:
            self._seen.add((str(row.get("id")), str(row.get("variant") or "")))
            self.rows.append(row)
            get_run_logger().info("%d/%d outputs done (%s%s %s)", self.done(), self.expected, row.get("id"),
                                  f"/{row['variant']}" if row.get("variant") else "", row.get("status"),
                                  extra=PROGRESS)
        update_progress_artifact(artifact_id=self._artifact, progress=PERCENT * self.done() / max(1, self.expected),
                                 description=self._describe())
        if time.monotonic() - self._written >= WRITE_EVERY_SECONDS:
            self.write()

    def write(self) -> str:
        """Write ``summary.csv`` with every row so far; return its URI."""
        self._written = time.monotonic()
        return write_summary(self.summary_uri, self.rows)

"""``harmonize_manifest``: validate a manifest, fan its items out, write the run summary.

Shape (the paper's pipeline figure, per item): dilate -> pass1 -> blend -> pass2 -> reconstruct (``flows.item``).
Items run concurrently on a ``ThreadPoolTaskRunner``; the network stages carry a ``gpu`` tag so a Prefect tag
concurrency limit bounds GPU use. A failed item never stops the others: the flow waits for every item, writes
``<out>/runs/<run_id>/summary.csv`` and a table artifact, and only then raises ``ItemsFailed`` so that the run's
final state says how many items failed. Bad manifests (unreadable, missing columns; any invalid row with
``strict``) raise ``ManifestError`` before anything runs.
"""

from __future__ import annotations

import uuid
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from harmonize_core.errors import InputError
from manifests import RunSettings, ValidationReport, check_run_settings, validate_manifest
from tasks import storage
from tasks.backbones import backbone_spec
from tasks.caching import prepare_result_storage
from tasks.stages import PROGRESS

from .item import ItemFailed, harmonize_item
from .summary import COMPLETED, FAILED, SUMMARY_NAME, invalid_rows, publish_artifact, write_summary
from .text import one_line

MAX_ITEMS_IN_FLIGHT = 4  # items started at once; a `gpu` tag limit bounds the network stages further


class ManifestError(InputError):
    """The manifest cannot run: unreadable, columns missing, or (``strict``) some rows invalid."""


class ItemsFailed(Exception):
    """Raised at the end of a run with failed or invalid items (after the summary is written)."""

    def __init__(self, failed: int, total: int, summary_uri: str, rows: list[dict[str, Any]]) -> None:
        super().__init__(f"{failed} of {total} items failed or were invalid; see {summary_uri}")
        self.failed, self.total, self.summary_uri, self.rows = failed, total, summary_uri, rows


def run_identifier() -> str:
    """Return this flow run's id (a fresh uuid when called outside a flow run)."""
    return str(flow_run.get_id() or uuid.uuid4())


def check_report(report: ValidationReport, strict: bool) -> None:
    """Raise ``ManifestError`` when the manifest is unusable, or has any problem and ``strict`` is set."""
    if report.fatal:
        raise ManifestError("; ".join(p.describe(report.manifest) for p in report.problems))
    if strict and not report.ok:
        first = report.problems[0].describe(report.manifest)
        raise ManifestError(f"{len(report.problems)} problem(s) and --strict is set; first: {first} "
                            f"(run `harmonize validate {report.manifest}` for all)")


def collect(futures: dict[Any, dict[str, Any]]) -> list[dict[str, Any]]:
    """Return each item's summary row as its future finishes (a failed item gives its partial row)."""
    logger = get_run_logger()
    rows: list[dict[str, Any]] = []
    for done, future in enumerate(as_completed(list(futures)), start=1):
        result = future.result(raise_on_failure=False)
        if isinstance(result, ItemFailed):
            row = result.row
        elif isinstance(result, dict):
            row = result
        else:  # crashed or cancelled: no row came back
            item = futures[future]
            reason = one_line(result) if isinstance(result, BaseException) else f"ended {future.state.name}"
            row = {"id": item["id"], "row": item["row"], "status": FAILED, "error": reason}
        rows.append(row)
        logger.info("%d/%d items done (%s %s)", done, len(futures), row["id"], row["status"], extra=PROGRESS)
    return rows


@flow(name="harmonize-manifest", task_runner=ThreadPoolTaskRunner(max_workers=MAX_ITEMS_IN_FLIGHT))
def harmonize_manifest(
    manifest: str,
    out: str,
    preset: str = "quick",
    device: str = "auto",
    backbone: str | None = None,
    weights: str | None = None,
    overrides: dict[str, Any] | None = None,
    strict: bool = False,
    only_ids: list[str] | None = None,
) -> dict[str, Any]:
    """Harmonize every valid item of ``manifest`` into ``out``; return ``{items, completed, cached, summary}``.

    ``preset``/``backbone``/``weights``/``overrides`` (flat names such as ``tau``, ``size``) set every row's config;
    a row's own override cells win over ``overrides``. ``only_ids`` limits the run to those ids (``--only-failed``).
    Raises ``ManifestError`` for an unusable manifest and ``ItemsFailed`` when any item failed or was invalid.
    """
    from harmonize_core.vgg import resolve_device

    logger = get_run_logger()
    run = RunSettings(preset=preset, overrides=dict(overrides or {})).with_overrides(backbone=backbone,
                                                                                      weights=weights)
    check_run_settings(run)
    report = validate_manifest(manifest, run, only_ids)
    check_report(report, strict)
    for problem in report.problems:
        logger.warning("invalid: %s", problem.describe(manifest), extra=PROGRESS)
    logger.info("%s: %d items to run, %d invalid rows", manifest, len(report.items), len(report.invalid_rows()),
                extra=PROGRESS)
    rows = invalid_rows(report)
    if report.items:
        rows += run_items(report, out, str(resolve_device(device)))
    summary_uri = write_summary(storage.run_uri(out, run_identifier(), SUMMARY_NAME), rows)
    publish_artifact(rows, summary_uri)
    failed = [r for r in rows if r["status"] != COMPLETED]
    logger.info("summary: %s", summary_uri, extra=PROGRESS)
    if failed:
        raise ItemsFailed(len(failed), len(rows), summary_uri, rows)
    return {"items": len(rows), "completed": len(rows), "summary": summary_uri, "rows": rows}


def run_items(report: ValidationReport, out: str, device: str) -> list[dict[str, Any]]:
    """Submit one ``harmonize_item`` per valid item and return their summary rows."""
    result_storage = prepare_result_storage(out)
    spec = backbone_spec(report.items[0].config, device)  # backbone and weights are run-level: one per run
    get_run_logger().info("backbone %s, weights %s (sha256 %s...) on %s; stage cache records in %s", spec["name"],
                          spec["weights"], spec["digest"][:12], device, result_storage, extra=PROGRESS)
    total = len(report.items)
    futures = {}
    for index, item in enumerate(report.items, start=1):
        record = item.to_record()
        future = harmonize_item.submit(record, out, spec, device, result_storage, position=f"{index}/{total}")
        futures[future] = record
    return collect(futures)

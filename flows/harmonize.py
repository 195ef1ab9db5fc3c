"""``harmonize_manifest``: validate a manifest, run its items here or on a GPU work pool, report the run.

Shape (the paper's pipeline figure, per item): dilate -> pass1 -> blend -> pass2 -> reconstruct (``flows.item``).
Without a pool the items run on this process's thread pool (``flows.shard.run_items_here``); with ``pool`` they are
split into shards that GPU workers run as ``harmonize-shard`` deployment runs (``flows.fleet.fanout``). Either way every
finished row lands in ``<out>/runs/<run_id>/items/`` at once, the progress artifact follows, and ``summary.csv``
is kept current. A failed item never stops the others: the flow waits for every item, writes the summary, the table
artifact, ``<out>/status.csv`` and the run report, and only then raises ``ItemsFailed`` so that the run's final
state says how many items failed. Bad manifests (unreadable, missing columns; any invalid row with ``strict``) raise
``ManifestError`` before anything runs.

Before the first item runs, ``runs/<run_id>/started.json`` lists every planned output and ``summary.csv`` holds the
invalid rows; at the end ``ended.json`` says whether the run finished or stopped (``flows.run_record``), and every
planned output without a result is an ``unfinished`` row. A run interrupted by an exception (Ctrl-C, a crash of the
flow itself) still writes its summary, status and report before re-raising; one killed outright leaves
``started.json`` without an end, which ``harmonize report`` turns into the same truth.
"""

from __future__ import annotations

import uuid
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from harmonize_core.errors import InputError
from manifests import RunSettings, ValidationReport, check_run_settings, validate_manifest
from tasks import storage
from tasks.backbones import backbone_spec
from tasks.caching import prepare_result_storage
from tasks.stages import PROGRESS

from .fleet.fanout import FanOut
from .item import variant_items
from .paths import refuse_relative_when_deployed
from .plan import plan_run
from .progress import RunProgress
from .run_record import FINISHED, STOPPED, planned_row, record_end, record_start, run_state, unfinished_rows
from .shard import ITEMS_IN_FLIGHT, run_items_here
from .summary import COMPLETED, counts, invalid_rows, publish_artifact, update_status
from .text import one_line

REPORT_ARTIFACT_KEY = "harmonize-run-report"
INPUTS_DIR = "inputs"  # under <out>/.cache: the input index (manifests.index)


class ManifestError(InputError):
    """The manifest cannot run: unreadable, columns missing, or (``strict``) some rows invalid."""


class ItemsFailed(Exception):
    """Raised at the end of a run with failed or invalid items (after the summary is written)."""

    def __init__(self, failed: int, total: int, summary_uri: str, rows: list[dict[str, Any]],
                 report_uri: str = "") -> None:
        super().__init__(f"{failed} of {total} items failed or were invalid; see {summary_uri}")
        self.failed, self.total, self.summary_uri, self.rows = failed, total, summary_uri, rows
        self.report_uri = report_uri


def run_identifier() -> str:
    """Return this flow run's id (a fresh uuid when called outside a flow run)."""
    return str(flow_run.get_id() or uuid.uuid4())


def input_index(out: str) -> str:
    """Return where the inputs' digests and checks are kept between runs: ``<out>/.cache/inputs``."""
    return storage.join(storage.cache_uri(out), INPUTS_DIR)


def check_report(report: ValidationReport, strict: bool) -> None:
    """Raise ``ManifestError`` when the manifest is unusable, or has any problem and ``strict`` is set."""
    if report.fatal:
        raise ManifestError("; ".join(p.describe(report.manifest) for p in report.problems))
    if strict and not report.ok:
        first = report.problems[0].describe(report.manifest)
        raise ManifestError(f"{len(report.problems)} problem(s) and --strict is set; first: {first} "
                            f"(run `harmonize validate {report.manifest}` for all)")


def manifest_ids(manifest: str) -> set[str] | None:
    """Return every id in the manifest (valid rows or not), or None when it cannot be read again."""
    from manifests.validate import read_manifest

    try:
        return {row.get("id", "") for row in read_manifest(manifest)[1]}
    except Exception:  # noqa: BLE001 - only status.csv's left_manifest marks depend on it
        return None


def log_findings(report: ValidationReport) -> None:
    """Log the manifest's problems and warnings one per line: the first ``manifests.validate.SHOWN_FINDINGS``, then
    one line counting the rest (``ValidationReport.lines``; every invalid row is in the summary)."""
    logger = get_run_logger()
    for line in report.lines():
        logger.warning("%s", line, extra=PROGRESS)


def finish_run(out: str, run_id: str, progress: RunProgress, ids: set[str] | None = None,
               stopped: str = "") -> tuple[str, str]:
    """Write the final summary, the table artifact, ``status.csv``, ``ended.json``, the report and its markdown
    artifact; return (summary URI, report URI, "" when the report could not be built: the run's outcome does not
    depend on it).

    Every planned output without a row becomes an ``unfinished`` row. ``ids``: every id of the manifest (marks ids
    that left it in ``status.csv``). ``stopped``: the one-line reason the run stopped early ("" when it finished).
    """
    from prefect.artifacts import create_markdown_artifact

    from .report.build import build_report, report_markdown

    logger = get_run_logger()
    record_end(out, run_id, STOPPED if stopped else FINISHED, stopped)
    missing = unfinished_rows(run_state(out, run_id), progress.rows)
    progress.rows += missing
    summary_uri = progress.write()
    publish_artifact(progress.rows, summary_uri)
    update_status(out, run_id, progress.rows, manifest_ids=ids)
    if missing:
        logger.warning("%d planned output(s) never finished (status unfinished): %s", len(missing),
                       missing[0]["error"], extra=PROGRESS)
    logger.info("summary: %s", summary_uri, extra=PROGRESS)
    try:
        report_uri = build_report(out, run_id)
    except Exception as exc:  # noqa: BLE001 - a report problem must not fail a finished run
        logger.warning("the report could not be built (%s); rebuild it with `harmonize report --out %s --run %s`",
                       one_line(exc), out, run_id, extra=PROGRESS)
        return summary_uri, ""
    create_markdown_artifact(key=REPORT_ARTIFACT_KEY, markdown=report_markdown(progress.rows, report_uri, summary_uri),
                             description=f"run report: {report_uri}")
    logger.info("report: %s", report_uri, extra=PROGRESS)
    return summary_uri, report_uri


@flow(name="harmonize-manifest", task_runner=ThreadPoolTaskRunner(max_workers=ITEMS_IN_FLIGHT))
def harmonize_manifest(
    manifest: str,
    out: str,
    preset: str = "paper",
    device: str = "auto",
    backbone: str | None = None,
    weights: str | None = None,
    overrides: dict[str, Any] | None = None,
    strict: bool = False,
    only_ids: list[str] | None = None,
    pool: str | None = None,
    shard_size: int = 1,
) -> dict[str, Any]:
    """Harmonize every valid item of ``manifest`` into ``out``; return ``{items, completed, summary, rows}``.

    ``preset``/``backbone``/``weights``/``overrides`` (flat names such as ``tau``, ``size``, ``max_seconds``) set
    every row's config; a row's own override cells win over ``overrides``. ``only_ids`` limits the run to those ids
    (``--only-failed``). ``pool`` sends the items, ``shard_size`` per shard, to that GPU work pool's workers.
    Raises ``ManifestError`` for an unusable manifest and ``ItemsFailed`` when any item failed or was invalid.
    """
    logger = get_run_logger()
    refuse_relative_when_deployed({"manifest": manifest, "out": out})  # flows.paths: a worker's folder is not ours
    run = RunSettings(preset=preset, overrides=dict(overrides or {})).with_overrides(backbone=backbone,
                                                                                      weights=weights)
    check_run_settings(run)
    report = validate_manifest(manifest, run, only_ids, strict_warnings=strict, index=input_index(out))
    check_report(report, strict)
    log_findings(report)
    logger.info("%s: %d items to run, %d invalid rows", manifest, len(report.items), len(report.invalid_rows()),
                extra=PROGRESS)
    run_id = run_identifier()
    records = [item.to_record() for item in report.items]
    planned = [planned_row(variant, out) for record in records for variant in variant_items(record)]
    invalid = invalid_rows(report)
    progress = RunProgress(out, run_id, len(invalid) + len(planned), invalid)
    ids = manifest_ids(manifest)
    record_start(out, run_id, manifest, planned, len(invalid))
    progress.write()  # the invalid rows, and a summary for `harmonize report` to find even if the run is killed now
    try:
        _run_records(report, records, out, run_id, progress, device=device, pool=pool, shard_size=shard_size)
    except BaseException as exc:  # an interrupt or a crash of the flow itself: record the truth, then re-raise
        reason = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else one_line(exc)
        try:
            finish_run(out, run_id, progress, ids, stopped=reason)
        except Exception as problem:  # noqa: BLE001 - the original exception is what the run ends with
            logger.warning("the stopped run's summary could not be written (%s)", one_line(problem), extra=PROGRESS)
        raise
    summary_uri, report_uri = finish_run(out, run_id, progress, ids)
    rows = progress.rows
    failed = [r for r in rows if r["status"] != COMPLETED]
    if failed:
        raise ItemsFailed(len(failed), len(rows), summary_uri, rows, report_uri)
    return {"items": len(rows), "completed": counts(rows)[COMPLETED], "summary": summary_uri, "rows": rows,
            "run_id": run_id, "report": report_uri}


def _run_records(report: ValidationReport, records: list[dict[str, Any]], out: str, run_id: str,
                 progress: RunProgress, *, device: str, pool: str | None, shard_size: int) -> None:
    """Run the valid items here or on ``pool``, adding their rows to ``progress`` as they finish."""
    from harmonize_core.network.vgg import resolve_device
    from harmonize_core.network.weights import describe_network

    logger = get_run_logger()
    if records:
        # On a pool each worker resolves "auto" on its own GPU; here the device is this process's.
        target = device if pool else str(resolve_device(device))
        spec = backbone_spec(report.items[0].config, "cpu" if pool else target)  # one network per run
        storage_ref = prepare_result_storage(out)
        logger.info("%s (sha256 %s...); stage cache records in %s", describe_network(spec["name"], spec["weights"]),
                    spec["digest"][:12], storage_ref, extra=PROGRESS)
        device_type = "cpu" if target == "cpu" else ("cuda" if pool else resolve_device(target).type)
        logger.info("%s", plan_run(report, out, spec["digest"], device_type).total_line(), extra=PROGRESS)
        if pool:
            FanOut(out, run_id, spec, target, pool, progress).run(records, shard_size)
        else:
            run_items_here(records, out, spec, target, run_id, on_rows=progress.add)

"""One item's chain of stage tasks, as a Prefect task that the flow fans out over the manifest.

``harmonize_item`` calls the five stage tasks in order (nested task runs: each keeps its own cache, retries and
``gpu`` tag). Two details make the content-addressed cache safe:

- each stage call sits in its own eagerly committed transaction, so a finished stage's cache record is written at
  once and survives a later stage failing (nested transactions otherwise commit, or roll back, with the parent);
- each returned record is checked against this item's own location ``uri_for(out, id, stage)`` by digest: a hit
  computed for an identical row elsewhere is copied here, and a hit whose outputs were deleted or overwritten since
  is recomputed with ``refresh_cache=True``.

A failed item raises ``ItemFailed`` carrying its partial summary row, so the item's task run ends Failed while the
flow still reports every stage that finished.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import CommitMode, transaction

from harmonize_core.stages import STAGES
from tasks import storage
from tasks.stages import PROGRESS, STAGE_TASKS

from .text import one_line

FINAL_STAGE = STAGES[-1]
LOSS_STAGES = ("pass1", "pass2")


class ItemFailed(Exception):
    """An item's chain stopped at ``stage``; ``row`` is its partial summary row (status failed, error)."""

    def __init__(self, message: str, row: dict[str, Any]) -> None:
        super().__init__(message)
        self.row = row


def settle(stage: str, record: dict[str, Any], item: dict[str, Any], out: str) -> dict[str, Any] | None:
    """Return ``record`` pointing at this item's own output (copying a twin's), or None if it must recompute."""
    expected = storage.uri_for(out, item["id"], stage, "png")
    if storage.digest(expected) == record["sha256"]:
        return {**record, "uri": expected, "metrics_uri": storage.uri_for(out, item["id"], stage, "json")}
    if record["uri"] != expected and storage.digest(record["uri"]) == record["sha256"]:
        metrics_uri = storage.uri_for(out, item["id"], stage, "json")
        storage.copy(record["metrics_uri"], metrics_uri)
        storage.copy(record["uri"], expected)
        return {**record, "uri": expected, "metrics_uri": metrics_uri}
    return None


def run_stage(stage: str, item: dict[str, Any], out: str, **inputs: Any) -> tuple[dict[str, Any], bool]:
    """Return (this item's settled record of ``stage``, whether it came from the cache)."""
    stage_task = STAGE_TASKS[stage].with_options(result_storage=inputs.pop("result_storage"))
    for refresh in (False, True):
        runner = stage_task.with_options(refresh_cache=True) if refresh else stage_task
        with transaction(commit_mode=CommitMode.EAGER):
            state = runner(item=item, out=out, **inputs, return_state=True)
        record = state.result()  # re-raises the stage's exception after its retries
        settled = settle(stage, record, item, out)
        if settled is not None:
            return settled, state.name == "Cached"
    raise RuntimeError(f"{stage}: the recomputed output at {record['uri']} does not match its digest")


def stage_inputs(stage: str, records: dict[str, dict[str, Any]], backbone: dict[str, Any]) -> dict[str, Any]:
    """Return the upstream keyword arguments of ``stage``'s task (see ``tasks.caching.UPSTREAM``)."""
    upstream = {"dilate": {}, "pass1": {"loose": records.get("dilate")}, "blend": {"pass1": records.get("pass1")},
                "pass2": {"loose": records.get("dilate"), "blended": records.get("blend")},
                "reconstruct": {"pass2": records.get("pass2")}}[stage]
    return {**upstream, **({"backbone": backbone} if stage in LOSS_STAGES else {})}


def summary_row(item: dict[str, Any], out: str, records: dict[str, dict[str, Any]], seconds: dict[str, float],
                cached: list[str], status: str, error: str = "") -> dict[str, Any]:
    """Return one item's summary row (see ``flows.summary.COLUMNS``)."""
    row: dict[str, Any] = {"id": item["id"], "row": item["row"], "status": status, "error": error,
                           "cached": ";".join(cached), "total_s": round(sum(seconds.values()), 3)}
    row.update({f"{stage}_s": round(seconds[stage], 3) for stage in seconds})
    for stage in LOSS_STAGES:
        if stage in records:
            row[f"{stage}_loss"] = records[stage]["summary"].get("final_loss")
    if "pass2" in records:
        row["tau"] = records["pass2"]["summary"].get("tau")
    row.update({f"{stage}_uri": record["uri"] for stage, record in records.items()})
    row["final_uri"] = records.get(FINAL_STAGE, {}).get("uri", "")
    row["outputs"] = storage.join(out, item["id"])
    return row


@task(name="harmonize-item", task_run_name="item-{item[id]}", cache_policy=NO_CACHE, persist_result=False)
def harmonize_item(item: dict[str, Any], out: str, backbone: dict[str, Any], device: str,
                   result_storage: Any, position: str = "") -> dict[str, Any]:
    """Run dilate, pass1, blend, pass2 and reconstruct for one item; return its summary row.

    Raises ``ItemFailed`` (with the partial row) when a stage fails after its retries.
    """
    logger = get_run_logger()
    records: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    cached: list[str] = []
    for stage in STAGES:
        started = time.perf_counter()
        try:
            records[stage], hit = run_stage(stage, item, out, result_storage=result_storage, device=device,
                                            **stage_inputs(stage, records, backbone))
        except Exception as exc:
            seconds[stage] = time.perf_counter() - started
            error = f"{stage}: {one_line(exc)}"
            logger.error("item %s %s failed: %s", position, item["id"], error, extra=PROGRESS)
            raise ItemFailed(error, summary_row(item, out, records, seconds, cached, "failed", error)) from exc
        seconds[stage] = time.perf_counter() - started
        cached += [stage] if hit else []
        how = "cached" if hit else f"{seconds[stage]:.1f} s"
        logger.info("item %s %s: %s done (%s)", position, item["id"], stage, how, extra=PROGRESS)
    return summary_row(item, out, records, seconds, cached, "completed")

"""Items running in this process: the ``harmonize-shard`` flow a GPU worker runs, and the local runner under it.

``run_items_here`` submits one ``harmonize_item`` task per item on the flow's thread pool (the network stages take
turns on the device, ``tasks.gpu``) and hands every finished row to ``on_rows`` as it arrives. ``harmonize run``
without a pool calls it from the manifest flow; with a pool, each shard of items is a run of the
``harmonize-shard`` deployment on a GPU worker (``flows.fleet.fanout``), which calls it too.

Before computing anything, a shard checks that this worker writes where the run reads (``flows.paths``): an ``out``
that is relative (it would name a folder in the worker's temporary working folder) or in which the run's marker is
not visible (another machine's local disk) fails the shard with one line, and an item whose local input files this
worker cannot see fails with one line naming the file; nothing is computed into a folder nobody reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.caching import result_storage_for
from tasks.gpu import worker_name
from tasks.stages import PROGRESS

from .item import ItemFailed, harmonize_item, variant_items
from .paths import invisible_input, pool_marker_problem
from .summary import FAILED, write_row
from .text import one_line

SHARD_FLOW = "harmonize-shard"
ITEMS_IN_FLIGHT = 4  # items started at once in one process; their network stages still take turns per device


def run_items_here(items: list[dict[str, Any]], out: str, backbone: dict[str, Any], device: str, run_id: str,
                   on_rows: Callable[[list[dict[str, Any]]], None] | None = None, first: int = 1,
                   total: int | None = None) -> list[dict[str, Any]]:
    """Run every item in this process; return all their summary rows (each also written under the run)."""
    result_storage = result_storage_for(out)
    total = total or len(items)
    futures = {harmonize_item.submit(item, out, backbone, device, result_storage, run_id,
                                     position=f"{first + index}/{total}"): item
               for index, item in enumerate(items)}
    rows: list[dict[str, Any]] = []
    for future in as_completed(list(futures)):
        result = future.result(raise_on_failure=False)
        if isinstance(result, ItemFailed):
            finished = result.rows
        elif isinstance(result, list):
            finished = result
        else:  # crashed or cancelled without rows: report it rather than lose it
            item = futures[future]
            reason = one_line(result) if isinstance(result, BaseException) else f"ended {future.state.name}"
            finished = [{"id": item["id"], "row": item["row"], "status": FAILED, "error": reason}]
            write_row(out, run_id, finished[0])
        rows += finished
        if on_rows is not None:
            on_rows(finished)
    return rows


@flow(name=SHARD_FLOW, task_runner=ThreadPoolTaskRunner(max_workers=ITEMS_IN_FLIGHT))
def harmonize_shard(items: list[dict[str, Any]], out: str, backbone: dict[str, Any], run_id: str,
                    device: str = "auto", first: int = 1, total: int = 0) -> dict[str, int]:
    """Harmonize one shard of a run's items on this worker; return ``{items, rows, failed}``, or a ``Failed`` state
    with one line when this worker cannot write where the run reads (``flows.paths.pool_marker_problem``).

    Rows land in ``<out>/runs/<run_id>/items/`` for the manifest flow to collect; an item whose local input files
    are not visible here gets a failed row naming the file. ``first``/``total`` only number the progress lines
    (item 7/120).
    """
    from prefect.states import Failed

    from harmonize_core.network.vgg import resolve_device

    logger = get_run_logger()
    problem = pool_marker_problem(out, run_id, worker_name())
    if problem:
        logger.error("%s", problem, extra=PROGRESS)
        return Failed(message=problem)
    runnable, rows = [], []
    for item in items:
        missing = invisible_input(item)
        if missing is None:
            runnable.append(item)
            continue
        logger.error("item %s failed: %s", item["id"], missing, extra=PROGRESS)
        for variant in variant_items(item):
            rows.append({"id": item["id"], "variant": variant.get("variant", ""), "row": item["row"],
                         "status": FAILED, "error": missing, "worker": worker_name()})
            write_row(out, run_id, rows[-1])
    resolved = str(resolve_device(device))
    logger.info("shard of %d item(s) for run %s on %s", len(items), run_id, resolved, extra=PROGRESS)
    if runnable:
        rows += run_items_here(runnable, out, backbone, resolved, run_id, first=first, total=total or len(items))
    return {"items": len(items), "rows": len(rows), "failed": sum(r["status"] == FAILED for r in rows)}

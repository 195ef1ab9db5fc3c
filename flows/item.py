"""One item's chain of stage tasks, as a Prefect task that a flow (local run or shard) fans out.

``harmonize_item`` calls the stage tasks in order (nested task runs: each keeps its own cache, retries and ``gpu``
tag): dilate -> pass1 -> blend once, then pass2 -> reconstruct once per style-level variant (a manifest ``tau``
cell such as ``1;5;10``: each value is its own output under ``<out>/<id>/tau-<value>/``, sharing the cached dilate,
pass 1 and blend). Details that keep the content-addressed cache safe with many workers:

- each stage call sits in its own eagerly committed transaction, so a finished stage's cache record is written at
  once and survives a later stage failing (nested transactions otherwise commit, or roll back, with the parent);
  the stage's own transaction is SERIALIZABLE on a lock kept in the output storage (``tasks.caching.stage_policy``),
  so two workers reaching one key compute it once;
- each returned record is checked (``settle``): its content-addressed object must still exist (else the stage is
  recomputed with ``refresh_cache=True``) and the item's own readable copy is refreshed from it when it is missing or
  holds another output (an identical row elsewhere, or another run's settings);
- the item's readable copies always come from one computation: a stage that computes, restores its copy or fails
  first removes the copies of the stages after it (``tasks.stages.discard_copies``), and a failed stage its own;
- each stage call's waits (its stage lock held by another run or worker, the device held by another item) are said
  while they last and on the stage's progress line, and are never counted in the stage's seconds (``tasks.waits``).

Every finished row (one per variant) is written at once to ``<out>/runs/<run_id>/items/`` so that a killed run, or
a shard on another machine, leaves the rows that finished. A failed variant raises ``ItemFailed`` at the end with
all rows, so the task run ends Failed while the flow still reports every stage that finished.
"""

from __future__ import annotations

import json
import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import CommitMode, transaction

from harmonize_core.passes.stages import STAGES
from tasks import storage
from tasks.caching import config_from_dict, stage_policy
from tasks.gpu import worker_name
from tasks.stages import PROGRESS, STAGE_TASKS, discard_copies, metrics_for_item, variant_of
from tasks.waits import StageWaits, waiting_in

from .summary import COMPLETED, FAILED, write_row
from .text import one_line

FINAL_STAGE = STAGES[-1]
LOSS_STAGES = ("pass1", "pass2")
SHARED_STAGES = ("dilate", "pass1", "blend")  # computed once per item, whatever its variants
VARIANT_PREFIX = "tau-"


class ItemFailed(Exception):
    """An item (or one of its variants) stopped at a stage; ``rows`` are its summary rows, failed ones included."""

    def __init__(self, message: str, rows: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.rows = rows


def settle(stage: str, record: dict[str, Any], item: dict[str, Any], out: str) -> dict[str, Any] | None:
    """Return ``record`` with this item's own copy in place, or None when its object is gone (recompute).

    A copy restored here (missing, or another computation's) makes the later stages' copies suspect: they are
    removed, and each later stage puts its own back as it settles.
    """
    if "item_uri" not in record or storage.digest(record["uri"]) != record["sha256"]:
        return None
    variant = variant_of(item, stage)
    expected = storage.uri_for(out, item["id"], stage, "png", variant)
    if storage.digest(expected) != record["sha256"]:
        storage.copy(record["uri"], expected)
        metrics = json.loads(storage.read_bytes(record["metrics_uri"]))
        storage.write_bytes(storage.uri_for(out, item["id"], stage, "json", variant), metrics_for_item(metrics, item))
        discard_copies(out, item, stage, including=False)
    return {**record, "item_uri": expected}


def run_stage(stage: str, item: dict[str, Any], out: str, **inputs: Any) -> tuple[dict[str, Any], bool]:
    """Return (this item's settled record of ``stage``, whether it came from the cache)."""
    stage_task = STAGE_TASKS[stage].with_options(result_storage=inputs.pop("result_storage"),
                                                 cache_policy=stage_policy(stage, out))
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


def variant_items(item: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the item once per style-level variant: ``[item]`` for a single tau, else one copy per tau value with
    that tau in its config and ``variant = "tau-<value>"``."""
    from manifests.schema import tau_label

    taus = item.get("tau_variants") or []
    if len(taus) < 2:
        return [item]
    config = config_from_dict(item["config"])
    return [{**item, "variant": f"{VARIANT_PREFIX}{tau_label(tau)}",
             "config": config.replace(**{"pass2.tau": tau}).to_dict()} for tau in taus]


def summary_row(item: dict[str, Any], out: str, chain: dict[str, Any], status: str,
                error: str = "") -> dict[str, Any]:
    """Return one summary row (see ``flows.summary.COLUMNS``) of an item or one of its variants."""
    records, seconds = chain["records"], chain["seconds"]
    row: dict[str, Any] = {"id": item["id"], "variant": item.get("variant", ""), "row": item["row"],
                           "status": status, "error": error, "warnings": ";".join(item.get("warnings") or []),
                           "cached": ";".join(chain["cached"]), "worker": worker_name(),
                           "total_s": round(sum(seconds.values()), 3)}
    row.update({f"{stage}_s": round(seconds[stage], 3) for stage in seconds})
    for stage in LOSS_STAGES:
        if stage in records:
            row[f"{stage}_loss"] = records[stage]["summary"].get("final_loss")
    if "pass2" in records:
        row["tau"] = records["pass2"]["summary"].get("tau")
    quality = records.get(FINAL_STAGE, {}).get("summary", {}).get("quality") or {}
    row.update({f"quality_{name}": value for name, value in quality.items()})
    row.update({f"{stage}_uri": record["item_uri"] for stage, record in records.items()})
    row["final_uri"] = records.get(FINAL_STAGE, {}).get("item_uri", "")
    row.update({f"{name}_uri": ref["uri"] for name, ref in item["files"].items()})
    row["outputs"] = storage.join(out, item["id"], *([item["variant"]] if item.get("variant") else []))
    row["extra"] = dict(item.get("extra") or {})
    return row


def run_chain(item: dict[str, Any], stages: tuple[str, ...], chain: dict[str, Any], out: str,
              context: dict[str, Any]) -> None:
    """Run ``stages`` of ``item`` in order, adding to ``chain`` (records, seconds, cached); raise on failure."""
    logger = get_run_logger()
    label = f"{item['id']}{'/' + item['variant'] if item.get('variant') else ''}"
    who = f"item {context['position']} {label}" if context["position"] else f"item {label}"

    def say(message: str) -> None:
        logger.info("%s", message, extra=PROGRESS)

    for stage in stages:
        started = time.perf_counter()
        scope = StageWaits(who=who, stage=stage, run_id=context.get("run_id", ""), announce=say)
        try:
            with waiting_in(scope):
                chain["records"][stage], hit = run_stage(
                    stage, item, out, result_storage=context["result_storage"], device=context["device"],
                    **stage_inputs(stage, chain["records"], context["backbone"]))
        except Exception:
            _discard_after_failure(out, item, stage)
            raise
        finally:
            # a stage's seconds never include its waits for the stage lock and the device (said on its line)
            chain["seconds"][stage] = max(0.0, time.perf_counter() - started - scope.waited())
        chain["cached"] += [stage] if hit else []
        computed = chain["records"][stage]["summary"].get("seconds")
        if not hit and isinstance(computed, (int, float)):
            chain["seconds"][stage] = float(computed)  # the core's own compute time (no loading, no writing)
        how = ("cached" if hit else f"{chain['seconds'][stage]:.1f} s") + scope.describe()
        logger.info("%s: %s done (%s)", who, stage, how, extra=PROGRESS)


def _discard_after_failure(out: str, item: dict[str, Any], stage: str) -> None:
    """Remove the item's copies of a failed stage and the later ones (``tasks.stages.discard_copies``): none of
    them belongs to this computation. A storage error here is logged; the stage's own error is the one reported."""
    try:
        discard_copies(out, item, stage)
    except Exception as exc:  # noqa: BLE001 - the failure being reported matters more
        get_run_logger().warning("item %s: could not remove its %s copies: %s", item["id"], stage, one_line(exc))


def _failed(item: dict[str, Any], out: str, chain: dict[str, Any], stage: str, exc: Exception) -> dict[str, Any]:
    message = one_line(exc)
    error = message if message.startswith(f"{stage}: ") else f"{stage}: {message}"
    get_run_logger().error("item %s failed: %s", item["id"], error, extra=PROGRESS)
    return summary_row(item, out, chain, FAILED, error)


def _failing_stage(stages: tuple[str, ...], chain: dict[str, Any]) -> str:
    return next(stage for stage in stages if stage not in chain["records"])


@task(name="harmonize-item", task_run_name="item-{item[id]}", cache_policy=NO_CACHE, persist_result=False)
def harmonize_item(item: dict[str, Any], out: str, backbone: dict[str, Any], device: str, result_storage: Any,
                   run_id: str, position: str = "") -> list[dict[str, Any]]:
    """Run dilate, pass1, blend, then pass2 and reconstruct per variant for one item; return its summary rows.

    Each row is also written to ``<out>/runs/<run_id>/items/`` as soon as it is final. Raises ``ItemFailed``
    (carrying every row) when a stage of the item or of any variant failed after its retries.
    """
    context = {"result_storage": result_storage, "device": device, "backbone": backbone, "position": position,
               "run_id": run_id}
    shared: dict[str, Any] = {"records": {}, "seconds": {}, "cached": []}
    rows: list[dict[str, Any]] = []
    try:
        run_chain(item, SHARED_STAGES, shared, out, context)
    except Exception as exc:  # every variant fails with the shared stage
        stage = _failing_stage(SHARED_STAGES, shared)
        rows = [_failed(variant, out, shared, stage, exc) for variant in variant_items(item)]
        for row in rows:
            write_row(out, run_id, row)
    else:
        for variant in variant_items(item):
            chain = {"records": dict(shared["records"]), "seconds": dict(shared["seconds"]),
                     "cached": list(shared["cached"])}
            tail = tuple(s for s in STAGES if s not in SHARED_STAGES)
            try:
                run_chain(variant, tail, chain, out, context)
                rows.append(summary_row(variant, out, chain, COMPLETED))
            except Exception as exc:
                rows.append(_failed(variant, out, chain, _failing_stage(tail, chain), exc))
            write_row(out, run_id, rows[-1])
    failed = [r for r in rows if r["status"] == FAILED]
    if failed:
        raise ItemFailed(failed[0]["error"], rows)
    return rows

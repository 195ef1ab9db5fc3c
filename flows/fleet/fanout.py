"""Fan a run's items out over a GPU work pool, one ``harmonize-shard`` deployment run per shard, and wait for all.

The manifest flow splits the valid items into shards of ``shard_size`` items and starts each as a run of the
``harmonize-shard/<pool>`` deployment (``run_deployment``, not waiting), which any worker of the pool picks up (one
worker per GPU, one shard at a time: ``harmonize worker``). While they run, the finished rows the item tasks write
under ``<out>/runs/<run_id>/items/`` are collected as they appear (progress across every machine).

A shard whose run ends without rows for all its items (Crashed: the worker was killed or the machine is gone and
Prefect's zombie automation marked the run, see ``flows.fleet.deploy``; Cancelled; Failed) is started again with just the
missing items, on whichever worker is free: every stage it finished before is a cache hit there. After
``MAX_ATTEMPTS`` runs an item is reported failed with the shard's last state, never lost.

Before the first shard starts, the run refuses a relative ``out`` (each worker would resolve it against its own
temporary folder) and writes its marker ``<out>/runs/<run_id>/pool.json``; a shard on a worker that cannot see it
(``out`` on another machine's disk) fails at once with one line saying so (``flows.paths``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect import get_run_logger

from harmonize_core.errors import InputError
from tasks import storage
from tasks.stages import PROGRESS

from ..item import variant_items
from ..paths import relative_path_problem, write_pool_marker
from ..progress import RunProgress
from ..shard import SHARD_FLOW
from ..summary import FAILED, write_row
from .automation import zombie_automation_problem

MAX_ATTEMPTS = 3
POLL_SECONDS = 3.0
WAITING_NOTICE_SECONDS = 60.0  # say so when no worker has taken a shard for this long


@dataclass
class Shard:
    """Items sent together to one worker, the attempt number, and the flow run carrying them."""

    number: int
    items: list[dict[str, Any]]
    attempt: int = 1
    flow_run_id: UUID | None = None


def shard_deployment(pool: str) -> str:
    """Return the ``flow/deployment`` name of the shard deployment on ``pool`` (``harmonize deploy`` creates it)."""
    return f"{SHARD_FLOW}/{pool}"


def make_shards(items: list[dict[str, Any]], size: int) -> list[Shard]:
    """Return the items cut into shards of ``size`` (the last may be smaller), numbered from 1."""
    size = max(1, int(size))
    return [Shard(number=i // size + 1, items=items[i:i + size]) for i in range(0, len(items), size)]


def check_deployment(pool: str) -> None:
    """Raise ``InputError`` unless the shard deployment of ``pool`` exists on the Prefect API."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(shard_deployment(pool))
        except ObjectNotFound:
            raise InputError(f"work pool {pool!r} has no {shard_deployment(pool)} deployment on this Prefect API: "
                             f"run `harmonize deploy --pool {pool}` first") from None


class FanOut:
    """The parent's side of a pooled run: submits shards, collects rows, resubmits what a lost worker dropped."""

    def __init__(self, out: str, run_id: str, backbone: dict[str, Any], device: str, pool: str,
                 progress: RunProgress) -> None:
        self.out, self.run_id, self.backbone, self.device, self.pool = out, run_id, backbone, device, pool
        self.progress = progress
        self.live: dict[UUID, Shard] = {}
        self.total = 0
        self._read: set[str] = set()

    def submit(self, shard: Shard) -> None:
        """Start ``shard`` as a run of the pool's shard deployment (returns at once)."""
        from prefect.deployments import run_deployment

        first = min(int(item.get("position", 0)) for item in shard.items) if shard.items else 1
        run = run_deployment(
            shard_deployment(self.pool), timeout=0,
            parameters={"items": shard.items, "out": self.out, "backbone": self.backbone, "run_id": self.run_id,
                        "device": self.device, "first": first, "total": self.total},
            idempotency_key=f"{self.run_id}-shard-{shard.number}-attempt-{shard.attempt}",
            flow_run_name=f"shard-{shard.number}-of-{self.run_id[:8]}-try-{shard.attempt}")
        shard.flow_run_id = run.id
        self.live[run.id] = shard

    def collect(self) -> None:
        """Read every row file written since the last call and add it to the progress."""
        prefix = storage.run_uri(self.out, self.run_id, storage.ROWS_DIR)
        fresh = [uri for uri in storage.list_uris(prefix) if uri.endswith(".json") and uri not in self._read]
        rows = [json.loads(storage.read_bytes(uri)) for uri in fresh]
        self._read.update(fresh)
        self.progress.add(rows)

    def missing(self, shard: Shard) -> list[dict[str, Any]]:
        """Return the shard's items that still lack a final row for some variant."""
        return [item for item in shard.items
                if not all(self.progress.has({"id": v["id"], "variant": v.get("variant", "")})
                           for v in variant_items(item))]

    def settle(self, shard: Shard, state: Any) -> None:
        """Handle a shard whose run ended: resubmit its missing items, or report them failed after the last try."""
        logger = get_run_logger()
        missing = self.missing(shard)
        if not missing:
            return
        reason = f"shard {shard.number} run ended {state.name}" + (f": {state.message}" if state.message else "")
        if shard.attempt < MAX_ATTEMPTS:
            logger.warning("%s; resubmitting %d item(s) (attempt %d of %d)", reason, len(missing), shard.attempt + 1,
                           MAX_ATTEMPTS, extra=PROGRESS)
            self.submit(Shard(shard.number, missing, shard.attempt + 1))
            return
        rows = []
        for item in missing:
            for variant in variant_items(item):
                row = {"id": item["id"], "variant": variant.get("variant", ""), "row": item["row"], "status": FAILED,
                       "error": f"{reason} (tried {MAX_ATTEMPTS} times; rerun with --only-failed)"}
                write_row(self.out, self.run_id, row)
                rows.append(row)
        self.progress.add(rows)

    def run(self, items: list[dict[str, Any]], shard_size: int) -> None:
        """Submit every shard and return when each item has a final row (``InputError`` for a relative ``out``)."""
        relative = relative_path_problem({"out": self.out})
        if relative:
            raise InputError(relative)
        check_deployment(self.pool)
        write_pool_marker(self.out, self.run_id, self.pool)
        try:
            problem = zombie_automation_problem()
        except Exception as error:  # a check, never a reason to stop the run
            problem = f"the zombie automation could not be read ({error})"
        if problem:
            get_run_logger().warning("%s: a shard whose worker dies would wait forever instead of being resubmitted; "
                                     "run `harmonize deploy --pool %s`", problem, self.pool, extra=PROGRESS)
        for position, item in enumerate(items, start=1):
            item["position"] = position
        self.total = len(items)
        for shard in make_shards(items, shard_size):
            self.submit(shard)
        get_run_logger().info("%d item(s) in %d shard(s) sent to work pool %s", len(items), len(self.live),
                              self.pool, extra=PROGRESS)
        self.wait()

    def wait(self) -> None:
        """Poll until every shard's run has ended and been settled."""
        from prefect import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        waiting_since = time.monotonic()
        with get_client(sync_client=True) as client:
            while self.live:
                time.sleep(POLL_SECONDS)
                self.collect()
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(self.live))))
                started = False
                for run in runs:
                    started |= run.state is not None and not run.state.is_scheduled()
                    if run.state is not None and run.state.is_final():
                        self.collect()
                        self.settle(self.live.pop(run.id), run.state)
                if started:
                    waiting_since = time.monotonic()
                elif time.monotonic() - waiting_since > WAITING_NOTICE_SECONDS:
                    get_run_logger().warning("no worker of pool %s has started a shard for %.0f s: start them with "
                                             "`harmonize worker --pool %s`", self.pool,
                                             time.monotonic() - waiting_since, self.pool, extra=PROGRESS)
                    waiting_since = time.monotonic()

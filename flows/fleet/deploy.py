"""Deployments on Prefect's own machinery: one work pool, two queues, two deployments, one automation.

``harmonize deploy --pool POOL [MANIFEST --out URI --cron CRON]`` creates, or brings up to date (every call is
idempotent), on the Prefect server that ``PREFECT_API_URL`` names:

- the **work pool** ``POOL`` (type ``process``) with two queues: ``gpu`` (shard runs; every GPU worker polls it, one
  shard at a time per GPU: ``harmonize worker``) and ``coordinator`` (manifest runs, which only wait and collect:
  limited to ``COORDINATOR_RUNS`` at once so they never pile up);
- the **shard deployment** ``harmonize-shard/POOL`` on queue ``gpu``, the one ``harmonize run --pool POOL`` and the
  nightly run fan items out to (``flows.fleet.fanout``); its runs send heartbeats every ``HEARTBEAT_SECONDS``;
- with a manifest: the **manifest deployment** ``harmonize-manifest/nightly`` on queue ``coordinator`` with a cron
  schedule, one run at a time, fanning out to ``POOL``;
- the **automation** ``AUTOMATION_NAME`` (``flows.fleet.automation``) that marks a shard run Crashed when it has been silent for
  ``zombie_seconds`` after it started running or after its last heartbeat (Prefect's documented zombie-run
  detection, armed also by the server's own ``Running`` event so that a machine lost before its run's first
  heartbeat reached the server is caught too): a killed worker's shard run ends Crashed, and the fan-out sends its
  missing items to another worker. It watches only runs tagged ``SHARD_TAG``: other flow runs on the same server
  (the coordinator's manifest runs, a team's other flows) send heartbeats every 180 s by default and must not be
  marked Crashed by a 90 s rule.

Code is located by module path (``flows.shard.harmonize_shard``, ``flows.harmonize.harmonize_manifest``): workers
need the package installed, no source storage. ``harmonize serve`` is the one-machine alternative: ``Flow.serve``
runs the schedule in its own process.
"""

from __future__ import annotations

from typing import Any

from harmonize_core.errors import InputError

from .automation import ensure_zombie_automation
from .settings import (
    AUTOMATION_NAME,
    COORDINATOR_QUEUE,
    COORDINATOR_RUNS,
    DEFAULT_POOL,
    HEARTBEAT_SECONDS,
    MANIFEST_DEPLOYMENT,
    NIGHTLY,
    SHARD_QUEUE,
    SHARD_TAG,
    ZOMBIE_SECONDS,
)


def require_api() -> str:
    """Return the configured Prefect API URL, or raise ``InputError`` saying how to set one."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise InputError("no Prefect server configured: start one (`prefect server start`) and set PREFECT_API_URL, "
                         "e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api")
    return url


def heartbeat_env() -> dict[str, str]:
    """Return the environment that makes flow runs send the heartbeats the zombie automation watches."""
    return {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS)}


def ensure_pool(pool: str) -> None:
    """Create the process work pool ``pool`` and its two queues if missing; set the coordinator queue's limit."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        for name, limit in ((SHARD_QUEUE, None), (COORDINATOR_QUEUE, COORDINATOR_RUNS)):
            try:
                queue = client.read_work_queue_by_name(name, work_pool_name=pool)
            except ObjectNotFound:
                client.create_work_queue(name=name, work_pool_name=pool, concurrency_limit=limit)
                continue
            if queue.concurrency_limit != limit:
                client.update_work_queue(queue.id, concurrency_limit=limit)


def shard_deployment(pool: str):
    """Return the ``RunnerDeployment`` of the shard flow on ``pool``'s ``gpu`` queue (named after the pool)."""
    from prefect.deployments.runner import EntrypointType

    from ..shard import harmonize_shard

    return harmonize_shard.to_deployment(name=pool, work_pool_name=pool, work_queue_name=SHARD_QUEUE,
                                         entrypoint_type=EntrypointType.MODULE_PATH, tags=["gpu", SHARD_TAG],
                                         job_variables={"env": heartbeat_env()})


def deployment(manifest: str, out: str, cron: str = NIGHTLY, name: str = MANIFEST_DEPLOYMENT,
               work_pool: str | None = None, **parameters: Any):
    """Return the ``RunnerDeployment`` of the manifest flow on ``cron`` (one run at a time).

    With ``work_pool`` it runs on that pool's coordinator queue and fans its items out to the same pool.
    ``parameters`` are further flow parameters (``preset``, ``device``, ``backbone``, ``weights``, ...).
    """
    from prefect.deployments.runner import EntrypointType

    from ..harmonize import harmonize_manifest

    values = {"manifest": manifest, "out": out, **parameters, **({"pool": work_pool} if work_pool else {})}
    extra = ({"work_pool_name": work_pool, "work_queue_name": COORDINATOR_QUEUE,
              "entrypoint_type": EntrypointType.MODULE_PATH} if work_pool else {})
    return harmonize_manifest.to_deployment(name=name, cron=cron, parameters=values, tags=["harmonize"],
                                            concurrency_limit=1, **extra)


def deploy(pool: str = DEFAULT_POOL, manifest: str | None = None, out: str | None = None, cron: str = NIGHTLY,
           zombie_seconds: float = ZOMBIE_SECONDS, **parameters: Any) -> dict[str, str]:
    """Create or update the pool, queues, deployments and automation (see the module doc); return their names."""
    require_api()
    ensure_pool(pool)
    shard_deployment(pool).apply()
    done = {"pool": pool, "shards": f"harmonize-shard/{pool}", "automation": AUTOMATION_NAME}
    if manifest:
        if not out:
            raise InputError("deploy: a manifest needs --out (where its outputs go)")
        deployment(manifest, out, cron=cron, work_pool=pool, **parameters).apply()
        done["manifest"] = f"harmonize-manifest/{MANIFEST_DEPLOYMENT}"
    ensure_zombie_automation(zombie_seconds)
    return done


def serve(manifest: str, out: str, cron: str = NIGHTLY, name: str = MANIFEST_DEPLOYMENT, **parameters: Any) -> None:
    """Serve the manifest flow from this process on ``cron`` until interrupted (``Flow.serve``; needs a server)."""
    from ..harmonize import harmonize_manifest

    require_api()
    harmonize_manifest.serve(name=name, cron=cron, parameters={"manifest": manifest, "out": out, **parameters},
                             tags=["harmonize"], limit=1)

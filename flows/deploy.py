"""Deployments on Prefect's own machinery: one work pool, two queues, two deployments, one automation.

``harmonize deploy --pool POOL [MANIFEST --out URI --cron CRON]`` creates, or brings up to date (every call is
idempotent), on the Prefect server that ``PREFECT_API_URL`` names:

- the **work pool** ``POOL`` (type ``process``) with two queues: ``gpu`` (shard runs; every GPU worker polls it, one
  shard at a time per GPU: ``harmonize worker``) and ``coordinator`` (manifest runs, which only wait and collect:
  limited to ``COORDINATOR_RUNS`` at once so they never pile up);
- the **shard deployment** ``harmonize-shard/POOL`` on queue ``gpu``, the one ``harmonize run --pool POOL`` and the
  nightly run fan items out to (``flows.fanout``); its runs send heartbeats every ``HEARTBEAT_SECONDS``;
- with a manifest: the **manifest deployment** ``harmonize-manifest/nightly`` on queue ``coordinator`` with a cron
  schedule, one run at a time, fanning out to ``POOL``;
- the **automation** ``AUTOMATION_NAME`` that marks a flow run Crashed when its heartbeats stop for
  ``zombie_seconds`` (Prefect's documented zombie-run detection): a killed worker's shard run ends Crashed, and the
  fan-out sends its missing items to another worker.

Code is located by module path (``flows.shard.harmonize_shard``): workers need the package installed, no source
storage. ``harmonize serve`` is the one-machine alternative: ``Flow.serve`` runs the schedule in its own process.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from harmonize_core.errors import InputError

NIGHTLY = "0 2 * * *"
DEFAULT_POOL = "harmonize-gpu"
SHARD_QUEUE, COORDINATOR_QUEUE = "gpu", "coordinator"
MANIFEST_DEPLOYMENT = "nightly"
COORDINATOR_RUNS = 4
HEARTBEAT_SECONDS = 30  # Prefect's minimum
ZOMBIE_SECONDS = 3 * HEARTBEAT_SECONDS  # Prefect's docs: at least three heartbeats of silence before a run is dead
AUTOMATION_NAME = "harmonize: mark silent runs crashed"


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

    from .shard import harmonize_shard

    return harmonize_shard.to_deployment(name=pool, work_pool_name=pool, work_queue_name=SHARD_QUEUE,
                                         entrypoint_type=EntrypointType.MODULE_PATH, tags=["gpu"],
                                         job_variables={"env": heartbeat_env()})


def deployment(manifest: str, out: str, cron: str = NIGHTLY, name: str = MANIFEST_DEPLOYMENT,
               work_pool: str | None = None, **parameters: Any):
    """Return the ``RunnerDeployment`` of the manifest flow on ``cron`` (one run at a time).

    With ``work_pool`` it runs on that pool's coordinator queue and fans its items out to the same pool.
    ``parameters`` are further flow parameters (``preset``, ``device``, ``backbone``, ``weights``, ...).
    """
    from prefect.deployments.runner import EntrypointType

    from .harmonize import harmonize_manifest

    values = {"manifest": manifest, "out": out, **parameters, **({"pool": work_pool} if work_pool else {})}
    extra = ({"work_pool_name": work_pool, "work_queue_name": COORDINATOR_QUEUE,
              "entrypoint_type": EntrypointType.MODULE_PATH} if work_pool else {})
    return harmonize_manifest.to_deployment(name=name, cron=cron, parameters=values, tags=["harmonize"],
                                            concurrency_limit=1, **extra)


def ensure_zombie_automation(seconds: float = ZOMBIE_SECONDS) -> Any:
    """Create or update the automation marking flow runs Crashed after ``seconds`` without a heartbeat."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    trigger = EventTrigger(
        after={"prefect.flow-run.heartbeat"},
        expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
        match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
        for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1, within=timedelta(seconds=seconds))
    action = ChangeFlowRunState(state=StateType.CRASHED,
                                message=f"no heartbeat for {seconds:.0f} s: the worker or its machine is gone")
    try:
        existing = Automation.read(name=AUTOMATION_NAME)
    except ValueError:
        return Automation(name=AUTOMATION_NAME, trigger=trigger, actions=[action]).create()
    existing.trigger, existing.actions, existing.enabled = trigger, [action], True
    existing.update()
    return existing


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
    from .harmonize import harmonize_manifest

    require_api()
    harmonize_manifest.serve(name=name, cron=cron, parameters={"manifest": manifest, "out": out, **parameters},
                             tags=["harmonize"], limit=1)

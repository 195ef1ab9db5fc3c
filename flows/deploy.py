"""Deployments of ``harmonize_manifest``: Prefect's own schedules, work pools and limits, nothing home-made.

One GPU machine: ``harmonize serve MANIFEST --out URI --cron "0 2 * * *"`` (``Flow.serve``: no work pool needed;
runs come from a Prefect server or Cloud, ``PREFECT_API_URL``). Many machines: ``deployment(...).apply()`` with a
``work_pool`` (``prefect work-pool create gpu-pool --type process``) and one ``prefect worker start --pool gpu-pool
--limit 1`` per GPU machine. Stage caches live in the output location, so every worker shares them. To bound GPU use
inside one run as well: ``prefect concurrency-limit create gpu 1`` (the pass1/pass2/reconstruct tasks carry the tag).
"""

from __future__ import annotations

from typing import Any

from .harmonize import harmonize_manifest

DEPLOYMENT_NAME = "nightly"
NIGHTLY = "0 2 * * *"


def deployment(manifest: str, out: str, cron: str = NIGHTLY, name: str = DEPLOYMENT_NAME,
               work_pool: str | None = None, **parameters: Any):
    """Return the ``RunnerDeployment`` of the manifest flow on ``cron`` (one run at a time, tagged ``gpu``).

    ``parameters`` are further flow parameters (``preset``, ``device``, ``backbone``, ``weights``, ...).
    """
    return harmonize_manifest.to_deployment(
        name=name, cron=cron, parameters={"manifest": manifest, "out": out, **parameters}, tags=["gpu"],
        concurrency_limit=1, work_pool_name=work_pool)


def serve(manifest: str, out: str, cron: str = NIGHTLY, name: str = DEPLOYMENT_NAME, **parameters: Any) -> None:
    """Serve the manifest flow from this process on ``cron`` until interrupted (``Flow.serve``)."""
    harmonize_manifest.serve(name=name, cron=cron, parameters={"manifest": manifest, "out": out, **parameters},
                             tags=["gpu"], limit=1)

"""The fleet's commands: ``serve`` (one machine, on a schedule), ``deploy`` (the pool, deployments and automation
on a Prefect server) and ``worker`` (this machine's workers, one per GPU); the machinery is ``flows.fleet``."""

from __future__ import annotations

import argparse
import os

from .common import EXIT_OK, flow_parameters, preflight, warn_local_paths
from .run import manifest_flow


def cmd_serve(args: argparse.Namespace) -> int:
    """``harmonize serve MANIFEST --out URI --cron CRON``: serve the flow on a schedule (needs a Prefect server)."""
    from ..fleet.deploy import require_api

    require_api()
    preflight(args.manifest, args)
    if args.pool:
        warn_local_paths(args.pool, args.manifest, args.out)
    if args.refresh:
        os.environ["PREFECT_TASKS_REFRESH_CACHE"] = "true"  # read when each task runs, in this serving process
    manifest_flow(args).serve(name=args.name, cron=args.cron, tags=["harmonize"], limit=1,
                              parameters={"manifest": args.manifest, "out": args.out, **flow_parameters(args)})
    return EXIT_OK


def cmd_deploy(args: argparse.Namespace) -> int:
    """``harmonize deploy --pool POOL [MANIFEST --out URI --cron CRON]``: create or update the fleet's deployments."""
    from ..fleet.deploy import deploy

    if args.manifest:
        if not args.out:
            from harmonize_core.errors import InputError

            raise InputError("deploy: a manifest needs --out (where its outputs go)")
        preflight(args.manifest, args)
        warn_local_paths(args.pool, args.manifest, args.out)
    parameters = {k: v for k, v in flow_parameters(args).items() if k != "pool"} if args.manifest else {}
    done = deploy(args.pool, args.manifest, args.out, cron=args.cron, zombie_seconds=args.zombie_seconds,
                  **parameters)
    print("\n".join(f"{kind}: {name}" for kind, name in done.items()))
    print(f"next: `harmonize worker --pool {args.pool}` on every GPU machine")
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    """``harmonize worker --pool POOL [--gpus 0,1 | --cpu N]``: one Prefect worker per GPU of this machine, pinned to
    it (or N CPU workers); exit 2 with one line when it would start no shard worker."""
    from ..fleet.workers import supervise, worker_gpus

    gpus = worker_gpus(args.gpus, args.cpu, args.coordinator_only)
    return supervise(args.pool, gpus, coordinator=args.coordinator or args.coordinator_only, cpu=args.cpu or 0)

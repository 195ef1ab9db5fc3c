"""The ``harmonize`` parser and entry point (``harmonize = flows.cli.main:main``); the commands are in the modules
beside this one (see ``flows.cli``)."""

from __future__ import annotations

import argparse
import os
import sys

from harmonize_core.errors import HarmonizeError

from ..fleet.settings import DEFAULT_POOL, NIGHTLY, ZOMBIE_SECONDS  # plain constants: `validate` stays free of Prefect
from ..text import one_line
from .common import EXIT_INTERRUPTED, EXIT_USAGE, absolute_arguments, add_run_arguments
from .demo import DEMO_BACKBONE, DEMO_OUT, DEMO_PRESET, DEMO_WEIGHTS, cmd_demo
from .fleet import cmd_deploy, cmd_serve, cmd_worker
from .one import add_config_arguments, add_one_parser
from .review import cmd_plan, cmd_report, cmd_validate
from .run import cmd_run

QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # offline machines: no telemetry attempts
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",  # Prefect's own console lines and tracebacks
}
PATH_COMMANDS = ("run", "plan", "deploy", "serve", "report", "demo")  # commands whose paths other processes read

# Prefect waits 20 s for its local ephemeral API to answer. Two `harmonize run` started at once on one machine share
# its SQLite database, and the second server waits for the first one's start-up behind a file lock: on a loaded
# machine that alone took over 20 s (measured at load 3 on 2 cores), and the second run died before its first item.
EPHEMERAL_STARTUP_SECONDS = "180"


def _configure_environment(verbose: bool) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", QUIET_ENV["PREFECT_SERVER_ANALYTICS_ENABLED"])
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_SECONDS)
    if not verbose:
        for name, value in QUIET_ENV.items():
            os.environ.setdefault(name, value)


def build_parser() -> argparse.ArgumentParser:
    """Return the ``harmonize`` argument parser: one, validate, run, plan, report, serve, deploy, worker, demo."""
    parser = argparse.ArgumentParser(prog="harmonize", description="Deep Painterly Harmonization, batch or one.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_one_parser(sub).set_defaults(verbose=True)

    validate = sub.add_parser("validate", help="check a manifest and list every problem (row and column)")
    validate.add_argument("manifest", help="CSV path or s3:// URI")
    validate.add_argument("--strict", action="store_true", help="warnings count as errors")
    add_config_arguments(validate)
    validate.set_defaults(handler=cmd_validate, verbose=True)

    run = sub.add_parser("run", help="harmonize every item of a manifest (cached, retried, summarised)")
    run.add_argument("manifest", help="CSV path or s3:// URI")
    run.add_argument("--out", required=True, help="output folder or s3:// prefix")
    run.add_argument("--only-failed", metavar="SUMMARY", help="rerun only the failed/invalid items of a summary.csv")
    add_run_arguments(run)
    run.set_defaults(handler=cmd_run)

    plan = sub.add_parser("plan", help="what a run would compute (cached/new/stale per row and stage, with the "
                          "reason) and about how long, without computing anything")
    plan.add_argument("manifest", help="CSV path or s3:// URI")
    plan.add_argument("--out", required=True, help="output folder or s3:// prefix the run would write to")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--all", action="store_true", help="also list rows that are fully cached")
    plan.add_argument("--strict", action="store_true", help="warnings count as errors")
    add_config_arguments(plan)
    plan.set_defaults(handler=cmd_plan, verbose=True)

    report = sub.add_parser("report", help="rebuild a run's HTML report from the output storage")
    report.add_argument("--out", required=True, help="output folder or s3:// prefix of the run")
    report.add_argument("--run", default=None, help="run id (default: the latest run with a summary)")
    report.set_defaults(handler=cmd_report, verbose=True)

    serve = sub.add_parser("serve", help="run a manifest on a cron schedule (Flow.serve; needs PREFECT_API_URL)")
    serve.add_argument("manifest", help="CSV path or s3:// URI")
    serve.add_argument("--out", required=True, help="output folder or s3:// prefix")
    serve.add_argument("--cron", default=NIGHTLY, help="schedule (default: every night at 02:00)")
    serve.add_argument("--name", default="nightly", help="deployment name (default nightly)")
    add_run_arguments(serve)
    serve.set_defaults(handler=cmd_serve, verbose=True)

    deploy = sub.add_parser("deploy", help="create or update the work pool, deployments and zombie-run automation "
                            "on the Prefect server (PREFECT_API_URL)")
    deploy.add_argument("manifest", nargs="?", default=None, help="also deploy this manifest on a cron schedule")
    deploy.add_argument("--out", default=None, help="output folder or s3:// prefix of the scheduled manifest")
    deploy.add_argument("--cron", default=NIGHTLY, help="schedule of the manifest (default: every night at 02:00)")
    deploy.add_argument("--zombie-seconds", type=float, default=ZOMBIE_SECONDS,
                        help=f"a run silent this long is marked Crashed and its items resubmitted "
                             f"(default {ZOMBIE_SECONDS})")
    add_run_arguments(deploy)
    deploy.set_defaults(handler=cmd_deploy, verbose=True, pool=DEFAULT_POOL)

    worker = sub.add_parser("worker", help="start this machine's Prefect workers: one per GPU, pinned to it")
    worker.add_argument("--pool", default=DEFAULT_POOL, help=f"work pool (default {DEFAULT_POOL})")
    worker.add_argument("--gpus", default="auto", help="GPU ids to serve, e.g. 0,1 (default: every visible GPU; "
                        "none visible is an error)")
    worker.add_argument("--cpu", type=int, default=None, metavar="N",
                        help="instead of GPU workers, start N workers that run shards on the CPU (a machine without "
                             "a GPU, tests; share the cores with OMP_NUM_THREADS)")
    worker.add_argument("--coordinator-only", action="store_true",
                        help="start no shard worker, only the coordinator queue's (e.g. on a machine without a GPU)")
    worker.add_argument("--no-coordinator", dest="coordinator", action="store_false",
                        help="do not also serve the pool's coordinator queue (scheduled manifest runs)")
    worker.set_defaults(handler=cmd_worker, verbose=True)

    demo = sub.add_parser("demo", help="make a small procedural dataset and harmonize it (quick preset)")
    demo.add_argument("--out", default=DEMO_OUT, help=f"folder for inputs and results (default ./{DEMO_OUT})")
    add_run_arguments(demo)
    demo.set_defaults(handler=cmd_demo, preset=DEMO_PRESET, backbone=DEMO_BACKBONE, weights=DEMO_WEIGHTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``harmonize`` command line and return its exit code (see ``flows.cli``)."""
    args = build_parser().parse_args(argv)
    _configure_environment(getattr(args, "verbose", False))
    if getattr(args, "handler", None) in (cmd_run, cmd_demo):  # Prefect's local API server dies with the run, even a killed one
        from ..lifeline import guard_children  # lazy: only the commands that start a local Prefect server

        guard_children()
    try:
        if args.command in PATH_COMMANDS:
            absolute_arguments(args)
        return args.handler(args)
    except HarmonizeError as exc:
        print(f"harmonize: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # a run records what finished and what did not before this reaches here
        out = getattr(args, "out", None)
        hint = f"; `harmonize report --out {out}` shows what finished and what did not" if out else ""
        print(f"harmonize: interrupted (Ctrl-C){hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


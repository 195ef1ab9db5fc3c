"""The ``harmonize`` command: ``one``, ``validate``, ``run``, ``report``, ``serve``, ``deploy``, ``worker``, ``demo``.

Exit codes: 0 success; 1 some items failed or some manifest rows are invalid; 2 a problem for the user to fix
(unreadable manifest, missing columns, bad flag value, weights unavailable), printed as one line without a
traceback; 130 interrupted by Ctrl-C (one line). ``run`` and ``demo`` use Prefect's local ephemeral API (no server
needed); Prefect's console logging is quiet unless ``--verbose``, and the pipeline's own progress lines (per item and
stage) are printed instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from .fleet.settings import DEFAULT_POOL, NIGHTLY, ZOMBIE_SECONDS  # plain constants: `validate` stays free of Prefect

QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # offline machines: no telemetry attempts
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",  # Prefect's own console lines and tracebacks
}
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)
PRINTED_PROBLEMS = 20  # failed/invalid/unfinished rows printed at the end of a run; the rest as a count
RUN_OVERRIDES = ("tau", "size", "pass1_iters", "pass2_iters", "max_seconds")  # run-level defaults rows may override
DEMO_OUT = "demo-out"
DEMO_PRESET, DEMO_BACKBONE, DEMO_WEIGHTS = "quick", "vgg16", "offline-vgg16"  # the demo's small settings, explicitly


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


class _ProgressFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return bool(getattr(record, "harmonize_progress", False))


def _show_progress() -> logging.Handler:
    """Print the pipeline's progress records (marked by ``tasks.stages.PROGRESS``) as plain lines on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ProgressFilter())
    handler.setFormatter(logging.Formatter("  %(message)s"))
    logging.getLogger("prefect").addHandler(handler)
    return handler


def _run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in RUN_OVERRIDES if getattr(args, name, None) is not None}


def cmd_validate(args: argparse.Namespace) -> int:
    """``harmonize validate MANIFEST``: print every problem as a table; exit 0 if all valid, 1 if not."""
    from manifests import RunSettings, check_run_settings, validate_manifest

    run = RunSettings(preset=args.preset, overrides=_run_overrides(args)).with_overrides(
        backbone=args.backbone, weights=args.weights)
    check_run_settings(run)
    report = validate_manifest(args.manifest, run, strict_warnings=args.strict)
    print(report.table())
    return EXIT_OK if report.ok else EXIT_FAILED


def flow_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """Return the manifest flow's parameters from the run flags (shared by run, serve and deploy)."""
    return {"preset": args.preset, "device": args.device, "backbone": args.backbone, "weights": args.weights,
            "overrides": _run_overrides(args), "strict": args.strict, "pool": args.pool,
            "shard_size": args.shard_size}


def manifest_flow(args: argparse.Namespace):
    """Return the manifest flow with ``--workers`` items in flight when given."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from .harmonize import harmonize_manifest

    if args.workers:
        return harmonize_manifest.with_options(task_runner=ThreadPoolTaskRunner(max_workers=args.workers))
    return harmonize_manifest


def run_flow(manifest: str, out: str, args: argparse.Namespace, only_ids: list[str] | None = None) -> int:
    """Run ``harmonize_manifest`` in-process and print the outcome; return the exit code."""
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    from harmonize_core.errors import HarmonizeError

    from .harmonize import ItemsFailed

    flow = manifest_flow(args)
    handler = None if args.verbose else _show_progress()
    started = time.perf_counter()
    try:
        with temporary_settings(updates={PREFECT_TASKS_REFRESH_CACHE: True} if args.refresh else {}):
            state = flow(manifest=manifest, out=out, only_ids=only_ids, return_state=True, **flow_parameters(args))
    finally:
        if handler is not None:
            logging.getLogger("prefect").removeHandler(handler)
    result = state.result(raise_on_failure=False)
    seconds = time.perf_counter() - started
    if isinstance(result, HarmonizeError):
        raise result
    if isinstance(result, ItemsFailed):
        broken = [row for row in result.rows if row["status"] != "completed"]
        for row in broken[:PRINTED_PROBLEMS]:
            print(f"{row['status']}: {row['id'] or 'row ' + str(row['row'])}: {row['error']}", file=sys.stderr)
        if len(broken) > PRINTED_PROBLEMS:
            print(f"... and {len(broken) - PRINTED_PROBLEMS:,} more (all in the summary and the report)", file=sys.stderr)
        print(f"{result} ({seconds:.0f} s); rerun them with --only-failed {result.summary_uri}", file=sys.stderr)
        if result.report_uri:
            print(f"report: {result.report_uri}", file=sys.stderr)
        return EXIT_FAILED
    if isinstance(result, BaseException):
        raise result
    cached = sum(1 for row in result["rows"] if row.get("cached"))
    print(f"{result['completed']} items completed ({cached} with cached stages) in {seconds:.0f} s; "
          f"outputs under {out}; summary: {result['summary']}")
    if result.get("report"):
        print(f"report: {result['report']}")
    return EXIT_OK


def preflight(manifest: str, args: argparse.Namespace) -> None:
    """Fail fast, before Prefect starts, on a missing manifest or invalid run-level flags (``InputError``)."""
    from harmonize_core.errors import InputError
    from manifests import RunSettings, check_run_settings
    from tasks import storage

    check_run_settings(RunSettings(preset=args.preset, overrides=_run_overrides(args)).with_overrides(
        backbone=args.backbone, weights=args.weights))
    if not storage.exists(manifest):
        raise InputError(f"{manifest}: manifest not found (give a CSV path or s3:// URI)")


PATH_COMMANDS = ("run", "plan", "deploy", "serve", "report", "demo")  # commands whose paths other processes read
PATH_ARGUMENTS = {"manifest": "manifest", "out": "--out", "only_failed": "--only-failed"}  # attribute: its name


def absolute_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Make every local path a command hands to another process absolute against the folder it was typed in
    (manifest, ``--out``, ``--only-failed``, a ``--weights`` file); return ``args``. ``InputError`` (one line) for a
    value that is neither a local path nor an ``s3://`` URI."""
    from .paths import absolute_location, absolute_weights

    for attribute, name in PATH_ARGUMENTS.items():
        if getattr(args, attribute, None):
            setattr(args, attribute, absolute_location(getattr(args, attribute), name))
    if getattr(args, "weights", None):
        args.weights = absolute_weights(args.weights)
    return args


def warn_local_paths(pool: str, manifest: str | None, out: str | None) -> None:
    """Print one warning line when a pooled run hands local paths to workers that may not share this disk."""
    from .paths import local_paths_warning

    warning = local_paths_warning(pool, {"manifest": manifest, "--out": out})
    if warning:
        print(f"harmonize: {warning}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    """``harmonize run MANIFEST --out URI``: run the flow; exit 0, or 1 when any item failed or was invalid."""
    if args.pool:
        from .fleet.deploy import require_api

        require_api()  # the pool's workers take shards from a Prefect server, not from this process
    preflight(args.manifest, args)
    if args.pool:
        warn_local_paths(args.pool, args.manifest, args.out)
    only_ids = None
    if args.only_failed:
        from .harmonize import manifest_ids
        from .summary import rerun_selection

        only_ids, gone = rerun_selection(args.only_failed, manifest_ids(args.manifest))
        if gone:
            more = len(gone) - PRINTED_PROBLEMS
            listed = ", ".join(gone[:PRINTED_PROBLEMS]) + (f" and {more} more" if more > 0 else "")
            print(f"warning: skipping {len(gone)} id(s) of {args.only_failed} no longer in {args.manifest}: {listed}",
                  file=sys.stderr)
        if not only_ids:
            print(f"nothing to rerun: {args.only_failed} lists no failed or invalid items")
            return EXIT_OK
    return run_flow(args.manifest, args.out, args, only_ids)


def cmd_demo(args: argparse.Namespace) -> int:
    """``harmonize demo``: make the procedural demo dataset in ``--out`` and run the flow on it.

    The demo manifest carries ``DEMO_OVERRIDES`` (size, iterations) in its cells; ``--size``/``--pass1-iters``/
    ``--pass2-iters``/``--tau`` given here are written into those cells instead of applying run-wide.
    """
    from harmonize_core.demo_data import DEMO_OVERRIDES, write_demo

    cells = {**DEMO_OVERRIDES, **{k: str(v) for k, v in _run_overrides(args).items()}}
    for name in RUN_OVERRIDES:
        setattr(args, name, None)
    out = Path(args.out).resolve()
    manifest = write_demo(out / "inputs", overrides=cells)
    settings = ", ".join(f"{k} {v}" for k, v in cells.items())
    print(f"demo inputs: {manifest} (3 procedural paintings, each with a pasted object and its mask)\n"
          f"demo settings: preset {args.preset}, {settings}, backbone {args.backbone}, weights {args.weights}")
    preflight(str(manifest), args)
    code = run_flow(str(manifest), str(out / "results"), args)
    from .report.build import latest_run, page_uri
    from .summary import SUMMARY_NAME

    run_id = latest_run(str(out / "results"))
    if run_id:
        from tasks import storage

        report = page_uri(storage.parent(storage.run_uri(str(out / "results"), run_id, SUMMARY_NAME)), 1)
        print(f"\nopen the report in a browser: {report}\n(each item's painting, composite, pass 1, final image, "
              f"loss curves and scores; the images themselves are in {out / 'results'}/<id>/)")
    return code


def cmd_serve(args: argparse.Namespace) -> int:
    """``harmonize serve MANIFEST --out URI --cron CRON``: serve the flow on a schedule (needs a Prefect server)."""
    from .fleet.deploy import require_api

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
    from .fleet.deploy import deploy

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
    from .fleet.workers import supervise, worker_gpus

    gpus = worker_gpus(args.gpus, args.cpu, args.coordinator_only)
    return supervise(args.pool, gpus, coordinator=args.coordinator or args.coordinator_only, cpu=args.cpu or 0)


def cmd_plan(args: argparse.Namespace) -> int:
    """``harmonize plan MANIFEST --out URI``: per row and stage cached/new/stale with the reason, and the total."""
    from manifests import RunSettings, validate_manifest
    from tasks.backbones import backbone_spec

    from .harmonize import check_report, input_index
    from .plan import plan_run

    preflight(args.manifest, args)
    run = RunSettings(preset=args.preset, overrides=_run_overrides(args)).with_overrides(
        backbone=args.backbone, weights=args.weights)
    report = validate_manifest(args.manifest, run, strict_warnings=args.strict, index=input_index(args.out))
    check_report(report, strict=False)
    weights = backbone_spec(report.items[0].config, "cpu")["digest"] if report.items else ""
    device_type = "cpu" if args.device == "cpu" else _device_type(args.device)
    plan = plan_run(report, args.out, weights, device_type)
    print(plan.to_json() if args.json else plan.table(everything=args.all))
    return EXIT_OK


def _device_type(device: str) -> str:
    from harmonize_core.network.vgg import resolve_device

    return resolve_device(device).type


def cmd_report(args: argparse.Namespace) -> int:
    """``harmonize report --out URI [--run ID]``: rebuild a run's report from storage; print its location."""
    from harmonize_core.errors import InputError

    from .report.build import build_report, latest_run
    from .summary import describe_end, rebuild_summary

    run_id = args.run or latest_run(args.out)
    if run_id is None:
        raise InputError(f"{args.out}: no run with a summary.csv under runs/ (give --run ID)")
    state, rows = rebuild_summary(args.out, run_id)  # finished, invalid, and planned rows that never finished
    ended = describe_end(state, rows)
    if ended:
        print(f"warning: {ended}", file=sys.stderr)
    print(build_report(args.out, run_id))
    return EXIT_OK


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    from harmonize_core.cli import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--strict", action="store_true", help="warnings count as errors, and any invalid row stops "
                        "the run before it starts")
    parser.add_argument("--workers", type=int, default=None, help="items in flight at once (default 4)")
    parser.add_argument("--pool", default=None, help="run the items on this GPU work pool's workers (see deploy, "
                        "worker) instead of in this process")
    parser.add_argument("--shard-size", type=int, default=1, help="items per shard sent to one worker (default 1)")
    parser.add_argument("--refresh", action="store_true", help="recompute every stage, ignoring (and replacing) "
                        "the cache records under OUT/.cache")
    parser.add_argument("-v", "--verbose", action="store_true", help="show Prefect's own logs")


def cmd_one(args: argparse.Namespace) -> int:
    """``harmonize one``: the core's single-item runner, with an ``s3://`` weights file downloaded first."""
    from harmonize_core.cli import run_one
    from tasks.backbones import local_weights

    if args.weights:
        args.weights = local_weights(args.weights)
    return run_one(args)


def build_parser() -> argparse.ArgumentParser:
    """Return the ``harmonize`` argument parser: one, validate, run, serve, demo."""
    from harmonize_core.cli import add_config_arguments, add_one_parser

    parser = argparse.ArgumentParser(prog="harmonize", description="Deep Painterly Harmonization, batch or one.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_one_parser(sub).set_defaults(handler=cmd_one, verbose=True)

    validate = sub.add_parser("validate", help="check a manifest and list every problem (row and column)")
    validate.add_argument("manifest", help="CSV path or s3:// URI")
    validate.add_argument("--strict", action="store_true", help="warnings count as errors")
    add_config_arguments(validate)
    validate.set_defaults(handler=cmd_validate, verbose=True)

    run = sub.add_parser("run", help="harmonize every item of a manifest (cached, retried, summarised)")
    run.add_argument("manifest", help="CSV path or s3:// URI")
    run.add_argument("--out", required=True, help="output folder or s3:// prefix")
    run.add_argument("--only-failed", metavar="SUMMARY", help="rerun only the failed/invalid items of a summary.csv")
    _add_run_arguments(run)
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
    _add_run_arguments(serve)
    serve.set_defaults(handler=cmd_serve, verbose=True)

    deploy = sub.add_parser("deploy", help="create or update the work pool, deployments and zombie-run automation "
                            "on the Prefect server (PREFECT_API_URL)")
    deploy.add_argument("manifest", nargs="?", default=None, help="also deploy this manifest on a cron schedule")
    deploy.add_argument("--out", default=None, help="output folder or s3:// prefix of the scheduled manifest")
    deploy.add_argument("--cron", default=NIGHTLY, help="schedule of the manifest (default: every night at 02:00)")
    deploy.add_argument("--zombie-seconds", type=float, default=ZOMBIE_SECONDS,
                        help=f"a run silent this long is marked Crashed and its items resubmitted "
                             f"(default {ZOMBIE_SECONDS})")
    _add_run_arguments(deploy)
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
    _add_run_arguments(demo)
    demo.set_defaults(handler=cmd_demo, preset=DEMO_PRESET, backbone=DEMO_BACKBONE, weights=DEMO_WEIGHTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``harmonize`` command line and return its exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    _configure_environment(getattr(args, "verbose", False))
    if getattr(args, "handler", None) in (cmd_run, cmd_demo):  # Prefect's local API server dies with the run, even a killed one
        from .lifeline import guard_children
        guard_children()
    from harmonize_core.errors import HarmonizeError

    from .text import one_line

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


if __name__ == "__main__":
    sys.exit(main())

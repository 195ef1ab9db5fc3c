"""``harmonize run MANIFEST --out URI``: the manifest flow in this process (Prefect's local ephemeral API), or its
items on a pool's workers (``--pool``); the pipeline's progress lines on stderr and the outcome in a few lines."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from .common import EXIT_FAILED, EXIT_OK, PRINTED_PROBLEMS, flow_parameters, preflight, warn_local_paths


class _ProgressFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return bool(getattr(record, "harmonize_progress", False))


def _show_progress() -> logging.Handler:
    """Print the pipeline's progress records (marked by ``tasks.stages.PROGRESS``) as plain lines on stderr; return
    the handler (to remove once the run ends)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ProgressFilter())
    handler.setFormatter(logging.Formatter("  %(message)s"))
    logging.getLogger("prefect").addHandler(handler)
    return handler


def manifest_flow(args: argparse.Namespace):
    """Return the manifest flow with ``--workers`` items in flight when given."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from ..harmonize import harmonize_manifest

    if args.workers:
        return harmonize_manifest.with_options(task_runner=ThreadPoolTaskRunner(max_workers=args.workers))
    return harmonize_manifest


def run_flow(manifest: str, out: str, args: argparse.Namespace, only_ids: list[str] | None = None) -> int:
    """Run ``harmonize_manifest`` in-process and print the outcome; return the exit code."""
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    from harmonize_core.errors import HarmonizeError

    from ..harmonize import ItemsFailed

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
        # invalid rows were listed (bounded) when the run validated the manifest: count them here, never again
        broken = [row for row in result.rows if row["status"] not in ("completed", "invalid")]
        invalid = sum(1 for row in result.rows if row["status"] == "invalid")
        for row in broken[:PRINTED_PROBLEMS]:
            print(f"{row['status']}: {row['id'] or 'row ' + str(row['row'])}: {row['error']}", file=sys.stderr)
        if len(broken) > PRINTED_PROBLEMS:
            print(f"... and {len(broken) - PRINTED_PROBLEMS:,} more (all in the summary and the report)", file=sys.stderr)
        if invalid:
            print(f"{invalid:,} invalid row(s), listed above when the manifest was validated; every one is in the "
                  "summary", file=sys.stderr)
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


def cmd_run(args: argparse.Namespace) -> int:
    """``harmonize run MANIFEST --out URI``: run the flow; exit 0, or 1 when any item failed or was invalid."""
    if args.pool:
        from ..fleet.deploy import require_api

        require_api()  # the pool's workers take shards from a Prefect server, not from this process
    preflight(args.manifest, args)
    if args.pool:
        warn_local_paths(args.pool, args.manifest, args.out)
    only_ids = None
    if args.only_failed:
        from ..harmonize import manifest_ids
        from ..summary import rerun_selection

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

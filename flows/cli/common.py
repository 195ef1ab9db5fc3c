"""What the ``harmonize`` subcommands share: exit codes, the run flags and the flow parameters they make, the
paths handed to other processes, and the checks made before Prefect starts."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .one import add_config_arguments

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)
PRINTED_PROBLEMS = 20  # failed/invalid/unfinished rows printed at the end of a run; the rest as a count
RUN_OVERRIDES = ("tau", "size", "pass1_iters", "pass2_iters", "max_seconds")  # run-level defaults rows may override
PATH_ARGUMENTS = {"manifest": "manifest", "out": "--out", "only_failed": "--only-failed"}  # attribute: its name


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Return the run-level overrides given as flags (``RUN_OVERRIDES`` that are set)."""
    return {name: getattr(args, name) for name in RUN_OVERRIDES if getattr(args, name, None) is not None}


def flow_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """Return the manifest flow's parameters from the run flags (shared by run, serve and deploy)."""
    return {"preset": args.preset, "device": args.device, "backbone": args.backbone, "weights": args.weights,
            "overrides": run_overrides(args), "strict": args.strict, "pool": args.pool,
            "shard_size": args.shard_size}


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the configuration flags and the flags of a manifest run (``--strict``, ``--workers``, ``--pool``, ...)."""
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


def preflight(manifest: str, args: argparse.Namespace) -> None:
    """Fail fast, before Prefect starts, on a missing manifest or invalid run-level flags (``InputError``)."""
    from harmonize_core.errors import InputError
    from manifests import RunSettings, check_run_settings
    from tasks import storage

    check_run_settings(RunSettings(preset=args.preset, overrides=run_overrides(args)).with_overrides(
        backbone=args.backbone, weights=args.weights))
    if not storage.exists(manifest):
        raise InputError(f"{manifest}: manifest not found (give a CSV path or s3:// URI)")


def absolute_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Make every local path a command hands to another process absolute against the folder it was typed in
    (manifest, ``--out``, ``--only-failed``, a ``--weights`` file); return ``args``. ``InputError`` (one line) for a
    value that is neither a local path nor an ``s3://`` URI."""
    from ..paths import absolute_location, absolute_weights

    for attribute, name in PATH_ARGUMENTS.items():
        if getattr(args, attribute, None):
            setattr(args, attribute, absolute_location(getattr(args, attribute), name))
    if getattr(args, "weights", None):
        args.weights = absolute_weights(args.weights)
    return args


def warn_local_paths(pool: str, manifest: str | None, out: str | None) -> None:
    """Print one warning line when a pooled run hands local paths to workers that may not share this disk."""
    from ..paths import local_paths_warning

    warning = local_paths_warning(pool, {"manifest": manifest, "--out": out})
    if warning:
        print(f"harmonize: {warning}", file=sys.stderr)

"""The commands that look and compute nothing: ``validate`` and ``plan`` before a run, ``report`` after one."""

from __future__ import annotations

import argparse
import sys

from .common import EXIT_FAILED, EXIT_OK, preflight, run_overrides


def cmd_validate(args: argparse.Namespace) -> int:
    """``harmonize validate MANIFEST``: print every problem as a table; exit 0 if all valid, 1 if not."""
    from manifests import RunSettings, check_run_settings, validate_manifest

    run = RunSettings(preset=args.preset, overrides=run_overrides(args)).with_overrides(
        backbone=args.backbone, weights=args.weights)
    check_run_settings(run)
    report = validate_manifest(args.manifest, run, strict_warnings=args.strict)
    print(report.table())
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_plan(args: argparse.Namespace) -> int:
    """``harmonize plan MANIFEST --out URI``: per row and stage cached/new/stale with the reason, and the total."""
    from manifests import RunSettings, validate_manifest
    from tasks.backbones import backbone_spec

    from ..harmonize import check_report, input_index
    from ..plan import plan_run

    preflight(args.manifest, args)
    run = RunSettings(preset=args.preset, overrides=run_overrides(args)).with_overrides(
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

    from ..report.build import build_report, latest_run
    from ..summary import describe_end, rebuild_summary

    run_id = args.run or latest_run(args.out)
    if run_id is None:
        raise InputError(f"{args.out}: no run with a summary.csv under runs/ (give --run ID)")
    state, rows = rebuild_summary(args.out, run_id)  # finished, invalid, and planned rows that never finished
    ended = describe_end(state, rows)
    if ended:
        print(f"warning: {ended}", file=sys.stderr)
    print(build_report(args.out, run_id))
    return EXIT_OK

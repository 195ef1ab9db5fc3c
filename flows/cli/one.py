"""``harmonize one``: run dilate, pass 1, blend, pass 2 and reconstruct on one item with no orchestration.

The core alone (``harmonize_core``): no Prefect, no cache, no storage but an ``s3://`` weights file downloaded
first (``tasks.backbones.local_weights``). The config flags are derived from ``config.OVERRIDE_FIELDS`` and the
dataclass fields' help text, so every subcommand, the flow parameters and the manifest columns share one set of
names and defaults (``add_config_arguments``, used by the other subcommands too).
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
from pathlib import Path

import torch

from harmonize_core.config import OVERRIDE_FIELDS, PRESETS, HarmonizeConfig, apply_overrides, override_targets, preset
from harmonize_core.estimate import describe_seconds, item_seconds, working_pixels
from harmonize_core.io import load_item, save_outputs
from harmonize_core.network.vgg import load_backbone, resolve_device
from harmonize_core.network.weights import describe_network
from harmonize_core.passes.stages import harmonize, prepare_inputs
from tasks.backbones import local_weights
from tasks.weights_fetch import fetch_weights

DEVICES = ("auto", "cpu", "cuda")


def _field_help(dotted: str) -> str:
    section_name, field_name = dotted.split(".")
    section = getattr(HarmonizeConfig(), section_name)
    meta = {f.name: f for f in dataclasses.fields(section)}[field_name]
    return f"{meta.metadata.get('help', '')} (paper default: {getattr(section, field_name)})"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--preset``, ``--device`` and one flag per documented override (``--size``, ``--tau``, ...)."""
    group = parser.add_argument_group("configuration")
    group.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                       help="paper: the authors' 700 px, 1000+1000 iterations (default); fast: 700 px with the "
                            "measured shorter schedule; quick: 256 px smoke runs")
    group.add_argument("--device", choices=DEVICES, default="auto", help="where to run (default: auto)")
    for flat in OVERRIDE_FIELDS:
        flag = "--" + flat.replace("_", "-")
        group.add_argument(flag, dest=flat, default=None, metavar=flat.split("_")[-1].upper(),
                           help=_field_help(override_targets(flat)[0]))


def config_from_args(args: argparse.Namespace) -> HarmonizeConfig:
    """Return the preset with the flags' overrides applied (flags left unset keep the preset's values)."""
    overrides = {flat: getattr(args, flat, None) for flat in OVERRIDE_FIELDS}
    return apply_overrides(preset(args.preset), overrides)


def add_one_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``one`` subcommand on an argparse subparsers object and return its parser."""
    parser = subparsers.add_parser(
        "one", help="harmonize one item from local files (no orchestration)",
        description="Run dilate, pass 1, blend, pass 2 and reconstruct on one item; write DIR/<stage>.png and "
                    "DIR/metrics.json.")
    parser.add_argument("--content", required=True, help="naive composite (the painting with the object pasted in)")
    parser.add_argument("--style", required=True, help="the painting")
    parser.add_argument("--mask", required=True, help="tight mask of the pasted object (white = object)")
    parser.add_argument("--out", required=True, help="output directory")
    add_config_arguments(parser)
    parser.set_defaults(handler=cmd_one)
    return parser


def _print_progress(event) -> None:
    print(f"  {event.summary()}", file=sys.stderr, flush=True)


def peak_memory() -> dict[str, float]:
    """Return peak memory so far: CPU RSS in MiB and, on CUDA, max allocated MiB."""
    peaks = {"cpu_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        peaks["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peaks


def run_one(args: argparse.Namespace) -> int:
    """Run ``harmonize one`` and return the exit code (0). ``HarmonizeError`` propagates to the caller."""
    config = config_from_args(args)
    started = time.perf_counter()
    content, style, mask = load_item(args.content, args.style, args.mask, config.masks.binarize_threshold)
    names = (f"content {args.content}", f"style {args.style}", f"mask {args.mask}")
    prepare_inputs(content, style, mask, config, names=names)  # fail fast on bad input, before loading weights
    device = resolve_device(args.device)
    fetch_weights(config.backbone.weights, config.backbone.name)  # the default network: downloaded once per machine
    backbone = load_backbone(config.backbone.name, config.backbone.weights, device=device,
                             ceil_mode=config.backbone.ceil_mode)
    print(f"harmonize one: {Path(args.content).name} at {config.sizing.size} px on {device}", file=sys.stderr)
    print(f"  {describe_network(config.backbone.name, config.backbone.weights)}", file=sys.stderr)
    seconds = item_seconds(config, pixels=working_pixels(config.sizing.size, tuple(content.shape[-2:])),
                           device_type=device.type)
    if seconds is not None:
        print(f"  estimated {describe_seconds(seconds)} on this CPU (the core's per-evaluation estimate)",
              file=sys.stderr)
    outputs = harmonize(content, style, mask, config, backbone=backbone, progress=_print_progress, names=names)
    extra = {"inputs": {"content": str(args.content), "style": str(args.style), "mask": str(args.mask)},
             "config": config.to_dict(), "device": str(device), "weights_digest": backbone.digest,
             "seconds_total": round(time.perf_counter() - started, 3), "peak_memory": peak_memory()}
    path = save_outputs(outputs, args.out, extra)
    stages = ", ".join(f"{s} {o.metrics['seconds']:.1f}s" for s, o in outputs.items())
    print(f"wrote {len(outputs)} stages to {args.out} ({stages}); metrics: {path}", file=sys.stderr)
    return 0


def cmd_one(args: argparse.Namespace) -> int:
    """``harmonize one``: ``run_one`` with an ``s3://`` weights file downloaded first; return the exit code (0)."""
    if args.weights:
        args.weights = local_weights(args.weights)
    return run_one(args)

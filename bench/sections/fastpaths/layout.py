"""channels_last vs NCHW: one pass-1 evaluation with the backbone in each layout, and their gradients' difference."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from harmonize_core.optimisation.objective import evaluate

from ... import timed, with_memory_format
from ...common import Options, Row, pass1_setup


def alternating_best(calls: dict[str, Callable[[], Any]], device: torch.device, repeats: int) -> dict[str, tuple]:
    """Time each call ``repeats`` times, alternating between them so that load drift hits both alike; return
    {name: (best seconds, last result)}."""
    best: dict[str, tuple] = {}
    for _ in range(max(1, repeats)):
        for name, fn in calls.items():
            seconds, result = timed(fn, device)
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, result)
    return best


def bench_channels_last(options: Options) -> list[Row]:
    """Return rows timing one pass-1 evaluation (VGG forward + segment-wise backward + losses) at ``fast_size``
    with the backbone in the default layout and in channels_last, and the relative gradient difference."""
    size = options.fast_size
    problem, x0, _ = pass1_setup(options, size, options.arch, options.weights)
    # Both layouts explicitly: load_backbone already builds channels_last nets.
    nchw = dataclasses.replace(problem, backbone=with_memory_format(problem.backbone, torch.contiguous_format))
    nhwc = dataclasses.replace(problem, backbone=with_memory_format(problem.backbone, torch.channels_last))
    best = alternating_best({"contiguous": lambda: evaluate(nchw, x0), "channels_last": lambda: evaluate(
        nhwc, x0)}, options.device, max(options.repeats, 3))
    ref, alt = best["contiguous"][1][2], best["channels_last"][1][2]
    rel = float((alt - ref).norm() / ref.norm().clamp_min(1e-30))
    speedup = best["contiguous"][0] / best["channels_last"][0]
    note = f"pass-1 evaluate, {options.arch} {options.weights}"
    return [Row("fastpaths", size, "channels_last", "contiguous_seconds", round(best["contiguous"][0], 4), "s",
                note=note),
            Row("fastpaths", size, "channels_last", "channels_last_seconds", round(best["channels_last"][0], 4), "s",
                note=note),
            Row("fastpaths", size, "channels_last", "speedup", round(speedup, 3), "x"),
            Row("fastpaths", size, "channels_last", "gradient_rel_diff", f"{rel:.3g}", "")]

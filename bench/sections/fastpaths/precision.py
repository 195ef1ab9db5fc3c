"""bf16 autocast vs fp32 on pass 1 and pass 2: loss curves, images and times, beside an fp32 control run."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

import torch

from harmonize_core.network.vgg import load_backbone
from harmonize_core.passes import stages
from tasks.weights_fetch import fetch_weights

from ... import timed, with_memory_format
from ...common import Options, Row, load_bench_item, md_cell, stage_config

NEGLIGIBLE_TERM = 1e-9  # a loss term below this fraction of the total is 0 for the precision comparison
PRECISION_METRICS = ("first_eval_worst_term_rel_diff", "total_rel_diff_median", "total_rel_diff_max",
                     "final_total_signed_rel_diff", "image_mean_abs_diff", "image_max_abs_diff", "image_psnr_db",
                     "seconds")
PRECISION_RUNS = {"bf16": "bf16 autocast", "control": "fp32 channels_last (control)",
                  "bf16_same_pass1": "bf16, pass 2 from the fp32 pass-1 image", "fp32": "fp32 (reference)"}



def _chain(options: Options, precision: str, layout: Callable[[Any], Any] = lambda b: b,
           pass1_from: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run pass 1 -> blend -> pass 2 at ``quality_size`` for ``quality_iterations`` per pass in ``precision``, with
    the backbone passed through ``layout`` (identity, or an NCHW copy for the control run). With
    ``pass1_from`` (another chain's result) pass 1 is not run: pass 2 starts from that chain's blended image."""
    size, n = options.quality_size, options.quality_iterations
    config = stage_config(size, n, options.ratio_arch, options.ratio_weights, **{"backbone.precision": precision})
    fetch_weights(options.ratio_weights, options.ratio_arch)  # the default network: fetched once per machine
    backbone = layout(load_backbone(options.ratio_arch, options.ratio_weights, device=options.device))
    item = load_bench_item(options.case, size)
    inputs = stages.prepare_inputs(item.content, item.style, item.mask, config)
    loose = stages.dilate(inputs, config).image
    if pass1_from is None:
        seconds1, out1 = timed(lambda: stages.pass1(inputs, loose, backbone, config), options.device)
        blended = stages.blend(out1.image, inputs, config).image
    else:
        seconds1, out1, blended = pass1_from["pass1_s"], pass1_from["pass1"], pass1_from["blended"]
    seconds2, out2 = timed(lambda: stages.pass2(inputs, loose, blended, backbone, config), options.device)
    return {"pass1": out1, "pass2": out2, "pass1_s": seconds1, "pass2_s": seconds2, "blended": blended,
            "content": inputs.content, "loose": loose > 0}


def _curve_diffs(reference: dict, other: dict) -> tuple[dict[str, float], str]:
    """Return (figures, worst term) comparing two runs' loss curves (one record per evaluation): the largest
    relative difference of any term at the first evaluation (same image, so the precision alone; the total can
    hide it behind an exactly equal TV term; terms that are 0 there in fp32, the content loss at its own
    target, are left out), the median and maximum relative difference of the total over the curve, and the
    signed relative difference of the final total."""
    total0 = abs(reference["curves"]["total"][0][1])
    first = {name: abs(other["curves"][name][0][1] - curve[0][1]) / abs(curve[0][1])
             for name, curve in reference["curves"].items()
             if name != "total" and abs(curve[0][1]) > NEGLIGIBLE_TERM * total0}
    worst = max(first, key=first.__getitem__)
    ref, alt = reference["curves"]["total"], other["curves"]["total"]
    rel = [abs(b[1] - a[1]) / max(abs(a[1]), 1e-30) for a, b in zip(ref, alt, strict=True)]
    signed_final = (alt[-1][1] - ref[-1][1]) / max(abs(ref[-1][1]), 1e-30)
    return {"first_eval_worst_term_rel_diff": first[worst], "total_rel_diff_median": statistics.median(rel),
            "total_rel_diff_max": max(rel), "final_total_signed_rel_diff": signed_final}, worst


def _image_diffs(reference: torch.Tensor, other: torch.Tensor, region: torch.Tensor) -> dict[str, float]:
    """Mean and max absolute difference in 8-bit levels and PSNR (dB) between two [0, 1] images (1, 3, H, W) over
    the pixels of ``region`` (1, 1, H, W) bool: the loose mask, the only pixels the passes may change."""
    inside = region.expand_as(reference)
    diff = (reference - other).abs()[inside] * 255.0
    mse = float(((reference - other)[inside] ** 2).mean())
    return {"image_mean_abs_diff": float(diff.mean()), "image_max_abs_diff": float(diff.max()),
            "image_psnr_db": 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")}


def bench_bf16(options: Options) -> list[Row]:
    """Return rows comparing bf16 autocast with fp32 on pass 1 and pass 2 (loss curves, images, times), beside a
    control: fp32 with an NCHW copy of the (channels_last) backbone, whose gradients differ only by summation order
    (~1e-9), which shows how far a few L-BFGS iterations alone drift apart from a tiny perturbation."""
    size, n = options.quality_size, options.quality_iterations
    runs = {"fp32": _chain(options, "fp32")}
    runs["bf16"] = _chain(options, "bf16")
    runs["control"] = _chain(options, "fp32", lambda b: with_memory_format(b, torch.contiguous_format))
    runs["bf16_same_pass1"] = _chain(options, "bf16", pass1_from=runs["fp32"])
    rows = []
    note = f"{options.ratio_arch} {options.ratio_weights}, {n} iterations per pass, loose-mask pixels"
    region = runs["fp32"]["loose"]
    for stage in ("pass1", "pass2"):
        reference = runs["fp32"][stage]
        moved = _image_diffs(runs["fp32"]["content"], reference.image, region)["image_mean_abs_diff"]
        rows.append(Row("fastpaths", size, f"{stage}_fp32", "change_from_composite", round(moved, 3),
                        "8-bit levels", note="mean abs(fp32 output - composite) in the loose mask"))
        for run in ("bf16", "control", "bf16_same_pass1")[:2 if stage == "pass1" else 3]:
            other = runs[run][stage]
            curves, worst = _curve_diffs(reference.metrics, other.metrics)
            figures = {**curves, **_image_diffs(reference.image, other.image, region)}
            rows += [Row("fastpaths", size, f"{stage}_{run}", metric, _round(value), _unit(metric),
                         note=f"{note}; worst first-eval term {worst}") for metric, value in figures.items()]
        rows += [Row("fastpaths", size, f"{stage}_{run}", "seconds", round(runs[run][f"{stage}_s"], 3), "s",
                     note=f"{n} iterations incl. setup") for run in ("fp32", "bf16", "control")]
    return rows


def _round(value: float) -> float | str:
    return f"{value:.3g}" if abs(value) < 1e-2 else round(value, 4)


def _unit(metric: str) -> str:
    return "dB" if metric.endswith("_db") else "8-bit levels" if metric.startswith("image_") else ""




def precision_table(rows: list[Row]) -> str:
    """Return the bf16-vs-fp32 rows as one line per (pass, run) against the fp32 reference."""
    value = {(r.stage, r.metric): r.value for r in rows}
    lines = ["| pass | run vs fp32 | " + " | ".join(m.replace("_", " ") for m in PRECISION_METRICS) + " |",
             "|---|---|" + "---|" * len(PRECISION_METRICS)]
    for stage in ("pass1", "pass2"):
        for run, label in PRECISION_RUNS.items():
            if (f"{stage}_{run}", "seconds") in value or (f"{stage}_{run}", "image_psnr_db") in value:
                cells = [md_cell(value.get((f"{stage}_{run}", m), "")) for m in PRECISION_METRICS]
                lines.append(f"| {stage} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

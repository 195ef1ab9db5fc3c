"""``python -m bench``: stage timings and peak memory per size, naive-vs-ours ratios, fast-path experiments.

Sections (``--sections``, default ``ratios,stages,quick``; ``all`` adds ``fastpaths``):

* ``stages``: every stage of one item (dilate, pass 1 with its per-layer matching, blend, pass 2 with its relu4_1
  matching and refinement, reconstruct) at each ``--sizes``, the paper preset with ``--iterations`` L-BFGS
  iterations per pass; the per-iteration time is measured on the iterations after the first evaluation and the
  paper's 1000-iteration totals are extrapolated from it (rows say ``measured`` or ``extrapolated``).
* ``ratios``: the naive forms beside ours on real VGG features of a reference case at ``--ratio-size``: full-matrix
  vs chunked masked matching (relu3_1), the O(n x bins) histogram remap vs sort + searchsorted (relu1_1),
  unmasked vs masked matching (relu3_1), and pass 2's full vs chunked relu4_1 match; each row checks that both
  give the same result and prints PASS/FAIL against the issue's bars.
* ``quick``: one item end to end under the shipped ``quick`` preset (the issue's "CPU item in <= 3 min"), measured.
* ``fastpaths``: channels_last, bf16 autocast quality, torch.compile, and L-BFGS history as a memory knob.
* ``evalcost``: one evaluation of each pass against a plain VGG forward + backward to the pass's deepest tap, at
  ``--evalcost-sizes`` (140, 700), for VGG16 offline weights and VGG19 random weights; PASS/FAIL against the 1.25x
  bar of issue 10 (``bench.evalcost``).

Outputs under ``--out``: ``stages.csv``, ``ratios.csv``, ``fastpaths.csv`` (long rows), ``evalcost.csv``, ``machine.json`` and
``report.md`` (the short tables). docs/performance.md quotes a run of this.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.reference_cases import CASES_DIR
from harmonize_core import pass1 as pass1_module
from harmonize_core import pass2 as pass2_module
from harmonize_core import stages
from harmonize_core.config import HarmonizeConfig, preset
from harmonize_core.errors import WeightsUnavailableError
from harmonize_core.histogram import histogram_target, remap_histogram, remap_histogram_naive
from harmonize_core.io import load_item
from harmonize_core.masks import dilate_mask
from harmonize_core.matching import (
    normalized_sum_match,
    normalized_sum_match_full,
    patch_cosine_match,
    patch_cosine_match_full,
)
from harmonize_core.objective import evaluate
from harmonize_core.pass1 import layer_masks, pass1_problem
from harmonize_core.pass2 import HIST_MASK_THRESHOLD, consistent_used_sets
from harmonize_core.vgg import load_backbone, resolve_device

from . import (
    MIB,
    PeakMemory,
    best_of,
    current_memory,
    machine_info,
    synchronize,
    timed,
    with_memory_format,
)
from .evalcost import EVAL_NETS, EVAL_SIZES, EvalCost, evalcost_table, run_evalcost

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CASE = "8"  # 564x700, tight mask 14% of the image: above the cases' median (6%), so masking gains less
PROCEDURAL = "procedural"
PROCEDURAL_SEED = 5
CPU_SIZES = (128, 256, 512, 700)
GPU_SIZES = (*CPU_SIZES, 1440)  # the "1440 px possible" figure; the reference cannot run it at all
PAPER = preset("paper")
PAPER_ITERATIONS = PAPER.pass1.iterations  # 1000 in both passes (neural_gram.lua, gen_all.py L37)
DEFAULT_ITERATIONS = {"cpu": 5, "cuda": 20}
STAGE_WEIGHTS = "random:0"  # timing does not depend on the weights' values; VGG19 ImageNet cannot be fetched here
RATIO_ARCH, RATIO_WEIGHTS = "vgg16", "offline-vgg16"  # real features for the ratio table (installable offline)
MATCH_LAYER, HIST_LAYER = "relu3_1", "relu1_1"
BARS = {"match_full_vs_chunked": 5.0, "hist_naive_vs_sorted": 10.0}  # issue 5 "Must show"
FAST_SIZE, QUALITY_SIZE, QUALITY_ITERATIONS = 512, 256, 10
SMALL_HISTORY = 10  # the L-BFGS history compared with the default 100
NEGLIGIBLE_TERM = 1e-9  # a loss term below this fraction of the total is 0 for the precision comparison
SECTIONS = ("ratios", "stages", "quick", "fastpaths", "evalcost")
FLOAT_DIGITS = 5


# ------------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Row:
    """One measured or extrapolated figure: ``basis`` is ``measured`` or ``extrapolated``."""

    section: str
    size: int
    stage: str
    metric: str
    value: float | str
    unit: str
    basis: str = "measured"
    note: str = ""


@dataclass(frozen=True)
class Ratio:
    """One naive-vs-ours comparison; ``ratio`` = naive seconds / ours seconds, ``bar`` the issue's minimum or None."""

    name: str
    what: str
    layer: str
    size: int
    positions: str
    naive_s: float
    ours_s: float
    check: str
    equal: bool
    naive_peak_mb: float
    ours_peak_mb: float
    bar: float | None = None

    @property
    def ratio(self) -> float:
        """Naive seconds over ours."""
        return self.naive_s / max(self.ours_s, 1e-12)

    @property
    def verdict(self) -> str:
        """PASS when both results are equal and the ratio meets the bar (when there is one), else FAIL."""
        return "PASS" if self.equal and (self.bar is None or self.ratio >= self.bar) else "FAIL"


@dataclass
class Options:
    """Parsed command line."""

    sizes: tuple[int, ...]
    device: torch.device
    iterations: int
    out: Path
    sections: tuple[str, ...]
    case: str
    arch: str
    weights: str
    ratio_size: int
    ratio_arch: str
    ratio_weights: str
    repeats: int
    fast_size: int
    quality_size: int
    quality_iterations: int
    compile: bool
    evalcost_sizes: tuple[int, ...] = EVAL_SIZES
    evalcost_nets: tuple[tuple[str, str], ...] = EVAL_NETS
    evalcost_repeats: int | None = None
    loads: dict[str, list[float]] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Item:
    """The benchmark item at its stored size: content/style (1, 3, H, W) in [0, 1], mask (1, 1, H, W) in {0, 1}."""

    content: torch.Tensor
    style: torch.Tensor
    mask: torch.Tensor
    source: str


def load_bench_item(case: str, long_side: int) -> Item:
    """Return reference case ``case`` (a copy of the authors' ``data/`` folder) when present, else a procedural demo item whose long
    side is ``min(long_side, 700)`` (the cases are 700 px; larger working sizes are upsampled by the pipeline)."""
    if case != PROCEDURAL and (CASES_DIR / f"{case}_naive.jpg").is_file():
        content, style, mask = load_item(CASES_DIR / f"{case}_naive.jpg", CASES_DIR / f"{case}_target.jpg",
                                          CASES_DIR / f"{case}_c_mask.jpg")
        return Item(content, style, mask, f"dph-case {case}")
    from harmonize_core.demo_data import make_item

    width = min(long_side, PAPER.sizing.size)
    demo = make_item(PROCEDURAL_SEED, height=round(width * 3 / 4), width=width)

    def tensor(array) -> torch.Tensor:
        data = torch.from_numpy(array.copy()).float() / 255.0
        return data.permute(2, 0, 1)[None] if data.dim() == 3 else data[None, None]

    return Item(tensor(demo.composite), tensor(demo.painting), (tensor(demo.mask) > 0.5).float(),
                f"procedural (demo_data seed {PROCEDURAL_SEED})")


def stage_config(size: int, iterations: int, arch: str, weights: str, **extra: Any) -> HarmonizeConfig:
    """Return the paper preset at ``size`` with ``iterations`` per pass, a loss record every evaluation, and pass 1's
    convergence tests off, so that every run does exactly ``iterations`` iterations."""
    return PAPER.replace(**{
        "sizing.size": size, "pass1.iterations": iterations, "pass2.iterations": iterations,
        "pass1.log_every": 1, "pass2.log_every": 1, "pass1.tolerance_grad": -1.0, "pass1.tolerance_change": -1.0,
        "backbone.name": arch, "backbone.weights": weights, **extra})


@contextlib.contextmanager
def timing_calls(module: Any, names: tuple[str, ...], device: torch.device) -> Iterator[dict[str, list[float]]]:
    """Within the block, time every call of ``module.<name>`` (synchronised) into ``{name: [seconds, ...]}``.

    The stages call their helpers by module-global name, so wrapping the attribute times each call in place
    without touching the core.
    """
    sink: dict[str, list[float]] = {name: [] for name in names}
    originals = {name: getattr(module, name) for name in names}

    def wrap(name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            seconds, result = timed(lambda: fn(*args, **kwargs), device)
            sink[name].append(seconds)
            return result
        return inner

    for name, fn in originals.items():
        setattr(module, name, wrap(name, fn))
    try:
        yield sink
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def steady_iteration_seconds(elapsed: list[float]) -> float:
    """Return the median seconds per iteration from the progress events' elapsed times (one event per evaluation):
    the gaps between consecutive events leave out the first evaluation and its one-off warm-up, and the median
    keeps a gap stretched by another process on a shared machine from setting the rate."""
    gaps = [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)]
    return statistics.median(gaps) if gaps else float("nan")


def extrapolate_total(measured_s: float, per_iteration_s: float, iterations: int,
                      target: int = PAPER_ITERATIONS) -> float:
    """Return the stage seconds at ``target`` iterations: the measured run plus the missing iterations at the
    steady per-iteration rate (setup, matching and the first evaluation are in the measured part)."""
    return measured_s + (target - iterations) * per_iteration_s


def lbfgs_history_bytes(numel: int, history: int, iterations: int, element_size: int = 4) -> int:
    """Return the bytes of torch LBFGS's curvature pairs after ``iterations`` steps: two vectors (``old_dirs``,
    ``old_stps``) of ``numel`` elements per kept pair; every step after the first adds one, at most ``history``."""
    return 2 * min(history, max(0, iterations - 1)) * numel * element_size


# ----------------------------------------------------------------------------------------------- stages
def run_pass_timed(kind: str, call: Callable[[Callable], stages.StageOutput], device: torch.device,
                   patch: tuple[Any, tuple[str, ...]]) -> tuple[float, stages.StageOutput, PeakMemory, list[float],
                                                                 dict[str, list[float]]]:
    """Run one optimisation stage with its progress times and helper timings recorded.

    Returns (stage seconds, output, peak memory meter, elapsed seconds at each evaluation, helper call times).
    """
    elapsed: list[float] = []

    def progress(event: stages.Iterate) -> None:
        if event.stage == kind:
            elapsed.append(event.elapsed)

    with timing_calls(patch[0], patch[1], device) as calls, PeakMemory(device) as memory:
        seconds, output = timed(lambda: call(progress), device)
    return seconds, output, memory, elapsed, calls


def bench_size(item: Item, size: int, options: Options, backbone: Any) -> list[Row]:
    """Return the stage rows of one item at working ``size`` (one item run end to end through the five stages)."""
    device, n = options.device, options.iterations
    config = stage_config(size, n, options.arch, options.weights)
    inputs = stages.prepare_inputs(item.content, item.style, item.mask, config)
    height, width = inputs.content.shape[-2:]
    rows: list[Row] = []

    def add(stage: str, metric: str, value: float, unit: str = "s", basis: str = "measured", note: str = "") -> None:
        rows.append(Row("stages", size, stage, metric, round(value, FLOAT_DIGITS), unit, basis, note))

    add("item", "pixels", height * width, "px", note=f"{height}x{width} {item.source}")
    add("item", "baseline_mb", current_memory(device) / MIB, "MB",
        note="process RSS" if device.type == "cpu" else "CUDA memory allocated")

    with PeakMemory(device) as memory:
        seconds, dilated = timed(lambda: stages.dilate(inputs, config), device)
    add("dilate", "seconds", seconds)
    add("dilate", "peak_mb", memory.peak_bytes / MIB, "MB")
    loose = dilated.image

    seconds, out1, memory, elapsed, calls = run_pass_timed(
        "pass1", lambda progress: stages.pass1(inputs, loose, backbone, config, progress), device,
        (pass1_module, ("patch_cosine_match",)))
    for layer, match_s in zip(config.pass1.style_layers, calls["patch_cosine_match"], strict=False):
        add("pass1", f"match_{layer}", match_s)
    _optimisation_rows(add, "pass1", seconds, out1, memory, elapsed, n, config.pass1.history_size, inputs)

    seconds, blended = timed(lambda: stages.blend(out1.image, inputs, config), device)
    add("blend", "seconds", seconds)

    seconds, out2, memory, elapsed, calls = run_pass_timed(
        "pass2", lambda progress: stages.pass2(inputs, loose, blended.image, backbone, config, progress), device,
        (pass2_module, ("normalized_sum_match", "refine_mapping")))
    add("pass2", f"match_{config.pass2.reference_layer}", sum(calls["normalized_sum_match"]))
    add("pass2", "refine", sum(calls["refine_mapping"]))
    _optimisation_rows(add, "pass2", seconds, out2, memory, elapsed, n, config.pass2.history_size, inputs)

    with PeakMemory(device) as memory:
        seconds, final = timed(lambda: stages.reconstruct(out2.image, inputs, config), device)
    add("reconstruct", "seconds", seconds)
    for step, step_s in final.metrics.get("seconds_detail", {}).items():
        add("reconstruct", f"{step}_seconds", step_s)
    add("reconstruct", "peak_mb", memory.peak_bytes / MIB, "MB")
    return rows + _end_to_end_rows(rows, size)


def _optimisation_rows(add: Callable, stage: str, seconds: float, output: stages.StageOutput, memory: PeakMemory,
                       elapsed: list[float], iterations: int, history: int, inputs: stages.ItemInputs) -> None:
    per_iteration = steady_iteration_seconds(elapsed)
    optimise_s = output.metrics.get("seconds_optimise", 0.0)
    add(stage, "setup_seconds", seconds - optimise_s, note="features, matching, targets (all but L-BFGS)")
    add(stage, "per_iteration", per_iteration, note=f"median of {max(0, len(elapsed) - 1)} evaluations after the first")
    add(stage, "seconds", seconds, note=f"{iterations} iterations")
    add(stage, f"seconds_{PAPER_ITERATIONS}it", extrapolate_total(seconds, per_iteration, iterations),
        basis="extrapolated", note=f"measured run + {PAPER_ITERATIONS - iterations} x per_iteration")
    add(stage, "peak_mb", memory.peak_bytes / MIB, "MB", note=f"{iterations} iterations")
    numel = inputs.content.numel()
    growth = lbfgs_history_bytes(numel, history, PAPER_ITERATIONS) - lbfgs_history_bytes(numel, history, iterations)
    add(stage, f"peak_mb_{PAPER_ITERATIONS}it", (memory.peak_bytes + growth) / MIB, "MB", basis="extrapolated",
        note=f"+ L-BFGS history growth to {history} pairs of {numel}-element vectors")


def _end_to_end_rows(rows: list[Row], size: int) -> list[Row]:
    value = {(r.stage, r.metric): float(r.value) for r in rows}
    measured = sum(value[(s, "seconds")] for s in stages.STAGES)
    paper = measured + sum(value[(s, f"seconds_{PAPER_ITERATIONS}it")] - value[(s, "seconds")]
                           for s in ("pass1", "pass2"))
    peak = max(float(r.value) for r in rows if r.metric == "peak_mb")
    peak_paper = max(float(r.value) for r in rows if r.metric in ("peak_mb", f"peak_mb_{PAPER_ITERATIONS}it"))
    return [Row("stages", size, "end_to_end", "seconds", round(measured, FLOAT_DIGITS), "s"),
            Row("stages", size, "end_to_end", f"seconds_{PAPER_ITERATIONS}it", round(paper, FLOAT_DIGITS), "s",
                "extrapolated", "paper preset: 1000 iterations per pass"),
            Row("stages", size, "end_to_end", "peak_mb", round(peak, 1), "MB"),
            Row("stages", size, "end_to_end", f"peak_mb_{PAPER_ITERATIONS}it", round(peak_paper, 1), "MB",
                "extrapolated")]


def run_stages(options: Options) -> list[Row]:
    """Return the stage rows at every size (printing each size's line as it finishes)."""
    backbone = load_backbone(options.arch, options.weights, device=options.device)
    item = load_bench_item(options.case, max(options.sizes))
    rows: list[Row] = []
    for size in options.sizes:
        size_rows = bench_size(item, size, options, backbone)
        rows += size_rows
        print(stage_line(size_rows), flush=True)
    return rows


def run_quick_preset(options: Options) -> list[Row]:
    """Return rows of one item end to end under the ``quick`` preset as it ships (CPU demos: 256 px, 60 + 60
    iterations, VGG16 offline weights): every stage measured, nothing extrapolated."""
    config = preset("quick")
    try:
        backbone = load_backbone(config.backbone.name, config.backbone.weights, device=options.device)
    except WeightsUnavailableError:
        config = config.replace(**{"backbone.weights": STAGE_WEIGHTS})
        backbone = load_backbone(config.backbone.name, STAGE_WEIGHTS, device=options.device)
    item = load_bench_item(options.case, config.sizing.size)
    size, rows = config.sizing.size, []
    with PeakMemory(options.device) as memory:
        total_s, outputs = timed(lambda: stages.harmonize(item.content, item.style, item.mask, config,
                                                          backbone=backbone), options.device)
    note = (f"{config.backbone.name} {config.backbone.weights}, {config.pass1.iterations} + "
            f"{config.pass2.iterations} iterations, {item.source}")
    for stage, output in outputs.items():
        rows.append(Row("quick", size, "quick_preset", f"{stage}_seconds", round(output.metrics["seconds"], 3), "s",
                        note=note if not rows else ""))
    rows += [Row("quick", size, "quick_preset", "seconds", round(total_s, 3), "s", note="end to end, measured"),
             Row("quick", size, "quick_preset", "peak_mb", round(memory.peak_bytes / MIB, 1), "MB")]
    print("  quick preset: " + ", ".join(f"{r.metric} {r.value}" for r in rows), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------- ratios
@dataclass
class RatioInputs:
    """Real features of the bench item at one size: content/style maps (C, H, W) per layer, query masks (H, W)."""

    content: dict[str, torch.Tensor]
    style: dict[str, torch.Tensor]
    query: dict[str, torch.Tensor]
    used: dict[str, torch.Tensor]
    source: str


def ratio_inputs(item: Item, size: int, backbone: Any, config: HarmonizeConfig) -> RatioInputs:
    """Return the features and masks the ratio rows use: as pass 1 queries relu3_1 (loose mask > 0), as pass 2
    remaps relu1_1 (loose mask > 0.1) against the painting's used set U from the relu4_1 mapping (with the
    composite standing in for the pass-1 image), and the relu4_1 maps of pass 2's match."""
    inputs = stages.prepare_inputs(item.content, item.style, item.mask, config)
    device, pre = backbone.device, backbone.preprocessing
    layers = sorted({MATCH_LAYER, HIST_LAYER, config.pass2.reference_layer})
    with torch.no_grad():
        content = backbone.extract(pre.preprocess(inputs.content.to(device)), layers)
        style = backbone.extract(pre.preprocess(inputs.style.to(device)), layers)
    loose = dilate_mask(inputs.tight, config.masks, size=size).to(device)
    masks = layer_masks(loose, backbone, layers, config.backbone.ceil_mode)
    reference = config.pass2.reference_layer
    used, _ = consistent_used_sets(content[reference], style, inputs.tight.to(device), inputs.style.to(device),
                                   config)
    query = {MATCH_LAYER: masks[MATCH_LAYER][0, 0] > 0, HIST_LAYER: masks[HIST_LAYER][0, 0] > HIST_MASK_THRESHOLD,
             reference: masks[reference][0, 0] > 0}
    return RatioInputs({k: v[0] for k, v in content.items()}, {k: v[0] for k, v in style.items()}, query,
                       {k: v[0, 0] > 0 for k, v in used.items()}, item.source)


def measure_call(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any, float]:
    """Return (best seconds of ``repeats``, result, peak extra memory in MB over the first call)."""
    with PeakMemory(device) as memory:
        first_s, result = timed(fn, device)
    best_s = first_s
    if repeats > 1:
        best_s = min(first_s, best_of(fn, device, repeats - 1)[0])
    return best_s, result, memory.extra_bytes / MIB


def _positions(query: torch.Tensor) -> str:
    return f"{int(query.sum())}/{query.numel()}"


def run_ratios(options: Options) -> list[Ratio]:
    """Return the naive-vs-ours rows at ``options.ratio_size`` (printing each as it finishes)."""
    device, size, repeats = options.device, options.ratio_size, options.repeats
    config = stage_config(size, 0, options.ratio_arch, options.ratio_weights)
    try:
        backbone = load_backbone(options.ratio_arch, options.ratio_weights, device=device)
    except WeightsUnavailableError as exc:
        print(f"ratio weights {options.ratio_weights} unavailable ({exc}); using {STAGE_WEIGHTS}", flush=True)
        backbone = load_backbone(options.ratio_arch, STAGE_WEIGHTS, device=device)
    data = ratio_inputs(load_bench_item(options.case, size), size, backbone, config)
    budget = config.pass1.match_budget_mb * MIB
    rows: list[Ratio] = []

    c3, s3, q3 = data.content[MATCH_LAYER], data.style[MATCH_LAYER], data.query[MATCH_LAYER]
    ours_s, ours, ours_mb = measure_call(lambda: patch_cosine_match(c3, s3, q3, budget_bytes=budget), device, repeats)
    naive_s, naive, naive_mb = measure_call(lambda: patch_cosine_match_full(c3, s3, q3), device, 1)
    rows.append(_emit(Ratio("match_full_vs_chunked", "pass-1 match: full matrix (all positions) vs chunked masked",
                            MATCH_LAYER, size, _positions(q3), naive_s, ours_s, "identical indices",
                            torch.equal(naive, ours), naive_mb, ours_mb, BARS["match_full_vs_chunked"])))

    everywhere = torch.ones_like(q3)
    all_s, unmasked, all_mb = measure_call(
        lambda: patch_cosine_match(c3, s3, everywhere, budget_bytes=budget), device, 1)
    rows.append(_emit(Ratio("match_unmasked_vs_masked", "pass-1 match, chunked: all positions vs masked only",
                            MATCH_LAYER, size, _positions(q3), all_s, ours_s, "identical indices on the mask",
                            torch.equal(unmasked[q3], ours[q3]), all_mb, ours_mb)))

    c1, s1, q1 = data.content[HIST_LAYER], data.style[HIST_LAYER], data.query[HIST_LAYER]
    target = histogram_target(s1, data.used[HIST_LAYER], int(q1.sum()), bins=config.pass2.hist_bins)
    ours_s, ours, ours_mb = measure_call(lambda: remap_histogram(c1, q1, target), device, max(repeats, 3))
    naive_s, naive, naive_mb = measure_call(lambda: remap_histogram_naive(c1, q1, target), device, 1)
    diff = float((naive - ours).abs().max())
    rows.append(_emit(Ratio("hist_naive_vs_sorted", "histogram remap: O(n x bins) vs sort + linear bin count",
                            HIST_LAYER, size, _positions(q1), naive_s, ours_s, f"max abs diff {diff:.3g}",
                            diff == 0.0, naive_mb, ours_mb, BARS["hist_naive_vs_sorted"])))

    reference = config.pass2.reference_layer
    c4, s4, q4 = data.content[reference], data.style[reference], data.query[reference]
    ours_s, ours, ours_mb = measure_call(lambda: normalized_sum_match(c4, s4, q4, budget_bytes=budget), device,
                                         repeats)
    naive_s, naive, naive_mb = measure_call(lambda: normalized_sum_match_full(c4, s4, q4), device, 1)
    rows.append(_emit(Ratio("nsum_full_vs_chunked", "pass-2 match: full matrix vs chunked masked", reference,
                            size, _positions(q4), naive_s, ours_s, "identical indices", torch.equal(naive, ours),
                            naive_mb, ours_mb)))
    return rows


def _emit(ratio: Ratio) -> Ratio:
    print(f"  {ratio.name}: naive {ratio.naive_s:.3f} s, ours {ratio.ours_s:.3f} s, {ratio.ratio:.1f}x, "
          f"{ratio.check} -> {ratio.verdict}", flush=True)
    return ratio


# -------------------------------------------------------------------------------------------- fast paths
def _pass1_setup(options: Options, size: int, arch: str, weights: str, **extra: Any) -> tuple[Any, torch.Tensor,
                                                                                                 HarmonizeConfig]:
    config = stage_config(size, options.iterations, arch, weights, **extra)
    backbone = load_backbone(arch, weights, device=options.device)
    item = load_bench_item(options.case, size)
    inputs = stages.prepare_inputs(item.content, item.style, item.mask, config)
    loose = stages.dilate(inputs, config).image
    problem, x0, _ = pass1_problem(inputs.content, inputs.style, loose, backbone, config)
    return problem, x0, config


def _alternating_best(calls: dict[str, Callable[[], Any]], device: torch.device, repeats: int) -> dict[str, tuple]:
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
    problem, x0, _ = _pass1_setup(options, size, options.arch, options.weights)
    # Both layouts explicitly: load_backbone already builds channels_last nets.
    nchw = dataclasses.replace(problem, backbone=with_memory_format(problem.backbone, torch.contiguous_format))
    nhwc = dataclasses.replace(problem, backbone=with_memory_format(problem.backbone, torch.channels_last))
    best = _alternating_best({"contiguous": lambda: evaluate(nchw, x0), "channels_last": lambda: evaluate(
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


def _chain(options: Options, precision: str, layout: Callable[[Any], Any] = lambda b: b,
           pass1_from: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run pass 1 -> blend -> pass 2 at ``quality_size`` for ``quality_iterations`` per pass in ``precision``, with
    the backbone passed through ``layout`` (identity, or an NCHW copy for the control run). With
    ``pass1_from`` (another chain's result) pass 1 is not run: pass 2 starts from that chain's blended image."""
    size, n = options.quality_size, options.quality_iterations
    config = stage_config(size, n, options.ratio_arch, options.ratio_weights, **{"backbone.precision": precision})
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


class CompiledSegments(torch.nn.Module):
    """A ``VGGFeatures`` whose runs of layers between consecutive requested taps are each ``torch.compile``d.

    Compiling the whole stack makes the taps outputs of one graph node, and the segment-wise backward of
    ``objective.evaluate`` (``autograd.grad`` from one tap to the tap below) then fails; per-segment graphs keep
    every tap a node of its own.
    """

    def __init__(self, net: Any) -> None:
        super().__init__()
        self.net = net
        self.segments: dict[tuple[int, int], Callable] = {}

    def forward(self, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        """Return ``{name: tap}`` as ``VGGFeatures.forward`` does, through compiled segments."""
        from harmonize_core.vgg import check_tap

        wanted = {name: check_tap(self.net.arch, name) for name in names}
        outputs, start = {}, 0
        for stop in sorted(set(wanted.values())):
            if (start, stop) not in self.segments:
                self.segments[(start, stop)] = torch.compile(self.net.layers[start:stop + 1])
            x = outputs[stop] = self.segments[(start, stop)](x)
            start = stop + 1
        return {name: outputs[index] for name, index in wanted.items()}


def _compile_trial(problem: Any, x0: torch.Tensor, wrap: Callable[[Any], Any], options: Options) -> dict[str, Any]:
    """Time the first (compiling) and the steady pass-1 evaluation with the backbone's net wrapped by ``wrap``;
    an exception is returned as ``{"error": text}`` (a toolchain or tracing failure is a finding, not a crash)."""
    from torch._functorch import config as functorch_config

    backbone = dataclasses.replace(problem.backbone, net=wrap(problem.backbone.net))
    compiled = dataclasses.replace(problem, backbone=backbone)
    # evaluate() backpropagates segment by segment with retain_graph, which donated buffers forbid
    with functorch_config.patch(donated_buffer=False):
        try:
            first_s, _ = timed(lambda: evaluate(compiled, x0), options.device)
            steady_s, result = best_of(lambda: evaluate(compiled, x0), options.device, max(options.repeats, 3))
        except Exception as exc:  # noqa: BLE001
            return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:160]}
    return {"first_s": first_s, "steady_s": steady_s, "grad": result[2]}


def bench_compile(options: Options) -> list[Row]:
    """Return rows for ``torch.compile`` of the feature extractor on the pass-1 evaluation at ``fast_size``: the
    whole stack (one graph) and per-segment graphs, each with its first (compiling) call and steady time."""
    size = options.fast_size
    problem, x0, _ = _pass1_setup(options, size, options.arch, options.weights)
    eager_s, eager = best_of(lambda: evaluate(problem, x0), options.device, max(options.repeats, 3))
    rows = [Row("fastpaths", size, "compile", "eager_seconds", round(eager_s, 4), "s", note="pass-1 evaluate")]
    for name, wrap in (("whole", torch.compile), ("segments", CompiledSegments)):
        trial = _compile_trial(problem, x0, wrap, options)
        if "error" in trial:
            rows.append(Row("fastpaths", size, f"compile_{name}", "error", trial["error"], ""))
            continue
        rel = float((trial["grad"] - eager[2]).norm() / eager[2].norm().clamp_min(1e-30))
        rows += [Row("fastpaths", size, f"compile_{name}", "first_call_seconds", round(trial["first_s"], 2), "s",
                     note="includes compilation"),
                 Row("fastpaths", size, f"compile_{name}", "compiled_seconds", round(trial["steady_s"], 4), "s"),
                 Row("fastpaths", size, f"compile_{name}", "speedup", round(eager_s / trial["steady_s"], 3), "x"),
                 Row("fastpaths", size, f"compile_{name}", "gradient_rel_diff", f"{rel:.3g}", "")]
    return rows


def lbfgs_state_peak(shape: tuple[int, ...], history: int, iterations: int, device: torch.device,
                     learning_rate: float) -> tuple[int, int, int]:
    """Run torch LBFGS (as ``objective.optimise`` builds it, no line search) on a cheap ill-conditioned quadratic
    over a tensor of ``shape`` for ``iterations`` steps; return (peak extra bytes during the steps, bytes of the
    kept curvature pairs, pairs kept). The network's memory does not depend on the history, so this isolates
    the knob. On the CPU, run it in a fresh process (``isolated``) so that freed heap pages do not hide growth."""
    generator = torch.Generator().manual_seed(0)
    numel = math.prod(shape)
    curvature = torch.logspace(-3, 0, numel)[torch.randperm(numel, generator=generator)].view(shape).to(device)
    x = torch.randn(shape, generator=generator).to(device).requires_grad_(True)
    optimizer = torch.optim.LBFGS([x], lr=learning_rate, max_iter=iterations, max_eval=2 * iterations,
                                  history_size=history, tolerance_grad=-1.0, tolerance_change=-1.0)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = 0.5 * (curvature * x * x).sum()
        loss.backward()
        return loss

    with PeakMemory(device) as memory:
        optimizer.step(closure)
    state = optimizer.state[optimizer._params[0]]
    kept = sum(t.numel() * t.element_size() for t in (*state["old_dirs"], *state["old_stps"]))
    return memory.extra_bytes, kept, len(state["old_dirs"])


def isolated(fn: Callable, *args: Any) -> Any:
    """Return ``fn(*args)`` computed in a fresh spawned process (``fn`` must be importable)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def bench_history(options: Options, stage_rows: list[Row]) -> list[Row]:
    """Return rows for L-BFGS history 100 vs 10 at ``fast_size``: the optimiser's own peak over ``history + 10``
    steps on the pass-1 image shape (a fresh process each), and pass 1's peak at 1000 iterations extrapolated from
    the measured pass-1 peak (this run's stage rows at that size, when the stages section ran)."""
    size = options.fast_size
    config = stage_config(size, options.iterations, options.arch, options.weights)
    item = load_bench_item(options.case, size)
    shape = tuple(stages.prepare_inputs(item.content, item.style, item.mask, config).content.shape)
    numel = math.prod(shape)
    measured_peak = next((float(r.value) for r in stage_rows
                          if r.size == size and r.stage == "pass1" and r.metric == "peak_mb"), None)
    rows = []
    for history in (config.pass1.history_size, SMALL_HISTORY):
        steps = history + SMALL_HISTORY
        extra, kept, pairs = isolated(lbfgs_state_peak, shape, history, steps, options.device,
                                      config.pass1.learning_rate)
        stage = f"lbfgs_history_{history}"
        rows += [Row("fastpaths", size, stage, "optimizer_peak_extra_mb", round(extra / MIB, 1), "MB",
                     note=f"{steps} steps on a {numel}-element image, {pairs} pairs kept, fresh process"),
                 Row("fastpaths", size, stage, "history_mb", round(kept / MIB, 1), "MB")]
        if measured_peak is not None:
            growth = lbfgs_history_bytes(numel, history, PAPER_ITERATIONS) - lbfgs_history_bytes(
                numel, config.pass1.history_size, options.iterations)
            rows.append(Row("fastpaths", size, stage, f"pass1_peak_mb_{PAPER_ITERATIONS}it",
                            round(measured_peak + growth / MIB, 1), "MB", "extrapolated",
                            f"measured pass-1 peak ({options.iterations} it) + history growth"))
    return rows


def run_fastpaths(options: Options, stage_rows: list[Row]) -> list[Row]:
    """Return the fast-path rows: channels_last, bf16 quality, torch.compile (unless disabled), L-BFGS history."""
    rows: list[Row] = []
    experiments: list[tuple[str, Callable[[], list[Row]]]] = [
        ("channels_last", lambda: bench_channels_last(options)), ("bf16", lambda: bench_bf16(options)),
        ("history", lambda: bench_history(options, stage_rows))]
    if options.compile:
        experiments.insert(2, ("compile", lambda: bench_compile(options)))
    for name, experiment in experiments:
        started = time.perf_counter()
        new = experiment()
        rows += new
        print(f"  {name} ({time.perf_counter() - started:.0f} s): "
              + ", ".join(f"{r.stage}.{r.metric}={r.value}" for r in new), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------- output
STAGE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("baseline MB", "item", "baseline_mb"),
    ("dilate s", "dilate", "seconds"),
    ("pass-1 match relu3_1 / 4_1 / 5_1 s", "pass1", "match_*"),
    ("pass 1 s/it", "pass1", "per_iteration"),
    ("pass 1 measured s (N it)", "pass1", "seconds"),
    ("pass 1 1000 it s (extrap.)", "pass1", f"seconds_{PAPER_ITERATIONS}it"),
    ("pass-2 match + refine s", "pass2", "match_refine"),
    ("pass 2 s/it", "pass2", "per_iteration"),
    ("pass 2 1000 it s (extrap.)", "pass2", f"seconds_{PAPER_ITERATIONS}it"),
    ("reconstruct s", "reconstruct", "seconds"),
    ("end to end measured s", "end_to_end", "seconds"),
    ("end to end paper s (extrap.)", "end_to_end", f"seconds_{PAPER_ITERATIONS}it"),
    ("peak MB (N it)", "end_to_end", "peak_mb"),
    ("peak MB 1000 it (extrap.)", "end_to_end", f"peak_mb_{PAPER_ITERATIONS}it"),
)


def _fmt(value: float) -> str:
    value = float(value)
    if value >= 100:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def stage_cells(rows: list[Row]) -> list[str]:
    """Return the markdown cells of one size's stage rows, in ``STAGE_COLUMNS`` order."""
    value = {(r.stage, r.metric): r.value for r in rows}
    cells = []
    for _, stage, metric in STAGE_COLUMNS:
        if metric == "match_*":
            cells.append(" / ".join(_fmt(v) for (s, m), v in value.items() if s == stage and m.startswith("match_")))
        elif metric == "match_refine":
            cells.append(_fmt(sum(float(v) for (s, m), v in value.items()
                                  if s == stage and (m.startswith("match_") or m == "refine"))))
        else:
            cells.append(_fmt(value[(stage, metric)]))
    return cells


def stage_line(rows: list[Row]) -> str:
    """Return a one-line summary of one size's stage rows for the console."""
    size = rows[0].size
    return f"  {size} px: " + ", ".join(f"{name} {cell}" for (name, _, _), cell in zip(STAGE_COLUMNS,
                                                                                        stage_cells(rows), strict=False))


def stage_table(rows: list[Row]) -> str:
    """Return the markdown stage table: one line per size (rows of the ``stages`` section only)."""
    rows = [r for r in rows if r.section == "stages"]
    sizes = sorted({r.size for r in rows})
    header = "| size | H x W | " + " | ".join(name for name, _, _ in STAGE_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(STAGE_COLUMNS) + 2)]
    for size in sizes:
        size_rows = [r for r in rows if r.size == size]
        shape = next(r.note.split()[0] for r in size_rows if r.metric == "pixels")
        lines.append(f"| {size} | {shape} | " + " | ".join(stage_cells(size_rows)) + " |")
    return "\n".join(lines)


def ratio_table(ratios: list[Ratio]) -> str:
    """Return the markdown ratio table (naive vs ours), one line per comparison."""
    lines = ["| comparison | layer @ size | masked / all positions | naive s | ours s | ratio | bar | result check "
             "| peak extra MB naive / ours | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in ratios:
        bar = f">= {r.bar:g}x" if r.bar is not None else "-"
        lines.append(f"| {r.what} | {r.layer} @ {r.size} px | {r.positions} | {r.naive_s:.3f} | {r.ours_s:.3f} | "
                     f"{r.ratio:.1f}x | {bar} | {r.check}: {'equal' if r.equal else 'DIFFERENT'} | "
                     f"{r.naive_peak_mb:.0f} / {r.ours_peak_mb:.0f} | {r.verdict} |")
    return "\n".join(lines)


PRECISION_METRICS = ("first_eval_worst_term_rel_diff", "total_rel_diff_median", "total_rel_diff_max",
                     "final_total_signed_rel_diff", "image_mean_abs_diff", "image_max_abs_diff", "image_psnr_db",
                     "seconds")
PRECISION_RUNS = {"bf16": "bf16 autocast", "control": "fp32 channels_last (control)",
                  "bf16_same_pass1": "bf16, pass 2 from the fp32 pass-1 image", "fp32": "fp32 (reference)"}


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|")


def rows_table(rows: list[Row]) -> str:
    """Return a markdown table of long rows; a note is shown once per experiment."""
    lines = ["| experiment | size | metric | value | unit | basis | note |", "|---|---|---|---|---|---|---|"]
    seen: set[str] = set()
    for r in rows:
        note = r.note if r.stage not in seen else ""
        seen.add(r.stage)
        lines.append("| " + " | ".join(_cell(v) for v in (r.stage, r.size, r.metric, r.value, r.unit, r.basis, note))
                     + " |")
    return "\n".join(lines)


def precision_table(rows: list[Row]) -> str:
    """Return the bf16-vs-fp32 rows as one line per (pass, run) against the fp32 reference."""
    value = {(r.stage, r.metric): r.value for r in rows}
    lines = ["| pass | run vs fp32 | " + " | ".join(m.replace("_", " ") for m in PRECISION_METRICS) + " |",
             "|---|---|" + "---|" * len(PRECISION_METRICS)]
    for stage in ("pass1", "pass2"):
        for run, label in PRECISION_RUNS.items():
            if (f"{stage}_{run}", "seconds") in value or (f"{stage}_{run}", "image_psnr_db") in value:
                cells = [_cell(value.get((f"{stage}_{run}", m), "")) for m in PRECISION_METRICS]
                lines.append(f"| {stage} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    """Write ``records`` (same keys) as CSV with a header; nothing when empty."""
    if not records:
        return
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def ratio_record(ratio: Ratio) -> dict[str, Any]:
    """Return a ratio row as a flat CSV record (with ``ratio`` and ``verdict``)."""
    return {**dataclasses.asdict(ratio), "ratio": round(ratio.ratio, 3), "verdict": ratio.verdict}


def report(options: Options, info: dict, stage_rows: list[Row], ratios: list[Ratio], fast_rows: list[Row],
           evalcost: list[EvalCost] | None = None) -> str:
    """Return the markdown report of one run."""
    parts = [f"# Benchmark run on {info['device']}", "",
             f"Machine: {info['cpu_model']}, {info['cpu_count']} cores, torch {info['torch']} with "
             f"{info['torch_threads']} threads" + (f", GPU {info['gpu']}" if "gpu" in info else "") + ".",
             "Load average (1/5/15 min) at each section start and end: "
             + "; ".join(f"{k} {v}" for k, v in options.loads.items()) + "."]
    if any(r.section == "stages" for r in stage_rows):
        parts += ["", f"## Stages ({options.arch}, weights {options.weights}, {options.iterations} iterations "
                      f"per pass measured; 1000-iteration figures extrapolated)", "", stage_table(stage_rows)]
        if options.device.type == "cpu":
            parts += ["", "GPU rows: not measured (no GPU in this run)."]
    quick = [r for r in stage_rows if r.section == "quick"]
    if quick:
        parts += ["", f"## Quick preset, end to end at {quick[0].size} px (measured; {quick[0].note})", "",
                  ", ".join(f"{r.metric} {r.value} {r.unit}" for r in quick) + "."]
    if ratios:
        parts += ["", f"## Naive vs ours ({ratios[0].size} px, {options.ratio_arch} {options.ratio_weights})", "",
                  ratio_table(ratios)]
    if fast_rows:
        precision = [r for r in fast_rows if r.stage.startswith(("pass1_", "pass2_"))]
        others = [r for r in fast_rows if r not in precision]
        parts += ["", "## Fast paths", "", rows_table(others)]
        if precision:
            change = "; ".join(f"{r.stage.split('_')[0]} {r.value}" for r in precision
                               if r.metric == "change_from_composite")
            note = next(r.note for r in precision if r.stage.endswith("_bf16")).split(";")[0]
            parts += ["", f"Precision at {precision[0].size} px ({note}); mean change of the fp32 result from the "
                          f"composite in the loose mask, 8-bit levels: {change}.", "", precision_table(precision)]
    if evalcost:
        parts += ["", "## One evaluation vs a plain forward + backward (median of alternating runs)", "",
                  evalcost_table(evalcost)]
    return "\n".join(parts) + "\n"


def write_outputs(options: Options, info: dict, stage_rows: list[Row], ratios: list[Ratio],
                  fast_rows: list[Row], evalcost: list[EvalCost] | None = None) -> Path:
    """Write the CSVs, machine.json and report.md under ``options.out``; return the report's path."""
    options.out.mkdir(parents=True, exist_ok=True)
    write_csv(options.out / "stages.csv", [dataclasses.asdict(r) for r in stage_rows])
    write_csv(options.out / "ratios.csv", [ratio_record(r) for r in ratios])
    write_csv(options.out / "fastpaths.csv", [dataclasses.asdict(r) for r in fast_rows])
    write_csv(options.out / "evalcost.csv", [{**dataclasses.asdict(r), "verdict": r.verdict} for r in evalcost or []])
    (options.out / "machine.json").write_text(json.dumps({**info, "loads": options.loads}, indent=2) + "\n")
    path = options.out / "report.md"
    path.write_text(report(options, info, stage_rows, ratios, fast_rows, evalcost))
    return path


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> Options:
    """Return the ``Options`` of a command line (see ``python -m bench --help``)."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", help="comma-separated working sizes (default 128,256,512,700; +1440 on CUDA)")
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto (default)")
    parser.add_argument("--iterations", type=int, help="L-BFGS iterations measured per pass (default 5 CPU, 20 CUDA)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="output folder")
    parser.add_argument("--sections", default="ratios,stages,quick", help=f"comma list of {', '.join(SECTIONS)} or all")
    parser.add_argument("--case", default=DEFAULT_CASE, help="dph-case number, or 'procedural' (default 8)")
    parser.add_argument("--arch", default=PAPER.backbone.name, help="backbone of the stage timings (vgg19)")
    parser.add_argument("--weights", default=STAGE_WEIGHTS, help="weights of the stage timings (random:0)")
    parser.add_argument("--ratio-size", type=int, default=PAPER.sizing.size, help="size of the ratio rows (700)")
    parser.add_argument("--ratio-arch", default=RATIO_ARCH, help="backbone of the ratio and bf16 rows (vgg16)")
    parser.add_argument("--ratio-weights", default=RATIO_WEIGHTS, help="real weights for those (offline-vgg16)")
    parser.add_argument("--repeats", type=int, default=2, help="timings of our forms; best kept (naive: once)")
    parser.add_argument("--fast-size", type=int, default=FAST_SIZE, help="size of channels_last/compile/history")
    parser.add_argument("--quality-size", type=int, default=QUALITY_SIZE, help="size of the bf16 comparison")
    parser.add_argument("--quality-iterations", type=int, default=QUALITY_ITERATIONS, help="iterations per pass")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile experiment")
    parser.add_argument("--evalcost-sizes", default=",".join(map(str, EVAL_SIZES)),
                        help="sizes of the evaluation-cost rows (140,700)")
    parser.add_argument("--evalcost-nets", default=",".join(f"{a}:{w}" for a, w in EVAL_NETS),
                        help="arch:weights pairs of the evaluation-cost rows (vgg16:offline-vgg16,vgg19:random:0)")
    parser.add_argument("--evalcost-repeats", type=int, help="alternating pairs per row (default 7, 3 from 400 px)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sections = SECTIONS if args.sections == "all" else tuple(s.strip() for s in args.sections.split(",") if s)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {', '.join(sorted(unknown))}: choose from {', '.join(SECTIONS)} or all")
    default_sizes = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else default_sizes
    iterations = args.iterations if args.iterations is not None else DEFAULT_ITERATIONS[device.type]
    if iterations < 1:
        parser.error("--iterations must be >= 1 (the per-iteration time needs one)")
    nets = tuple(tuple(pair.split(":", 1)) for pair in args.evalcost_nets.split(",") if pair)
    if any(len(net) != 2 for net in nets):
        parser.error("--evalcost-nets takes arch:weights pairs, e.g. vgg16:offline-vgg16,vgg19:random:0")
    return Options(sizes, device, iterations, args.out, sections, args.case, args.arch, args.weights,
                   args.ratio_size, args.ratio_arch, args.ratio_weights, args.repeats, args.fast_size,
                   args.quality_size, args.quality_iterations, not args.no_compile,
                   tuple(int(s) for s in args.evalcost_sizes.split(",") if s), nets, args.evalcost_repeats)


def _section(options: Options, name: str, fn: Callable[[], Any]) -> Any:
    """Run one section, recording the load average before and after and printing its wall time."""
    started, load_before = time.perf_counter(), round(os.getloadavg()[0], 2)
    print(f"== {name} (load {load_before})", flush=True)
    result = fn()
    options.loads[name] = [load_before, round(os.getloadavg()[0], 2)]
    print(f"== {name} done in {time.perf_counter() - started:.0f} s", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the chosen sections, write the outputs, print the tables; return 0, or 1 if a ratio or evalcost row
    FAILs."""
    options = parse_args(argv)
    info = machine_info(options.device)
    print(f"bench on {info['device']}: {info['cpu_model']}, {info['torch_threads']} torch threads, "
          f"load {info['loadavg']}", flush=True)
    started = time.perf_counter()
    # Ratios first: the naive forms' timings are then taken in a fresh process, not after the stage sweep.
    ratios = _section(options, "ratios", lambda: run_ratios(options)) if "ratios" in options.sections else []
    stage_rows = _section(options, "stages", lambda: run_stages(options)) if "stages" in options.sections else []
    if "quick" in options.sections:
        stage_rows += _section(options, "quick", lambda: run_quick_preset(options))
    fast_rows = (_section(options, "fastpaths", lambda: run_fastpaths(options, stage_rows))
                 if "fastpaths" in options.sections else [])
    evalcost = (_section(options, "evalcost", lambda: run_evalcost(
        lambda size: load_bench_item(options.case, size), lambda size, arch, weights: stage_config(size, 0, arch, weights),
        options.evalcost_sizes, options.evalcost_nets, options.device, options.evalcost_repeats))
        if "evalcost" in options.sections else [])
    info["total_seconds"] = round(time.perf_counter() - started, 1)
    info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    path = write_outputs(options, info, stage_rows, ratios, fast_rows, evalcost)
    if any(r.section == "stages" for r in stage_rows):
        print("\n" + stage_table(stage_rows))
    if ratios:
        print("\n" + ratio_table(ratios))
    if evalcost:
        print("\n" + evalcost_table(evalcost))
    print(f"\nwrote {path} ({info['total_seconds']} s in all)")
    synchronize(options.device)
    return 1 if any(r.verdict == "FAIL" for r in [*ratios, *evalcost]) else 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``stages`` section: one item through dilate, pass 1, blend, pass 2 and reconstruct at each size.

The paper preset with ``--iterations`` L-BFGS iterations per pass; the per-iteration time is the median gap between
the progress events after the first evaluation, and the paper's 1000-iteration totals are extrapolated from it (rows
say ``measured`` or ``extrapolated``). The matching inside each pass is timed through the core's phase hook
(``bench.phases``): pass 1's match per layer, pass 2's relu4_1 match and its refinement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from harmonize_core.network.vgg import load_backbone
from harmonize_core.passes import stages
from tasks.weights_fetch import fetch_weights

from .. import MIB, PeakMemory, current_memory, timed
from ..common import (
    FLOAT_DIGITS,
    PAPER_ITERATIONS,
    Item,
    Options,
    Row,
    extrapolate_total,
    lbfgs_history_bytes,
    load_bench_item,
    stage_config,
    steady_iteration_seconds,
)
from ..phases import PhaseTimes, recording_phases

PASS_PHASES = {"pass1": ("pass1.match",), "pass2": ("pass2.match", "pass2.refine")}  # harmonize_core.timing


def run_pass_timed(kind: str, call: Callable[[Callable], stages.StageOutput],
                   device: torch.device) -> tuple[float, stages.StageOutput, PeakMemory, list[float], PhaseTimes]:
    """Run one optimisation stage with its progress times and its phases (``PASS_PHASES[kind]``) recorded.

    Returns (stage seconds, output, peak memory meter, elapsed seconds at each evaluation, phase times); raises
    ``bench.phases.PhaseError`` when one of the pass's phases never reported.
    """
    elapsed: list[float] = []

    def progress(event: stages.Iterate) -> None:
        if event.stage == kind:
            elapsed.append(event.elapsed)

    with recording_phases(device, PASS_PHASES[kind]) as phases, PeakMemory(device) as memory:
        seconds, output = timed(lambda: call(progress), device)
    return seconds, output, memory, elapsed, phases


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

    seconds, out1, memory, elapsed, phases = run_pass_timed(
        "pass1", lambda progress: stages.pass1(inputs, loose, backbone, config, progress), device)
    for layer, match_s in phases.by_detail("pass1.match").items():
        add("pass1", f"match_{layer}", match_s)
    _optimisation_rows(add, "pass1", seconds, out1, memory, elapsed, n, config.pass1.history_size, inputs)

    seconds, blended = timed(lambda: stages.blend(out1.image, inputs, config), device)
    add("blend", "seconds", seconds)

    seconds, out2, memory, elapsed, phases = run_pass_timed(
        "pass2", lambda progress: stages.pass2(inputs, loose, blended.image, backbone, config, progress), device)
    for layer, match_s in phases.by_detail("pass2.match").items():
        add("pass2", f"match_{layer}", match_s)
    add("pass2", "refine", phases.total("pass2.refine"))
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
    fetch_weights(options.weights, options.arch)  # the default network: fetched once per machine
    backbone = load_backbone(options.arch, options.weights, device=options.device)
    item = load_bench_item(options.case, max(options.sizes))
    rows: list[Row] = []
    for size in options.sizes:
        size_rows = bench_size(item, size, options, backbone)
        rows += size_rows
        print(stage_line(size_rows), flush=True)
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

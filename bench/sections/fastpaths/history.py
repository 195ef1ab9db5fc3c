"""The L-BFGS history (100 vs 10 pairs) as a memory knob: torch LBFGS's own peak, and pass 1's extrapolated."""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from harmonize_core.passes import stages

from ... import MIB, PeakMemory
from ...common import PAPER_ITERATIONS, Options, Row, lbfgs_history_bytes, load_bench_item, stage_config

SMALL_HISTORY = 10  # the L-BFGS history compared with the default 100


def lbfgs_state_peak(shape: tuple[int, ...], history: int, iterations: int, device: torch.device,
                     learning_rate: float) -> tuple[int, int, int]:
    """Run torch LBFGS (as ``lbfgs.optimise`` builds it, no line search) on a cheap ill-conditioned quadratic
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

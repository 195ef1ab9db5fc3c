"""The ``fastpaths`` section: experiments on ways to make a stage faster or smaller, each in a module of its own.

``layout`` (channels_last vs NCHW), ``precision`` (bf16 autocast vs fp32, with a control run), ``compile``
(torch.compile of the feature extractor) and ``history`` (the L-BFGS history as a memory knob).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ...common import Options, Row
from .compile import bench_compile
from .history import bench_history
from .layout import bench_channels_last
from .precision import bench_bf16


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

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
  bar of issue 10 (``bench.sections.evalcost``).

Outputs under ``--out``: ``stages.csv``, ``ratios.csv``, ``fastpaths.csv`` (long rows), ``evalcost.csv``, ``machine.json`` and
``report.md`` (the short tables). docs/performance.md quotes a run of this.

Layout: ``bench/__init__.py`` the instruments (timer, peak memory, machine record), ``bench.common`` the options,
row record, bench item and config, ``bench.phases`` the phase timings through the core's hook, one module per
section under ``bench.sections``, ``bench.report`` the output files; this module the command line.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from harmonize_core.network.vgg import resolve_device

from . import machine_info, synchronize
from .common import (
    CPU_SIZES,
    DEFAULT_CASE,
    DEFAULT_ITERATIONS,
    EVAL_NETS,
    EVAL_SIZES,
    FAST_SIZE,
    GPU_SIZES,
    PAPER,
    QUALITY_ITERATIONS,
    QUALITY_SIZE,
    RATIO_ARCH,
    RATIO_WEIGHTS,
    REPO,
    STAGE_WEIGHTS,
    Options,
)
from .report import write_outputs
from .sections.evalcost import evalcost_table, run_evalcost
from .sections.fastpaths import run_fastpaths
from .sections.quick import run_quick_preset
from .sections.ratios import ratio_table, run_ratios
from .sections.stages import run_stages, stage_table

SECTIONS = ("ratios", "stages", "quick", "fastpaths", "evalcost")


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


def run_section(options: Options, name: str, fn: Callable[[], Any]) -> Any:
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
    ratios = run_section(options, "ratios", lambda: run_ratios(options)) if "ratios" in options.sections else []
    stage_rows = run_section(options, "stages", lambda: run_stages(options)) if "stages" in options.sections else []
    if "quick" in options.sections:
        stage_rows += run_section(options, "quick", lambda: run_quick_preset(options))
    fast_rows = (run_section(options, "fastpaths", lambda: run_fastpaths(options, stage_rows))
                 if "fastpaths" in options.sections else [])
    evalcost = (run_section(options, "evalcost", lambda: run_evalcost(options))
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

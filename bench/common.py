"""What every section of ``python -m bench`` shares: the options, the row record, the bench item, the config.

``Options`` is the parsed command line (``bench.cli``); ``Row`` one long output row (``stages.csv``,
``fastpaths.csv``); ``load_bench_item`` the reference case (or the procedural demo item) every section runs on;
``stage_config`` the paper preset at a size with exactly N iterations per pass; and the arithmetic that turns a
few measured iterations into the paper's 1000 (``extrapolate_total``, ``lbfgs_history_bytes``).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.reference_cases import CASES_DIR
from harmonize_core.config import HarmonizeConfig, preset
from harmonize_core.demo_data import make_item
from harmonize_core.io import load_item
from harmonize_core.network.vgg import load_backbone
from harmonize_core.passes import stages
from harmonize_core.passes.pass1 import pass1_problem
from tasks.weights_fetch import fetch_weights

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
RATIO_ARCH, RATIO_WEIGHTS = "vgg16", "offline-vgg16"  # real features for the ratio and bf16 rows (installable offline)
FAST_SIZE, QUALITY_SIZE, QUALITY_ITERATIONS = 512, 256, 10
EVAL_SIZES = (140, 700)
EVAL_NETS = (("vgg16", "offline-vgg16"), ("vgg19", "random:0"))
FLOAT_DIGITS = 5


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



def pass1_setup(options: Options, size: int, arch: str, weights: str, **extra: Any) -> tuple[Any, torch.Tensor,
                                                                                               HarmonizeConfig]:
    """Return (pass 1's ``Problem``, its start image, the config) for the bench item at ``size`` on ``arch``."""
    config = stage_config(size, options.iterations, arch, weights, **extra)
    fetch_weights(weights, arch)  # the default network: fetched once per machine
    backbone = load_backbone(arch, weights, device=options.device)
    item = load_bench_item(options.case, size)
    inputs = stages.prepare_inputs(item.content, item.style, item.mask, config)
    loose = stages.dilate(inputs, config).image
    problem, x0, _ = pass1_problem(inputs.content, inputs.style, loose, backbone, config)
    return problem, x0, config


def md_cell(value: Any) -> str:
    """Return ``value`` as the text of a markdown table cell (a ``|`` escaped)."""
    return str(value).replace("|", "\\|")

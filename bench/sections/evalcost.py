"""The ``evalcost`` section of ``python -m bench``: one evaluation of each pass against a plain VGG forward + backward.

Issue 10 point 4: one evaluation of either pass (``objective.evaluate`` on the real ``Problem`` that
``pass1_problem`` / ``pass2_problem`` build) should cost at most ``EVAL_BAR`` (1.25) times a plain forward and
backward of the same network, at the same input size and layout (channels_last, as ``load_backbone`` builds it),
to the pass's deepest tap. The plain run backpropagates a gradient of ones from that tap to the image: the same
convolutions, ReLUs and pools as an evaluation, and nothing else.

The two are timed alternately (so that load drift on a shared machine hits both alike) after one warm-up call
each; the verdict reads the median of the per-pair ratios, and the ratio of the fastest runs is reported beside
it. Pass 2's problem is built with the composite standing in for the blended pass-1 image (the mapping only decides
the targets, not the cost of an evaluation).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from harmonize_core.config import HarmonizeConfig
from harmonize_core.errors import WeightsUnavailableError
from harmonize_core.network.vgg import load_backbone
from harmonize_core.optimisation.objective import Problem, evaluate
from harmonize_core.passes import stages
from harmonize_core.passes.pass1 import pass1_problem
from harmonize_core.passes.pass2 import pass2_problem
from tasks.weights_fetch import fetch_weights

from .. import timed
from ..common import Options, load_bench_item, stage_config

EVAL_BAR = 1.25  # issue 10: an evaluation costs at most 1.25x a plain forward + backward to the deepest tap
EVAL_TAU = 5.0  # the paper's default style weight; the cost does not depend on it
EVAL_REPEATS = {"small": 7, "large": 3}
LARGE_SIZE = 400  # from this size on, fewer repeats (one 700 px evaluation takes seconds on a CPU)


@dataclass(frozen=True)
class EvalCost:
    """One pass at one size on one network: median seconds of the plain run and of an evaluation, their ratio."""

    stage: str
    size: int
    shape: str
    arch: str
    weights: str
    deepest: str
    plain_s: float
    eval_s: float
    ratio: float
    best_ratio: float
    repeats: int
    threads: int
    load: str
    bar: float = EVAL_BAR

    @property
    def verdict(self) -> str:
        """PASS when the evaluation costs at most ``bar`` times the plain forward + backward."""
        return "PASS" if self.ratio <= self.bar else "FAIL"


def plain_forward_backward(problem: Problem, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Return a call that runs the problem's backbone on ``x`` to its deepest tap and backpropagates ones to ``x``;
    it returns the image gradient (1, 3, H, W)."""
    deepest = problem.taps[-1]
    backbone = problem.backbone

    def run() -> torch.Tensor:
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            features = backbone.extract(leaf, [deepest])[deepest]
            (grad,) = torch.autograd.grad(features, leaf, grad_outputs=torch.ones_like(features))
        return grad

    return run


def pass_problems(item: Any, size: int, backbone: Any, config: HarmonizeConfig) -> dict[str, tuple[Problem, Any]]:
    """Return {"pass1": (problem, x0), "pass2": (problem, x0)} for ``item`` (a ``bench.common.Item``) at ``size``."""
    inputs = stages.prepare_inputs(item.content, item.style, item.mask, config)
    loose = stages.dilate(inputs, config).image
    problem1, x1, _ = pass1_problem(inputs.content, inputs.style, loose, backbone, config)
    problem2, x2, _ = pass2_problem(inputs.content, inputs.style, loose, inputs.tight, inputs.content, backbone,
                                    config, tau=EVAL_TAU)
    return {"pass1": (problem1, x1), "pass2": (problem2, x2)}


def paired_medians(plain: Callable[[], Any], full: Callable[[], Any], device: torch.device,
                   repeats: int) -> tuple[float, float, float, float]:
    """Return (median plain seconds, median evaluation seconds, median of the per-pair ratios, fastest evaluation
    over fastest plain run) of ``repeats`` alternating timed calls after one untimed warm-up of each. On a loaded
    machine the fastest runs are the least disturbed ones."""
    plain(), full()
    pairs = []
    for _ in range(max(1, repeats)):
        plain_s, _ = timed(plain, device)
        full_s, _ = timed(full, device)
        pairs.append((plain_s, full_s))
    return (statistics.median(p for p, _ in pairs), statistics.median(f for _, f in pairs),
            statistics.median(f / p for p, f in pairs), min(f for _, f in pairs) / min(p for p, _ in pairs))


def measure_eval_cost(item: Any, size: int, arch: str, weights: str, config: HarmonizeConfig, device: torch.device,
                      repeats: int | None = None) -> list[EvalCost]:
    """Return one ``EvalCost`` per pass for ``item`` at ``size`` on ``arch`` with ``weights``."""
    fetch_weights(weights, arch)  # the default network: fetched once per machine
    backbone = load_backbone(arch, weights, device=device)
    problems = pass_problems(item, size, backbone, config)
    count = repeats or EVAL_REPEATS["large" if size >= LARGE_SIZE else "small"]
    rows = []
    for stage, (problem, x0) in problems.items():
        load_before = os.getloadavg()[0]
        plain_s, eval_s, ratio, best = paired_medians(plain_forward_backward(problem, x0),
                                                lambda problem=problem, x0=x0: evaluate(problem, x0), device, count)
        height, width = x0.shape[-2:]
        rows.append(EvalCost(stage, size, f"{height}x{width}", arch, weights, problem.taps[-1], round(plain_s, 4),
                             round(eval_s, 4), round(ratio, 3), round(best, 3), count, torch.get_num_threads(),
                             f"{load_before:.2f} -> {os.getloadavg()[0]:.2f}"))
    return rows


def run_evalcost(options: Options) -> list[EvalCost]:
    """Return the rows for every network of ``--evalcost-nets`` at every ``--evalcost-sizes``, printing each as it
    finishes; a network whose weights are not installed is skipped with a line saying so."""
    rows: list[EvalCost] = []
    for arch, weights in options.evalcost_nets:
        for size in options.evalcost_sizes:
            try:
                new = measure_eval_cost(load_bench_item(options.case, size), size, arch, weights,
                                        stage_config(size, 0, arch, weights), options.device,
                                        options.evalcost_repeats)
            except WeightsUnavailableError as exc:
                print(f"  evalcost: {arch} {weights} skipped ({exc})", flush=True)
                break
            for row in new:
                print(f"  evalcost {row.stage} {arch} {weights} {row.size} px ({row.shape}): plain {row.plain_s:.3f} s, "
                      f"evaluate {row.eval_s:.3f} s, ratio {row.ratio:.2f} (best {row.best_ratio:.2f}; bar {row.bar:g}) "
                      f"-> {row.verdict}, "
                      f"load {row.load}", flush=True)
            rows += new
    return rows


def evalcost_table(rows: list[EvalCost]) -> str:
    """Return the markdown table of the evalcost rows."""
    lines = ["| pass | network | size | H x W | deepest tap | plain fwd+bwd s | evaluate s | ratio | best/best | bar "
             "| verdict | repeats | threads | load |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.stage} | {r.arch} {r.weights} | {r.size} | {r.shape} | {r.deepest} | {r.plain_s:.3f} | "
                     f"{r.eval_s:.3f} | {r.ratio:.2f}x | {r.best_ratio:.2f}x | <= {r.bar:g}x | {r.verdict} | "
                     f"{r.repeats} | {r.threads} | {r.load} |")
    return "\n".join(lines)

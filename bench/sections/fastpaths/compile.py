"""torch.compile of the feature extractor on the pass-1 evaluation: the whole stack and one graph per segment."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from harmonize_core.network.vgg import check_tap
from harmonize_core.optimisation.objective import evaluate

from ... import best_of, timed
from ...common import Options, Row, pass1_setup


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
    from torch._functorch import config as functorch_config  # lazy, for start-up time: only this experiment needs it

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
    problem, x0, _ = pass1_setup(options, size, options.arch, options.weights)
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

"""The optimisation engine shared by both passes: loss terms at VGG taps, masked/normalised gradients, L-BFGS.

The authors' loss modules sit inside the network and rewrite the gradient flowing through them: each takes its own
gradient, (pass 2 only) L2-normalises it, scales it by its weight, adds the upstream gradient and multiplies the sum
by the layer's soft mask, module after module (so at a tap with several modules the upstream gradient is masked
once per module) (neural_gram.lua L396-413, neural_paint.lua L537-539 / L592-594 / L656-658). A plain sum of
losses cannot express that, so ``evaluate`` backpropagates segment by segment between taps and applies the rule at
each tap. Finally the image gradient is multiplied by the loose mask, so pixels outside M+ never move (L244-246).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .errors import StageTimeoutError

GRADIENT_EPS = 1e-8  # neural_paint.lua L537-539: g / (||g|| + 1e-8)


@dataclass(frozen=True)
class Term:
    """One loss term (one of the authors' loss modules): ``fn`` maps the tap's features (or the image for layer
    "image") to a raw scalar loss. Terms at the same tap are listed in the order the modules sit in the network.

    ``masked_input``: the term sees ``F * m`` and its gradient is taken with respect to that masked input (the
    authors call ``gram:backward(masked_input, ...)``), so the mask is applied once, not twice.
    """

    name: str
    layer: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    weight: float
    masked_input: bool = False
    premask: bool = True  # pass 2: mask the own gradient before normalising (all but the histogram module)


@dataclass
class Problem:
    """What an evaluation needs: the backbone, the terms, the soft mask per tap and the image-gradient mask."""

    backbone: object
    terms: list[Term]
    layer_masks: dict[str, torch.Tensor]
    image_mask: torch.Tensor
    normalize: bool
    autocast: bool = False
    taps: list[str] = field(init=False)

    def __post_init__(self) -> None:
        from .vgg import TAPS

        indices = TAPS[self.backbone.arch]
        used = {t.layer for t in self.terms if t.layer != "image"}
        self.taps = sorted(used, key=indices.__getitem__)


def _term_gradient(term: Term, features: torch.Tensor, mask: torch.Tensor, normalize: bool,
                   values: dict[str, float]) -> torch.Tensor:
    """Return one module's own gradient with respect to ``features``: weighted, and in pass 2 L2-normalised."""
    leaf = (features * mask if term.masked_input else features).detach().requires_grad_(True)
    with torch.enable_grad():
        loss = term.fn(leaf)
        (grad,) = torch.autograd.grad(loss, leaf)
    values[term.name] = values.get(term.name, 0.0) + term.weight * float(loss.detach())
    if 0 in grad.stride():  # an expanded view (e.g. the gradient of a plain sum) cannot be scaled in place
        grad = grad.clone()
    if normalize:
        if term.premask:
            grad.mul_(mask)
        return grad.mul_(term.weight / (grad.norm() + GRADIENT_EPS))
    return grad.mul_(term.weight)


def _through_modules(terms: list[Term], features: torch.Tensor, mask: torch.Tensor, normalize: bool,
                     values: dict[str, float], upstream: torch.Tensor | None) -> torch.Tensor:
    """Return the gradient leaving a tap's loss modules: backward visits them in reverse insertion order, and
    each adds its own gradient to the one coming down and multiplies the sum by the soft mask."""
    grad = torch.zeros_like(features) if upstream is None else upstream.float()
    for term in reversed(terms):
        grad = _term_gradient(term, features, mask, normalize, values).add_(grad).mul_(mask)
    return grad


def evaluate(problem: Problem, x: torch.Tensor) -> tuple[float, dict[str, float], torch.Tensor]:
    """Return (total loss, per-term weighted losses, image gradient) at the preprocessed image ``x`` (1, 3, H, W).

    The image gradient is already multiplied by the loose image mask.
    """
    values: dict[str, float] = {}
    x = x.detach().requires_grad_(True)
    device_type = x.device.type
    cast = torch.autocast(device_type, dtype=torch.bfloat16) if problem.autocast else nullcontext()
    with torch.enable_grad():
        with cast:
            raw = problem.backbone.extract(x, problem.taps) if problem.taps else {}
        upstream = None
        for index in range(len(problem.taps) - 1, -1, -1):
            name = problem.taps[index]
            terms = [t for t in problem.terms if t.layer == name]
            # Loss maths in fp32 even when the network runs in bf16.
            grad = _through_modules(terms, raw[name].detach().float(), problem.layer_masks[name], problem.normalize,
                                    values, upstream)
            below = raw[problem.taps[index - 1]] if index > 0 else x
            (upstream,) = torch.autograd.grad(raw[name], below, grad_outputs=grad.to(raw[name].dtype),
                                              retain_graph=index > 0)
        image_terms = [t for t in problem.terms if t.layer == "image"]
        # The image mask is binary, so the TV module's own masking and feval's final one coincide (pass 1 and 2).
        image_grad = _through_modules(image_terms, x.detach(), problem.image_mask, problem.normalize, values,
                                      upstream if upstream is not None else torch.zeros_like(x))
    image_grad = image_grad * problem.image_mask
    return sum(values.values()), values, image_grad


@dataclass
class LbfgsSettings:
    """Torch7 ``optim.lbfgs`` equivalents (ALGORITHM.md section 7): fixed step, no line search."""

    iterations: int
    learning_rate: float
    history_size: int
    tolerance_grad: float
    tolerance_change: float
    log_every: int
    max_seconds: float = 0.0  # 0 = no limit; Prefect's timeout cannot interrupt a blocking CUDA call, this can


def optimise(problem: Problem, x0: torch.Tensor, settings: LbfgsSettings, *, stage: str,
             progress: Callable | None = None, event: Callable | None = None) -> tuple[torch.Tensor, dict]:
    """Return (optimised preprocessed image, metrics) after L-BFGS from ``x0``.

    metrics: ``curves`` {term: [[evaluation, value], ...]} every ``log_every`` evaluations (and the last),
    ``final`` {term: value}, ``evaluations``, ``seconds_per_evaluation``. ``event(step, total, losses, elapsed)``
    builds the progress event passed to ``progress``.
    """
    x = x0.detach().clone(memory_format=torch.contiguous_format).requires_grad_(True)
    curves: dict[str, list] = {}
    state = {"evaluations": 0, "last": {}}
    started = time.perf_counter()

    def record(step: int, values: dict[str, float], total: float) -> None:
        for name, value in {**values, "total": total}.items():
            curves.setdefault(name, []).append([step, value])
        if progress is not None and event is not None:
            progress(event(step, settings.iterations, {**values, "total": total}, time.perf_counter() - started))

    def closure() -> torch.Tensor:
        elapsed = time.perf_counter() - started
        if settings.max_seconds > 0 and elapsed > settings.max_seconds:
            raise StageTimeoutError(f"{stage}: stopped after {elapsed:.0f} s at evaluation {state['evaluations']} of "
                                    f"{settings.iterations} (limit {settings.max_seconds:g} s; raise max_seconds)")
        total, values, grad = evaluate(problem, x)
        x.grad = grad.contiguous()
        step = state["evaluations"]
        if step % max(1, settings.log_every) == 0:
            record(step, values, total)
        state["evaluations"] = step + 1
        state["last"] = {**values, "total": total}
        return torch.tensor(total, dtype=torch.float32)

    if settings.iterations > 0:
        optimizer = torch.optim.LBFGS(
            [x], lr=settings.learning_rate, max_iter=settings.iterations,
            max_eval=max(settings.iterations * 5 // 4, settings.iterations + 1), history_size=settings.history_size,
            tolerance_grad=settings.tolerance_grad, tolerance_change=settings.tolerance_change, line_search_fn=None)
        optimizer.step(closure)
    # One more evaluation at the final image gives its true losses (L-BFGS's last step is not evaluated).
    total, values, _ = evaluate(problem, x)
    record(state["evaluations"], values, total)
    seconds = time.perf_counter() - started
    metrics = {"curves": curves, "final": {**values, "total": total}, "evaluations": state["evaluations"],
               "seconds_optimise": round(seconds, 4),
               "seconds_per_evaluation": round(seconds / max(1, state["evaluations"] + 1), 5)}
    return x.detach(), metrics

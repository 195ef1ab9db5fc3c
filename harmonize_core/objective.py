"""The optimisation engine shared by both passes: loss terms at VGG taps, masked/normalised gradients, L-BFGS.

The authors' loss modules sit inside the network and rewrite the gradient flowing through them: each takes its own
gradient, (pass 2 only) L2-normalises it, scales it by its weight, adds the upstream gradient and multiplies the sum
by the layer's soft mask, module after module (so at a tap with several modules the upstream gradient is masked
once per module) (neural_gram.lua L396-413, neural_paint.lua L537-539 / L592-594 / L656-658). A plain sum of
losses cannot express that, so ``evaluate`` backpropagates segment by segment between taps and applies the rule at
each tap. Finally the image gradient is multiplied by the loose mask, so pixels outside M+ never move (L244-246).

Every module multiplies the gradient leaving it by the soft mask m, so at a tap the gradient handed to the network
is zero wherever m is: the module chain runs on the window of m's support only (``window.Window``, a slice view),
and terms that declare a ``windowed`` form compute their loss and gradient there too (the masked terms see
``F * m``, zero outside it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .errors import DivergedError, StageTimeoutError
from .network.architecture import TAPS
from .window import Window

GRADIENT_EPS = 1e-8  # neural_paint.lua L537-539: g / (||g|| + 1e-8)
REPORTING_ONLY = ("ProgressLog",)  # tasks.code_digest: these decide no pixel and are left out of cache keys
# A total loss above this multiple of its value at the first evaluation has diverged (see ``LossGuard``).
EXPLOSION_FACTOR = 1e3


@dataclass(frozen=True)
class SparseGradient:
    """A gradient that is zero outside the bool mask ``where`` (H, W): ``values`` (n, C) holds it at the n masked
    positions in raster order, one row of C channels per position (the histogram loss's I - R is zero outside maskI,
    so it never needs a full-size tensor)."""

    where: torch.Tensor
    values: torch.Tensor


OwnGradient = torch.Tensor | SparseGradient


@dataclass(frozen=True)
class Term:
    """One loss term (one of the authors' loss modules): ``fn`` maps the tap's features (or the image for layer
    "image") to a raw scalar loss. Terms at the same tap are listed in the order the modules sit in the network.

    ``masked_input``: the term sees ``F * m`` and its gradient is taken with respect to that masked input (the
    authors call ``gram:backward(masked_input, ...)``), so the mask is applied once, not twice.
    ``gradient``: optional closed form of ``fn``'s gradient, returning (raw loss as a 0-d tensor, d loss / d input)
    as a tensor shaped like the input or a ``SparseGradient``; without it the gradient is autograd's of ``fn``.
    ``windowed``: optional form of ``gradient`` on the window of the tap's mask support: given the term's input
    cropped to the ``Window`` (a view) and the window, it returns (the raw loss of the whole map as a 0-d tensor, the
    gradient on the window: a window-shaped tensor or a ``SparseGradient`` whose ``where`` is window-shaped). Only
    for terms whose loss and gradient depend on nothing outside the window (masked inputs, maskI rows).
    """

    name: str
    layer: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    weight: float
    masked_input: bool = False
    premask: bool = True  # pass 2: mask the own gradient before normalising (all but the histogram module)
    gradient: Callable[[torch.Tensor], tuple[torch.Tensor, OwnGradient]] | None = None
    windowed: Callable[[torch.Tensor, Window], tuple[torch.Tensor, OwnGradient]] | None = None


@dataclass
class Problem:
    """What an evaluation needs: the backbone, the terms, the soft mask per tap and the image-gradient mask.

    ``crop``: run each tap's loss maths on the window of its mask's support (``windows``, computed here once);
    False runs it on the whole maps (the same results up to float summation order; kept for tests and benches).
    """

    backbone: object
    terms: list[Term]
    layer_masks: dict[str, torch.Tensor]
    image_mask: torch.Tensor
    normalize: bool
    autocast: bool = False
    crop: bool = True
    taps: list[str] = field(init=False)
    windows: dict[str, Window] = field(init=False)

    def __post_init__(self) -> None:
        indices = TAPS[self.backbone.arch]
        used = {t.layer for t in self.terms if t.layer != "image"}
        self.taps = sorted(used, key=indices.__getitem__)
        masks = {name: self.layer_masks[name] for name in self.taps if name in self.layer_masks}
        self.windows = {name: Window.of_support(mask) if self.crop else Window.whole(*mask.shape[-2:])
                        for name, mask in masks.items()}

    def terms_at(self, layer: str) -> list[Term]:
        """Return the terms at ``layer`` (a tap or "image") in insertion order."""
        return [t for t in self.terms if t.layer == layer]


def _own_gradient(term: Term, inputs: torch.Tensor) -> tuple[torch.Tensor, OwnGradient]:
    """Return (raw loss 0-d tensor, d loss / d inputs) of one term: its closed form, or autograd of ``fn``."""
    if term.gradient is not None:
        return term.gradient(inputs)
    leaf = inputs.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = term.fn(leaf)
        (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


def _masked_norm(grad: OwnGradient, mask: torch.Tensor | None) -> torch.Tensor:
    """Return ``||grad * mask||`` (``||grad||`` when ``mask`` is None) as a 0-d tensor without forming the product:
    the norms over channels at each position (one read of ``grad``) are weighted by a one-channel mask."""
    if isinstance(grad, SparseGradient):
        if mask is None:
            return torch.linalg.vector_norm(grad.values)
        return torch.linalg.vector_norm(torch.linalg.vector_norm(grad.values, dim=1) * mask[0, 0][grad.where])
    if mask is None:
        return torch.linalg.vector_norm(grad)
    if mask.shape[1] != 1:  # a per-channel mask (the image's): form the product
        return torch.linalg.vector_norm(grad * mask)
    return torch.linalg.vector_norm(torch.linalg.vector_norm(grad, dim=1, keepdim=True) * mask)


def _at(where: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Return the (1, 1, H, W) ``factor`` at the positions of the bool mask ``where``, as an (n, 1) column."""
    return factor[0, 0][where].unsqueeze(1)


def _crop_gradient(own: OwnGradient, window: Window) -> OwnGradient:
    """Return a whole-map gradient restricted to ``window``: a view of a dense one, the window's rows of a sparse one
    (raster order within the window is raster order of the map, so the rows keep their order)."""
    if window.is_whole:
        return own
    if isinstance(own, SparseGradient):
        inside = torch.zeros_like(own.where)
        window.crop(inside).fill_(True)
        return SparseGradient(window.crop(own.where), own.values[inside[own.where]])
    return window.crop(own)


def _term_gradient(term: Term, window: Window, mask: torch.Tensor, inputs: Callable[[bool, bool], torch.Tensor],
                   normalize: bool) -> tuple[torch.Tensor, OwnGradient, torch.Tensor | None]:
    """Return (raw loss, own gradient on ``window``, the norm pass 2 divides it by or None) of one term at a tap.

    ``inputs(masked, windowed)`` gives the term's input (``F`` or ``F * m``, whole or cropped). A term with a
    ``windowed`` form runs on the window; any other runs on the whole map and its gradient is cropped afterwards
    (after its norm, which for a term that is not premasked reads the whole gradient).
    """
    if term.windowed is not None:
        loss, own = term.windowed(inputs(term.masked_input, True), window)
        norm = _masked_norm(own, window.crop(mask) if term.premask else None) if normalize else None
        return loss, own, norm
    loss, own = _own_gradient(term, inputs(term.masked_input, False))
    norm = _masked_norm(own, mask if term.premask else None) if normalize else None
    return loss, _crop_gradient(own, window), norm


def _accumulate(grad: torch.Tensor, own: OwnGradient, factor: torch.Tensor) -> torch.Tensor:
    """Add ``own * factor`` ((1, 1, H, W) factor, broadcast over channels) into ``grad`` in place; return it."""
    if isinstance(own, SparseGradient):
        rows = grad[0].permute(1, 2, 0)  # (H, W, C) view: one row of channels per position
        rows[own.where] += own.values * _at(own.where, factor)
        return grad
    return grad.addcmul_(own, factor)


def _through_modules(terms: list[Term], features: torch.Tensor, mask: torch.Tensor, normalize: bool,
                     losses: dict[str, torch.Tensor], upstream: torch.Tensor | None,
                     window: Window | None = None) -> torch.Tensor:
    """Return the gradient leaving a tap's loss modules (shaped like ``features``).

    Backward visits them in reverse insertion order; each adds its own gradient (weighted, in pass 2 masked and
    L2-normalised) to the one coming down and multiplies the sum by the soft mask m. Unrolled, with k modules and
    module j (in visiting order) scaled by s_j: ``g = up m^k + sum_j s_j own_j m^(k - j + 1 + premask_j)``, which is
    summed here in one pass per module instead of three (scale, add, mask). Every summand carries m, so g is zero
    outside ``window`` (which must hold m's support; default the whole map): the sum is formed on the window only.
    """
    if not terms:
        return torch.zeros_like(features) if upstream is None else upstream.float()
    window = window or Window.whole(*features.shape[-2:])
    if upstream is None:
        full = torch.zeros_like(features)
    else:  # reuse the upstream gradient's memory: zero it outside the window, scale it inside
        full = window.zero_outside_(upstream.float())
    grad, cropped_mask = window.crop(full), window.crop(mask)
    cache: dict[tuple[bool, bool], torch.Tensor] = {}

    def inputs(masked: bool, windowed: bool) -> torch.Tensor:
        if (masked, windowed) not in cache:
            source = window.crop(features) if windowed else features
            cache[masked, windowed] = source * (cropped_mask if windowed else mask) if masked else source
        return cache[masked, windowed]

    visiting = list(reversed(terms))
    powers = {1: cropped_mask}

    def power(n: int) -> torch.Tensor:
        if n not in powers:
            powers[n] = power(n - 1) * cropped_mask
        return powers[n]

    count = len(visiting)
    if upstream is not None:
        grad.mul_(power(count))
    for j, term in enumerate(visiting, start=1):
        loss, own, norm = _term_gradient(term, window, mask, inputs, normalize)
        losses[term.name] = losses[term.name] + term.weight * loss if term.name in losses else term.weight * loss
        exponent = count - j + 1
        if normalize:
            exponent += int(term.premask)
            scale = term.weight / (norm + GRADIENT_EPS)
        else:
            scale = term.weight
        _accumulate(grad, own, power(exponent) * scale)
    return full


def evaluate(problem: Problem, x: torch.Tensor) -> tuple[float, dict[str, float], torch.Tensor]:
    """Return (total loss, per-term weighted losses, image gradient) at the preprocessed image ``x`` (1, 3, H, W).

    The image gradient is already multiplied by the loose image mask. The loss values are read back from the
    device once, at the end.
    """
    losses: dict[str, torch.Tensor] = {}
    x = x.detach().requires_grad_(True)
    device_type = x.device.type
    cast = torch.autocast(device_type, dtype=torch.bfloat16) if problem.autocast else nullcontext()
    with torch.enable_grad():
        with cast:
            raw = problem.backbone.extract(x, problem.taps) if problem.taps else {}
        upstream = None
        for index in range(len(problem.taps) - 1, -1, -1):
            name = problem.taps[index]
            # Loss maths in fp32 even when the network runs in bf16.
            grad = _through_modules(problem.terms_at(name), raw[name].detach().float(), problem.layer_masks[name],
                                    problem.normalize, losses, upstream, problem.windows[name])
            below = raw[problem.taps[index - 1]] if index > 0 else x
            (upstream,) = torch.autograd.grad(raw[name], below, grad_outputs=grad.to(raw[name].dtype),
                                              retain_graph=index > 0)
    # The image mask is binary, so the TV module's own masking and feval's final one coincide (pass 1 and 2).
    image_grad = _through_modules(problem.terms_at("image"), x.detach(), problem.image_mask, problem.normalize, losses,
                                  upstream if upstream is not None else torch.zeros_like(x))
    image_grad.mul_(problem.image_mask)
    names = list(losses)
    numbers = torch.stack([losses[n].float() for n in names]).tolist() if names else []
    values = dict(zip(names, numbers, strict=True))
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
    # Early stopping (ours, not the authors'): every ``stop_every`` evaluations the mean absolute image change over
    # the loose mask since the previous check is measured; ``stop_patience`` checks in a row below ``stop_levels``
    # (8-bit levels) end the pass there. 0 = off (the authors always run every iteration).
    stop_levels: float = 0.0
    stop_every: int = 50
    stop_patience: int = 2


EIGHT_BIT_LEVELS = 255.0  # image change is reported in 8-bit levels of the [0, 1] RGB image


def mean_change(image: torch.Tensor, previous: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Return the mean and the largest absolute change between two [0, 1] images over the bool ``region``, in 8-bit
    levels, as a (2,) tensor (zeros for an empty region)."""
    if not bool(region.any()):
        return torch.zeros(2)
    change = (image - previous).abs()[region] * EIGHT_BIT_LEVELS
    return torch.stack([change.mean(), change.max()])


@dataclass(frozen=True)
class Snapshots:
    """Intermediate images of one optimisation: for each evaluation count n in ``at``, ``keep(n, x, losses)``
    receives the preprocessed image after n L-BFGS iterations (a detached clone (1, 3, H, W)) and its losses
    ({term: value, "total": value}). L-BFGS's first n iterations do not depend on how many follow, so the image
    equals the result of an n-iteration run with the same settings (bit for bit on a deterministic device); an n
    beyond the run's end (its iterations, a tolerance or an early stop) receives the final image."""

    at: tuple[int, ...]
    keep: Callable[[int, torch.Tensor, dict[str, float]], None]


class EarlyStopper:
    """Decides when a pass stops improving the image (``LbfgsSettings.stop_levels``; ours, not the authors').

    ``check(step, x)`` is called at every evaluation; every ``stop_every`` evaluations it measures the mean change
    of the image over the loose mask since the previous check (8-bit levels) and returns True once ``stop_patience``
    checks in a row were below ``stop_levels``. ``changes`` keeps [[step, levels], ...] of every check.
    """

    def __init__(self, problem: Problem, settings: LbfgsSettings) -> None:
        self.settings = settings
        self.preprocessing = problem.backbone.preprocessing
        self.region = problem.image_mask > 0
        self.previous: torch.Tensor | None = None
        self.quiet = 0
        self.changes: list[list[float]] = []

    @property
    def enabled(self) -> bool:
        """Return whether early stopping is on."""
        return self.settings.stop_levels > 0

    def check(self, step: int, x: torch.Tensor) -> bool:
        """Return True when the pass should stop at ``step`` (the image x is the result of ``step`` iterations)."""
        if not self.enabled or step % max(1, self.settings.stop_every) != 0:
            return False
        image = self.preprocessing.deprocess(x.detach())
        previous, self.previous = self.previous, image
        if previous is None:
            return False
        levels = float(mean_change(image, previous, self.region)[0])
        self.changes.append([step, round(levels, 5)])
        self.quiet = self.quiet + 1 if levels < self.settings.stop_levels else 0
        return self.quiet >= self.settings.stop_patience


class LossGuard:
    """Fails an optimisation that diverged, with one line naming the pass and the term (``DivergedError``).

    ``check`` runs at every evaluation: a loss term that is NaN or infinite, an image gradient that holds a NaN or
    an infinity, or a total loss above ``EXPLOSION_FACTOR`` times its value at the first evaluation (the start,
    from which a working L-BFGS run only goes down: the paper's runs end at a fraction of it) all end the pass.
    The explosion test reads the total, never a single term: pass 2's content term starts at 0 (the optimisation
    starts from the content), so any growth of it is an infinite ratio to its own start; and a start total of 0
    (nothing to optimise) disables it. ``DivergedError`` is a ``HarmonizeError``: the pipeline never retries it.
    """

    def __init__(self, stage: str, settings: LbfgsSettings) -> None:
        self.stage = stage
        self.settings = settings
        self.start: float | None = None

    def _fail(self, what: str, step: int) -> DivergedError:
        return DivergedError(
            f"{self.stage}: {what} at evaluation {step} of {self.settings.iterations}; the optimisation diverged "
            f"and is not retried: lower {self.stage}.learning_rate (now {self.settings.learning_rate:g}) or check "
            "this item's images")

    def check(self, step: int, values: dict[str, float], total: float, grad: torch.Tensor | None = None) -> None:
        """Return None when the losses (and ``grad``, when given) are sound; raise ``DivergedError`` otherwise."""
        for name, value in values.items():
            if not math.isfinite(value):
                raise self._fail(f"the {name} loss became {'NaN' if math.isnan(value) else 'infinite'}", step)
        if not math.isfinite(total):  # finite terms whose sum overflows
            raise self._fail(f"the total loss became {'NaN' if math.isnan(total) else 'infinite'}", step)
        if grad is not None and not bool(torch.isfinite(grad).all()):
            raise self._fail("the image gradient became NaN or infinite (every loss term still finite)", step)
        if self.start is None:
            self.start = total
        elif self.start > 0 and total > EXPLOSION_FACTOR * self.start:
            name = max(values, key=values.__getitem__)
            raise self._fail(f"the loss exploded ({name} {values[name]:.3g}; total {total:.3g} = "
                             f"{total / self.start:.3g} x its start {self.start:.3g}, limit {EXPLOSION_FACTOR:g} x)",
                             step)


class _StopEarly(Exception):
    """Raised inside the L-BFGS closure to end the optimisation at the current image."""


class ProgressLog:
    """The loss curves and progress figures ``optimise`` records every ``log_every`` evaluations (log time only).

    Each record stores every term's value, the total and ``image_change``: the mean absolute change of the RGB
    image in 8-bit levels over the loose-mask pixels since the previous record (0 at the first). The progress event
    also gets each term relative to its reference value: the term's first record, or, for a term that starts at 0
    (the content term: the optimisation starts from the content image), the first record's total, so such a term
    reads as a share of where the whole loss started (0 at first, 0.05 when it has grown to 5% of it) rather than as
    a ratio to some tiny first nonzero value. Also the largest change.
    """

    def __init__(self, problem: Problem) -> None:
        self.curves: dict[str, list] = {}
        self.references: dict[str, float] = {}
        self.preprocessing = problem.backbone.preprocessing
        self.region = problem.image_mask > 0
        self.previous: torch.Tensor | None = None

    def _image_change(self, x: torch.Tensor) -> tuple[float, float]:
        image = self.preprocessing.deprocess(x.detach())
        previous, self.previous = self.previous, image
        if previous is None:
            return 0.0, 0.0
        mean, peak = mean_change(image, previous, self.region).tolist()
        return mean, peak

    def _relative(self, values: dict[str, float]) -> dict[str, float]:
        if not self.references:  # the first record: each term's own start, or the total's for a term at 0
            start_total = values.get("total") or sum(values.values())
            self.references = {name: value if value != 0 else start_total for name, value in values.items()}
        relative = {}
        for name, value in values.items():
            reference = self.references.setdefault(name, value)
            relative[name] = value / reference if reference else 1.0
        return relative

    def record(self, step: int, values: dict[str, float], x: torch.Tensor) -> dict:
        """Append one record and return the progress figures: {"relative": {term: value / reference},
        "image_change": mean levels, "image_change_max": max levels}."""
        mean, peak = self._image_change(x)
        for name, value in {**values, "image_change": mean}.items():
            self.curves.setdefault(name, []).append([step, value])
        return {"relative": self._relative(values), "image_change": mean, "image_change_max": peak}


def optimise(problem: Problem, x0: torch.Tensor, settings: LbfgsSettings, *, stage: str,
             progress: Callable | None = None, event: Callable | None = None,
             snapshots: Snapshots | None = None) -> tuple[torch.Tensor, dict]:
    """Return (optimised preprocessed image, metrics) after L-BFGS from ``x0``.

    metrics: ``curves`` {term: [[evaluation, value], ...]} every ``log_every`` evaluations (and the last), with
    ``total`` and ``image_change`` (mean 8-bit levels moved in the loose mask since the previous record) among
    them; ``final`` {term: value}, ``evaluations``, ``seconds_per_evaluation``; ``stopped_early`` (bool) and, when
    early stopping is on, ``stopped_at`` (the iterations run, or None) and ``stop_changes`` [[evaluation, levels]].
    ``event(step, total, losses, elapsed, relative=..., image_change=..., image_change_max=...)`` builds the
    progress event passed to ``progress``. ``snapshots`` (optional) receives intermediate images (``Snapshots``).
    Raises ``DivergedError`` (one line naming ``stage`` and the term) when the loss diverges (``LossGuard``).
    """
    x = x0.detach().clone(memory_format=torch.contiguous_format).requires_grad_(True)
    log = ProgressLog(problem)
    stopper = EarlyStopper(problem, settings)
    guard = LossGuard(stage, settings)
    wanted = sorted(set(snapshots.at)) if snapshots is not None else []
    state = {"evaluations": 0, "last": {}, "stopped_at": None}
    # Built before the clock starts: the first torch optimiser of a process imports torch._dynamo (over a second on
    # a busy CPU), which is not the optimisation's time and must not count against ``max_seconds``.
    optimizer = torch.optim.LBFGS(
        [x], lr=settings.learning_rate, max_iter=settings.iterations,
        max_eval=max(settings.iterations * 5 // 4, settings.iterations + 1), history_size=settings.history_size,
        tolerance_grad=settings.tolerance_grad, tolerance_change=settings.tolerance_change, line_search_fn=None)
    started = time.perf_counter()

    def record(step: int, values: dict[str, float], total: float) -> None:
        figures = log.record(step, {**values, "total": total}, x)
        if progress is not None and event is not None:
            progress(event(step, settings.iterations, {**values, "total": total}, time.perf_counter() - started,
                           **figures))

    def closure() -> torch.Tensor:
        elapsed = time.perf_counter() - started
        step = state["evaluations"]
        if settings.max_seconds > 0 and elapsed > settings.max_seconds:
            raise StageTimeoutError(f"{stage}: stopped after {elapsed:.0f} s at evaluation {step} of "
                                    f"{settings.iterations} (limit {settings.max_seconds:g} s; raise max_seconds)")
        if stopper.check(step, x):  # x is the result of ``step`` iterations: stop with it
            state["stopped_at"] = step
            raise _StopEarly
        total, values, grad = evaluate(problem, x)
        guard.check(step, values, total, grad)
        x.grad = grad.contiguous()
        if step % max(1, settings.log_every) == 0:
            record(step, values, total)
        if wanted and wanted[0] == step:
            snapshots.keep(wanted.pop(0), x.detach().clone(), {**values, "total": total})
        state["evaluations"] = step + 1
        state["last"] = {**values, "total": total}
        # float64: L-BFGS's lack-of-progress test (|loss - previous| < tolerance_change) must see the change, as
        # Torch7's double-precision lbfgs does; in float32 a loss of 1.8e8 moves in steps of 16, and a first step
        # that changes it by less (bf16 pass 1 at 224 px: by 5) ended pass 1 after 2 evaluations.
        return torch.tensor(total, dtype=torch.float64)

    if settings.iterations > 0:
        try:
            optimizer.step(closure)
        except _StopEarly:
            pass
    # One more evaluation at the final image gives its true losses (L-BFGS's last step is not evaluated).
    total, values, _ = evaluate(problem, x)
    guard.check(state["evaluations"], values, total)
    record(state["evaluations"], values, total)
    for n in wanted:  # beyond the run's end: the final image
        snapshots.keep(n, x.detach().clone(), {**values, "total": total})
    seconds = time.perf_counter() - started
    metrics = {"curves": log.curves, "final": {**values, "total": total}, "evaluations": state["evaluations"],
               "seconds_optimise": round(seconds, 4),
               "seconds_per_evaluation": round(seconds / max(1, state["evaluations"] + 1), 5),
               "stopped_early": state["stopped_at"] is not None}
    if stopper.enabled:
        metrics.update(stopped_at=state["stopped_at"], stop_changes=stopper.changes)
    return x.detach(), metrics

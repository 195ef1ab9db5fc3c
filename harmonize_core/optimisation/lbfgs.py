"""The L-BFGS driver both passes run, and when it stops: Torch7 ``optim.lbfgs`` equivalents (fixed step, no line
search), early stopping on a still image (ours), the divergence guard and the wall-clock limit, with the loss curves
for the report and the intermediate images a study asks for.

Each step evaluates the objective (``objective.evaluate``); the driver only decides what to do with the losses and
the gradient it returns.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import DivergedError, StageTimeoutError
from .objective import Problem, evaluate

REPORTING_ONLY = ("ProgressLog",)  # tasks.code_digest: these decide no pixel and are left out of cache keys
# A total loss above this multiple of its value at the first evaluation has diverged (see ``LossGuard``).
EXPLOSION_FACTOR = 1e3


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

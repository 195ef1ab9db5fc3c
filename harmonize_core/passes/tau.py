"""``tau="auto"``: the style weight estimated from the painting itself, for users who have no genre label.

The authors set tau per painting from a CNN genre classifier that was never released (README; issues #11, #38,
#46), on three levels: 1 (Baroque, Renaissance, Realism), 5 (Impressionism, Post-Impressionism), 10
(Expressionism, Cubism) (issue #6; ``data/wikiart_output.txt``). This estimator replaces the classifier with one
image statistic the authors already compute for the same painting: ``mtv``, the median squared pixel difference
(``noise_estimate``, neural_paint.lua L470-483), which they use to choose between smoothing and texture in pass 2.
Smooth, finely blended paintings (old masters) have a small mtv and get tau near 1; paintings with visible brush
texture get tau near 5:

    tau = 1 + (5 - 1) * sigmoid((log10(mtv) - centre) / width)

Two constants, fitted by ``bench/calibrate_tau.py`` on the 35 reference cases published with the authors' code
(their ``data/`` folder), where leave-one-out cross-validation gives 25/35 level agreement (nearest of 1/5/10;
"always 5" gives 18/35) and a mean absolute error of 1.385 (2.082 for "always 5"). It never answers 10: no
statistic tried separates the five Expressionism/Cubism cases from Impressionism. ``docs/tau.md`` has the method,
the figures and the limits.
"""

from __future__ import annotations

import math

import torch

from ..config import PAPER_SIZE
from ..images import to_working_size
from ..losses.terms import noise_estimate

TAU_SMOOTH = 1.0  # the authors' lowest level (issue #6)
TAU_TEXTURED = 5.0  # the authors' middle level (issue #6)
TAU_RANGE = (1.0, 10.0)  # the authors' values run from 1.000 to 9.996 (wikiart_output.txt)
# Fitted by bench/calibrate_tau.py on the 35 reference cases (paintings at 700 px); rerun it to refit.
LOG_MTV_CENTRE = -3.475  # log10(mtv) where tau is halfway between the two levels (mtv ~ 3.3e-4)
LOG_MTV_WIDTH = 0.02  # log10 units: tau goes from 1.2 to 4.8 within +-0.06 (mtv +-15%) of the centre
MTV_FLOOR = 1e-8  # a flat painting has mtv 0: keep log10 finite
CALIBRATION_SIZE = PAPER_SIZE  # mtv depends on resolution: measure it at the size the constants were fitted at


def log_mtv(painting: torch.Tensor) -> float:
    """Return log10 of the authors' noise estimate mtv of ``painting`` (1, 3, H, W) in [0, 1], at 700 px.

    The painting is resized so that its long side is 700 px (the calibration size) unless it already is.
    """
    return math.log10(max(noise_estimate(to_working_size(painting.float(), CALIBRATION_SIZE)), MTV_FLOOR))


def tau_from_log_mtv(value: float, centre: float = LOG_MTV_CENTRE, width: float = LOG_MTV_WIDTH) -> float:
    """Return tau in [1, 5] for a log10(mtv) ``value``: a logistic step from ``TAU_SMOOTH`` to ``TAU_TEXTURED``."""
    z = max(min((value - centre) / width, 60.0), -60.0)  # exp overflows past ~700; the sigmoid is flat by 60
    return TAU_SMOOTH + (TAU_TEXTURED - TAU_SMOOTH) / (1.0 + math.exp(-z))


def estimate_tau(painting: torch.Tensor) -> float:
    """Return the estimated style weight tau, a float in [1, 10], for ``painting`` (1, 3, H, W) RGB in [0, 1].

    Deterministic. Replaces the authors' unreleased genre classifier (README, issue #6) with a calibrated step on
    log10(mtv); see the module docstring and ``docs/tau.md`` for accuracy (about 70 % level agreement).

    >>> round(estimate_tau(torch.full((1, 3, 70, 70), 0.5)), 3)
    1.0
    """
    if painting.dim() != 4 or painting.shape[:2] != (1, 3):
        raise ValueError(f"estimate_tau: painting must be (1, 3, H, W), got {tuple(painting.shape)}")
    tau = tau_from_log_mtv(log_mtv(painting))
    return min(max(tau, TAU_RANGE[0]), TAU_RANGE[1])


def fit_constants(
    values: list[float], taus: list[float], *, centres: list[float], widths: list[float],
) -> tuple[float, float]:
    """Return (centre, width) minimising the summed absolute error of ``tau_from_log_mtv`` on the given cases.

    Grid search. Among the centres that tie for the best error, the middle one is kept (the step sits in the
    middle of the gap between the two groups); among widths, the widest that reaches the best error.
    """
    best: tuple[float, float, float] | None = None
    for width in sorted(widths, reverse=True):
        errors = [sum(abs(tau_from_log_mtv(v, c, width) - t) for v, t in zip(values, taus, strict=False)) for c in centres]
        lowest = min(errors)
        tied = [c for c, e in zip(centres, errors, strict=False) if e <= lowest + 1e-9]
        if best is None or lowest < best[0] - 1e-9:
            best = (lowest, tied[len(tied) // 2], width)
    return best[1], best[2]


def leave_one_out(
    values: list[float], taus: list[float], *, centres: list[float], widths: list[float],
) -> list[float]:
    """Return each case's tau predicted by constants fitted on the other cases (leave-one-out cross-validation)."""
    predictions = []
    for held_out in range(len(values)):
        rest = [i for i in range(len(values)) if i != held_out]
        centre, width = fit_constants([values[i] for i in rest], [taus[i] for i in rest],
                                      centres=centres, widths=widths)
        predictions.append(tau_from_log_mtv(values[held_out], centre, width))
    return predictions

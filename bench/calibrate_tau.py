"""Fit and cross-validate the ``tau="auto"`` estimator (harmonize_core/passes/tau.py) on the reference cases.

Usage: python bench/calibrate_tau.py [CASES_DIR]
(CASES_DIR: the 35 reference cases published with the authors' code, their data/ folder; default: a
shared/dph-cases folder beside the repository)

Reads ``N_target.jpg`` (the painting) and ``wikiart_output.txt`` (the authors' tau for case N), computes log10(mtv)
of each painting at 700 px, fits the two constants of ``tau_from_log_mtv`` on all cases (the values to paste into
harmonize_core/passes/tau.py), then reports leave-one-out figures: level agreement (nearest of 1/5/10), the per-level confusion matrix
and the mean absolute error, next to the constant baseline "always 5". The figures in docs/tau.md come from here.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.reference_cases import CASES_DIR, authors_taus
from harmonize_core.images import decode_image, read_bytes
from harmonize_core.passes.tau import (
    LOG_MTV_CENTRE,
    LOG_MTV_WIDTH,
    TAU_TEXTURED,
    fit_constants,
    leave_one_out,
    log_mtv,
)

LEVELS = (1.0, 5.0, 10.0)  # the authors' three levels (issue #6)
CENTRE_GRID = [round(-4.5 + 0.005 * i, 3) for i in range(501)]  # log10(mtv) from -4.5 to -2.0
WIDTH_GRID = [0.02, 0.05, 0.1, 0.2]


def read_cases(folder: Path) -> list[tuple[int, str, float, float]]:
    """Return (index, genre, authors' tau, log10 mtv) for every case with both a weight and a painting."""
    cases = []
    for index, (genre, tau) in authors_taus(folder).items():
        painting = folder / f"{index}_target.jpg"
        if painting.exists():
            cases.append((index, genre, tau, log_mtv(decode_image(read_bytes(painting), painting.name))))
    return cases


def nearest_level(tau: float) -> float:
    """Return the authors' level (1, 5 or 10) nearest to ``tau``."""
    return min(LEVELS, key=lambda level: abs(level - tau))


def summarise(name: str, taus: list[float], predictions: list[float]) -> dict[str, float]:
    """Print and return level agreement, confusion matrix (rows: authors' level) and mean absolute error."""
    truth, guess = [nearest_level(t) for t in taus], [nearest_level(p) for p in predictions]
    agree = sum(t == g for t, g in zip(truth, guess, strict=False))
    mae = sum(abs(t - p) for t, p in zip(taus, predictions, strict=False)) / len(taus)
    print(f"{name}: level agreement {agree}/{len(taus)} = {agree / len(taus):.3f}, mean absolute error {mae:.3f}")
    print("    authors' level -> predicted 1 / 5 / 10")
    for level in LEVELS:
        row = [sum(t == level and g == other for t, g in zip(truth, guess, strict=False)) for other in LEVELS]
        print(f"    {level:>4g} (n={sum(t == level for t in truth):2d}): {row[0]:3d} {row[1]:3d} {row[2]:3d}")
    return {"agreement": agree, "cases": len(taus), "mae": mae}


def main(argv: list[str]) -> int:
    folder = Path(argv[1]) if len(argv) > 1 else CASES_DIR
    if not (folder / "wikiart_output.txt").exists():
        print(f"{folder}: no wikiart_output.txt; pass the folder holding the reference cases (N_target.jpg, "
              "wikiart_output.txt)", file=sys.stderr)
        return 2
    cases = read_cases(folder)
    values, taus = [c[3] for c in cases], [c[2] for c in cases]
    centre, width = fit_constants(values, taus, centres=CENTRE_GRID, widths=WIDTH_GRID)
    print(f"fit on all {len(cases)} cases: LOG_MTV_CENTRE = {centre}, LOG_MTV_WIDTH = {width}"
          f"  (tau.py has {LOG_MTV_CENTRE}, {LOG_MTV_WIDTH})")
    predictions = leave_one_out(values, taus, centres=CENTRE_GRID, widths=WIDTH_GRID)
    summarise("leave-one-out", taus, predictions)
    summarise("baseline always 5", taus, [TAU_TEXTURED] * len(taus))
    print("\ncase  genre                          authors  log10(mtv)  LOO prediction")
    for (index, genre, tau, value), predicted in zip(cases, predictions, strict=False):
        print(f"{index:4d}  {genre[:29]:29s}  {tau:7.3f}  {value:10.3f}  {predicted:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

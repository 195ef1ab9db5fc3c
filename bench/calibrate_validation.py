"""Calibrate the manifest warnings (manifests/checks.py) on the reference cases.

Usage: python bench/calibrate_validation.py [CASES_DIR]   (default: ../shared/dph-cases next to the repository)

For every case with a composite (``N_naive.jpg``), a painting (``N_target.jpg``) and a tight mask (``N_c_mask.jpg``)
it prints what validation measures: the share of changed pixels outside the dilated mask (warned above
``OUTSIDE_WARN_FRACTION``) and outside the tight mask, the share of the tight mask that changed (warned below
``PASTED_MIN_FRACTION``) and the mask's grey share (warned above ``GREY_WARN_FRACTION``); then the same measures
on damaged copies of every case, which should warn: the mask eroded by 20 / 40 px (drawn too tight), the mask
feathered by a Gaussian (sigma 4 / 8 px) and the painting given as the composite (nothing pasted). The figures in
docs/manifests.md come from here.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.reference_cases import CASES_DIR
from harmonize_core.config import MaskConfig
from harmonize_core.images import decode_image, read_bytes
from harmonize_core.passes.masks import gaussian_kernel1d, separable_filter
from manifests.checks import (
    CHANGE_TOLERANCE_LEVELS,
    GREY_WARN_FRACTION,
    OUTSIDE_WARN_FRACTION,
    PASTED_MIN_FRACTION,
    grey_fraction,
    measure_consistency,
)

ERODE_PX = (20, 40)  # a mask drawn too tight: the object's outer band left out (px at 700)
FEATHER_SIGMA_PX = (4, 8)  # a soft mask (px at 700)


def erode(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Return the binary mask eroded by a (2 * pixels + 1) square."""
    return -F.max_pool2d(-mask, 2 * pixels + 1, stride=1, padding=pixels)


def feather(grey: torch.Tensor, sigma: float) -> torch.Tensor:
    """Return the grey mask blurred by a Gaussian of ``sigma`` pixels (a soft, feathered mask)."""
    width = 2 * int(3 * sigma) + 1
    return separable_filter(grey, gaussian_kernel1d(width, sigma)).clamp(0, 1)


def case_ids(folder: Path) -> list[int]:
    """Return the numbers of the cases with a composite, a painting and a tight mask, sorted."""
    found = [int(p.name.split("_")[0]) for p in folder.glob("*_naive.jpg")]
    return sorted(n for n in found if (folder / f"{n}_target.jpg").is_file() and (folder / f"{n}_c_mask.jpg").is_file())


def measure(folder: Path, number: int, masks: MaskConfig) -> dict[str, float]:
    """Return the clean and damaged measurements of one case."""
    content = decode_image(read_bytes(folder / f"{number}_naive.jpg"), "content")
    style = decode_image(read_bytes(folder / f"{number}_target.jpg"), "style")
    grey = decode_image(read_bytes(folder / f"{number}_c_mask.jpg"), "mask").mean(dim=1, keepdim=True)
    tight = (grey > masks.binarize_threshold).float()
    clean = measure_consistency(content, style, tight, masks)
    row = {"outside": clean.outside_fraction, "outside_tight": clean.outside_tight_fraction,
           "inside": clean.inside_fraction, "grey": grey_fraction(grey), "area": float(tight.mean())}
    for pixels in ERODE_PX:
        row[f"eroded{pixels}_outside"] = measure_consistency(content, style, erode(tight, pixels), masks).outside_fraction
    for sigma in FEATHER_SIGMA_PX:
        row[f"feather{sigma}_grey"] = grey_fraction(feather(grey, sigma))
    row["unpasted_inside"] = measure_consistency(style, style, tight, masks).inside_fraction
    return row


def summary(name: str, values: list[float]) -> str:
    """Return min / median / max of ``values`` as one line."""
    return f"{name:<22} min {min(values):.4f}  median {statistics.median(values):.4f}  max {max(values):.4f}"


def main(folder: Path) -> None:
    """Print the per-case table, the distributions and how many cases each threshold flags."""
    torch.set_num_threads(1)
    masks = MaskConfig()
    rows = {n: measure(folder, n, masks) for n in case_ids(folder)}
    columns = list(next(iter(rows.values())))
    print(f"tolerance {CHANGE_TOLERANCE_LEVELS} levels; {len(rows)} cases")
    print("case " + " ".join(f"{c:>16}" for c in columns))
    for number, row in rows.items():
        print(f"{number:>4} " + " ".join(f"{row[c]:>16.4f}" for c in columns))
    for column in columns:
        print(summary(column, [row[column] for row in rows.values()]))
    flagged = {
        f"outside > {OUTSIDE_WARN_FRACTION}": [n for n, r in rows.items() if r["outside"] > OUTSIDE_WARN_FRACTION],
        f"inside < {PASTED_MIN_FRACTION}": [n for n, r in rows.items() if r["inside"] < PASTED_MIN_FRACTION],
        f"grey > {GREY_WARN_FRACTION}": [n for n, r in rows.items() if r["grey"] > GREY_WARN_FRACTION],
    }
    for pixels in ERODE_PX:
        key = f"eroded{pixels}_outside"
        flagged[f"{key} > {OUTSIDE_WARN_FRACTION}"] = [n for n, r in rows.items() if r[key] > OUTSIDE_WARN_FRACTION]
    for sigma in FEATHER_SIGMA_PX:
        key = f"feather{sigma}_grey"
        flagged[f"{key} > {GREY_WARN_FRACTION}"] = [n for n, r in rows.items() if r[key] > GREY_WARN_FRACTION]
    flagged[f"unpasted_inside < {PASTED_MIN_FRACTION}"] = [
        n for n, r in rows.items() if r["unpasted_inside"] < PASTED_MIN_FRACTION]
    for name, numbers in flagged.items():
        print(f"{name}: {len(numbers)}/{len(rows)} cases {numbers if len(numbers) < len(rows) else '(all)'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else CASES_DIR)

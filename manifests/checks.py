"""Per-row content checks behind the manifest's warnings: mask greyness and composite/painting consistency.

These never stop a row; they flag rows a curator should look at (strict validation makes them errors):

- a **grey mask**: too many of the mask's pixels are neither near black nor near white (a feathered, soft or grey
  mask; the core splits it at ``masks.binarize_threshold``, so what runs may not be what was drawn);
- **changes outside the mask**: the composite should be the painting with the object pasted in, so where the two
  differ outside the *dilated* mask the mask is too tight (a halo or a part of the pasted object stays untouched) or
  the composite's background is not the painting's (re-encoded, resized, retouched);
- **nothing pasted**: the composite equals the painting over most of the tight mask.

Thresholds were calibrated on the 35 reference cases (docs/manifests.md). The analysis runs at a fixed long side
(``ANALYSIS_SIZE``, never upsampling) with the row's own mask settings, as ``stages.prepare_inputs`` and
``stages.dilate`` treat the mask: bilinear resize, > 0.5, then ``masks.dilate_mask``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from harmonize_core.config import PAPER_SIZE, MaskConfig
from harmonize_core.images import resize, working_shape
from harmonize_core.passes.masks import dilate_mask

ANALYSIS_SIZE = PAPER_SIZE  # long side of the consistency analysis (smaller inputs are analysed as they are)
LEVELS = 255.0
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, JPEG's Y: kept at full resolution, unlike its chroma
# A pixel "changed" when its luma differs by more than this many 8-bit levels. Luma, not the largest channel: JPEG's
# subsampled chroma moves single channels by up to ~50 levels at saturated edges (demo paintings at quality 92),
# while luma noise stays under 17 levels there and at or under 18 at the clean reference cases' 99.9th percentile.
CHANGE_TOLERANCE_LEVELS = 24
OUTSIDE_WARN_FRACTION = 0.03  # warn when more than 3% of the changed pixels lie outside the dilated mask
PASTED_MIN_FRACTION = 0.05  # warn when fewer than 5% of the tight mask's pixels changed (nothing pasted?)
NEAR_BLACK, NEAR_WHITE = 0.1, 0.9  # a mask pixel in between (channel mean, 0..1) is grey
GREY_WARN_FRACTION = 0.25  # warn when more than 25% of the mask's footprint (pixels above NEAR_BLACK) is grey
ANALYSIS_VERSION = 2  # bump when a measurement below changes: cached analyses are then recomputed


@dataclass(frozen=True)
class Consistency:
    """Composite vs painting at the analysis size.

    ``changed``: pixels whose luma differs by more than ``CHANGE_TOLERANCE_LEVELS``; ``outside_fraction``: the share of
    them outside the dilated mask; ``outside_tight_fraction``: the share outside the tight mask (JPEG ringing at the
    object's edge counts here, so it is reported, not warned on); ``inside_fraction``: the share of the tight mask's
    pixels that changed.
    """

    changed: int
    outside_fraction: float
    outside_tight_fraction: float
    inside_fraction: float

    def to_dict(self) -> dict[str, float]:
        """Return the measurements as a JSON-able dict."""
        return asdict(self)


def grey_fraction(grey: torch.Tensor) -> float:
    """Return the share of the mask's footprint (pixels above ``NEAR_BLACK``) below ``NEAR_WHITE``, in [0, 1].

    ``grey`` is the mask's channel mean (1, 1, H, W) in [0, 1]; 0.0 for an all-black mask.
    """
    footprint = grey > NEAR_BLACK
    count = int(footprint.sum())
    return float((footprint & (grey < NEAR_WHITE)).sum()) / count if count else 0.0


def measure_consistency(content: torch.Tensor, style: torch.Tensor, tight: torch.Tensor,
                        masks: MaskConfig) -> Consistency:
    """Return the ``Consistency`` of a composite and a painting (1, 3, H, W) in [0, 1] under a tight mask in {0, 1}.

    All three have the same (H, W). They are resized to long side ``min(ANALYSIS_SIZE, max(H, W))``; the mask is
    re-binarised at 0.5 and dilated by ``masks.dilate_mask`` with ``masks`` at that size.
    """
    height, width = content.shape[-2:]
    size = min(ANALYSIS_SIZE, max(height, width))
    shape = working_shape(height, width, size)
    small_tight = (resize(tight.float(), shape) > 0.5) if tuple(tight.shape[-2:]) != shape else tight > 0.5
    loose = dilate_mask(small_tight.float(), masks, size=size) > 0.5
    weights = torch.tensor(LUMA_WEIGHTS, dtype=content.dtype).view(1, 3, 1, 1)
    difference = ((resize(content, shape) - resize(style, shape)) * weights).sum(dim=1, keepdim=True).abs()
    changed = difference * LEVELS > CHANGE_TOLERANCE_LEVELS
    total, area = int(changed.sum()), int(small_tight.sum())
    return Consistency(
        changed=total,
        outside_fraction=_share(changed & ~loose, total),
        outside_tight_fraction=_share(changed & ~small_tight, total),
        inside_fraction=_share(changed & small_tight, area) if area else 1.0,
    )


def consistency_warnings(measured: Consistency) -> list[tuple[str, str]]:
    """Return ``[(column, message)]``: changes outside the dilated mask, or a composite with nothing pasted."""
    found = []
    if measured.outside_fraction > OUTSIDE_WARN_FRACTION:
        found.append(("mask", f"{_percent(measured.outside_fraction)} of the pixels where the composite differs from "
                              "the painting lie outside the dilated mask: the mask may miss part of the pasted object "
                              "(it would stay unharmonized) or the composite's background is not the painting's"))
    if measured.inside_fraction < PASTED_MIN_FRACTION:
        found.append(("content", f"the composite equals the painting on {_percent(1 - measured.inside_fraction)} of "
                                 "the mask: was the object pasted? (content is the painting with the object in it)"))
    return found


def grey_mask_warning(fraction: float, threshold: float) -> str:
    """Return the warning for a mask whose footprint is ``fraction`` grey, or "" when it is black and white enough."""
    if fraction <= GREY_WARN_FRACTION:
        return ""
    return (f"{_percent(fraction)} of the mask is grey (neither black nor white) and will be split at {threshold:g}: "
            "paint the object pure white on black")


def _share(selected: torch.Tensor, total: int) -> float:
    return float(selected.sum()) / total if total else 0.0


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"

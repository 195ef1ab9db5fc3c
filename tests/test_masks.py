"""Masks: dilation against the authors' published loose masks, feathering, per-layer propagation."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harmonize_core.config import MaskConfig
from harmonize_core.images import decode_mask, read_bytes
from harmonize_core.passes.masks import (
    dilate_mask,
    feather_mask,
    gaussian_kernel1d,
    propagate_mask,
    separable_filter,
)

CASES = Path(__file__).resolve().parents[2] / "shared" / "dph-cases"
# Case 8's published loose mask was made another way (IoU about 0.80 with the rule; docs/algorithm.md section 1).
OUTLIERS = {8}


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.skipif(not CASES.is_dir(), reason="reference cases not present")
def test_dilation_matches_authors_loose_masks():
    ious = {}
    for path in sorted(CASES.glob("*_c_mask.jpg")):
        case = int(path.name.split("_")[0])
        tight = decode_mask(read_bytes(path), path.name)
        published = decode_mask(read_bytes(CASES / f"{case}_c_mask_dilated.jpg"), "dilated")
        ours = dilate_mask(tight, MaskConfig(), size=max(tight.shape[-2:]))
        ious[case] = _iou(ours, published)
    assert len(ious) == 35
    good = {c: v for c, v in ious.items() if c not in OUTLIERS}
    assert min(good.values()) >= 0.95, sorted(good.items(), key=lambda kv: kv[1])[:3]
    assert sorted(good.values())[len(good) // 2] >= 0.99  # median
    assert ious[8] < 0.9  # the documented outlier stays an outlier: the rule is the authors' rule


def test_dilation_grows_a_straight_edge_by_12_px_at_700():
    # docs/algorithm.md section 1: the 35-tap support cuts the Gaussian at +-1.46 sigma and renormalises, so the 0.1
    # level sits at 12 px, not at the untruncated 1.28 sigma = 15 px. The published masks agree (test above).
    tight = torch.zeros(1, 1, 100, 700)
    tight[..., :, :350] = 1
    loose = dilate_mask(tight, MaskConfig(), size=700)
    grown = int(loose[0, 0, 50].sum()) - 350
    assert grown == 12


def test_dilation_scales_with_working_size():
    tight = torch.zeros(1, 1, 50, 350)
    tight[..., :, :175] = 1
    grown = int(dilate_mask(tight, MaskConfig(), size=350)[0, 0, 25].sum()) - 175
    assert 5 <= grown <= 7


def test_separable_gaussian_equals_2d_convolution_with_zero_padding():
    torch.manual_seed(0)
    image = torch.rand(1, 2, 17, 13)
    k = gaussian_kernel1d(7, 2.0)
    reference = F.conv2d(image, (k[:, None] * k[None, :]).expand(2, 1, 7, 7), padding=3, groups=2)
    assert torch.allclose(separable_filter(image, k), reference, atol=1e-6)
    assert abs(float(k.sum()) - 1) < 1e-6


def test_feather_is_nearly_a_box_and_zero_far_from_the_mask():
    tight = torch.zeros(1, 1, 21, 21)
    tight[..., 10, 10] = 1
    feathered = feather_mask(tight, 7)
    support = feathered[0, 0] > 0
    assert int(support.sum()) == 49  # exactly the 7x7 neighbourhood
    values = feathered[0, 0][support]
    assert float(values.max() / values.min()) < 1.03  # sigma 21 px on 7 taps: edge weight 0.99 per axis
    assert abs(float(feathered.sum()) - 1) < 1e-5


def test_propagate_mask_box_blurs_per_conv_and_halves_per_pool():
    mask = torch.ones(1, 1, 9, 11)
    one_conv = propagate_mask(mask, ["conv"])
    assert one_conv[0, 0, 4, 5] == 1  # interior untouched
    assert abs(float(one_conv[0, 0, 0, 0]) - 4 / 9) < 1e-6  # zero padding counted: corner sees 4 of 9
    pooled = propagate_mask(mask, ["conv", "conv", "pool"], ceil_mode=True)
    assert pooled.shape[-2:] == (5, 6)
    assert propagate_mask(mask, ["pool"], ceil_mode=False).shape[-2:] == (4, 5)

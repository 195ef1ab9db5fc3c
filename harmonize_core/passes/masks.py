"""Masks: loose-mask dilation, per-layer soft masks, and the feathered tight mask (docs/algorithm.md section 1).

Masks are ``(1, 1, H, W)`` float tensors. Pixel sizes are given at the paper's 700 px and scaled to the working size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import MaskConfig, odd_at_size, scale_to_size


def gaussian_kernel1d(width: int, sigma: float, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Return a normalised 1-D Gaussian of ``width`` taps (MATLAB ``fspecial('gaussian')`` is its outer product)."""
    offsets = torch.arange(width, device=device, dtype=dtype) - (width - 1) / 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def separable_filter(image: torch.Tensor, kernel1d: torch.Tensor) -> torch.Tensor:
    """Return ``image`` (N, C, H, W) filtered by ``kernel1d`` along both axes with zero padding ('same' size)."""
    channels, width = image.shape[1], kernel1d.numel()
    pad = width // 2
    horizontal = kernel1d.view(1, 1, 1, width).repeat(channels, 1, 1, 1)
    vertical = kernel1d.view(1, 1, width, 1).repeat(channels, 1, 1, 1)
    out = F.conv2d(F.pad(image, (pad, pad, 0, 0)), horizontal, groups=channels)
    return F.conv2d(F.pad(out, (0, 0, pad, pad)), vertical, groups=channels)


def dilate_mask(tight: torch.Tensor, config: MaskConfig, *, size: int) -> torch.Tensor:
    """Return the loose mask M+ (1, 1, H, W) in {0, 1}: Gaussian blur of the tight mask, then ``> threshold``.

    dilate_mask.m L23-30: 35x35 Gaussian, sigma 35/3, zero-padded ``imfilter 'same'``, ``J > 0.1`` -> 1 at 700 px;
    the support and sigma scale with the working ``size``. At 700 px a straight edge grows by about 12 px.
    """
    width = odd_at_size(config.dilate_kernel, size)
    sigma = scale_to_size(config.dilate_sigma, size)
    kernel = gaussian_kernel1d(width, sigma, device=tight.device, dtype=torch.float32)
    blurred = separable_filter(tight.float(), kernel)
    return (blurred > config.dilate_threshold).float()


def feather_mask(tight: torch.Tensor, kernel: int = 7) -> torch.Tensor:
    """Return the feathered tight mask (1, 1, H, W) in [0, 1] used for the final blend.

    neural_gram.lua L83-85: torch ``image.gaussian(7, 3, 1, true)`` has sigma relative to the width (3 * 7 = 21 px),
    so on a 7x7 support it is practically a box filter (edge weight 0.99); applied with zero padding. Kept at 7 px at
    every working size (differs from the other pixel sizes because it only softens the seam by a few pixels).
    """
    weights = gaussian_kernel1d(kernel, sigma=3.0 * kernel, device=tight.device)
    return separable_filter(tight.float(), weights).clamp(0, 1)


def propagate_mask(mask: torch.Tensor, plan: list[str], *, ceil_mode: bool = True) -> torch.Tensor:
    """Return the soft mask at a VGG layer, following ``plan`` (a list of "conv"/"pool" ops from the input).

    neural_gram.lua L110-115: every conv is a 3x3 average pool with stride 1 and zero padding counted (borders are
    attenuated); every max pool is a bilinear rescale to ceil(W/2) x ceil(H/2) (floor when ``ceil_mode`` is off).
    The mask is not thresholded: soft weights in [0, 1].
    """
    out = mask.float()
    for op in plan:
        if op == "conv":
            out = F.avg_pool2d(out, 3, stride=1, padding=1, count_include_pad=True)
        elif op == "pool":
            height, width = out.shape[-2:]
            shape = (math.ceil(height / 2), math.ceil(width / 2)) if ceil_mode else (height // 2, width // 2)
            out = F.interpolate(out, size=shape, mode="bilinear", align_corners=False)
        else:
            raise ValueError(f"unknown op {op!r} in layer plan")
    return out


def nearest_resize(mask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Return ``mask`` resized to ``shape`` by nearest neighbour (torch/image 'simple' scale)."""
    return F.interpolate(mask.float(), size=shape, mode="nearest")

"""The reconstruction stage: the authors' post-processing (``filt_cnn_artifact.m``) in PyTorch, no MATLAB.

docs/algorithm.md section 4. From the pass-2 result ``I``, the painting ``S``, the naive composite ``G`` and the tight
mask ``M`` (all at working size):

1. chrominance denoising: ``I`` to CIE-Lab, a guided filter on a* and b*, back to RGB -> ``O1`` (L31-45);
2. patch synthesis: PatchMatch of ``O1``'s patches in ``S``, then a vote -> ``O2_base``, made only of painting
   pixels (L47-51);
3. detail re-injection: ``O2 = O2_base + O1 - Gauss(O1)`` (L53-56);
4. blend: ``O2 * sM + S * (1 - sM)`` with the dilated, feathered tight mask ``sM`` (L24-29, L58).

Value ranges, as in the MATLAB code: images and guide in [0, 1] (``im2double``); Lab with L* in [0, 100] and a*, b*
in their natural range (``colorspace('rgb->lab')``, kornia's ``rgb_to_lab`` likewise). With the colour guide the
range of a*/b* does not matter: the guided filter is linear in the filtered signal, and ``eps`` is in squared guide
units, so it keeps its meaning for a [0, 1] guide. The luminance guide (the paper's variant) is L* / 100 for the
same reason.

Pixel sizes are the paper's at 700 px and scale with the working ``size`` (``odd_at_size``/``scale_to_size``):
guided radius 2 (at least 1), PatchMatch patch 7 (odd, at least 3), detail Gaussian 7x7 sigma 1, blend Gaussian
7x7 sigma 3. ``eps`` and the 0.01 threshold are intensities and do not scale.

Deviations from ``filt_cnn_artifact.m``, each for a reason:

- guided filter windows at the image border: kornia reflects the image, He et al.'s ``boxfilter`` averages the
  in-bounds pixels only; the results differ within 2 * radius px of the image border and nowhere else;
- Lab -> RGB: kornia clips out-of-gamut values, ``colorspace`` first adds white to negative linear RGB, then clips;
- the detail base ``Gauss(O1)`` uses reflected borders instead of ``imfilter``'s zero padding, which darkens the
  base near the image border and so adds a bright false "detail" rim where an object touches the frame;
- ``sM`` is made from the binarised tight mask (the stage's input), not the raw grey-level JPEG mask;
- PatchMatch queries only the pixels whose patch overlaps the blend region (``nnmex`` matches the whole image;
  only that region reaches the output), compares float values (``nnmex`` quantises [0, 1] floats to 8 bits) and
  propagates in parallel (see ``patchmatch.py``). Every step but the match works on the bounding box of the region
  plus a margin (``_crop_margin``) that gives the same values inside the region as the whole image would.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from kornia.color import lab_to_rgb, rgb_to_lab
from kornia.filters import gaussian_blur2d, guided_blur

from ..config import PostConfig, odd_at_size, scale_to_size
from .patchmatch import patch_distance, patchmatch, vote

LAB_L_MAX = 100.0  # L* range of CIE-Lab (colorspace.m, kornia rgb_to_lab): L* / 100 is a [0, 1] luminance guide
MIN_PATCH_SIZE = 3  # a 1x1 "patch" would only re-colour pixels: keep some structure at small working sizes
MIN_GUIDED_RADIUS = 1


def reconstruct(
    pass2: torch.Tensor, painting: torch.Tensor, composite: torch.Tensor, tight: torch.Tensor, config: PostConfig,
    *, size: int, seed: int,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Return the post-processed final image (1, 3, H, W) float32 in [0, 1] and JSON-able metrics.

    ``pass2``, ``painting`` (S) and ``composite`` (G) are (1, 3, H, W) in [0, 1], ``tight`` (1, 1, H, W) in {0, 1},
    all on one device. The output equals ``painting`` bit for bit where the feathered blend mask is 0.
    Metrics: ``step_seconds`` (wall time per sub-step), ``mean_patch_distance`` (squared L2 per 7x7x3 patch, in
    [0, 1] units, over the queried pixels), ``patchmatch_iterations``, pixel counts and the scaled sizes.
    Ports filt_cnn_artifact.m L17-58 (``k_final_res2.png``); PatchMatch is seeded with ``seed``.

    >>> image = torch.rand(1, 3, 32, 32); mask = torch.zeros(1, 1, 32, 32); mask[..., 12:20, 12:20] = 1
    >>> reconstruct(image, image, image, mask, PostConfig(), size=32, seed=0)[0].shape
    torch.Size([1, 3, 32, 32])
    """
    _check_shapes(pass2, painting, composite, tight)
    pass2, painting, composite, tight = (t.float() for t in (pass2, painting, composite, tight))
    sizes, device, seconds = scaled_sizes(config, size), pass2.device, {}
    with _timed(seconds, "blend_mask", device):
        weight = blend_mask(tight, config, size=size)
        rows, cols = _crop_box(weight[0, 0] > 0, _crop_margin(sizes))
        weight = weight[..., rows, cols]  # everything below works on the crop; the source stays the whole painting
        region = weight[0, 0] > 0
        query_mask = _dilate(region, sizes["patch_size"] // 2)
    with _timed(seconds, "chroma_denoise", device):
        denoised = denoise_chroma(pass2[..., rows, cols], composite[..., rows, cols], config, size=size)
    with _timed(seconds, "patchmatch", device):
        generator = torch.Generator(device=device).manual_seed(seed)
        nnf = patchmatch(denoised, painting, query_mask, patch_size=sizes["patch_size"],
                         iterations=config.patchmatch_iters, generator=generator)
    with _timed(seconds, "vote", device):
        base = vote(painting, nnf, region, sizes["patch_size"])
    with _timed(seconds, "detail_and_blend", device):
        behind = painting[..., rows, cols]
        blended = ((base + detail_layer(denoised, config, size=size)) * weight + behind * (1 - weight)).clamp(0, 1)
        out = painting.clone()
        out[..., rows, cols] = torch.where(weight > 0, blended, behind)
    distance = patch_distance(denoised, painting, nnf, sizes["patch_size"])[query_mask]
    metrics = {
        "step_seconds": {name: round(value, 4) for name, value in seconds.items()},
        "mean_patch_distance": float(distance.mean()) if distance.numel() else 0.0,
        "patchmatch_iterations": config.patchmatch_iters,
        "query_pixels": int(query_mask.sum()),
        "region_pixels": int(region.sum()),
        "crop": [rows.start, rows.stop, cols.start, cols.stop],
        "guide": config.guide,
        **sizes,
    }
    return out, metrics


def scaled_sizes(config: PostConfig, size: int) -> dict[str, int | float]:
    """Return the post-processing pixel sizes at working ``size`` (given at 700 px in ``config``)."""
    return {
        "guided_radius": max(MIN_GUIDED_RADIUS, round(scale_to_size(config.guided_radius, size))),
        "patch_size": max(MIN_PATCH_SIZE, odd_at_size(config.patch_size, size)),
        "detail_kernel": odd_at_size(config.detail_kernel, size),
        "detail_sigma": scale_to_size(config.detail_sigma, size),
        "blend_kernel": odd_at_size(config.blend_kernel, size),
        "blend_sigma": scale_to_size(config.blend_sigma, size),
    }


def guided_filter(guide: torch.Tensor, source: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """Return He et al.'s guided filter of ``source`` (1, Cs, H, W) by ``guide`` (1, Cg, H, W), same shape as source.

    A grey guide (Cg = 1) is ``guidedfilter.m``; a colour guide (Cg = 3) is ``guidedfilter_color.m``, the
    covariance form that solves (Sigma_k + eps I) a_k = cov_k(I, p) per window (He et al. 2010, eq. 14). Windows
    are (2 radius + 1)^2; borders reflect (kornia ``guided_blur``), where the MATLAB box filter averages the
    in-bounds pixels only. ``eps`` is in squared guide units.

    >>> guided_filter(torch.rand(1, 3, 8, 8), torch.rand(1, 2, 8, 8), 2, 0.01).shape
    torch.Size([1, 2, 8, 8])
    """
    return guided_blur(guide, source, 2 * radius + 1, eps, border_type="reflect")


def denoise_chroma(image: torch.Tensor, composite: torch.Tensor, config: PostConfig, *, size: int) -> torch.Tensor:
    """Return ``O1`` (1, 3, H, W) in [0, 1]: ``image`` with its Lab a*, b* guided-filtered, L* untouched.

    The guide is the RGB naive ``composite`` for ``config.guide == "composite"`` (filt_cnn_artifact.m L37-42,
    ``guidedfilter_color(G, ., r=2, eps=0.1^2)``) or L* / 100 of ``image`` for ``"luminance"`` (the paper).
    """
    lab = rgb_to_lab(image)
    guide = composite if config.guide == "composite" else lab[:, :1] / LAB_L_MAX
    radius = scaled_sizes(config, size)["guided_radius"]
    chroma = guided_filter(guide, lab[:, 1:], radius, config.guided_eps)
    return lab_to_rgb(torch.cat([lab[:, :1], chroma], dim=1), clip=True)


def detail_layer(image: torch.Tensor, config: PostConfig, *, size: int) -> torch.Tensor:
    """Return ``image - Gauss(image)`` (1, C, H, W): the detail that filt_cnn_artifact.m L53-56 adds to the vote.

    Gaussian 7x7, sigma 1 at 700 px (``fspecial('gaussian', 7, 1)``), scaled to ``size``; reflected borders.
    """
    sizes = scaled_sizes(config, size)
    kernel, sigma = sizes["detail_kernel"], sizes["detail_sigma"]
    return image - gaussian_blur2d(image, (kernel, kernel), (sigma, sigma), border_type="reflect")


def blend_mask(tight: torch.Tensor, config: PostConfig, *, size: int) -> torch.Tensor:
    """Return ``sM`` (1, 1, H, W) in [0, 1]: the tight mask blurred, set to 1 where > 0.01, blurred again.

    filt_cnn_artifact.m L24-29: ``fspecial('gaussian', 7, 3)`` with ``imfilter 'same'`` (zero padding), which
    dilates the mask by about 3 px and then feathers it over another 3 px at 700 px; scaled to ``size``.
    """
    sizes = scaled_sizes(config, size)
    kernel, sigma = sizes["blend_kernel"], sizes["blend_sigma"]
    blurred = gaussian_blur2d(tight.float(), (kernel, kernel), (sigma, sigma), border_type="constant")
    dilated = (blurred > config.blend_threshold).float()
    return gaussian_blur2d(dilated, (kernel, kernel), (sigma, sigma), border_type="constant").clamp(0, 1)


def _crop_margin(sizes: dict[str, int | float]) -> int:
    """Pixels kept around the blend region so that the crop gives the same values in it as the whole image.

    Region pixels read the denoised image up to 2 patch radii away (the patches of the queried pixels, which
    are within one patch radius) or a detail-kernel radius away; the guided filter's reflected border changes the
    2 guided radii nearest the crop edge, the detail blur's only pixels farther out. One more pixel for safety.
    """
    reach = max(2 * (sizes["patch_size"] // 2), sizes["detail_kernel"] // 2)
    return reach + 2 * sizes["guided_radius"] + 1


def _crop_box(region: torch.Tensor, margin: int) -> tuple[slice, slice]:
    """(rows, cols): the bounding box of ``region`` (H, W) bool grown by ``margin`` and clipped to the image."""
    height, width = region.shape
    rows, cols = region.any(dim=1).nonzero()[:, 0], region.any(dim=0).nonzero()[:, 0]
    if rows.numel() == 0:  # nothing to reconstruct: the whole image keeps every step well-defined
        return slice(0, height), slice(0, width)
    top, bottom = max(0, int(rows[0]) - margin), min(height, int(rows[-1]) + 1 + margin)
    left, right = max(0, int(cols[0]) - margin), min(width, int(cols[-1]) + 1 + margin)
    return slice(top, bottom), slice(left, right)


def _dilate(region: torch.Tensor, radius: int) -> torch.Tensor:
    """(H, W) bool: the pixels within ``radius`` (Chebyshev) of ``region``, i.e. whose patch overlaps it."""
    grown = F.max_pool2d(region.float()[None, None], 2 * radius + 1, stride=1, padding=radius)
    return grown[0, 0] > 0


def _check_shapes(pass2: torch.Tensor, painting: torch.Tensor, composite: torch.Tensor, tight: torch.Tensor) -> None:
    height, width = painting.shape[-2:]
    expected = {"pass2": (pass2, 3), "painting": (painting, 3), "composite": (composite, 3), "tight": (tight, 1)}
    for name, (tensor, channels) in expected.items():
        if tuple(tensor.shape) != (1, channels, height, width):
            raise ValueError(f"reconstruct: {name} must be (1, {channels}, {height}, {width}) like the painting, "
                             f"got {tuple(tensor.shape)}")
    if len({t.device for t in (pass2, painting, composite, tight)}) != 1:
        raise ValueError("reconstruct: all inputs must be on the same device")


@contextmanager
def _timed(seconds: dict[str, float], name: str, device: torch.device) -> Iterator[None]:
    """Record the wall time of the block under ``name`` (synchronising CUDA so queued kernels are counted)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds[name] = time.perf_counter() - started

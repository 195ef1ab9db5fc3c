"""The reconstruction stage (harmonize_core/postprocess/reconstruct.py) against direct references of filt_cnn_artifact.m."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from kornia.color import lab_to_rgb, rgb_to_lab

from harmonize_core.config import PostConfig
from harmonize_core.postprocess import reconstruct as postprocess
from harmonize_core.postprocess.reconstruct import (
    blend_mask,
    denoise_chroma,
    detail_layer,
    guided_filter,
    reconstruct,
    scaled_sizes,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _reflect(index: int, size: int) -> int:
    """torch/kornia 'reflect' padding (the edge pixel is not repeated)."""
    if index < 0:
        return -index
    if index >= size:
        return 2 * (size - 1) - index
    return index


def _window(height, width, y, x, radius, reflect):
    """The pixels of the (2r+1)^2 window at (y, x): reflected indices, or only the in-bounds ones (MATLAB)."""
    pixels = []
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if reflect:
                pixels.append((_reflect(y + dy, height), _reflect(x + dx, width)))
            elif 0 <= y + dy < height and 0 <= x + dx < width:
                pixels.append((y + dy, x + dx))
    return pixels


def _guided_reference(guide, source, radius, eps, reflect=True):
    """He et al. 2010 (guidedfilter.m / guidedfilter_color.m) with explicit window sums, in float64.

    Step 1, per window k: mean and covariance of the guide I, mean of p, cov(I, p); a_k = (Sigma_k + eps U)^-1
    cov_k(I, p), b_k = mean_k(p) - a_k . mean_k(I). Step 2, per pixel i: q_i = mean over the windows k that
    contain i of (a_k . I_i + b_k). ``reflect`` chooses kornia's reflected windows; otherwise the MATLAB box filter,
    which averages over the in-bounds pixels only.
    """
    guide, source = guide[0].double(), source[0].double()
    channels, height, width = guide.shape
    a = torch.zeros(height, width, channels, source.shape[0], dtype=torch.float64)
    b = torch.zeros(height, width, source.shape[0], dtype=torch.float64)
    for y in range(height):
        for x in range(width):
            window = _window(height, width, y, x, radius, reflect)
            I = torch.stack([guide[:, wy, wx] for wy, wx in window])  # (n, Cg)
            p = torch.stack([source[:, wy, wx] for wy, wx in window])  # (n, Cs)
            mean_I, mean_p = I.mean(0), p.mean(0)
            sigma = (I.T @ I) / len(window) - torch.outer(mean_I, mean_I)
            cov = (I.T @ p) / len(window) - torch.outer(mean_I, mean_p)
            a[y, x] = torch.linalg.solve(sigma + eps * torch.eye(channels, dtype=torch.float64), cov)
            b[y, x] = mean_p - mean_I @ a[y, x]
    out = torch.zeros_like(source)
    for y in range(height):
        for x in range(width):
            window = _window(height, width, y, x, radius, reflect)
            mean_a = torch.stack([a[wy, wx] for wy, wx in window]).mean(0)
            mean_b = torch.stack([b[wy, wx] for wy, wx in window]).mean(0)
            out[:, y, x] = guide[:, y, x] @ mean_a + mean_b
    return out[None]


@pytest.mark.parametrize("guide_channels", [3, 1])
def test_guided_filter_matches_he_et_al_with_explicit_windows(guide_channels):
    guide = _rand(1, guide_channels, 11, 13, seed=1)
    source = _rand(1, 2, 11, 13, seed=2)
    ours = guided_filter(guide, source, 2, 0.01)  # float32, as used
    reference = _guided_reference(guide, source, 2, 0.01, reflect=True)
    torch.testing.assert_close(ours.double(), reference, rtol=0, atol=1e-5)
    # the MATLAB box filter averages in-bounds pixels only: identical away from the border (2 * radius px)
    matlab = _guided_reference(guide, source, 2, 0.01, reflect=False)
    torch.testing.assert_close(ours.double()[..., 4:-4, 4:-4], matlab[..., 4:-4, 4:-4], rtol=0, atol=1e-5)
    assert (ours.double() - matlab).abs().max() > 1e-4  # ... and they do differ at the border


def test_guided_filter_is_linear_in_the_filtered_signal():
    # why the a*/b* range (about +-100, not [0, 1]) does not change the result of the colour-guided filter
    guide, source = _rand(1, 3, 16, 16, seed=3), _rand(1, 2, 16, 16, seed=4)
    scaled = guided_filter(guide, 100 * source - 50, 2, 0.01)
    torch.testing.assert_close(scaled, 100 * guided_filter(guide, source, 2, 0.01) - 50, rtol=1e-5, atol=1e-3)


def test_lab_round_trip_and_chroma_denoise_keeps_lightness_and_flat_colour():
    image = _rand(1, 3, 24, 24, seed=5) * 0.8 + 0.1
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(image)), image, rtol=0, atol=1e-4)
    flat = torch.tensor([0.7, 0.4, 0.2]).view(1, 3, 1, 1).expand(1, 3, 24, 24).contiguous()
    torch.testing.assert_close(denoise_chroma(flat, image, PostConfig(), size=700), flat, rtol=0, atol=1e-4)
    muted = 0.4 + 0.2 * image  # colours whose filtered chroma stays in the sRGB gamut (no clipping on the way back)
    denoised = denoise_chroma(muted, muted, PostConfig(), size=700)
    torch.testing.assert_close(rgb_to_lab(denoised)[:, 0], rgb_to_lab(muted)[:, 0], rtol=0, atol=0.01)
    assert rgb_to_lab(denoised)[:, 1:].std() < rgb_to_lab(muted)[:, 1:].std()  # the chroma is smoothed


def test_luminance_guide_is_the_papers_variant():
    image, composite = 0.4 + 0.2 * _rand(1, 3, 20, 20, seed=6), _rand(1, 3, 20, 20, seed=7)
    by_composite = denoise_chroma(image, composite, PostConfig(guide="composite"), size=700)
    by_luminance = denoise_chroma(image, composite, PostConfig(guide="luminance"), size=700)
    lab = rgb_to_lab(image)
    expected = guided_filter(lab[:, :1] / 100, lab[:, 1:], 2, 0.01)
    torch.testing.assert_close(rgb_to_lab(by_luminance)[:, 1:], expected, rtol=0, atol=0.01)
    assert not torch.allclose(by_composite, by_luminance)


def _fspecial_gaussian(width: int, sigma: float) -> torch.Tensor:
    """MATLAB fspecial('gaussian', width, sigma): exp(-(x^2 + y^2) / (2 sigma^2)), normalised to sum 1."""
    offsets = torch.arange(width, dtype=torch.float64) - (width - 1) / 2
    kernel = torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    return kernel / kernel.sum()


def test_blend_mask_is_the_authors_blur_threshold_blur():
    tight = torch.zeros(1, 1, 30, 30)
    tight[..., 10:18, 0:12] = 1  # touches the left border: zero padding matters there
    kernel = _fspecial_gaussian(7, 3.0)[None, None]
    first = F.conv2d(tight.double(), kernel, padding=3)  # imfilter(M, h, 'same'): zero padding
    expected = F.conv2d((first > 0.01).double(), kernel, padding=3)
    torch.testing.assert_close(blend_mask(tight, PostConfig(), size=700).double(), expected, rtol=0, atol=1e-6)


def test_detail_layer_is_image_minus_its_gaussian_base():
    image = _rand(1, 3, 20, 20, seed=8)
    kernel = _fspecial_gaussian(7, 1.0)[None, None].repeat(3, 1, 1, 1)
    base = F.conv2d(F.pad(image.double(), (3, 3, 3, 3), mode="reflect"), kernel, groups=3)
    torch.testing.assert_close(detail_layer(image, PostConfig(), size=700).double(), image.double() - base,
                               rtol=0, atol=1e-6)


def test_sizes_scale_from_700_px():
    assert scaled_sizes(PostConfig(), 700) == {"guided_radius": 2, "patch_size": 7, "detail_kernel": 7,
                                               "detail_sigma": 1.0, "blend_kernel": 7, "blend_sigma": 3.0}
    half = scaled_sizes(PostConfig(), 350)
    assert half["guided_radius"] == 1 and half["patch_size"] == 5 and half["blend_sigma"] == 1.5
    assert scaled_sizes(PostConfig(), 100)["patch_size"] == 3  # never below 3


def _scene(device: str, size: int = 48):
    """A painting, a composite with a pasted square, a mask, and a noisy 'pass-2' image, all (1, C, size, size)."""
    painting = _rand(1, 3, size, size, seed=10).to(device)
    tight = torch.zeros(1, 1, size, size, device=device)
    tight[..., 16:30, 18:32] = 1
    composite = torch.where(tight > 0, _rand(1, 3, size, size, seed=11).to(device), painting)
    pass2 = (composite + 0.05 * torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(12))
             .to(device)).clamp(0, 1)
    return pass2, painting, composite, tight


@pytest.mark.parametrize("device", DEVICES)
def test_reconstruct_is_bit_identical_to_the_painting_outside_the_feathered_mask(device):
    pass2, painting, composite, tight = _scene(device)
    out, metrics = reconstruct(pass2, painting, composite, tight, PostConfig(), size=700, seed=316)
    outside = (blend_mask(tight, PostConfig(), size=700) == 0).expand_as(painting)
    assert outside.float().mean() > 0.5
    assert torch.equal(out[outside], painting[outside])
    assert not torch.equal(out[~outside], painting[~outside])
    assert out.shape == painting.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    json.dumps(metrics)  # JSON-able
    assert metrics["region_pixels"] == int((~outside[0, 0]).sum())
    assert metrics["query_pixels"] > metrics["region_pixels"]
    assert set(metrics["step_seconds"]) == {"blend_mask", "chroma_denoise", "patchmatch", "vote", "detail_and_blend"}
    assert math.isfinite(metrics["mean_patch_distance"])


def test_reconstruct_is_deterministic_for_a_seed():
    scene = _scene("cpu")
    first, _ = reconstruct(*scene, PostConfig(), size=700, seed=1)
    again, _ = reconstruct(*scene, PostConfig(), size=700, seed=1)
    other, _ = reconstruct(*scene, PostConfig(patchmatch_iters=0), size=700, seed=2)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_before_detail_the_region_is_made_of_painting_pixels(monkeypatch):
    # A two-level painting (every channel value 0 or 1): a pixel of the vote is the mean of the 7 x 7 = 49
    # painting pixels that the overlapping matched patches place on it, so 49 times it is a whole number.
    pass2, _, composite, tight = _scene("cpu")
    painting = (_rand(1, 3, 48, 48, seed=13) > 0.5).float()
    monkeypatch.setattr(postprocess, "detail_layer", lambda image, config, size: torch.zeros_like(image))
    out, _ = reconstruct(pass2, painting, composite, tight, PostConfig(), size=700, seed=0)
    full = blend_mask(tight, PostConfig(), size=700) > 1 - 1e-6  # where the output is the vote alone
    assert full.sum() > 50
    votes = out[full.expand_as(out)] * 49
    torch.testing.assert_close(votes, votes.round(), rtol=0, atol=1e-4)


def test_reconstruct_rejects_mismatched_shapes():
    pass2, painting, composite, tight = _scene("cpu")
    with pytest.raises(ValueError, match="tight must be"):
        reconstruct(pass2, painting, composite, tight[..., :40], PostConfig(), size=700, seed=0)


def test_working_on_the_crop_around_the_region_changes_nothing(monkeypatch):
    pass2, painting, composite, tight = _scene("cpu", size=64)
    cropped, metrics = reconstruct(pass2, painting, composite, tight, PostConfig(), size=700, seed=3)
    assert metrics["crop"] != [0, 64, 0, 64]  # the region's box, not the whole image
    monkeypatch.setattr(postprocess, "_crop_box", lambda region, margin: (slice(0, 64), slice(0, 64)))
    whole, _ = reconstruct(pass2, painting, composite, tight, PostConfig(), size=700, seed=3)
    torch.testing.assert_close(cropped, whole, rtol=0, atol=1e-6)


def test_an_empty_mask_returns_the_painting():
    pass2, painting, composite, tight = _scene("cpu")
    out, metrics = reconstruct(pass2, painting, composite, torch.zeros_like(tight), PostConfig(), size=700, seed=0)
    assert torch.equal(out, painting) and metrics["region_pixels"] == 0

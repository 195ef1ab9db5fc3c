"""Per-item quality scores of a harmonized result: style distance, structure kept, seam visibility.

``quality_scores(result, content, style, tight)`` returns three numbers, each measured on a fixed analysis grid
(every input resampled so that its long side is ``ANALYSIS_SIZE``, so the numbers do not depend on the working size):

- ``style`` (lower is better; about 1 = as close to the painting around the region as the painting is to itself):
  a sliced-Wasserstein distance between the region of the result (the tight mask) and a ring of the painting around
  it, on the features of a fixed, seeded random-filter network (one convolution layer of zero-mean random 5x5
  filters applied at three scales of an image pyramid, Ustyuzhaninov et al. 2017, plus the pixels' CIE-Lab colour).
  Every feature's 1-D Wasserstein distance (between quantiles) is divided by that feature's spread in the ring; the
  mean over features is divided by the same distance between two disjoint halves of the ring (the painting's own
  variation around the object). The network shares nothing with the optimisation's VGG (not its weights, not its
  architecture, not its statistic: Grams and histograms of VGG features there, quantiles of random projections here).
- ``structure`` (higher is better, in [0, 1]; 1 = every edge of the object kept, 0 = none): the correlation between
  the gradient magnitudes of the result's and the composite's lightness inside the tight mask, at four scales from
  fine detail to the object's large shapes (smoothing inside the mask only, so that the painting around the object
  and the seam do not count), negative correlations counted as 0, averaged over the scales.
- ``seam`` (lower is better; about 1 = the seam is no stronger than the painting's own edges there): the mean colour
  gradient across the mask boundary (its component normal to the boundary) in a thin band around the boundary of the
  result, divided by the same in the painting.

Pure torch; deterministic (the random filters and the pixel subsamples come from fixed seeds).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_lab
from kornia.filters import gaussian_blur2d, spatial_gradient

ANALYSIS_SIZE = 512  # long side (px) every score is measured at
SEED = 20180101  # the random filters and the pixel subsamples
FILTERS_PER_SCALE = 32
FILTER_SIZE = 5
PYRAMID_SCALES = (1, 2, 4)  # average-pool factors of the image the random filters see
LAB_SCALE = (100.0, 128.0, 128.0)  # L*, a*, b* divided by these: comparable units before the per-feature spread
QUANTILES = 64  # quantile levels of each 1-D Wasserstein distance
MAX_SAMPLES = 4096  # positions drawn (seeded) from each region before the quantiles
RING_GAP = 8  # px at ANALYSIS_SIZE between the tight mask and the ring (about the loose mask's margin)
RING_MIN_WIDTH = 16  # px at ANALYSIS_SIZE
RING_RADIUS_FRACTION = 0.5  # ring width as a fraction of the region's equivalent radius, when wider than the minimum
MIN_PIXELS = 32  # fewer pixels in a ring or an eroded mask: fall back to a wider one
STRUCTURE_SIGMAS = (1.0, 2.0, 4.0, 8.0)  # px at ANALYSIS_SIZE: gradient scales of the structure score (fine detail to shapes)
STRUCTURE_ERODE = 3  # px at ANALYSIS_SIZE (plus one upsampled input pixel) removed from the mask edge for the structure score
SEAM_SIGMA = 1.0  # px at ANALYSIS_SIZE: gradient scale of the seam score
SEAM_BAND = 2  # px at ANALYSIS_SIZE each side of the boundary
EPS = 1e-8
SPREAD_FLOOR = 0.01  # added to each feature's spread in the ring (features are in about [0, 1] units; flat rings)
BASELINE_FLOOR = 0.05  # the ring's halves differ at least this much (real paintings: 0.15-0.9; a flat painting: 0)
FLAT = 0.1  # L* per px: a gradient-magnitude spread below this (invisible) is no structure to keep at that scale
SEAM_FLOOR = 1e-3  # per-pixel colour gradient (about a quarter of an 8-bit level): a flat painting's edges


def quality_scores(
    result: torch.Tensor, content: torch.Tensor, style: torch.Tensor, tight: torch.Tensor,
    *, loose: torch.Tensor | None = None,
) -> dict[str, float]:
    """Return ``{"style", "structure", "seam"}`` of ``result`` (plain floats; directions in the module docstring).

    ``result`` (the harmonized image), ``content`` (the naive composite) and ``style`` (the painting) are
    (1, 3, H, W) in [0, 1]; ``tight`` (1, 1, H, W) in {0, 1}; all the same size. ``loose`` (the dilated mask, same
    size) only moves the inner edge of the style ring outside it when given. Runs on the CPU; every score only
    reads a crop around the region (the mask, its ring and the filters' reach).
    """
    _check(result, content, style, tight)
    upscale = max(1.0, ANALYSIS_SIZE / max(style.shape[-2:]))  # a small input's pixel edges spread over this many px
    images = [_analysis(t.detach().float().cpu()) for t in (result, content, style, tight)]
    if loose is not None:
        images.append(_analysis(loose.detach().float().cpu()))
    images[3] = _binary(images[3])
    rows, cols = _box(images[3][0, 0] > 0.5, _reach(images[3]))
    images = [image[..., rows, cols] for image in images]
    result, content, style, tight = images[:4]
    loose = _binary(images[4]) if loose is not None else None
    labs = [rgb_to_lab(image) for image in (result, content, style)]
    return {
        "style": style_distance(result, style, tight, loose=loose, labs=(labs[0], labs[2])),
        "structure": structure_kept(labs[0][:, :1], labs[1][:, :1], tight, erode=STRUCTURE_ERODE + math.ceil(upscale) - 1),
        "seam": seam_visibility(result, style, tight),
    }


def _binary(mask: torch.Tensor) -> torch.Tensor:
    """A resampled mask back in {0, 1} (split at 0.5; any coverage counts when nothing reaches 0.5)."""
    return (mask > 0.5).float() if bool((mask > 0.5).any()) else (mask > 0).float()


def _reach(tight: torch.Tensor) -> int:
    """Pixels around the mask that any score reads: the style ring plus the coarsest random filter's support."""
    return RING_GAP + _ring_width(tight) + FILTER_SIZE * max(PYRAMID_SCALES)


# ---------------------------------------------------------------------------------------------------- style


def style_distance(result: torch.Tensor, style: torch.Tensor, tight: torch.Tensor, *,
                   loose: torch.Tensor | None = None,
                   labs: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
    """Return the normalised style distance (>= 0, lower is better) of ``result``'s region to the painting's ring.

    Sliced Wasserstein distance between the judge network's features of the region (in ``result``) and of the
    ring (in the painting), divided by the same distance between the ring's two halves. ``labs`` are the two
    images' CIE-Lab values when already computed.
    """
    ring = style_ring(tight, loose)
    half_a, half_b = split_halves(ring)
    sets = {"region": tight[0, 0], "ring": ring.float(), "half_a": half_a.float(), "half_b": half_b.float()}
    labs = labs or (None, None)
    distance = baseline = 0.0
    groups = zip((1, *PYRAMID_SCALES), random_features(result, labs[0]), random_features(style, labs[1]), strict=True)
    for scale, ours, theirs in groups:
        samples = {name: _positions(ours if name == "region" else theirs, mask, scale) for name, mask in sets.items()}
        spread = samples["ring"].std(dim=1) + SPREAD_FLOOR
        distance += sliced_distance(samples["region"], samples["ring"], spread)
        baseline += sliced_distance(samples["half_a"], samples["half_b"], spread)
    return float(distance / max(baseline, BASELINE_FLOOR * (1 + len(PYRAMID_SCALES))))


def random_filters() -> list[torch.Tensor]:
    """Return one bank of zero-mean, unit-norm random filters (FILTERS_PER_SCALE, 3, 5, 5) per pyramid scale."""
    generator = torch.Generator().manual_seed(SEED)
    banks = []
    for _ in PYRAMID_SCALES:
        bank = torch.randn(FILTERS_PER_SCALE, 3, FILTER_SIZE, FILTER_SIZE, generator=generator)
        bank = bank - bank.mean(dim=(1, 2, 3), keepdim=True)
        banks.append(bank / bank.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
    return banks


_FILTERS: list[torch.Tensor] = []


def random_features(image: torch.Tensor, lab: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Return the judge network's feature maps of ``image`` (1, 3, H, W), one (1, F, h, w) tensor per group.

    Group 0 is the pixels' Lab colour (3 features at full size); then, for each pyramid scale s, the image
    average-pooled by s and convolved with that scale's random bank (reflected borders, size ceil(H/s) x ceil(W/s)).
    """
    if not _FILTERS:
        _FILTERS.extend(random_filters())
    lab = rgb_to_lab(image) if lab is None else lab
    groups = [lab / torch.tensor(LAB_SCALE).view(1, 3, 1, 1)]
    pad = FILTER_SIZE // 2
    for scale, bank in zip(PYRAMID_SCALES, _FILTERS, strict=True):
        pooled = F.avg_pool2d(image, scale, ceil_mode=True) if scale > 1 else image
        groups.append(F.conv2d(F.pad(pooled, (pad,) * 4, mode="reflect"), bank))
    return groups


def _positions(features: torch.Tensor, mask: torch.Tensor, scale: int) -> torch.Tensor:
    """(F, N): the feature vectors of ``features`` (1, F, h, w) at the positions of ``mask`` (H, W) pooled by ``scale``.

    A position counts when at least half of its pooled footprint is in the mask (any part of it when no position
    has half); at most MAX_SAMPLES positions, drawn with a fixed seed.
    """
    cover = F.avg_pool2d(mask[None, None], scale, ceil_mode=True)[0, 0] if scale > 1 else mask
    chosen = cover >= 0.5 if bool((cover >= 0.5).any()) else cover > 0
    values = features[0][:, chosen]
    if values.shape[1] > MAX_SAMPLES:
        generator = torch.Generator().manual_seed(SEED)
        values = values[:, torch.randperm(values.shape[1], generator=generator)[:MAX_SAMPLES]]
    return values


def sliced_distance(first: torch.Tensor, second: torch.Tensor, spread: torch.Tensor) -> float:
    """Return the mean over features of the 1-D Wasserstein-1 distance between ``first`` (F, N) and ``second`` (F, M).

    Each feature's distance is the mean absolute difference of QUANTILES quantiles (nearest rank), divided by
    ``spread`` (F,).
    """
    levels = (torch.arange(QUANTILES, dtype=torch.float32) + 0.5) / QUANTILES
    quantiles = [_quantiles(values, levels) for values in (first, second)]
    return float(((quantiles[0] - quantiles[1]).abs().mean(dim=1) / spread).mean())


def _quantiles(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """(F, Q): the ``levels`` quantiles of each row of ``values`` (F, N) by sorting (nearest rank)."""
    ordered = values.sort(dim=1).values
    index = (levels * values.shape[1]).long().clamp(max=values.shape[1] - 1)
    return ordered[:, index]


def style_ring(tight: torch.Tensor, loose: torch.Tensor | None = None) -> torch.Tensor:
    """Return the ring (H, W) bool of painting around the region: outside the tight mask grown by RING_GAP (or
    outside ``loose``), inside it grown by the ring width (max of RING_MIN_WIDTH and a fraction of the region's
    equivalent radius). Falls back to all the painting outside the inner edge, then outside the tight mask, then the
    whole painting, when the ring has fewer than MIN_PIXELS pixels."""
    inner = _grow(tight, RING_GAP) if loose is None else torch.maximum(loose, tight)
    candidates = ((_grow(inner, _ring_width(tight)) > 0.5) & (inner < 0.5), inner < 0.5, tight < 0.5)
    for ring in candidates:
        if int(ring.sum()) >= MIN_PIXELS:
            return ring[0, 0]
    return torch.ones_like(tight[0, 0], dtype=torch.bool)


def _ring_width(tight: torch.Tensor) -> int:
    """The ring's width in px: RING_RADIUS_FRACTION of the region's equivalent radius, at least RING_MIN_WIDTH."""
    return max(RING_MIN_WIDTH, round(RING_RADIUS_FRACTION * math.sqrt(float(tight.sum()) / math.pi)))


def split_halves(ring: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return two disjoint halves (H, W) bool of ``ring`` with as many pixels each: split across the ring's longer
    extent (left/right for a wide ring, top/bottom for a tall one), i.e. on either side of the region."""
    rows, cols = torch.nonzero(ring, as_tuple=True)
    along = cols if (cols.max() - cols.min()) >= (rows.max() - rows.min()) else rows
    order = torch.argsort(along * ring.shape[0] * ring.shape[1] + rows * ring.shape[1] + cols)  # ties: raster order
    first = torch.zeros_like(ring)
    first[rows[order[: len(order) // 2]], cols[order[: len(order) // 2]]] = True
    return first, ring & ~first


# ---------------------------------------------------------------------------------------------------- structure


def structure_kept(result_lightness: torch.Tensor, content_lightness: torch.Tensor, tight: torch.Tensor, *,
                   erode: int = STRUCTURE_ERODE) -> float:
    """Return the structure kept in [0, 1] (higher is better) from the two images' L* (1, 1, H, W) in [0, 100].

    At each of STRUCTURE_SIGMAS: the correlation of the two gradient magnitudes over the mask eroded by ``erode``
    px (STRUCTURE_ERODE, plus the width of one input pixel when the input was upsampled to ANALYSIS_SIZE), the images
    being smoothed inside the mask only (normalised convolution), so that nothing outside the object (the painting
    around it, the seam) leaks in; negative correlations count as 0. The mean over the scales where the composite
    has structure (a flat object has nothing to lose: 1).
    """
    inside = _shrink(tight, erode)[0, 0] > 0.5
    if int(inside.sum()) < MIN_PIXELS:
        inside = tight[0, 0] > 0.5
    scores = []
    for sigma in STRUCTURE_SIGMAS:
        weight = _blur(tight, sigma) + EPS
        ours, theirs = (_gradient(_blur(image * tight, sigma) / weight, 0.0).square().sum(dim=2).sqrt()[0, 0][inside]
                        for image in (result_lightness, content_lightness))
        if theirs.numel() > 1 and float(theirs.std()) > FLAT:  # else no structure at this scale: not counted
            scores.append(max(0.0, _correlation(ours, theirs)) if float(ours.std()) > FLAT else 0.0)
    return float(sum(scores) / len(scores)) if scores else 1.0


def _correlation(first: torch.Tensor, second: torch.Tensor) -> float:
    """Pearson correlation in [-1, 1] of two 1-D tensors (0 when either is constant)."""
    first, second = first - first.mean(), second - second.mean()
    return float((first * second).sum() / ((first.square().sum() * second.square().sum()).sqrt() + EPS))


# ---------------------------------------------------------------------------------------------------- seam


def seam_visibility(result: torch.Tensor, style: torch.Tensor, tight: torch.Tensor) -> float:
    """Return the seam strength (>= 0; about 1 = no stronger than the painting's own edges there; lower is better).

    In the band of SEAM_BAND px either side of the mask's boundary (the image border is no boundary): the mean over
    the band of the colour gradient's component normal to the boundary (RGB, summed over channels, Gaussian
    derivative of SEAM_SIGMA px) in ``result``, divided by the same in the painting (at least SEAM_FLOOR). 1 when
    the mask has no boundary inside the image.
    """
    band = ((_grow(tight, SEAM_BAND) - _shrink(tight, SEAM_BAND)) > 0.5)[0, 0]
    if not bool(band.any()):
        return 1.0
    normal = _gradient(tight, 2.0 * SEAM_BAND)[0, 0]  # (2, H, W): points across the boundary
    normal = normal / (normal.square().sum(dim=0, keepdim=True).sqrt() + EPS)
    across = [float((_gradient(image, SEAM_SIGMA)[0] * normal).sum(dim=1).abs().sum(dim=0)[band].mean())
              for image in (result, style)]
    return across[0] / max(across[1], SEAM_FLOOR)


# ---------------------------------------------------------------------------------------------------- helpers


def _gradient(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, C, 2, H, W): x and y derivatives (per pixel) of ``image`` smoothed by a Gaussian of ``sigma`` px."""
    return spatial_gradient(_blur(image, sigma), mode="diff", order=1)


def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """``image`` smoothed by a Gaussian of ``sigma`` px (3 sigma support, reflected borders); unchanged for 0."""
    if sigma <= 0:
        return image
    kernel = 2 * math.ceil(3 * sigma) + 1
    return gaussian_blur2d(image, (kernel, kernel), (sigma, sigma), border_type="reflect")


def _box(region: torch.Tensor, margin: int) -> tuple[slice, slice]:
    """(rows, cols): the bounding box of ``region`` (H, W) bool grown by ``margin`` px, clipped to the image."""
    rows, cols = region.any(dim=1).nonzero()[:, 0], region.any(dim=0).nonzero()[:, 0]
    height, width = region.shape
    return (slice(max(0, int(rows[0]) - margin), min(height, int(rows[-1]) + 1 + margin)),
            slice(max(0, int(cols[0]) - margin), min(width, int(cols[-1]) + 1 + margin)))


def _grow(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """(1, 1, H, W): ``mask`` dilated by a square of radius ``pixels`` (separable max pooling)."""
    if pixels <= 0:
        return mask
    size = 2 * pixels + 1
    grown = F.max_pool2d(mask, (1, size), stride=1, padding=(0, pixels))
    return F.max_pool2d(grown, (size, 1), stride=1, padding=(pixels, 0))


def _shrink(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """(1, 1, H, W): ``mask`` eroded by a square of radius ``pixels``."""
    return 1.0 - _grow(1.0 - mask, pixels)


def _analysis(image: torch.Tensor) -> torch.Tensor:
    """``image`` resized (bilinear, antialiased when shrinking) so that its long side is ANALYSIS_SIZE."""
    height, width = image.shape[-2:]
    scale = ANALYSIS_SIZE / max(height, width)
    shape = (max(1, round(height * scale)), max(1, round(width * scale)))
    if shape == (height, width):
        return image
    return F.interpolate(image, size=shape, mode="bilinear", align_corners=False, antialias=scale < 1).clamp(0, 1)


def _check(result: torch.Tensor, content: torch.Tensor, style: torch.Tensor, tight: torch.Tensor) -> None:
    height, width = style.shape[-2:]
    for name, tensor, channels in (("result", result, 3), ("content", content, 3), ("style", style, 3),
                                   ("tight", tight, 1)):
        if tuple(tensor.shape) != (1, channels, height, width):
            raise ValueError(f"quality_scores: {name} must be (1, {channels}, {height}, {width}), "
                             f"got {tuple(tensor.shape)}")
    if float(tight.sum()) == 0:
        raise ValueError("quality_scores: the tight mask is empty")

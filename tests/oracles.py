"""Test oracles and brute-force references of the core's fast paths: the literal, memory-hungry forms the
optimised code must agree with. They live here, not in the product modules; ``bench`` times the fast paths against
them (pytest and the bench put the repository root on ``sys.path``).

- ``patch_cosine_match_full`` / ``normalized_sum_match_full``: the reference kernels' full positions x positions
  score matrix, then a row argmax (``harmonize_core.matching.nearest``'s chunked matches must give the same indices);
- ``remap_histogram_searchsorted`` / ``remap_histogram_naive``: the histogram remap with each rank's bin found by
  binary search, or by comparing with every bin (``harmonize_core.losses.histogram.remap_histogram``);
- ``nearest_patches_bruteforce``: the exact nearest-neighbour field by exhaustive search
  (``harmonize_core.postprocess.patchmatch.patchmatch`` approximates it).

They reuse the core modules' own checks and helpers, so the conventions (borders, ties, -1 outside the query) are
the core's by construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harmonize_core.losses.histogram import HistogramTarget, _check_remap, _remapped_values, _scatter_back
from harmonize_core.matching.nearest import (
    COSINE_EPS,
    _BoxNorms,
    _check_maps,
    _decode_extent,
    _extent_ids,
    _intersect,
    _normalize,
)
from harmonize_core.postprocess.patchmatch import (
    UNMATCHED,
    _check_inputs,
    _chunk_elements,
    _query_patches,
    patch_distance,
)

FULL_SLAB_PAIRS = 2**24  # pairs per slab when the *_full forms turn the full score matrix into scores


# --------------------------------------------------------------------- full-matrix patch matches
def _unfold(feat: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(C * k * k, H * W)`` zero-padded patches."""
    return F.unfold(feat[None], patch_size, padding=patch_size // 2)[0]


def _box_tables(feat: torch.Tensor, radius: int) -> torch.Tensor:
    """``(E * E, H * W)`` patch norms for every box id ``ybox_id * E + xbox_id`` (E = (r + 1)^2 extents)."""
    norms = _BoxNorms(feat, radius)
    extents = [_decode_extent(i, radius) for i in range((radius + 1) ** 2)]
    return torch.stack([norms(ybox, xbox).flatten() for ybox in extents for xbox in extents])


def _intersect_table(radius: int, device: torch.device) -> torch.Tensor:
    """``(E, E)`` extent id of the intersection of two extents given by id."""
    n = (radius + 1) ** 2
    table = [[0] * n for _ in range(n)]
    for a in range(n):
        for b in range(n):
            lo, hi = _intersect(_decode_extent(a, radius), _decode_extent(b, radius))
            table[a][b] = (lo + radius) * (radius + 1) + hi
    return torch.tensor(table, device=device)


@torch.no_grad()
def patch_cosine_match_full(content: torch.Tensor, style: torch.Tensor, query: torch.Tensor, *,
                            patch_size: int = 3) -> torch.Tensor:
    """Return the same mapping as ``patch_cosine_match``, ``(H, W)`` int64 (-1 outside ``query``), the way the
    reference kernels do it: the full ``(H*W, Hs*Ws)`` score matrix over all positions, then a row argmax
    (cuda_utils.cu patchmatch_r L1310-1350). Memory grows with the square of the image; tests and benchmarks only.
    Norm boxes are looked up per pair, in slabs of rows, from the extents of p and q.
    """
    _check_maps(content, style, query, patch_size)
    radius = patch_size // 2
    (_, height, width), (_, style_h, style_w) = content.shape, style.shape
    scores = _unfold(content, patch_size).T @ _unfold(style, patch_size)
    norms_p, norms_q = _box_tables(content, radius), _box_tables(style, radius)
    intersect = _intersect_table(radius, content.device)
    n_extents = (radius + 1) ** 2
    p = torch.arange(height * width, device=content.device)
    q = torch.arange(style_h * style_w, device=content.device)
    ey_p, ex_p = _extent_ids(p // width, height, radius), _extent_ids(p % width, width, radius)
    ey_q, ex_q = _extent_ids(q // style_w, style_h, radius), _extent_ids(q % style_w, style_w, radius)
    for part in p.split(max(1, FULL_SLAB_PAIRS // q.numel())):
        box = intersect[ey_p[part][:, None], ey_q[None]] * n_extents + intersect[ex_p[part][:, None], ex_q[None]]
        den = norms_p[:, part].T.gather(1, box) * norms_q.gather(0, box) + COSINE_EPS
        scores[part] /= den
    return _argmax_on_query(scores, query)


def _argmax_on_query(scores: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    best = scores.argmax(1)
    return torch.where(query.flatten(), best, torch.full_like(best, -1)).view(query.shape)


@torch.no_grad()
def normalized_sum_match_full(A: torch.Tensor, BP: torch.Tensor, query: torch.Tensor, *,
                              patch_size: int = 3) -> torch.Tensor:
    """Return the same mapping as ``normalized_sum_match`` (``(H, W)`` int64, -1 outside ``query``) from the full
    ``(H*W, Hs*Ws)`` score matrix with the border rule applied per pair, as the reference kernels do
    (cuda_utils.cu patchmatch_conv_kernel + patchmatch_argmax_kernel). Tests and benchmarks only.
    """
    _check_maps(A, BP, query, patch_size)
    radius = patch_size // 2
    (_, height, width), (_, style_h, style_w) = A.shape, BP.shape
    scores = _unfold(_normalize(A), patch_size).T @ _unfold(_normalize(BP), patch_size)
    p = torch.arange(height * width, device=A.device)
    q = torch.arange(style_h * style_w, device=A.device)
    yp, xp, yq, xq = p // width, p % width, q // style_w, q % style_w
    for part in p.split(max(1, FULL_SLAB_PAIRS // q.numel())):
        skip = ((xq[None] < radius) & ~(xp[part, None] < radius)) \
            | ((xq[None] > style_w - 1 - radius) & ~(xp[part, None] > width - 1 - radius)) \
            | ((yq[None] < radius) & ~(yp[part, None] < radius)) \
            | ((yq[None] > style_h - 1 - radius) & ~(yp[part, None] > height - 1 - radius))
        scores[part] = scores[part].masked_fill(skip, float("-inf"))
    return _argmax_on_query(scores, query)


# ----------------------------------------------------------------------------------- histogram remaps
@torch.no_grad()
def remap_histogram_searchsorted(feat: torch.Tensor, query: torch.Tensor, target: HistogramTarget) -> torch.Tensor:
    """Return the same R as ``remap_histogram`` with each rank's bin found by binary search (``searchsorted``
    on the channel's cumsum, as the kernel does; the form ``remap_histogram`` used before ``bin_of_rank``).
    A test oracle."""
    _check_remap(feat, query, target)
    values = feat.detach()[:, query].to(target.cum.dtype)
    _, order = values.sort(dim=1, stable=True)
    rank = torch.arange(values.shape[1], dtype=values.dtype, device=values.device).expand_as(values).contiguous()
    bin_index = torch.searchsorted(target.cum.contiguous(), rank, right=True).clamp_(max=target.bins - 1)
    return _scatter_back(feat, query, order, _remapped_values(bin_index, rank, target))


@torch.no_grad()
def remap_histogram_naive(feat: torch.Tensor, query: torch.Tensor, target: HistogramTarget) -> torch.Tensor:
    """Return the same R as ``remap_histogram`` ``(C, H, W)``, finding each rank's bin by comparing it with every
    bin's cumulative count (O(n x bins) per channel, the widely copied blog form but reading each channel's own
    histogram). For benchmarks and as a test oracle.
    """
    _check_remap(feat, query, target)
    values = feat.detach()[:, query].to(target.cum.dtype)
    _, order = values.sort(dim=1, stable=True)
    rank = torch.arange(values.shape[1], dtype=values.dtype, device=values.device)
    bin_index = torch.stack([(cum[None, :] <= rank[:, None]).sum(1) for cum in target.cum])
    bin_index = bin_index.clamp_(max=target.bins - 1)
    return _scatter_back(feat, query, order, _remapped_values(bin_index, rank.expand_as(values), target))


# -------------------------------------------------------------------------- exact nearest patches
def nearest_patches_bruteforce(
    query: torch.Tensor, source: torch.Tensor, query_mask: torch.Tensor, patch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the exact nearest-neighbour field (H, W, 2) int64 and its distances (H, W) float32, by exhaustive search.

    Same conventions as ``patchmatch``; ties keep the first source centre in raster order. For tests on small images:
    memory grows as (queried pixels) x (source centres).
    """
    _check_inputs(query, source, query_mask, patch_size)
    ys, xs = query_mask.nonzero(as_tuple=True)
    patches = _query_patches(query, ys, xs, patch_size).double()
    radius, cols = patch_size // 2, source.shape[-1] - patch_size + 1
    candidates = F.unfold(source.double(), patch_size)[0].T  # (centres, C * P^2), raster order of centres
    candidates = candidates.view(candidates.shape[0], source.shape[1], -1).transpose(1, 2).flatten(1)
    norms = candidates.square().sum(1)
    step = max(1, _chunk_elements(source.device) // candidates.shape[0])
    best = torch.cat([
        (norms - 2 * chunk @ candidates.T).argmin(dim=1) for chunk in patches.split(step)
    ]) if ys.numel() else ys
    centres = torch.stack([best // cols + radius, best % cols + radius], dim=1)
    nnf = torch.full((*query_mask.shape, 2), UNMATCHED, dtype=torch.long, device=query.device)
    nnf[ys, xs] = centres
    return nnf, patch_distance(query, source, nnf, patch_size)

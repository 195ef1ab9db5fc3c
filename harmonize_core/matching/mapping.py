"""Pass 2's consistent mapping at the reference layer (docs/algorithm.md sections 3b-3c).

Maps are flat raster indices ``q = y * Ws + x`` into the style map, in ``(H, W)`` int64 tensors (``-1`` = not
matched), as produced by ``matching.normalized_sum_match``. Ports of ``cuda_utils.cu`` (luanfujun/
deep-painterly-harmonization): ``refineNNF`` (L1360-1484), ``Ring2`` (L1159-1214), and torch/image
``scale(..., 'simple')`` for the nearest upsampling of the used-style set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _refine_offsets(radius: int) -> list[tuple[int, int]]:
    """Offsets (dy, dx) in refineNNF_kernel's loop order: dx outer, dy inner (cuda_utils.cu L1380-1381)."""
    span = range(-radius, radius + 1)
    return [(dy, dx) for dx in span for dy in span]


@torch.no_grad()
def refine_mapping(P0: torch.Tensor, tight: torch.Tensor, painting: torch.Tensor, *,
                   radius: int = 2) -> torch.Tensor:
    """Return the consistent mapping P (3b): ``(H, W)`` int64 flat indices into the ``(Hs, Ws)`` painting grid.

    For p in ``tight``, the candidates are ``P0(p + o) - o`` (o in [-r, r]^2, p + o inside the map, candidate with
    r <= x < Ws - r - 1 and r <= y < Hs - r - 1); each costs the mean over o' (p + o' inside, s' = P0(p + o') - o'
    inside the painting) of the Euclidean RGB distance ``||g(q) - g(s')||``, summed in the kernel's order; the
    smallest cost wins, ties to the first candidate in dx-outer order; p with no candidate and p outside ``tight``
    keep P0 (cuda_utils.cu refineNNF_kernel L1360-1440, ``-refine_size 5``). ``painting`` is ``(3, Hs, Ws)`` RGB in
    [0, 1] resized to the feature grid. Neighbours with P0 = -1 are skipped (the kernel matched every position).

    >>> P0 = torch.arange(30).view(5, 6) % 30
    >>> refine_mapping(P0, torch.ones(5, 6, dtype=torch.bool), torch.rand(3, 6, 5)).shape
    torch.Size([5, 6])
    """
    if P0.dim() != 2 or tight.shape != P0.shape or tight.dtype != torch.bool:
        raise ValueError(f"expected P0 (H, W) and a bool tight mask of the same shape, got {tuple(P0.shape)}, "
                         f"{tight.dtype} {tuple(tight.shape)}")
    if painting.dim() != 3 or painting.shape[0] != 3:
        raise ValueError(f"expected painting (3, Hs, Ws), got {tuple(painting.shape)}")
    height, width = P0.shape
    flat_p0 = P0.flatten()
    pos = tight.flatten().nonzero().squeeze(1)
    if bool((flat_p0[pos] < 0).any()):
        raise ValueError("P0 must hold a match (>= 0) at every tight position")
    shifted, term_ok, cand_ok = _shifted_matches(flat_p0, pos, (height, width), tuple(painting.shape[1:]), radius)
    cost = _refine_costs(painting.reshape(3, -1)[:, shifted], term_ok)
    best = cost.masked_fill(~cand_ok, float("inf")).argmin(1)
    chosen = shifted.gather(1, best[:, None]).squeeze(1)
    result = flat_p0.clone()
    result[pos] = torch.where(cand_ok.any(1), chosen, flat_p0[pos])
    return result.view(height, width)


def _shifted_matches(flat_p0: torch.Tensor, pos: torch.Tensor, shape: tuple[int, int],
                     style_shape: tuple[int, int], radius: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For positions ``pos`` (n,) and offsets o in refine order: ``P0(p + o) - o`` as flat style indices (n, K)
    (clamped where invalid), whether it may enter the cost (inside both maps) and whether it may be chosen
    (inside the kernel's asymmetric candidate bound, refineNNF_kernel L1391)."""
    (height, width), (style_h, style_w) = shape, style_shape
    offsets = torch.tensor(_refine_offsets(radius), device=pos.device)
    ny = (pos // width)[:, None] + offsets[None, :, 0]
    nx = (pos % width)[:, None] + offsets[None, :, 1]
    inside = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
    match = flat_p0[ny.clamp(0, height - 1) * width + nx.clamp(0, width - 1)]
    known = inside & (match >= 0)
    sy = match.div(style_w, rounding_mode="floor") - offsets[None, :, 0]
    sx = match % style_w - offsets[None, :, 1]
    term_ok = known & (sy >= 0) & (sy < style_h) & (sx >= 0) & (sx < style_w)
    cand_ok = known & (sy >= radius) & (sy < style_h - radius - 1) & (sx >= radius) & (sx < style_w - radius - 1)
    return sy.clamp(0, style_h - 1) * style_w + sx.clamp(0, style_w - 1), term_ok, cand_ok


def _refine_costs(colours: torch.Tensor, term_ok: torch.Tensor) -> torch.Tensor:
    """``(n, K)`` mean Euclidean RGB distance from each candidate colour to the valid term colours; ``colours`` is
    ``(3, n, K)``, candidates and terms being the same shifted matches. Sums run in the kernel's order."""
    total = torch.zeros_like(colours[0])
    for j in range(colours.shape[2]):
        diff = colours - colours[:, :, j:j + 1]
        dist = (diff[0] * diff[0] + diff[1] * diff[1] + diff[2] * diff[2]).sqrt()
        total += torch.where(term_ok[:, j:j + 1], dist, torch.zeros_like(dist))
    return total / term_ok.sum(1, keepdim=True).clamp(min=1)


@torch.no_grad()
def used_style_mask(P: torch.Tensor, tight: torch.Tensor, style_shape: tuple[int, int], *,
                    ring_radius: int = 1) -> torch.Tensor:
    """Return U ``(Hs, Ws)`` float32 in {0, 1}: 1 on the ``(2r+1)^2`` block (clipped at the borders) around P(p)
    for every p in ``tight`` (3c; cuda_utils.cu Ring2_kernel L1159-1184, ``-ring_radius 1``).

    >>> used_style_mask(torch.zeros(5, 6, dtype=torch.long), torch.ones(5, 6, dtype=torch.bool), (6, 5)).shape
    torch.Size([6, 5])
    """
    if P.shape != tight.shape or tight.dtype != torch.bool:
        raise ValueError(f"expected P and a bool tight mask of one (H, W) shape, got {tuple(P.shape)}, "
                         f"{tight.dtype} {tuple(tight.shape)}")
    style_h, style_w = style_shape
    centres = P.flatten()[tight.flatten()]
    if bool((centres < 0).any()) or bool((centres >= style_h * style_w).any()):
        raise ValueError("P must hold a style index in [0, Hs*Ws) at every tight position")
    marks = torch.zeros(style_h * style_w, device=P.device)
    marks[centres] = 1
    size = 2 * ring_radius + 1
    return F.max_pool2d(marks.view(1, 1, style_h, style_w), size, stride=1, padding=ring_radius)[0, 0]


def _simple_indices(src: int, dst: int, device: torch.device) -> torch.Tensor:
    """torch/image scaleSimple source indices: ``(long)(i * (float)src / (float)dst)``, clamped to src - 1."""
    scale = torch.tensor(src, dtype=torch.float32) / torch.tensor(dst, dtype=torch.float32)
    index = (torch.arange(dst, dtype=torch.float32) * scale).long().clamp(max=src - 1)
    return index.to(device)


def upsample_used_mask(U: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Return ``U`` ``(Hs, Ws)`` resized to ``shape`` = (h, w) by nearest neighbour as torch/image
    ``scale(..., 'simple')`` does (neural_paint.lua L165; image.c Main_scaleSimple), values kept in {0, 1}.

    >>> upsample_used_mask(torch.ones(3, 4), (6, 8)).shape
    torch.Size([6, 8])
    """
    if U.dim() != 2:
        raise ValueError(f"expected U (Hs, Ws), got {tuple(U.shape)}")
    rows = _simple_indices(U.shape[0], shape[0], U.device)
    cols = _simple_indices(U.shape[1], shape[1], U.device)
    return U[rows][:, cols]

"""Nearest-neighbour matching of Deep Painterly Harmonization (docs/algorithm.md sections 2 and 3a-3c).

Feature maps are ``(C, H, W)`` with no batch dim. A match is a flat raster index ``q = y * Ws + x`` into the style
map, stored in a ``(H, W)`` int64 map; ``-1`` marks positions that were not asked for. Ports of ``cuda_utils.cu``
(luanfujun/deep-painterly-harmonization): ``patchmatch_r`` (pass 1, L1217-1358) and ``patchmatch`` (pass-2 initial
match, L331-478). The pass-2 consistency refinement and used-style set live in ``mapping.py``.

The brute-force matches never build the positions x positions score matrix. Query rows go in chunks whose score
matrix and per-pair temporaries fit ``budget_bytes``. Each chunk's window dot products come from one product of the
chunk's neighbourhood features with the style map, shifted and summed over the window offsets: about 9x fewer
multiply-adds than a product of unfolded 3x3 patches, and exact (offsets outside either map add zero). The
full-matrix forms of the reference kernels are test oracles, in ``tests/oracles.py``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

COSINE_EPS = 1e-9  # cuda_utils.cu patchmatch_r_conv_kernel: conv / (norm_1 * norm_2 + 1e-9)
NORMALIZE_EPS = 1e-8  # neural_paint.lua normalize_features L453
DEFAULT_BUDGET_BYTES = 512 * 2**20  # config.Pass1Config.match_budget_mb default
INDEX_BYTES = 8  # int64 indices
# Per window neighbour of a query row, besides its gathered feature column: index bookkeeping (offset coordinates,
# slots, torch.unique's sort buffers), measured below 100 bytes with torch.profiler.
NEIGHBOUR_INDEX_BYTES = 160

Extent = tuple[int, int]  # (lo, hi): window offsets lo..hi along one axis stay inside the map


# ----------------------------------------------------------------------------------------------- checks
def _check_maps(content: torch.Tensor, style: torch.Tensor, query: torch.Tensor, patch_size: int) -> None:
    if content.dim() != 3 or style.dim() != 3:
        raise ValueError(f"expected (C, H, W) feature maps, got {tuple(content.shape)} and {tuple(style.shape)}")
    if content.shape[0] != style.shape[0]:
        raise ValueError(f"channel mismatch: content has {content.shape[0]}, style has {style.shape[0]}")
    if query.dtype != torch.bool or tuple(query.shape) != tuple(content.shape[1:]):
        raise ValueError(f"query must be a bool (H, W) = {tuple(content.shape[1:])} mask, got "
                         f"{query.dtype} {tuple(query.shape)}")
    if patch_size < 1 or patch_size % 2 == 0:
        raise ValueError(f"patch_size must be odd and >= 1, got {patch_size}")


def _query_rows(query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (flat indices of the query positions, a flat int64 result filled with -1) on the query's device."""
    rows = query.flatten().nonzero().squeeze(1)
    return rows, torch.full((query.numel(),), -1, dtype=torch.long, device=query.device)


def chunk_rows(n_queries: int, n_keys: int, bytes_per_pair: int, budget_bytes: int) -> int:
    """Return how many query rows one chunk holds: the most rows whose ``n_keys * bytes_per_pair`` fit the budget.

    At least 1 and at most ``max(n_queries, 1)``. Raises ``ValueError`` when a single row does not fit.

    >>> chunk_rows(1000, 100, 40, 40_000)
    10
    """
    row_bytes = n_keys * bytes_per_pair
    if row_bytes > budget_bytes:
        raise ValueError(f"match budget too small: one query row needs {row_bytes} bytes "
                         f"({n_keys} keys x {bytes_per_pair} bytes), the budget leaves {budget_bytes}")
    return max(1, min(n_queries, budget_bytes // row_bytes))


def _fixed_bytes(content: torch.Tensor, style: torch.Tensor, n_queries: int, radius: int, per_position: int) -> int:
    """Bytes a brute-force match holds outside its chunk workspace: ``per_position`` values per position of both
    maps (norm tables, normalised copies), the zero-padded energy maps, and the int64 bookkeeping."""
    (_, height, width), (_, style_h, style_w) = content.shape, style.shape
    positions, keys = height * width, style_h * style_w
    padded = (height + 2 * radius) * (width + 2 * radius) + (style_h + 2 * radius) * (style_w + 2 * radius)
    values = per_position * (positions + keys) + padded
    return content.element_size() * values + INDEX_BYTES * (2 * positions + 4 * n_queries)


def _chunk_for(content: torch.Tensor, style: torch.Tensor, n_queries: int, radius: int,
               fixed_bytes: int, budget_bytes: int) -> int:
    """Chunk rows for a brute-force match: the per-pair bound of ``_Workspace`` within what ``fixed_bytes`` leaves."""
    channels, n_keys = content.shape[0], style.shape[1] * style.shape[2]
    window = (2 * radius + 1) ** 2
    element = content.element_size()
    # Workspace per query row: neighbourhood products (at most `window` rows, plus one zero row per chunk),
    # the dot matrix and a scratch matrix (shifted copies, then the cosine denominators).
    per_pair = element * (window + 2)
    per_row = window * (channels * element + NEIGHBOUR_INDEX_BYTES) + INDEX_BYTES
    bytes_per_pair = per_pair + math.ceil(per_row / n_keys)
    reserved = fixed_bytes + element * n_keys
    if reserved >= budget_bytes:
        raise ValueError(f"match budget too small: {budget_bytes} bytes, the tables alone need {reserved}")
    return chunk_rows(n_queries, n_keys, bytes_per_pair, budget_bytes - reserved)


# ------------------------------------------------------------------------------------------- windows
def _offsets(radius: int) -> list[tuple[int, int]]:
    """Window offsets (dy, dx) in raster order, as the kernels loop (dy outer, dx inner)."""
    span = range(-radius, radius + 1)
    return [(dy, dx) for dy in span for dx in span]


def _extent(pos: int, length: int, radius: int) -> Extent:
    return -min(radius, pos), min(radius, length - 1 - pos)


@functools.lru_cache(maxsize=64)
def _runs(length: int, radius: int) -> tuple[tuple[int, int, Extent], ...]:
    """Maximal runs ``[start, stop)`` of positions along one axis whose windows have the same extent."""
    runs: list[tuple[int, int, Extent]] = []
    for pos in range(length):
        extent = _extent(pos, length, radius)
        if runs and runs[-1][2] == extent:
            runs[-1] = (runs[-1][0], pos + 1, extent)
        else:
            runs.append((pos, pos + 1, extent))
    return tuple(runs)


def _extent_ids(coord: torch.Tensor, length: int, radius: int) -> torch.Tensor:
    """Id ``(lo + r) * (r + 1) + hi`` of each coordinate's window extent along one axis."""
    lo = -coord.clamp(max=radius)
    hi = (length - 1 - coord).clamp(max=radius)
    return (lo + radius) * (radius + 1) + hi


def _decode_extent(extent_id: int, radius: int) -> Extent:
    return extent_id // (radius + 1) - radius, extent_id % (radius + 1)


def _intersect(a: Extent, b: Extent) -> Extent:
    return max(a[0], b[0]), min(a[1], b[1])


class _BoxNorms:
    """Patch norms over a box of window offsets, ``sqrt(sum_o ||F(p + o)||^2)`` (zero outside the map), per box."""

    def __init__(self, feat: torch.Tensor, radius: int) -> None:
        energy = torch.einsum("chw,chw->hw", feat, feat)
        self.padded = F.pad(energy, (radius, radius, radius, radius))
        self.radius, self.shape = radius, tuple(feat.shape[1:])
        self.cache: dict[tuple[Extent, Extent], torch.Tensor] = {}

    def __call__(self, ybox: Extent, xbox: Extent) -> torch.Tensor:
        """Return the ``(H, W)`` norms of the patches restricted to offsets ``ybox x xbox``."""
        key = (ybox, xbox)
        if key not in self.cache:
            (height, width), r = self.shape, self.radius
            total = torch.zeros_like(self.padded[:height, :width])
            for dy in range(ybox[0], ybox[1] + 1):
                for dx in range(xbox[0], xbox[1] + 1):
                    total += self.padded[r + dy:r + dy + height, r + dx:r + dx + width]
            self.cache[key] = total.sqrt_()
        return self.cache[key]


class _Workspace:
    """Buffers reused by every chunk of one match: fresh large allocations cost page faults comparable to the
    arithmetic on CPU. Sized by the per-pair bound of ``_chunk_for``; untouched pages are never backed on CPU."""

    def __init__(self, like: torch.Tensor, chunk: int, style_shape: tuple[int, int], radius: int) -> None:
        n_positions = like.shape[1] * like.shape[2]
        n_keys = style_shape[0] * style_shape[1]
        self.style_shape = style_shape
        self.products = like.new_empty(min((2 * radius + 1) ** 2 * chunk, n_positions) + 1, n_keys)
        self.dots = like.new_empty(chunk, n_keys)
        self.scratch = like.new_empty(chunk * n_keys)

    def scratch_like(self, *shape: int) -> torch.Tensor:
        """A contiguous ``shape`` view of the scratch buffer (contents undefined)."""
        return self.scratch[:math.prod(shape)].view(shape)


def _window_dots(content: torch.Tensor, style: torch.Tensor, rows: torch.Tensor, radius: int,
                 work: _Workspace) -> torch.Tensor:
    """Return ``(m, Hs, Ws)`` (a view of ``work.dots``): for each content row p and style position q, the sum over
    window offsets o valid in both maps of ``<content[p + o], style[q + o]>`` (patchmatch_conv_kernel and
    patchmatch_r_conv_kernel numerators). One product per chunk, then a shifted sum over the offsets."""
    channels, height, width = content.shape
    style_h, style_w = work.style_shape
    offsets = torch.tensor(_offsets(radius), device=rows.device)
    ny = (rows // width)[None] + offsets[:, :1]
    nx = (rows % width)[None] + offsets[:, 1:]
    inside = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
    neighbours, inverse = torch.unique((ny * width + nx)[inside], return_inverse=True)
    slots = torch.full_like(ny, neighbours.numel())  # neighbours outside the map read the zero row
    slots[inside] = inverse
    products = work.products[:neighbours.numel() + 1]
    torch.mm(content.reshape(channels, -1)[:, neighbours].T, style.reshape(channels, -1), out=products[:-1])
    products[-1] = 0
    products = products.view(-1, style_h, style_w)
    dots = work.dots[:rows.numel()].view(-1, style_h, style_w).zero_()
    shifted = work.scratch_like(rows.numel(), style_h, style_w)
    for k, (dy, dx) in enumerate(_offsets(radius)):
        dst_y, src_y = slice(max(0, -dy), min(style_h, style_h - dy)), slice(max(0, dy), min(style_h, style_h + dy))
        dst_x, src_x = slice(max(0, -dx), min(style_w, style_w - dx)), slice(max(0, dx), min(style_w, style_w + dx))
        torch.index_select(products, 0, slots[k], out=shifted)
        dots[:, dst_y, dst_x] += shifted[:, src_y, src_x]
    return dots


def _group_by_extent(rows: torch.Tensor, shape: tuple[int, int], radius: int) -> list[tuple[Extent, Extent, torch.Tensor]]:
    """Split query rows (raster order kept) into groups whose windows have the same y and x extents."""
    height, width = shape
    ids = _extent_ids(rows // width, height, radius) * (radius + 1) ** 2 + _extent_ids(rows % width, width, radius)
    groups = []
    for key in torch.unique(ids).tolist():
        ey, ex = divmod(key, (radius + 1) ** 2)
        groups.append((_decode_extent(ey, radius), _decode_extent(ex, radius), rows[ids == key]))
    return groups


def _divide_by_norms(dots: torch.Tensor, rows: torch.Tensor, extents: tuple[Extent, Extent],
                     content_norms: _BoxNorms, style_norms: _BoxNorms, work: _Workspace) -> None:
    """Turn window dots into patch cosines in place; rows share ``extents``, style runs share theirs, so every
    block of pairs uses one box of offsets valid in both maps (patchmatch_r_conv_kernel L1252-1270)."""
    _, style_h, style_w = dots.shape
    radius = content_norms.radius
    for y0, y1, ey in _runs(style_h, radius):
        ybox = _intersect(extents[0], ey)
        for x0, x1, ex in _runs(style_w, radius):
            xbox = _intersect(extents[1], ex)
            norm_p = content_norms(ybox, xbox).flatten()[rows]
            norm_q = style_norms(ybox, xbox)[y0:y1, x0:x1]
            den = work.scratch_like(rows.numel(), y1 - y0, x1 - x0)
            torch.mul(norm_p[:, None, None], norm_q[None], out=den)
            dots[:, y0:y1, x0:x1].div_(den.add_(COSINE_EPS))


def _apply_border_rule(dots: torch.Tensor, rows: torch.Tensor, shape: tuple[int, int], radius: int) -> None:
    """Mask (-inf) style positions within ``radius`` of a border unless the content row is within ``radius`` of the
    same border (patchmatch_argmax_kernel, cuda_utils.cu L402-409)."""
    if radius == 0:
        return
    height, width = shape
    _, style_h, style_w = dots.shape
    y, x = rows // width, rows % width
    fill = float("-inf")
    dots[:, :, :radius].masked_fill_((x >= radius)[:, None, None], fill)
    dots[:, :, max(style_w - radius, 0):].masked_fill_((x <= width - 1 - radius)[:, None, None], fill)
    dots[:, :radius, :].masked_fill_((y >= radius)[:, None, None], fill)
    dots[:, max(style_h - radius, 0):, :].masked_fill_((y <= height - 1 - radius)[:, None, None], fill)


# ----------------------------------------------------------------------------------- pass 1 matching
@torch.no_grad()
def patch_cosine_match(content: torch.Tensor, style: torch.Tensor, query: torch.Tensor, *, patch_size: int = 3,
                       budget_bytes: int = DEFAULT_BUDGET_BYTES) -> torch.Tensor:
    """Return the pass-1 independent mapping: ``(H, W)`` int64, the flat style index ``y * Ws + x`` maximising the
    3x3 patch cosine for each ``query`` position, -1 elsewhere.

    ``content`` ``(C, H, W)`` and ``style`` ``(C, Hs, Ws)`` are raw features (any float dtype, same device).
    Score = (sum over offsets valid in both maps of the dot products) / (norm_p * norm_q + 1e-9) with both norms
    over the same offsets; ties keep the first maximum in raster order (cuda_utils.cu patchmatch_r L1217-1358;
    the kernel accumulates in double, this uses the input dtype). Query rows are chunked so that the score
    matrix, the per-pair temporaries and the fixed tables stay within ``budget_bytes`` (a non-contiguous input's
    one contiguous copy is not counted).

    >>> patch_cosine_match(torch.rand(8, 5, 6), torch.rand(8, 6, 5), torch.ones(5, 6, dtype=torch.bool)).shape
    torch.Size([5, 6])
    """
    _check_maps(content, style, query, patch_size)
    content, style = content.contiguous(), style.contiguous()
    radius = patch_size // 2
    height, width = query.shape
    rows, result = _query_rows(query)
    if rows.numel() == 0:
        return result.view(height, width)
    boxes = (radius + 1) ** 4  # norm tables, one per box of offsets valid in both maps, plus the energy map
    fixed = _fixed_bytes(content, style, rows.numel(), radius, per_position=boxes + 1)
    chunk = _chunk_for(content, style, rows.numel(), radius, fixed, budget_bytes)
    content_norms, style_norms = _BoxNorms(content, radius), _BoxNorms(style, radius)
    work = _Workspace(content, chunk, tuple(style.shape[1:]), radius)
    for ey, ex, group in _group_by_extent(rows, (height, width), radius):
        for part in group.split(chunk):
            dots = _window_dots(content, style, part, radius, work)
            _divide_by_norms(dots, part, (ey, ex), content_norms, style_norms, work)
            result[part] = dots.view(part.numel(), -1).argmax(1)
    return result.view(height, width)


def gather_targets(style: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Return ``(C, H, W)`` ``style[:, index]``: the centre feature vector of each match, zeros where index is -1
    (the matched target M_l of pass 1, patchmatch_r_argmax_kernel L1340-1342).

    >>> gather_targets(torch.rand(4, 6, 5), torch.zeros(5, 6, dtype=torch.long)).shape
    torch.Size([4, 5, 6])
    """
    if style.dim() != 3 or index.dim() != 2:
        raise ValueError(f"expected style (C, Hs, Ws) and index (H, W), got {tuple(style.shape)}, {tuple(index.shape)}")
    flat = style.reshape(style.shape[0], -1)
    picked = flat[:, index.clamp(min=0).flatten()].view(style.shape[0], *index.shape)
    return torch.where(index[None] >= 0, picked, torch.zeros_like(picked))


# ------------------------------------------------------------------------------ pass 2 initial match
def _normalize(feat: torch.Tensor) -> torch.Tensor:
    """Per-pixel L2 normalisation over channels, ``F / (||F|| + 1e-8)`` (neural_paint.lua normalize_features)."""
    return feat / (torch.linalg.vector_norm(feat, dim=0, keepdim=True) + NORMALIZE_EPS)


@torch.no_grad()
def normalized_sum_match(A: torch.Tensor, BP: torch.Tensor, query: torch.Tensor, *, patch_size: int = 3,
                         budget_bytes: int = DEFAULT_BUDGET_BYTES) -> torch.Tensor:
    """Return pass 2's initial relu4_1 mapping (3a): ``(H, W)`` int64 flat style indices, -1 outside ``query``.

    ``A`` ``(C, H, W)`` (pass-1 image features) and ``BP`` ``(C, Hs, Ws)`` (painting features) are L2-normalised
    per pixel (eps 1e-8); score(p, q) = sum over the window offsets valid in both maps of the per-pixel cosines;
    q within ``patch_size // 2`` of a style border is skipped unless p is as close to the same border; first
    maximum wins, and a p with every q skipped gets 0 as the kernel's zero-initialised output does
    (cuda_utils.cu patchmatch L331-478, neural_paint.lua L141-154). Chunked within ``budget_bytes``, which also
    covers the two normalised copies.

    >>> normalized_sum_match(torch.rand(8, 5, 6), torch.rand(8, 6, 5), torch.ones(5, 6, dtype=torch.bool)).shape
    torch.Size([5, 6])
    """
    _check_maps(A, BP, query, patch_size)
    radius = patch_size // 2
    height, width = query.shape
    rows, result = _query_rows(query)
    if rows.numel() == 0:
        return result.view(height, width)
    fixed = _fixed_bytes(A, BP, rows.numel(), radius, per_position=A.shape[0] + 2)  # normalised copies, norms
    chunk = _chunk_for(A, BP, rows.numel(), radius, fixed, budget_bytes)
    normed_a, normed_bp = _normalize(A), _normalize(BP)
    work = _Workspace(A, chunk, tuple(BP.shape[1:]), radius)
    for part in rows.split(chunk):
        dots = _window_dots(normed_a, normed_bp, part, radius, work)
        _apply_border_rule(dots, part, (height, width), radius)
        result[part] = dots.view(part.numel(), -1).argmax(1)
    return result.view(height, width)


# ------------------------------------------------------------------------------ pass 2 consistency

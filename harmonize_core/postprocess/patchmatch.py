"""PatchMatch nearest-neighbour fields and patch voting, vectorised in torch (CPU and GPU).

Ports what ``filt_cnn_artifact.m`` L47-51 gets from the PatchMatch-2.0 mex files: ``nnmex(O1, S, 'cputiled', 7)``
(Barnes et al. 2009: random init, propagation, random search at radii ``w * 0.5**i``; squared L2 on 7x7 RGB patches)
and ``votemex(S, ann)`` (coherence-only vote: each pixel is the mean of what the overlapping matched patches put on
it). Conventions that differ from the mex files, and why:

- The NN field indexes patch *centres* (row, col) in the source, not upper-left corners, so ``nnf[p]`` is the
  source pixel matched to query pixel ``p``. Source centres are kept at least ``patch_size // 2`` pixels from the
  border, so every matched patch lies inside the source: the vote is made only of source pixels.
- Query patches that cross the query's border read the query with replicate padding, so every queried pixel has a
  full patch and every pixel of the region gets the same number of votes (the mex files skip border patches).
- Propagation is parallel (jump-flood style, Rong & Tan 2006): every queried pixel tries the matches of its
  neighbours at distance ``k`` (left, up, right, down), shifted by ``k``, for each ``k`` of ``jumps``, instead of the
  sequential raster scan that cannot be vectorised. Long jumps carry a good match across the region in a few steps.
- Only the pixels of ``query_mask`` are matched (the mex files match the whole image); others hold ``-1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

UNMATCHED = -1  # nnf value of pixels outside the query mask
RANDOM_SEARCH_RATIO = 0.5  # nnmex.m rs_ratio default
DEFAULT_JUMPS = (8, 4, 2, 1)  # propagation distances per iteration; 1 is PatchMatch's own neighbour step
# Gathered patch values per distance chunk: 4 MiB of float32 stays in a CPU's cache for the subtract-and-square
# passes (1.6x faster at 700 px than 32 MiB chunks); on a GPU larger chunks mean fewer kernel launches.
CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}


def patchmatch(
    query: torch.Tensor, source: torch.Tensor, query_mask: torch.Tensor, *, patch_size: int, iterations: int,
    generator: torch.Generator, jumps: tuple[int, ...] = DEFAULT_JUMPS,
) -> torch.Tensor:
    """Return the approximate nearest-neighbour field of ``query``'s patches in ``source`` (PatchMatch).

    ``query`` (1, C, H, W) and ``source`` (1, C, Hs, Ws) float, same device; ``query_mask`` (H, W) bool selects the
    pixels to match. Returns ``nnf`` (H, W, 2) int64: the (row, col) of the matched source patch centre, always at
    least ``patch_size // 2`` from the source border, and ``-1`` where ``query_mask`` is False. Squared L2 over
    ``patch_size``^2 x C values; random init, then ``iterations`` rounds of propagation (``jumps``) and random search
    at radii max(Hs, Ws) * 0.5**i down to 1 (nnmex.m defaults rs_max, rs_ratio 0.5). Deterministic for a given
    ``generator`` state on a given device (filt_cnn_artifact.m L47, nnmex.m).

    >>> g = torch.Generator().manual_seed(0)
    >>> patchmatch(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 20, 20), torch.ones(16, 16, dtype=torch.bool),
    ...            patch_size=3, iterations=2, generator=g).shape
    torch.Size([16, 16, 2])
    """
    _check_inputs(query, source, query_mask, patch_size)
    ys, xs = query_mask.nonzero(as_tuple=True)
    search = _Search.start(query, source, ys, xs, patch_size, generator)
    index_map = torch.full(query_mask.shape, -1, dtype=torch.long, device=query.device)
    index_map[ys, xs] = torch.arange(ys.numel(), device=query.device)
    steps = [(dy, dx) for jump in jumps for dy, dx in ((0, -jump), (-jump, 0), (0, jump), (jump, 0))]
    neighbours = [(torch.tensor([dy, dx], device=query.device), *_neighbour(index_map, ys, xs, dy, dx))
                  for dy, dx in steps]
    for _ in range(iterations):
        for step, index, valid in neighbours:
            # the neighbour at p + d matched m: offer m - d to p (PatchMatch propagation, Barnes et al. eq. 1)
            shifted = search.clamp(search.best[index] - step)
            search.offer(torch.where(valid[:, None], shifted, search.best))
        _random_search(search, generator, max(source.shape[-2:]))
    nnf = torch.full((*query_mask.shape, 2), UNMATCHED, dtype=torch.long, device=query.device)
    nnf[ys, xs] = search.best
    return nnf


def patch_distance(query: torch.Tensor, source: torch.Tensor, nnf: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Return the squared L2 distance (H, W) float32 between each query patch and its matched source patch.

    Same patch convention as ``patchmatch`` (query replicate-padded, centres in the NN field); ``+inf`` where the
    field is ``-1``. This is channel 3 of nnmex's output, on [0, 1] values instead of 8-bit ones.
    """
    matched = nnf[..., 0] >= 0
    ys, xs = matched.nonzero(as_tuple=True)
    search = _Search.build(query, source, ys, xs, patch_size)
    distance = torch.full(matched.shape, float("inf"), device=query.device)
    distance[ys, xs] = search.costs(nnf[ys, xs])
    return distance


def vote(source: torch.Tensor, nnf: torch.Tensor, region: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Return the coherence vote (1, C, H, W): each ``region`` pixel is the mean of the source pixels that the
    matched patches overlapping it place on it; 0 outside ``region`` and where no matched patch overlaps.

    The patch centred at query pixel ``c`` matched to source centre ``s`` places ``source[s + o]`` on pixel ``c + o``
    for every offset ``o`` of the patch (votemex.m, coherence only, uniform weights). ``region`` (H, W) bool.
    Every output value is an average of source pixels (filt_cnn_artifact.m L48, ``O2_base = votemex(B, ann)``).
    """
    height, width = region.shape
    flat_source = source[0].flatten(1)
    total = source.new_zeros(source.shape[1], height * width)
    count = source.new_zeros(height * width)
    ys, xs = (nnf[..., 0] >= 0).nonzero(as_tuple=True)
    matches = nnf[ys, xs]
    for dy, dx in _offsets(patch_size):
        ty, tx = ys + dy, xs + dx
        inside = (ty >= 0) & (ty < height) & (tx >= 0) & (tx < width)
        inside &= region[ty.clamp(0, height - 1), tx.clamp(0, width - 1)]
        target = ty[inside] * width + tx[inside]
        origin = (matches[inside, 0] + dy) * source.shape[-1] + matches[inside, 1] + dx
        # each offset writes each target at most once, so plain indexed adds are deterministic on every device
        total[:, target] += flat_source[:, origin]
        count[target] += 1
    mean = total / count.clamp(min=1)
    return mean.view(1, -1, height, width)


def _check_inputs(query: torch.Tensor, source: torch.Tensor, query_mask: torch.Tensor, patch_size: int) -> None:
    if query.dim() != 4 or source.dim() != 4 or query.shape[:2] != source.shape[:2] or query.shape[0] != 1:
        raise ValueError(f"query and source must be (1, C, H, W) with the same C, got {tuple(query.shape)} "
                         f"and {tuple(source.shape)}")
    if query_mask.shape != query.shape[-2:] or query_mask.dtype != torch.bool:
        raise ValueError(f"query_mask must be a bool (H, W) = {tuple(query.shape[-2:])}, got "
                         f"{query_mask.dtype} {tuple(query_mask.shape)}")
    if patch_size < 1 or patch_size % 2 == 0 or min(source.shape[-2:]) < patch_size:
        raise ValueError(f"patch_size must be odd and fit in the source {tuple(source.shape[-2:])}, got {patch_size}")


def _chunk_elements(device: torch.device) -> int:
    return CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cpu"])


def _offsets(patch_size: int) -> list[tuple[int, int]]:
    radius = patch_size // 2
    return [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]


def _offset_tensors(patch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.tensor(_offsets(patch_size), device=device)
    return offsets[:, 0], offsets[:, 1]


def _query_patches(query: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(n, P^2 * C) patches of the replicate-padded query, pixel-major (channels last) like ``_Search.costs``."""
    radius = patch_size // 2
    padded = F.pad(query, (radius,) * 4, mode="replicate")[0]
    dy, dx = _offset_tensors(patch_size, query.device)
    index = (ys[:, None] + radius + dy) * padded.shape[-1] + (xs[:, None] + radius + dx)
    return padded.flatten(1).T[index.flatten()].view(ys.numel(), patch_size * patch_size * query.shape[1])


@dataclass
class _Search:
    """PatchMatch state: the source as channels-last rows, the query patches, and the current best matches."""

    pixels: torch.Tensor  # (Hs * Ws, C) source pixels
    width: int  # Ws
    offsets: torch.Tensor  # (P^2,) flat source offsets of a patch's pixels from its centre, raster order
    patches: torch.Tensor  # (n, P^2 * C) query patches, pixel-major like the gathered source rows
    low: torch.Tensor  # (2,) smallest valid source centre (row, col)
    high: torch.Tensor  # (2,) largest valid source centre
    best: torch.Tensor | None = None  # (n, 2) int64 matched source centres
    best_cost: torch.Tensor | None = None  # (n,) their squared L2 distances

    @classmethod
    def build(cls, query, source, ys, xs, patch_size: int) -> _Search:
        radius, (height, width) = patch_size // 2, source.shape[-2:]
        dy, dx = _offset_tensors(patch_size, source.device)
        return cls(pixels=source[0].flatten(1).T.contiguous(), width=width, offsets=dy * width + dx,
                   patches=_query_patches(query, ys, xs, patch_size),
                   low=torch.tensor([radius, radius], device=source.device),
                   high=torch.tensor([height - 1 - radius, width - 1 - radius], device=source.device))

    @classmethod
    def start(cls, query, source, ys, xs, patch_size: int, generator: torch.Generator) -> _Search:
        """Build, then draw every match uniformly among the valid source centres (PatchMatch's random init)."""
        search = cls.build(query, source, ys, xs, patch_size)
        uniform = torch.rand((ys.numel(), 2), generator=generator, device=source.device)
        search.best = search.clamp(search.low + (uniform * (search.high - search.low + 1)).long())
        search.best_cost = search.costs(search.best)
        return search

    def clamp(self, centres: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(centres, self.high), self.low)

    def costs(self, centres: torch.Tensor) -> torch.Tensor:
        """(n,) squared L2 distances between the query patches and the source patches centred at ``centres``."""
        linear = centres[:, 0] * self.width + centres[:, 1]
        step = max(1, _chunk_elements(self.pixels.device) // max(1, self.patches.shape[1]))
        costs = []
        for start in range(0, linear.numel(), step):
            index = (linear[start:start + step, None] + self.offsets).flatten()
            difference = self.pixels.index_select(0, index).view(-1, self.patches.shape[1])
            difference.sub_(self.patches[start:start + step])
            costs.append(torch.linalg.vecdot(difference, difference))
        return torch.cat(costs) if costs else self.patches.new_zeros(0)

    def offer(self, candidates: torch.Tensor) -> None:
        """Keep each candidate (n, 2) that is strictly closer than the current match (ties keep the current one)."""
        cost = self.costs(candidates)
        better = cost < self.best_cost
        self.best = torch.where(better[:, None], candidates, self.best)
        self.best_cost = torch.where(better, cost, self.best_cost)


def _neighbour(index_map, ys, xs, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each queried pixel p: the list position of the queried pixel p + (dy, dx) (0 if none) and its validity.

    ``index_map`` (H, W) holds each queried pixel's position in the (ys, xs) list and -1 elsewhere.
    """
    height, width = index_map.shape
    ny, nx = ys + dy, xs + dx
    inside = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
    index = index_map[ny.clamp(0, height - 1), nx.clamp(0, width - 1)]
    valid = inside & (index >= 0)
    return index.clamp(min=0), valid


def _random_search(search: _Search, generator: torch.Generator, max_radius: int) -> None:
    """PatchMatch random search: one uniform candidate per radius max_radius * 0.5**i (>= 1), window clipped to
    the valid centres (nnmex.m rs_max, rs_ratio)."""
    radius = float(max_radius)
    while radius >= 1:
        start = torch.maximum(search.best - int(radius), search.low)
        stop = torch.minimum(search.best + int(radius), search.high)
        uniform = torch.rand(search.best.shape, generator=generator, device=search.best.device)
        search.offer(torch.minimum(start + (uniform * (stop - start + 1)).long(), stop))
        radius *= RANDOM_SEARCH_RATIO

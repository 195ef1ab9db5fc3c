"""Nearest-neighbour matching (docs/algorithm.md sections 2, 3a-3c) against literal loop oracles of the CUDA kernels."""

from __future__ import annotations

import math

import numpy as np
import oracles
import pytest
import torch
import torch.nn.functional as F
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from harmonize_core.matching import mapping
from harmonize_core.matching import nearest as matching

# ---------------------------------------------------------------------------------------------- oracles
# Literal ports of the cuda_utils.cu loops, one pair and one offset at a time (numpy, float64 unless stated).


def oracle_patch_cosine(content: np.ndarray, style: np.ndarray, query: np.ndarray, radius: int = 1) -> np.ndarray:
    """patchmatch_r_conv_kernel + patchmatch_r_argmax_kernel (L1217-1350): norms over offsets valid in both maps."""
    _, height, width = content.shape
    _, style_h, style_w = style.shape
    out = -np.ones((height, width), dtype=np.int64)
    for y, x in zip(*np.nonzero(query), strict=False):
        best, arg = -1e20, 0
        for qy in range(style_h):
            for qx in range(style_w):
                dot = norm_p = norm_q = 0.0
                for dy in range(-radius, radius + 1):
                    for dx in range(-radius, radius + 1):
                        if 0 <= y + dy < height and 0 <= x + dx < width and 0 <= qy + dy < style_h \
                                and 0 <= qx + dx < style_w:
                            a, b = content[:, y + dy, x + dx], style[:, qy + dy, qx + dx]
                            dot, norm_p, norm_q = dot + a @ b, norm_p + a @ a, norm_q + b @ b
                score = dot / (math.sqrt(norm_p) * math.sqrt(norm_q) + 1e-9)
                if score > best:
                    best, arg = score, qy * style_w + qx
        out[y, x] = arg
    return out


def oracle_normalized_sum(a: np.ndarray, bp: np.ndarray, query: np.ndarray, radius: int = 1) -> np.ndarray:
    """normalize_features + patchmatch_conv_kernel + patchmatch_argmax_kernel with its border rule (L402-409)."""
    a = a / (np.sqrt((a ** 2).sum(0, keepdims=True)) + 1e-8)
    bp = bp / (np.sqrt((bp ** 2).sum(0, keepdims=True)) + 1e-8)
    _, height, width = a.shape
    _, style_h, style_w = bp.shape
    out = -np.ones((height, width), dtype=np.int64)
    for y, x in zip(*np.nonzero(query), strict=False):
        best, arg = -np.inf, 0
        for qy in range(style_h):
            for qx in range(style_w):
                if (qx < radius and not x < radius) or (qx > style_w - 1 - radius and not x > width - 1 - radius) \
                        or (qy < radius and not y < radius) or (qy > style_h - 1 - radius and not y > height - 1 - radius):
                    continue
                score = 0.0
                for dy in range(-radius, radius + 1):
                    for dx in range(-radius, radius + 1):
                        if 0 <= y + dy < height and 0 <= x + dx < width and 0 <= qy + dy < style_h \
                                and 0 <= qx + dx < style_w:
                            score += a[:, y + dy, x + dx] @ bp[:, qy + dy, qx + dx]
                if score > best:
                    best, arg = score, qy * style_w + qx
        out[y, x] = arg
    return out


def oracle_refine(p0: np.ndarray, tight: np.ndarray, guide: np.ndarray, radius: int) -> np.ndarray:
    """refineNNF_kernel (L1360-1440) in float32, sums in the kernel's order (dx outer, dy inner)."""
    height, width = p0.shape
    _, style_h, style_w = guide.shape
    out = p0.copy()
    for y, x in zip(*np.nonzero(tight), strict=False):
        best_d, best = np.float32(np.finfo(np.float32).max), p0[y, x]
        for dx in range(-radius, radius + 1):
            for dy in range(-radius, radius + 1):
                if not (0 <= x + dx < width and 0 <= y + dy < height):
                    continue
                cy, cx = p0[y + dy, x + dx] // style_w - dy, p0[y + dy, x + dx] % style_w - dx
                if not (radius <= cx < style_w - radius - 1 and radius <= cy < style_h - radius - 1):
                    continue
                dist, cnt = np.float32(0), 0
                for tdx in range(-radius, radius + 1):
                    for tdy in range(-radius, radius + 1):
                        if not (0 <= x + tdx < width and 0 <= y + tdy < height):
                            continue
                        ty, tx = p0[y + tdy, x + tdx] // style_w - tdy, p0[y + tdy, x + tdx] % style_w - tdx
                        if 0 <= tx < style_w and 0 <= ty < style_h:
                            d = np.float32(0)
                            for channel in range(3):
                                diff = np.float32(guide[channel, cy, cx] - guide[channel, ty, tx])
                                d = np.float32(d + diff * diff)
                            dist, cnt = np.float32(dist + np.sqrt(d)), cnt + 1
                dist = np.float32(dist / np.float32(cnt))
                if dist < best_d:
                    best_d, best = dist, cy * style_w + cx
        out[y, x] = best
    return out


def oracle_used(p: np.ndarray, tight: np.ndarray, style_shape: tuple[int, int], ring: int) -> np.ndarray:
    """Ring2_kernel (L1159-1184)."""
    style_h, style_w = style_shape
    used = np.zeros(style_shape, dtype=np.float32)
    for y, x in zip(*np.nonzero(tight), strict=False):
        qy, qx = divmod(int(p[y, x]), style_w)
        for dx in range(-ring, ring + 1):
            for dy in range(-ring, ring + 1):
                if 0 <= qx + dx < style_w and 0 <= qy + dy < style_h:
                    used[qy + dy, qx + dx] = 1
    return used


def peak_allocated_bytes(fn) -> tuple[int, object]:
    """Peak bytes held by tensors allocated while ``fn`` runs (CPU), and its result.

    Method: torch.profiler with ``profile_memory=True`` records every allocator event (allocation > 0,
    free < 0, each with its byte count and timestamp); walking them in time order and keeping the running
    sum gives the peak of live bytes allocated inside ``fn``, including tensors freed before it returns.
    Inputs allocated before the call are not counted. ``test_peak_allocated_bytes_method`` checks it on a
    known allocation pattern.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events, key=lambda event: event[0]):
        live += size
        peak = max(peak, live)
    return peak, result


def _maps(seed: int, channels: int, content_shape, style_shape, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    content = torch.randn(channels, *content_shape, generator=generator, dtype=dtype)
    style = torch.randn(channels, *style_shape, generator=generator, dtype=dtype)
    query = torch.rand(*content_shape, generator=generator) < 0.7
    query.view(-1)[0] = True  # a corner always asked for
    return content, style, query


SHAPES = [  # (channels, content (H, W), style (Hs, Ws), patch_size)
    (3, (5, 6), (6, 5), 3),
    (8, (7, 7), (7, 7), 3),
    (4, (1, 5), (4, 1), 3),
    (5, (3, 1), (1, 6), 3),
    (3, (2, 2), (3, 3), 3),
    (6, (4, 3), (1, 1), 3),
    (3, (6, 7), (5, 8), 5),
    (4, (4, 5), (5, 4), 1),
]


# --------------------------------------------------------------------------------------- pass 1 match
@pytest.mark.parametrize(("channels", "content_shape", "style_shape", "patch_size"), SHAPES)
def test_patch_cosine_match_equals_loop_oracle(channels, content_shape, style_shape, patch_size):
    content, style, query = _maps(1, channels, content_shape, style_shape)
    expected = oracle_patch_cosine(content.numpy(), style.numpy(), query.numpy(), patch_size // 2)
    chunked = matching.patch_cosine_match(content, style, query, patch_size=patch_size)
    full = oracles.patch_cosine_match_full(content, style, query, patch_size=patch_size)
    assert chunked.dtype == torch.long and chunked.shape == content_shape
    np.testing.assert_array_equal(chunked.numpy(), expected)
    np.testing.assert_array_equal(full.numpy(), expected)
    assert bool((chunked[~query] == -1).all())


def test_patch_cosine_match_relu_features_with_zero_patch():
    """Non-negative features; an all-zero content patch scores 0 everywhere, so the first index (0) wins."""
    content, style, query = _maps(2, 6, (7, 6), (6, 7))
    content, style = content.relu(), style.relu()
    content[:, 2:5, 1:4] = 0  # the 3x3 patch around (3, 2) is zero
    query[3, 2] = True
    expected = oracle_patch_cosine(content.numpy(), style.numpy(), query.numpy())
    result = matching.patch_cosine_match(content, style, query)
    np.testing.assert_array_equal(result.numpy(), expected)
    assert int(result[3, 2]) == 0


def _periodic_style(dtype: torch.dtype) -> torch.Tensor:
    """Integer-valued style of period 3 in y and x: interior patches repeat exactly, so scores tie exactly."""
    generator = torch.Generator().manual_seed(3)
    cell = torch.randint(1, 9, (4, 3, 3), generator=generator).to(dtype)
    return cell.repeat(1, 3, 3)[:, :8, :8]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_resolve_to_first_index_in_raster_order(dtype):
    style = _periodic_style(dtype)
    content = style[:, 1:4, 1:4].clone()  # its centre patch equals the style patches at (2,2), (2,5), (5,2), (5,5)
    query = torch.zeros(3, 3, dtype=torch.bool)
    query[1, 1] = True
    for result in (matching.patch_cosine_match(content, style, query),
                   oracles.patch_cosine_match_full(content, style, query)):
        assert int(result[1, 1]) == 2 * 8 + 2
        assert bool((result[~query] == -1).all())
    for result in (matching.normalized_sum_match(content, style, query),
                   oracles.normalized_sum_match_full(content, style, query)):
        assert int(result[1, 1]) == 2 * 8 + 2


def _spy_chunks(monkeypatch) -> list[int]:
    chunks: list[int] = []
    original = matching.chunk_rows

    def spy(*args):
        chunks.append(original(*args))
        return chunks[-1]

    monkeypatch.setattr(matching, "chunk_rows", spy)
    return chunks


class _Planned(Exception):
    """Raised by the planning spy to stop a match once its chunk size is known."""


def _smallest_budget(match, content, style, query, monkeypatch) -> int:
    """Bisect the smallest budget the match accepts (a smaller one raises): it holds exactly one row per chunk.
    Each probe stops right after planning its chunks."""
    original = matching.chunk_rows

    def plan_only(*args):
        original(*args)
        raise _Planned

    monkeypatch.setattr(matching, "chunk_rows", plan_only)
    low, high = 1, 1 << 30
    while low < high:
        middle = (low + high) // 2
        try:
            match(content, style, query, budget_bytes=middle)
        except _Planned:
            high = middle
        except ValueError:
            low = middle + 1
    monkeypatch.setattr(matching, "chunk_rows", original)
    return low


@pytest.mark.parametrize(("match", "full"), [
    (matching.patch_cosine_match, oracles.patch_cosine_match_full),
    (matching.normalized_sum_match, oracles.normalized_sum_match_full),
])
def test_chunked_equals_full_matrix_for_all_budgets(match, full, monkeypatch):
    content, style, _ = _maps(4, 16, (24, 20), (22, 26))
    query = torch.rand(24, 20, generator=torch.Generator().manual_seed(5)) < 0.4
    expected = full(content, style, query)
    assert bool((expected[~query] == -1).all()) and bool((expected[query] >= 0).all())
    smallest = _smallest_budget(match, content, style, query, monkeypatch)
    chunks = _spy_chunks(monkeypatch)
    for budget in (matching.DEFAULT_BUDGET_BYTES, 2**21, 2**20, smallest):
        np.testing.assert_array_equal(match(content, style, query, budget_bytes=budget).numpy(), expected.numpy())
    assert chunks[0] == int(query.sum()) and chunks[-1] == 1 and sorted(chunks, reverse=True) == chunks
    with pytest.raises(ValueError, match="budget too small"):
        match(content, style, query, budget_bytes=smallest - 1)


# ------------------------------------------------------------------------------------ pass 2 match
@pytest.mark.parametrize(("channels", "content_shape", "style_shape", "patch_size"), SHAPES)
def test_normalized_sum_match_equals_loop_oracle(channels, content_shape, style_shape, patch_size):
    a, bp, query = _maps(6, channels, content_shape, style_shape)
    expected = oracle_normalized_sum(a.numpy(), bp.numpy(), query.numpy(), patch_size // 2)
    chunked = matching.normalized_sum_match(a, bp, query, patch_size=patch_size)
    full = oracles.normalized_sum_match_full(a, bp, query, patch_size=patch_size)
    np.testing.assert_array_equal(chunked.numpy(), expected)
    np.testing.assert_array_equal(full.numpy(), expected)


def test_normalized_sum_border_rule_skips_style_borders():
    """Interior content positions never match a style border; content on a border may match that border."""
    a, bp, _ = _maps(7, 5, (8, 9), (7, 8))
    query = torch.ones(8, 9, dtype=torch.bool)
    result = matching.normalized_sum_match(a, bp, query)
    qy, qx = result // 8, result % 8
    interior = torch.zeros(8, 9, dtype=torch.bool)
    interior[1:-1, 1:-1] = True
    assert bool(((qy[interior] >= 1) & (qy[interior] <= 5) & (qx[interior] >= 1) & (qx[interior] <= 6)).all())
    np.testing.assert_array_equal(result.numpy(), oracle_normalized_sum(a.numpy(), bp.numpy(), query.numpy()))
    # a style made of one border-only feature: left-column content positions find it, others cannot
    bp = torch.zeros(2, 4, 4, dtype=torch.float64)
    bp[0] = 1.0
    bp[1, :, 0] = 5.0
    a = torch.zeros(2, 4, 4, dtype=torch.float64)
    a[1] = 1.0
    result = matching.normalized_sum_match(a, bp, torch.ones(4, 4, dtype=torch.bool))
    assert bool((result[1:3, 0] % 4 == 0).all()) and bool((result[1:3, 1:3] % 4 != 0).all())


# ------------------------------------------------------------------------------ consistency, ring
@pytest.mark.parametrize(("radius", "quantised"), [(2, False), (1, False), (2, True)])
def test_refine_mapping_equals_loop_oracle(radius, quantised):
    generator = torch.Generator().manual_seed(8 + radius)
    height, width, style_h, style_w = 9, 10, 8, 11
    p0 = torch.randint(0, style_h * style_w, (height, width), generator=generator)
    p0[2:6, 3:8] = (torch.arange(4)[:, None] + 2) * style_w + torch.arange(5)[None] + 3  # a coherent patch
    tight = torch.rand(height, width, generator=generator) < 0.6
    painting = torch.rand(3, style_h, style_w, generator=generator)
    if quantised:  # few colours: many exactly equal costs, decided by the candidate order
        painting = (painting * 2).round() / 2
    expected = oracle_refine(p0.numpy(), tight.numpy(), painting.numpy(), radius)
    result = mapping.refine_mapping(p0, tight, painting, radius=radius)
    np.testing.assert_array_equal(result.numpy(), expected)
    assert bool((result[~tight] == p0[~tight]).all())


def test_refine_mapping_constant_painting_takes_first_candidate():
    """All costs are 0, so the first valid candidate in dx-outer, dy-inner order wins (refineNNF_kernel L1380)."""
    style_w = 9
    p0 = torch.full((5, 5), 4 * style_w + 4)  # every neighbour matched to (4, 4)
    p0[0, 2] = 3 * style_w + 2  # o = (dy, dx) = (-2, 0): candidate (5, 2), first in a dy-outer order
    tight = torch.zeros(5, 5, dtype=torch.bool)
    tight[2, 2] = True
    result = mapping.refine_mapping(p0, tight, torch.full((3, 9, 9), 0.5))
    # dx = -2 gives x = 6, outside the asymmetric bound x < 9 - 2 - 1; dx = -1, dy = -2 gives y = 6, also out;
    # dx = -1, dy = -1 gives (5, 5): the first valid candidate in dx-outer order.
    assert int(result[2, 2]) == 5 * style_w + 5


def test_refine_mapping_rejects_missing_matches_in_tight():
    p0 = torch.zeros(4, 4, dtype=torch.long)
    p0[1, 1] = -1
    with pytest.raises(ValueError, match="tight"):
        mapping.refine_mapping(p0, torch.ones(4, 4, dtype=torch.bool), torch.rand(3, 6, 6))


@pytest.mark.parametrize("ring", [1, 2])
def test_used_style_mask_equals_loop_oracle(ring):
    generator = torch.Generator().manual_seed(11)
    p = torch.randint(0, 7 * 9, (6, 8), generator=generator)
    p[0, 0], p[0, 1] = 0, 7 * 9 - 1  # corners of the style map: clipped blocks
    tight = torch.rand(6, 8, generator=generator) < 0.3
    tight[0, :2] = True
    used = mapping.used_style_mask(p, tight, (7, 9), ring_radius=ring)
    assert used.dtype == torch.float32 and used.shape == (7, 9)
    np.testing.assert_array_equal(used.numpy(), oracle_used(p.numpy(), tight.numpy(), (7, 9), ring))


@pytest.mark.parametrize(("source", "target"), [((6, 7), (12, 14)), ((35, 44), (70, 88)), ((3, 5), (7, 11)),
                                                ((5, 4), (5, 4)), ((70, 88), (279, 350))])
def test_upsample_used_mask_is_torch_image_simple(source, target):
    used = (torch.rand(*source, generator=torch.Generator().manual_seed(12)) < 0.5).float()
    result = mapping.upsample_used_mask(used, target)
    rows = [min(int(np.float32(i) * (np.float32(source[0]) / np.float32(target[0]))), source[0] - 1)
            for i in range(target[0])]
    cols = [min(int(np.float32(j) * (np.float32(source[1]) / np.float32(target[1]))), source[1] - 1)
            for j in range(target[1])]
    np.testing.assert_array_equal(result.numpy(), used.numpy()[np.ix_(rows, cols)])
    nearest = F.interpolate(used[None, None], size=target, mode="nearest")[0, 0]
    np.testing.assert_array_equal(result.numpy(), nearest.numpy())
    assert set(result.unique().tolist()) <= {0.0, 1.0}


def test_gather_targets_takes_centre_vectors_and_zeros():
    style = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    index = torch.tensor([[0, 11, -1], [5, -1, 7]])
    result = matching.gather_targets(style, index)
    expected = torch.tensor([[[0, 11, 0], [5, 0, 7]], [[12, 23, 0], [17, 0, 19]]], dtype=torch.float32)
    assert torch.equal(result, expected)


# ------------------------------------------------------------------------------------------ budget
def test_chunk_rows_rule():
    assert matching.chunk_rows(1000, 100, 40, 40_000) == 10
    assert matching.chunk_rows(5, 100, 40, 10**9) == 5
    assert matching.chunk_rows(1000, 100, 40, 4_000) == 1
    with pytest.raises(ValueError, match="budget too small"):
        matching.chunk_rows(1000, 100, 40, 3_999)


def test_peak_allocated_bytes_method():
    def pattern():
        first = torch.empty(1_000_000, dtype=torch.uint8)
        second = torch.empty(2_000_000, dtype=torch.uint8)
        del first
        third = torch.empty(500_000, dtype=torch.uint8)
        del second, third
        return torch.empty(10, dtype=torch.uint8)

    peak, _ = peak_allocated_bytes(pattern)
    assert 3_000_000 <= peak <= 3_000_000 + 4096


BUDGET = 4 * 2**20


@pytest.mark.parametrize("match", [matching.patch_cosine_match, matching.normalized_sum_match])
@pytest.mark.parametrize("layout", ["dense", "scattered"])
def test_chunked_match_stays_within_memory_budget(match, layout):
    """A 64x64, C=64 map: the full score matrix alone is 64 MiB; the chunked match must stay within 4 MiB.

    "dense" asks for a 24x24 block; "scattered" asks for every third position in both axes, so no two query windows share a neighbour:
    the worst case of the per-pair bound."""
    content, style, _ = _maps(13, 64, (64, 64), (64, 64), dtype=torch.float32)
    query = torch.zeros(64, 64, dtype=torch.bool)
    query[20:44, 20:44] = True
    if layout == "scattered":
        query = torch.zeros(64, 64, dtype=torch.bool)
        query[1::3, 1::3] = True
    peak, _ = peak_allocated_bytes(lambda: match(content, style, query, budget_bytes=BUDGET))
    assert 0 < peak <= BUDGET


def test_full_matrix_form_exceeds_the_budget_and_agrees():
    """The full form holds the 64x64 x 64x64 score matrix (64 MiB whatever C; C=8 keeps the test quick)."""
    content, style, _ = _maps(14, 8, (64, 64), (64, 64), dtype=torch.float32)
    query = torch.ones(64, 64, dtype=torch.bool)
    chunked_peak, chunked = peak_allocated_bytes(
        lambda: matching.patch_cosine_match(content, style, query, budget_bytes=BUDGET))
    full_peak, full = peak_allocated_bytes(lambda: oracles.patch_cosine_match_full(content, style, query))
    assert full_peak >= 64 * 64 * 64 * 64 * 4 > 10 * BUDGET >= 10 * chunked_peak
    assert (chunked == full).float().mean() > 0.999  # float32: only exact near-ties may differ


# ------------------------------------------------------------------------------------------ checks
def test_boundary_checks_name_the_problem():
    content, style, query = _maps(15, 4, (5, 6), (6, 5))
    with pytest.raises(ValueError, match="channel mismatch"):
        matching.patch_cosine_match(content, style[:3], query)
    with pytest.raises(ValueError, match="bool"):
        matching.patch_cosine_match(content, style, query.float())
    with pytest.raises(ValueError, match="odd"):
        matching.normalized_sum_match(content, style, query, patch_size=4)
    empty = torch.zeros_like(query)
    assert bool((matching.patch_cosine_match(content, style, empty) == -1).all())

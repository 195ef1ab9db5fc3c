"""Histogram target and remap (ALGORITHM.md section 3d) against loop oracles of the CUDA kernels."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from oracles import remap_histogram_naive, remap_histogram_searchsorted

from harmonize_core.losses.histogram import (
    HistogramTarget,
    bin_of_rank,
    histogram_loss_and_gradient,
    histogram_target,
    remap_histogram,
    stable_sort_rows,
)
from harmonize_core.losses.terms import histogram_loss
from harmonize_core.optimisation.window import Window

BINS = 256
EDGE_GUARD = 1e-9  # in bins; float64 rounding of vmin + b * step is ~1e-13 bins


def oracle_histogram(style: np.ndarray, used: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """histogram_kernel (cuda_utils.cu L102-133) in float32: counts per bin, min and max over U."""
    values = style[:, used]
    vmin, vmax = values.min(1), values.max(1)
    hist = np.zeros((style.shape[0], bins), dtype=np.float32)
    for channel in range(style.shape[0]):
        lo, hi = vmin[channel], vmax[channel]
        if lo == hi:
            lo, hi = np.float32(lo - 1), np.float32(hi + 1)
        for value in values[channel]:
            index = min(int(np.float32(np.float32(value - lo) / np.float32(hi - lo)) * np.float32(bins)), bins - 1)
            hist[channel, index] += 1
    return hist, vmin, vmax


def oracle_remap(feat: np.ndarray, query: np.ndarray, hist: np.ndarray, cum: np.ndarray, vmin: np.ndarray,
                 vmax: np.ndarray, bins: int) -> np.ndarray:
    """hist_remap2_kernel (L233-291): binary search with the -0.5 / +0.5 sentinels, ratio, value; float64."""
    result = feat.astype(np.float64).copy()
    for channel in range(feat.shape[0]):
        values = feat[channel][query]
        order = np.argsort(values, kind="stable")
        remapped = np.empty(values.shape, dtype=np.float64)
        for rank, element in enumerate(order):
            start, end, middle, found = 0, bins - 1, (bins - 1) // 2, -1
            while start <= end:
                cdf_end = cum[channel, middle] + (0.5 if middle == bins - 1 else 0.0)
                cdf_start = -0.5 if middle == 0 else cum[channel, middle - 1]
                if rank >= cdf_end:
                    start = middle + 1
                elif rank < cdf_start:
                    end = middle - 1
                else:
                    found = middle
                    break
                middle = (start + end) // 2
            count = hist[channel, found]
            ratio = min(max((rank - (cum[channel, found] - count)) / (count + 1e-8), 0.0), 1.0)
            step = (vmax[channel] - vmin[channel]) / bins
            remapped[element] = vmin[channel] + (found + ratio) * step
        result[channel][query] = remapped
    return result


def _distinct_channels(n: int, generator: torch.Generator) -> torch.Tensor:
    """Three channels with very different ranges and shapes: uniform [0, 1], exponential around 100, bimodal < 0."""
    uniform = torch.rand(n, generator=generator)
    exponential = 100 + 50 * torch.empty(n).exponential_(generator=generator)
    bimodal = torch.where(torch.rand(n, generator=generator) < 0.3, -5 + torch.rand(n, generator=generator) * 2,
                          7 + torch.rand(n, generator=generator))
    return torch.stack([uniform, exponential, bimodal])


def _case(seed: int = 0, n_style: tuple[int, int] = (30, 40), n_feat: tuple[int, int] = (28, 36)):
    generator = torch.Generator().manual_seed(seed)
    style = _distinct_channels(n_style[0] * n_style[1], generator).view(3, *n_style)
    used = torch.rand(*n_style, generator=generator) < 0.5
    feat = torch.randn(3, *n_feat, generator=generator).relu() * torch.tensor([3.0, 0.1, 20.0])[:, None, None]
    query = torch.rand(*n_feat, generator=generator) < 0.6
    return style, used, feat, query


def _rehistogram(values: torch.Tensor, target: HistogramTarget) -> torch.Tensor:
    """Counts of ``values`` (C, n) in the target's bins on [vmin, vmax], with the target's binning formula; a value
    the remap put exactly on a bin's lower edge (ratio 0) may round just below it, hence the 1e-9 bin guard."""
    scale = (target.vmax - target.vmin).clamp(min=1e-30)[:, None]
    position = (values - target.vmin[:, None]) / scale * target.bins
    index = (position + EDGE_GUARD).floor().clamp(0, target.bins - 1).long()
    return torch.zeros_like(target.hist).scatter_add_(1, index, torch.ones_like(values))


# ---------------------------------------------------------------------------------------------- target
def test_histogram_target_equals_loop_oracle():
    style, used, _, _ = _case(1)
    n_used = int(used.sum())
    target = histogram_target(style, used, n_query=n_used)
    hist, vmin, vmax = oracle_histogram(style.numpy(), used.numpy(), BINS)
    np.testing.assert_array_equal(target.hist.numpy(), hist)
    np.testing.assert_array_equal(target.vmin.numpy(), vmin)
    np.testing.assert_array_equal(target.vmax.numpy(), vmax)
    np.testing.assert_allclose(target.cum.numpy(), np.cumsum(hist, axis=1), rtol=0, atol=1e-3)
    assert target.cum[:, -1].tolist() == [n_used] * 3 and target.bins == BINS


def test_histogram_target_scales_to_the_query_count():
    style, used, _, _ = _case(2)
    unscaled = histogram_target(style, used, n_query=int(used.sum()))
    scaled = histogram_target(style, used, n_query=1000)
    np.testing.assert_allclose(scaled.hist.numpy(), unscaled.hist.numpy() * 1000 / int(used.sum()), rtol=1e-6)
    np.testing.assert_allclose(scaled.cum[:, -1].numpy(), [1000.0] * 3, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- remap
def test_remap_equals_kernel_loop_oracle():
    style, used, feat, query = _case(3, n_style=(12, 15), n_feat=(10, 14))
    target = histogram_target(style.double(), used, n_query=int(query.sum()))
    expected = oracle_remap(feat.double().numpy(), query.numpy(), target.hist.numpy(), target.cum.numpy(),
                            target.vmin.numpy(), target.vmax.numpy(), BINS)
    np.testing.assert_allclose(remap_histogram(feat.double(), query, target).numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_query_equals_n_used", [True, False])
def test_remap_output_has_each_channels_target_histogram(n_query_equals_n_used):
    """Each channel's remapped values fall in its own bins with the target's counts: exactly when the counts are
    integers (n_query = n_used), else within the +-1 of rounding the scaled counts to whole elements."""
    style, used, feat, query = _case(4)
    if n_query_equals_n_used:
        query = torch.zeros(feat.shape[1:], dtype=torch.bool)
        query.view(-1)[:int(used.sum())] = True
    target = histogram_target(style.double(), used, n_query=int(query.sum()))
    remapped = remap_histogram(feat.double(), query, target)[:, query]
    assert bool((remapped >= target.vmin[:, None]).all()) and bool((remapped <= target.vmax[:, None]).all())
    counts = _rehistogram(remapped, target)
    assert counts.sum(1).tolist() == [int(query.sum())] * 3
    deviation = (counts - target.hist).abs().max().item()
    assert deviation <= (1e-6 if n_query_equals_n_used else 1.0 + 1e-6)


def test_histogram_check_detects_the_channel0_bug():
    """Reading every channel's histogram from channel 0 (sgugger's cell 130) fails the check above."""
    style, used, feat, query = _case(5)
    target = histogram_target(style.double(), used, n_query=int(query.sum()))
    buggy = dataclasses.replace(target, hist=target.hist[:1].expand_as(target.hist).contiguous(),
                                cum=target.cum[:1].expand_as(target.cum).contiguous())
    counts = _rehistogram(remap_histogram(feat.double(), query, buggy)[:, query], target)
    assert (counts - target.hist)[1:].abs().max().item() > 10


def test_fast_remap_equals_naive():
    generator = torch.Generator().manual_seed(6)
    style = torch.randn(8, 20, 24, generator=generator).relu() * torch.rand(8, 1, 1, generator=generator) * 10
    used = torch.rand(20, 24, generator=generator) < 0.4
    feat = torch.randn(8, 30, 26, generator=generator).relu()
    query = torch.rand(30, 26, generator=generator) < 0.5
    for bins in (BINS, 16):
        target = histogram_target(style, used, n_query=int(query.sum()), bins=bins)
        fast, naive = remap_histogram(feat, query, target), remap_histogram_naive(feat, query, target)
        np.testing.assert_allclose(fast.numpy(), naive.numpy(), rtol=0, atol=1e-5)


def test_remap_preserves_rank_order_within_each_channel():
    style, used, feat, query = _case(7)
    feat = feat + 0.01 * torch.randn(feat.shape, generator=torch.Generator().manual_seed(8))  # no ties
    target = histogram_target(style, used, n_query=int(query.sum()))
    values, remapped = feat[:, query], remap_histogram(feat, query, target)[:, query]
    order = values.argsort(dim=1)
    assert bool((remapped.gather(1, order).diff(dim=1) >= 0).all())


def test_remap_leaves_values_outside_the_mask_untouched():
    style, used, feat, query = _case(9)
    feat.requires_grad_(True)
    target = histogram_target(style, used, n_query=int(query.sum()))
    result = remap_histogram(feat, query, target)
    assert not result.requires_grad
    assert torch.equal(result[:, ~query], feat.detach()[:, ~query])
    assert not torch.equal(result[:, query], feat.detach()[:, query])


def test_flat_style_channel_maps_to_its_constant():
    """min == max: the histogram bins on [min - 1, max + 1] (all counts in the middle bin) and the remap's step
    is 0, so every masked value becomes that constant (histogram_kernel L116-119, hist_remap2_kernel L244)."""
    style, used, feat, query = _case(10)
    style[1] = 3.5
    target = histogram_target(style, used, n_query=int(query.sum()))
    assert float(target.vmin[1]) == float(target.vmax[1]) == 3.5
    assert float(target.hist[1, BINS // 2]) == pytest.approx(float(query.sum()))
    assert float(target.hist[1].sum() - target.hist[1, BINS // 2]) == 0.0
    result = remap_histogram(feat, query, target)
    assert bool((result[1][query] == 3.5).all())
    np.testing.assert_allclose(result.numpy(), remap_histogram_naive(feat, query, target).numpy(), atol=1e-5)


def test_remap_with_an_empty_query_returns_the_input():
    style, used, feat, _ = _case(11)
    target = histogram_target(style, used, n_query=0)
    query = torch.zeros(feat.shape[1:], dtype=torch.bool)
    assert torch.equal(remap_histogram(feat, query, target), feat)


def test_boundary_checks():
    style, used, feat, query = _case(12)
    with pytest.raises(ValueError, match="empty"):
        histogram_target(style, torch.zeros_like(used), n_query=5)
    with pytest.raises(ValueError, match="bool"):
        histogram_target(style, used.float(), n_query=5)
    target = histogram_target(style, used, n_query=int(query.sum()))
    with pytest.raises(ValueError, match="bins"):
        remap_histogram(feat[:2], query, target)
    assert math.isclose(float(target.cum[0, -1]), float(query.sum()), rel_tol=1e-5)


# ------------------------------------------------------------------------------------- linear bin search
@pytest.mark.parametrize("count", [1, 7, 300])
def test_bin_of_rank_equals_searchsorted(count):
    generator = torch.Generator().manual_seed(count)
    hist = torch.rand(5, 16, generator=generator) * (torch.rand(5, 16, generator=generator) < 0.6)
    hist[1] = 0  # an empty histogram
    hist[2, 3] = 1e6  # one huge bin
    cum = (hist / hist.sum(1, keepdim=True).clamp_min(1e-30) * count).cumsum(1)
    cum[3] = torch.arange(1, 17).float() * count / 16  # integer-valued cumulative counts: ties at the edges
    rank = torch.arange(count, dtype=torch.float32).expand(5, count).contiguous()
    expected = torch.searchsorted(cum, rank, right=True).clamp_(max=15)
    assert torch.equal(bin_of_rank(cum, count, 16), expected)


def test_remap_equals_the_searchsorted_form_exactly():
    generator = torch.Generator().manual_seed(11)
    style = torch.randn(8, 20, 24, generator=generator).relu() * torch.rand(8, 1, 1, generator=generator) * 10
    used = torch.rand(20, 24, generator=generator) < 0.4
    feat = torch.randn(8, 30, 26, generator=generator).relu()  # about half zeros: many ties
    query = torch.rand(30, 26, generator=generator) < 0.5
    for bins in (BINS, 16):
        target = histogram_target(style, used, n_query=int(query.sum()), bins=bins)
        fast = remap_histogram(feat, query, target)
        assert torch.equal(fast, remap_histogram_searchsorted(feat, query, target))
        np.testing.assert_allclose(fast.numpy(), remap_histogram_naive(feat, query, target).numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_histogram_loss_and_gradient_equal_autograd_of_the_loss(layout):
    generator = torch.Generator().manual_seed(12)
    style = torch.randn(6, 20, 24, generator=generator).relu() * 5
    used = torch.rand(20, 24, generator=generator) < 0.5
    features = torch.randn(1, 6, 18, 22, generator=generator).relu().contiguous(memory_format=layout)
    query = torch.rand(18, 22, generator=generator) < 0.4
    target = histogram_target(style, used, n_query=int(query.sum()))
    loss, rows = histogram_loss_and_gradient(features, query, target)
    leaf = features.clone().requires_grad_(True)
    remapped = remap_histogram(features[0], query, target).unsqueeze(0)
    reference = histogram_loss(leaf, remapped)
    (grad,) = torch.autograd.grad(reference, leaf)
    assert torch.allclose(loss, reference.detach(), rtol=1e-5)
    assert torch.equal(rows, grad[0].permute(1, 2, 0)[query])  # the same (n, C) rows, bit for bit
    assert float(grad[0].permute(1, 2, 0)[~query].abs().max()) == 0.0  # and zero elsewhere


# ------------------------------------------------------------------------------------------ keyed sort
def _sort_cases() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(21)
    relu = torch.randn(6, 500, generator=generator).relu() * 40  # about half exact zeros
    mixed = torch.randn(5, 400, generator=generator) * torch.tensor([1e-3, 1.0, 1e3, 1e30, 1e-40])[:, None]
    mixed[:, ::7] = 0.0
    mixed[:, 3::11] = -0.0  # ties with 0.0 in a float sort
    ties = torch.randint(-3, 4, (4, 300), generator=generator).float() * 0.5  # few distinct values, negatives
    return {"relu": relu, "mixed signs, subnormals, -0.0": mixed, "ties": ties, "all zeros": torch.zeros(3, 50),
            "no zeros": torch.rand(4, 200, generator=generator) + 0.5, "one column": torch.randn(3, 1),
            "infinities": torch.tensor([[float("inf"), 1.0, -float("inf"), 0.0, float("inf"), -2.0]])}


@pytest.mark.parametrize("name", list(_sort_cases()))
def test_keyed_sort_equals_torch_stable_sort_bit_for_bit(name):
    values = _sort_cases()[name]
    ordered, order = stable_sort_rows(values)
    expected = values.sort(dim=1, stable=True)
    assert torch.equal(order, expected.indices)
    assert torch.equal(ordered.view(torch.int32), expected.values.view(torch.int32))  # -0.0 stays -0.0


def test_keyed_sort_falls_back_to_torch_for_other_dtypes():
    values = torch.randn(3, 40, dtype=torch.float64).relu()
    ordered, order = stable_sort_rows(values)
    assert ordered.dtype == torch.float64 and torch.equal(order, values.sort(dim=1, stable=True).indices)


@pytest.mark.parametrize("kind", ["relu", "no zeros", "all zeros", "negative"])
def test_remap_equals_the_oracles_on_zeros_and_signs(kind):
    """The remap (keyed sort, linear bin count) gives exactly the searchsorted form's R (torch's stable sort) and
    the naive form's within rounding, on ReLU maps, maps without zeros, all-zero maps and maps with negatives."""
    generator = torch.Generator().manual_seed(22)
    style = torch.randn(8, 20, 24, generator=generator).relu() * torch.rand(8, 1, 1, generator=generator) * 10
    used = torch.rand(20, 24, generator=generator) < 0.4
    feat = {"relu": torch.randn(8, 30, 26, generator=generator).relu(),
            "no zeros": torch.rand(8, 30, 26, generator=generator) + 0.1, "all zeros": torch.zeros(8, 30, 26),
            "negative": torch.randn(8, 30, 26, generator=generator).round(decimals=1)}[kind]
    query = torch.rand(30, 26, generator=generator) < 0.5
    target = histogram_target(style, used, n_query=int(query.sum()))
    fast = remap_histogram(feat, query, target)
    assert torch.equal(fast, remap_histogram_searchsorted(feat, query, target))
    np.testing.assert_allclose(fast.numpy(), remap_histogram_naive(feat, query, target).numpy(), rtol=0, atol=1e-5)


def test_histogram_gradient_on_a_window_with_the_whole_count_equals_the_whole_map():
    generator = torch.Generator().manual_seed(23)
    features = torch.randn(1, 6, 18, 22, generator=generator).relu().contiguous(memory_format=torch.channels_last)
    query = torch.zeros(18, 22, dtype=torch.bool)
    query[4:12, 6:19] = torch.rand(8, 13, generator=generator) < 0.6
    target = histogram_target(torch.randn(6, 20, 24, generator=generator).relu() * 5,
                              torch.rand(20, 24, generator=generator) < 0.5, n_query=int(query.sum()))
    window = Window(3, 13, 5, 20, 18, 22)
    loss, rows = histogram_loss_and_gradient(features, query, target)
    loss_window, rows_window = histogram_loss_and_gradient(window.crop(features), window.crop(query), target,
                                                           features.numel())
    assert torch.equal(rows_window, rows)  # the same rows in the same (raster) order
    assert float(loss_window) == pytest.approx(float(loss), rel=1e-6)


def test_sorted_remap_is_kept_per_target_and_equals_a_fresh_computation():
    style, used, feat, query = _case(24)
    target = histogram_target(style, used, n_query=int(query.sum()))
    count = int(query.sum())
    first = target.sorted_remap(count)
    assert target.sorted_remap(count) is first  # computed once
    rank = torch.arange(count, dtype=target.cum.dtype)[None, :]
    expected = torch.searchsorted(target.cum, rank.expand(3, count).contiguous(), right=True).clamp_(max=BINS - 1)
    fresh = dataclasses.replace(target)  # a copy starts with its own, empty cache
    assert torch.equal(fresh.sorted_remap(count), first)
    assert fresh.sorted_remap(count) is not first
    count_per_bin = target.hist.gather(1, expected)
    ratio = ((rank - (target.cum.gather(1, expected) - count_per_bin)) / (count_per_bin + 1e-8)).clamp(0, 1)
    step = ((target.vmax - target.vmin) / BINS)[:, None]
    assert torch.equal(first, target.vmin[:, None] + (expected.to(ratio.dtype) + ratio) * step)
    assert target.sorted_remap(count - 1).shape == (3, count - 1)  # another count: recomputed

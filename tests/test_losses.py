"""Loss functions against loop references and the authors' formulas."""

import math

import pytest
import torch

from harmonize_core.losses.terms import (
    channel_matrix,
    content_loss,
    content_loss_and_gradient,
    gram_of_masked,
    masked_gram,
    noise_estimate,
    pass2_weights,
    style_loss,
    style_loss_and_gradient,
    total_variation,
    tv_sigmoid,
)


def _gram_loop(features, mask):
    _, channels, height, width = features.shape
    out = torch.zeros(channels, channels, dtype=torch.float64)
    mask_sum = 0.0
    for y in range(height):
        for x in range(width):
            m = float(mask[0, 0, y, x])
            mask_sum += m
            for i in range(channels):
                for j in range(channels):
                    out[i, j] += float(features[0, i, y, x]) * m * float(features[0, j, y, x]) * m
    # The authors expand the mask to C x H x W before summing it: C times the spatial sum.
    return out / (channels * mask_sum)


def test_masked_gram_equals_loop_implementation():
    torch.manual_seed(1)
    features = torch.rand(1, 4, 5, 6, dtype=torch.float64)
    mask = torch.rand(1, 1, 5, 6, dtype=torch.float64)
    mask[..., 0, :] = 0
    assert torch.allclose(masked_gram(features, mask), _gram_loop(features, mask), atol=1e-12)
    assert torch.allclose(gram_of_masked(features * mask, mask), masked_gram(features, mask))


def test_tv_gradient_is_the_authors_difference_operator():
    torch.manual_seed(2)
    image = torch.rand(1, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(total_variation(image), image)
    x = image.detach()[0]
    expected = torch.zeros_like(x)
    for c in range(3):
        for i in range(5):
            for j in range(6):  # first (H-1) x (W-1) pixels only (neural_gram.lua L431-446)
                dx = x[c, i, j] - x[c, i, j + 1]
                dy = x[c, i, j] - x[c, i + 1, j]
                expected[c, i, j] += dx + dy
                expected[c, i, j + 1] -= dx
                expected[c, i + 1, j] -= dy
    assert torch.allclose(grad[0], expected, atol=1e-12)


def test_noise_estimate_is_median_of_half_squared_differences():
    torch.manual_seed(3)
    painting = torch.rand(1, 3, 5, 4)
    x = painting[0]
    values = []
    for c in range(3):
        for i in range(4):
            for j in range(3):
                values.append(float(((x[c, i, j] - x[c, i, j + 1]) ** 2 + (x[c, i, j] - x[c, i + 1, j]) ** 2) / 2))
    values.sort()
    assert math.isclose(noise_estimate(painting), values[(len(values) - 1) // 2], rel_tol=1e-6)


def test_pass2_weights_follow_the_sigmoid():
    assert math.isclose(tv_sigmoid(2.5e-3), 5.0)
    assert tv_sigmoid(0.0) > 9.99 and tv_sigmoid(0.01) < 1e-6
    weights = pass2_weights(tau=5.0, mtv=2.5e-3)
    assert weights == {"content": 1.0, "style": 5.0, "hist": 25.0, "tv": 25.0}
    smooth = pass2_weights(tau=1.0, mtv=1e-5)
    assert math.isclose(smooth["hist"] + smooth["tv"], 10.0)


def _autograd(fn, inputs):
    leaf = inputs.detach().requires_grad_(True)
    loss = fn(leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


LAYOUTS = [torch.contiguous_format, torch.channels_last]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_channel_matrix_is_a_view_in_both_layouts(layout):
    features = torch.rand(1, 5, 4, 3).contiguous(memory_format=layout)
    matrix = channel_matrix(features)
    assert matrix.shape == (5, 12) and matrix.data_ptr() == features.data_ptr()
    assert torch.equal(matrix, features.reshape(5, 12))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_closed_form_style_gradient_equals_autograd(layout):
    torch.manual_seed(2)
    mask = torch.rand(1, 1, 9, 7, dtype=torch.float64)
    masked = (torch.rand(1, 6, 9, 7, dtype=torch.float64) * mask).contiguous(memory_format=layout)
    target = masked_gram(torch.rand(1, 6, 9, 7, dtype=torch.float64), mask)
    loss, grad = style_loss_and_gradient(masked, mask, target)
    ref_loss, ref_grad = _autograd(lambda fm: style_loss(gram_of_masked(fm, mask), target), masked)
    assert torch.allclose(loss, ref_loss, rtol=1e-12)
    assert torch.allclose(grad, ref_grad, rtol=1e-10, atol=1e-14)
    assert grad.is_contiguous(memory_format=layout)  # the gradient keeps the features' layout


def test_closed_form_style_gradient_in_float32_is_within_rounding_of_autograd():
    torch.manual_seed(3)
    mask = torch.rand(1, 1, 20, 16)
    masked = (torch.rand(1, 32, 20, 16) * 50 * mask).contiguous(memory_format=torch.channels_last)
    target = masked_gram(torch.rand(1, 32, 20, 16) * 50, mask)
    _, grad = style_loss_and_gradient(masked, mask, target)
    _, ref = _autograd(lambda fm: style_loss(gram_of_masked(fm, mask), target), masked)
    assert float((grad - ref).norm() / ref.norm()) < 1e-6


def test_closed_form_content_gradient_equals_autograd():
    torch.manual_seed(4)
    features, target = torch.rand(1, 8, 5, 6, dtype=torch.float64), torch.rand(1, 8, 5, 6, dtype=torch.float64)
    loss, grad = content_loss_and_gradient(features, target)
    ref_loss, ref_grad = _autograd(lambda f: content_loss(f, target), features)
    assert torch.allclose(loss, ref_loss, rtol=1e-12) and torch.allclose(grad, ref_grad, rtol=1e-12, atol=0)


def test_content_gradient_on_a_window_with_the_whole_count_equals_the_whole_map():
    """Masked features and target are zero outside the mask's window: the window with the whole map's count gives
    the same loss and the same gradient there (pass 2's windowed content term)."""
    generator = torch.Generator().manual_seed(3)
    mask = torch.zeros(1, 1, 12, 15)
    mask[..., 3:9, 4:12] = torch.rand(6, 8, generator=generator)
    features = torch.rand(1, 5, 12, 15, generator=generator) * mask
    target = torch.rand(1, 5, 12, 15, generator=generator) * mask
    loss, grad = content_loss_and_gradient(features, target)
    rows, cols = slice(2, 10), slice(3, 13)
    loss_window, grad_window = content_loss_and_gradient(features[..., rows, cols], target[..., rows, cols],
                                                         features.numel())
    assert float(loss_window) == pytest.approx(float(loss), rel=1e-6)
    assert torch.allclose(grad_window, grad[..., rows, cols], rtol=1e-6, atol=0)
    assert float(grad.abs().sum()) == pytest.approx(float(grad_window.abs().sum()), rel=1e-6)

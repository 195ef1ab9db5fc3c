"""The window of a mask's support: bounding box, crop views, zeroing outside."""

import torch

from harmonize_core.optimisation.window import Window


def test_window_is_the_bounding_box_of_the_nonzero_positions():
    mask = torch.zeros(1, 1, 9, 12)
    mask[..., 2, 5] = 0.3
    mask[..., 6, 3] = 1e-30  # any non-zero weight counts
    mask[..., 4, 8] = 1.0
    window = Window.of_support(mask)
    assert (window.top, window.bottom, window.left, window.right) == (2, 7, 3, 9)
    assert window.area == 5 * 6 and not window.is_whole
    assert float(window.crop(mask).sum()) == float(mask.sum())


def test_crop_is_a_view_and_zero_outside_clears_only_the_outside():
    tensor = torch.rand(1, 4, 9, 12).contiguous(memory_format=torch.channels_last)
    window = Window(2, 7, 3, 9, 9, 12)
    inside = window.crop(tensor)
    assert inside.data_ptr() == tensor[..., 2:, 3:].data_ptr() and inside.shape == (1, 4, 5, 6)
    before = inside.clone()
    window.zero_outside_(tensor)
    assert torch.equal(window.crop(tensor), before)
    window.crop(tensor).zero_()
    assert float(tensor.abs().max()) == 0.0


def test_an_empty_mask_gives_a_one_position_window_and_a_full_mask_the_whole_map():
    assert Window.of_support(torch.zeros(1, 1, 5, 6)) == Window(0, 1, 0, 1, 5, 6)
    assert Window.of_support(torch.ones(1, 3, 5, 6)).is_whole
    assert Window.whole(5, 6).is_whole


def test_crop_refuses_a_tensor_of_another_size():
    window = Window.whole(5, 6)
    try:
        window.crop(torch.zeros(1, 1, 5, 7))
    except ValueError as exc:
        assert "5x6" in str(exc)
    else:
        raise AssertionError("expected a ValueError")

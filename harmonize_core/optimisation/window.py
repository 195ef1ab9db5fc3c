"""The window of a layer's soft mask: the bounding box of ``m > 0``, where every masked loss term lives.

A tap's loss modules multiply the gradient leaving them by the layer's soft mask m (objective.py), and the masked
terms see ``F * m``, which is zero where m is. So at each tap the loss maths only needs the rectangle that holds
the mask's support (the loose mask covers 5-30% of a painting; its box 8-45% of the map): a slice view of the
feature map, no copy. ``Window`` names that rectangle and crops tensors to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Window:
    """Rows ``top:bottom`` and columns ``left:right`` of a ``height`` x ``width`` map."""

    top: int
    bottom: int
    left: int
    right: int
    height: int
    width: int

    @classmethod
    def of_support(cls, mask: torch.Tensor) -> Window:
        """Return the smallest window holding every position where ``mask`` (..., H, W) is non-zero in any leading
        index; a 1 x 1 window at the origin when the mask is zero everywhere (the maths on it then sees only zeros,
        as it would on the whole map)."""
        height, width = mask.shape[-2:]
        support = (mask != 0).reshape(-1, height, width).any(0)
        rows, cols = support.any(1).nonzero().flatten(), support.any(0).nonzero().flatten()
        if rows.numel() == 0:
            return cls(0, 1, 0, 1, height, width)
        top, bottom, left, right = torch.stack([rows[0], rows[-1], cols[0], cols[-1]]).tolist()
        return cls(top, bottom + 1, left, right + 1, height, width)

    @classmethod
    def whole(cls, height: int, width: int) -> Window:
        """Return the window covering the whole ``height`` x ``width`` map."""
        return cls(0, height, 0, width, height, width)

    @property
    def is_whole(self) -> bool:
        """True when the window covers the whole map."""
        return (self.top, self.left, self.bottom, self.right) == (0, 0, self.height, self.width)

    @property
    def area(self) -> int:
        """Number of positions in the window."""
        return (self.bottom - self.top) * (self.right - self.left)

    def crop(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return the view of ``tensor`` (..., height, width) inside the window (no copy)."""
        if tuple(tensor.shape[-2:]) != (self.height, self.width):
            raise ValueError(f"window of a {self.height}x{self.width} map cannot crop a {tuple(tensor.shape)} tensor")
        return tensor[..., self.top:self.bottom, self.left:self.right]

    def zero_outside_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Set ``tensor`` (..., height, width) to zero outside the window, in place (up to four strips); return it."""
        tensor[..., :self.top, :].zero_()
        tensor[..., self.bottom:, :].zero_()
        tensor[..., self.top:self.bottom, :self.left].zero_()
        tensor[..., self.top:self.bottom, self.right:].zero_()
        return tensor

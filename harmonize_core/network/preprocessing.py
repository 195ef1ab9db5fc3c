"""Input conventions of the backbones: how [0, 1] RGB images map to a network's input and back.

A set of weights carries the convention it was trained with (``weights.LoadedWeights.preprocessing``): ``CAFFE``
(BGR, x256, minus the BGR mean; the authors' VGG19 and the offline VGG16) or ``TORCHVISION`` (RGB, ImageNet
mean/std).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import InputError
from .architecture import RGB_CHANNELS


@dataclass(frozen=True)
class Preprocessing:
    """How [0, 1] RGB images map to a backbone's input: reorder channels, scale, subtract mean, divide by std.

    ``mean`` and ``std`` are given in the network's channel order (BGR for Caffe weights).
    """

    order: Literal["RGB", "BGR"]
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str = "custom"

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, RGB_CHANNELS, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return mean, std

    def _reorder(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1) if self.order == "BGR" else x

    def preprocess(self, rgb01: torch.Tensor) -> torch.Tensor:
        """Return the network input ``(N, 3, H, W)`` (same dtype/device) from an RGB image ``(N, 3, H, W)`` in [0, 1].

        Caffe: RGB->BGR, x256, minus the BGR mean (neural_gram.lua L285-292, neural_paint.lua L417-424).

        >>> CAFFE.preprocess(torch.ones(1, 3, 2, 2))[0, :, 0, 0]
        tensor([152.0610, 139.2210, 132.3200])
        """
        if rgb01.ndim != 4 or rgb01.shape[1] != RGB_CHANNELS:
            raise InputError(f"images must be (N, 3, H, W) RGB, got {tuple(rgb01.shape)}")
        mean, std = self._stats(rgb01)
        return (self._reorder(rgb01) * self.scale - mean) / std

    def deprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Return the RGB image ``(N, 3, H, W)`` with [0, 1] scaling from a network input; the exact inverse, no clamp.

        Caffe: plus mean, /256, BGR->RGB (neural_gram.lua L294-301); values may leave [0, 1].
        """
        mean, std = self._stats(x)
        return self._reorder((x * std + mean) / self.scale)


# The authors' code scales by 256, not 255 (neural_gram.lua L288); Caffe trained on 0..255 BGR minus this mean.
CAFFE_SCALE = 256.0
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE = Preprocessing("BGR", CAFFE_SCALE, CAFFE_BGR_MEAN, (1.0, 1.0, 1.0), name="caffe")
TORCHVISION = Preprocessing("RGB", 1.0, IMAGENET_MEAN, IMAGENET_STD, name="torchvision")
PREPROCESSINGS: dict[str, Preprocessing] = {p.name: p for p in (CAFFE, TORCHVISION)}

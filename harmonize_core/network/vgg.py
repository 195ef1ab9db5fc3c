"""The VGG network: the feature stack that returns named taps, and the backbone loader.

The architecture is data (``architecture``: torchvision's cfg "D" (VGG16) and "E" (VGG19) without batch norm, with
torchvision's exact ``features`` indices); the input conventions are ``preprocessing``; the weights come from the
registry (``weights``), which never imports this module. Pooling is max with ``ceil_mode=True`` by default, as
loadcaffe builds the authors' Caffe VGG19 (docs/algorithm.md section 1: relu1..5_1 of a 557x700 input are 557x700,
279x350, 140x175, 70x88, 35x44); torchvision's floor mode is an option. The tables and conventions are re-exported
here (``vgg.TAPS``, ``vgg.CAFFE``, ...), where the docs name them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError
from .architecture import (
    ARCHS,
    CONV_KERNEL,
    CONV_PADDING,
    LAYER_NAMES,
    POOL,
    POOL_KERNEL,
    POOL_STRIDE,
    RGB_CHANNELS,
    TAPS,
    VGG_CFGS,
    check_arch,
    check_tap,
    conv_shapes,
    layer_plan,
)
from .preprocessing import CAFFE, PREPROCESSINGS, TORCHVISION, Preprocessing
from .weights import WeightsSource, load_state_dict, parse_weights_source, source_stamp


def build_features(arch: str, ceil_mode: bool = True) -> nn.Sequential:
    """Return torchvision's ``features`` stack for ``arch`` (same indices), non-inplace ReLUs, max pools in ``ceil_mode``.

    ReLUs are not in-place so that tap outputs stay intact when later layers run.
    """
    layers: list[nn.Module] = []
    channels = RGB_CHANNELS
    for item in VGG_CFGS[check_arch(arch)]:
        if item == POOL:
            layers.append(nn.MaxPool2d(POOL_KERNEL, POOL_STRIDE, ceil_mode=ceil_mode))
        else:
            layers += [nn.Conv2d(channels, int(item), CONV_KERNEL, padding=CONV_PADDING), nn.ReLU(inplace=False)]
            channels = int(item)
    return nn.Sequential(*layers)


class VGGFeatures(nn.Module):
    """A VGG feature stack that returns named taps and runs only as deep as the deepest one requested.

    Anchor: crowsonkb/style-transfer-pytorch ``VGGFeatures`` (dict of taps, truncation).
    """

    def __init__(self, arch: str = "vgg19", ceil_mode: bool = True) -> None:
        super().__init__()
        self.arch = check_arch(arch)
        self.ceil_mode = ceil_mode
        self.layers = build_features(arch, ceil_mode)

    def forward(self, x: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Return ``{name: (N, C_l, H_l, W_l)}`` for each requested tap, in request order, attached to ``x``'s graph.

        ``x`` is ``(N, 3, H, W)`` float in this backbone's preprocessed space (see ``Preprocessing``). Layers past the
        deepest tap are not run.
        """
        wanted = {name: check_tap(self.arch, name) for name in names}
        if not wanted:
            raise InputError("VGGFeatures needs at least one layer name, e.g. ['relu4_1']")
        if x.ndim != 4 or x.shape[1] != RGB_CHANNELS:
            raise InputError(f"VGG input must be (N, 3, H, W), got {tuple(x.shape)}")
        by_index = {index: name for name, index in wanted.items()}
        outputs: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self.layers[: max(by_index) + 1]):
            x = layer(x)
            if index in by_index:
                outputs[index] = x
        return {name: outputs[index] for name, index in wanted.items()}


@dataclass
class Backbone:
    """A frozen feature extractor on a device, with the input convention and identity of its weights.

    ``weights`` is the source string it was loaded from; ``digest`` is the sha256 hex identifying the weights
    (cache keys include it).
    """

    arch: str
    net: VGGFeatures
    preprocessing: Preprocessing
    weights: str
    digest: str
    device: torch.device

    def extract(self, x: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Return ``{name: (N, C_l, H_l, W_l)}`` taps of a preprocessed ``x`` (see ``VGGFeatures.forward``)."""
        return self.net(x, names)


def resolve_device(device: str | torch.device) -> torch.device:
    """Return a ``torch.device``: ``"auto"`` -> cuda if available else cpu; a CUDA request without CUDA raises."""
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except RuntimeError:
            raise InputError(f"unknown device {device!r}: use auto, cpu or cuda[:N]") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!s} requested but CUDA is not available here: use --device cpu or auto")
    return resolved


_CACHE: dict[tuple, Backbone] = {}
_CACHE_LOCK = threading.Lock()


def load_backbone(
    arch: str = "vgg19", weights: str = "imagenet", device: str | torch.device = "cpu", ceil_mode: bool = True
) -> Backbone:
    """Return the ``Backbone`` for ``arch`` with ``weights`` on ``device`` (eval mode, parameters frozen).

    ``weights``: ``imagenet`` | ``offline-vgg16`` | a local .pth/.pt path | ``random:<seed>`` (tests only); see
    ``harmonize_core.network.weights``. Loaded backbones are cached in-process by (arch, weights, device, ceil_mode, and a
    local file's size and mtime), so repeated stage calls do not reload. Raises ``WeightsUnavailableError`` when the
    weights cannot be had; never falls back to random weights.
    """
    check_arch(arch)
    resolved = resolve_device(device)
    source = parse_weights_source(weights)
    key = (arch, weights, str(resolved), ceil_mode, source_stamp(source))
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = _build_backbone(arch, source, resolved, ceil_mode)
        return _CACHE[key]


def _build_backbone(arch: str, source: WeightsSource, device: torch.device, ceil_mode: bool) -> Backbone:
    loaded = load_state_dict(arch, source)
    net = VGGFeatures(arch, ceil_mode)
    net.layers.load_state_dict(loaded.state_dict, strict=True)
    # channels_last (NHWC) convolutions: 1.12-1.25x faster per pass-1 evaluation on CPU (docs/performance.md),
    # same features to 1e-9; cuDNN prefers NHWC too. Features keep their (N, C, H, W) shape.
    net.eval().requires_grad_(False).to(device=device, memory_format=torch.channels_last)
    return Backbone(arch, net, loaded.preprocessing, source.text, loaded.digest, device)


def clear_backbone_cache() -> None:
    """Forget every backbone loaded in this process (tests; freeing GPU memory)."""
    with _CACHE_LOCK:
        _CACHE.clear()


__all__ = [
    "ARCHS",
    "CAFFE",
    "LAYER_NAMES",
    "POOL",
    "PREPROCESSINGS",
    "TAPS",
    "TORCHVISION",
    "VGG_CFGS",
    "Backbone",
    "Preprocessing",
    "VGGFeatures",
    "build_features",
    "check_arch",
    "check_tap",
    "clear_backbone_cache",
    "conv_shapes",
    "layer_plan",
    "load_backbone",
    "resolve_device",
]

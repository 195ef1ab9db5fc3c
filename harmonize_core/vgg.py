"""VGG16/VGG19 feature stacks as data, named taps, input conventions and the backbone loader.

The architecture is torchvision's ``models/vgg.py`` cfg "D" (VGG16) and "E" (VGG19) without batch norm, built with
torchvision's exact ``features`` indices so that its checkpoints (``features.N.weight``) load after the ``features.``
prefix is stripped. Pooling is max with ``ceil_mode=True`` by default, as loadcaffe builds the authors' Caffe VGG19
(docs/algorithm.md section 1: relu1..5_1 of a 557x700 input are 557x700, 279x350, 140x175, 70x88, 35x44); torchvision's
floor mode is an option. Layer names follow jcjohnson/neural-style (``relu4_1``); ``TAPS`` is the one table that maps
them to indices, derived from the cfg: nothing else writes an integer index.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from .errors import InputError

if TYPE_CHECKING:
    from .weights import WeightsSource

POOL = "M"
CONV_KERNEL = 3
CONV_PADDING = 1
POOL_KERNEL = 2
POOL_STRIDE = 2
RGB_CHANNELS = 3

# torchvision models/vgg.py cfgs "D" and "E": channel counts of the 3x3 convs, "M" = 2x2 max pool.
VGG_CFGS: dict[str, tuple[int | str, ...]] = {
    "vgg16": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL),
    "vgg19": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512, 512, 512, POOL,
              512, 512, 512, 512, POOL),
}
ARCHS = tuple(VGG_CFGS)


def _layer_names(cfg: tuple[int | str, ...]) -> tuple[str, ...]:
    """Return the name of every ``features`` index: conv{b}_{k}, relu{b}_{k} (two per conv) and pool{b}."""
    names: list[str] = []
    block, conv = 1, 1
    for item in cfg:
        if item == POOL:
            names.append(f"pool{block}")
            block, conv = block + 1, 1
        else:
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
            conv += 1
    return tuple(names)


LAYER_NAMES: dict[str, tuple[str, ...]] = {arch: _layer_names(cfg) for arch, cfg in VGG_CFGS.items()}
# The one table of taps: every relu output by name -> its torchvision ``features`` index.
TAPS: dict[str, dict[str, int]] = {
    arch: {name: index for index, name in enumerate(names) if name.startswith("relu")}
    for arch, names in LAYER_NAMES.items()
}


def check_arch(arch: str) -> str:
    """Return ``arch`` if it is a known backbone (``vgg16`` or ``vgg19``), else raise ``InputError``."""
    if arch not in VGG_CFGS:
        raise InputError(f"unknown backbone {arch!r}: choose one of {', '.join(ARCHS)}")
    return arch


def check_tap(arch: str, name: str) -> int:
    """Return the ``features`` index of tap ``name`` in ``arch``, or raise ``InputError`` listing valid taps."""
    taps = TAPS[check_arch(arch)]
    if name not in taps:
        raise InputError(f"unknown {arch} layer {name!r}: choose one of {', '.join(taps)}")
    return taps[name]


def conv_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Return ``{"N.weight": (out, in, 3, 3), "N.bias": (out,)}`` for every conv of ``arch`` (Sequential-relative keys)."""
    shapes: dict[str, tuple[int, ...]] = {}
    channels, index = RGB_CHANNELS, 0
    for item in VGG_CFGS[check_arch(arch)]:
        if item == POOL:
            index += 1
            continue
        shapes[f"{index}.weight"] = (int(item), channels, CONV_KERNEL, CONV_KERNEL)
        shapes[f"{index}.bias"] = (int(item),)
        channels, index = int(item), index + 2
    return shapes


def layer_plan(arch: str, name: str) -> list[str]:
    """Return the ops ``"conv"``/``"pool"`` from the input up to and including the conv feeding tap ``name``.

    The per-layer mask propagation (neural_gram.lua L110-115, neural_paint.lua L216-221) blurs at each conv and
    halves at each pool; ReLUs do not touch the mask. VGG19: relu1_1 -> 1 conv, relu2_1 -> conv, conv, pool, conv,
    relu4_1 -> 8 convs and 3 pools.

    >>> layer_plan("vgg19", "relu2_1")
    ['conv', 'conv', 'pool', 'conv']
    """
    stop = check_tap(arch, name)
    ops = [layer[:4] for layer in LAYER_NAMES[arch][:stop]]
    return [op for op in ops if op in ("conv", "pool")]


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
    ``harmonize_core.weights``. Loaded backbones are cached in-process by (arch, weights, device, ceil_mode, and a
    local file's size and mtime), so repeated stage calls do not reload. Raises ``WeightsUnavailableError`` when the
    weights cannot be had; never falls back to random weights.
    """
    # weights.py imports this module's tables: import it late to avoid a cycle
    from . import weights as weights_module

    check_arch(arch)
    resolved = resolve_device(device)
    source = weights_module.parse_weights_source(weights)
    key = (arch, weights, str(resolved), ceil_mode, weights_module.source_stamp(source))
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = _build_backbone(arch, source, resolved, ceil_mode)
        return _CACHE[key]


def _build_backbone(arch: str, source: WeightsSource, device: torch.device, ceil_mode: bool) -> Backbone:
    from . import weights as weights_module

    loaded = weights_module.load_state_dict(arch, source)
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
    "PREPROCESSINGS",
    "TAPS",
    "TORCHVISION",
    "VGG_CFGS",
    "Backbone",
    "Preprocessing",
    "VGGFeatures",
    "build_features",
    "clear_backbone_cache",
    "conv_shapes",
    "layer_plan",
    "load_backbone",
    "resolve_device",
]

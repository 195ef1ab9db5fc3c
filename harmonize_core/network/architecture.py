"""The VGG16/VGG19 architectures as data: layer layouts, layer names, the table of named taps, conv shapes.

The layouts are torchvision's ``models/vgg.py`` cfg "D" (VGG16) and "E" (VGG19) without batch norm, indexed as
torchvision's ``features`` stack, so that its checkpoints (``features.N.weight``) load after the ``features.`` prefix
is stripped. Layer names follow jcjohnson/neural-style (``relu4_1``); ``TAPS`` is the one table that maps them to
indices, derived from the cfg: nothing else writes an integer index. Pure data and lookups (no torch): the weights
registry (``weights``) checks files against these shapes, and the network (``vgg``) is built from them.
"""

from __future__ import annotations

from ..errors import InputError

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

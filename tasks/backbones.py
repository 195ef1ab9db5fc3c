"""The run's backbone: resolve the weights source (downloading ``s3://`` files once), load it, name its digest.

The flow resolves the backbone once per run (``backbone_spec``) to learn the weights' digest that keys pass1/pass2;
tasks call ``load_for_task`` with that spec, which loads through the core's in-process cache (so items share one
network) and checks that the weights still have the digest the keys were computed with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harmonize_core.config import HarmonizeConfig
from harmonize_core.errors import InputError

from . import storage

CONVENTION_MARK = "#"  # harmonize_core.weights: "<file>#caffe" names the file's input convention
S3_SUBDIR = "s3"  # downloaded s3:// weights files live beside the core's converted weights


def weights_cache_dir() -> Path:
    """Return the local folder for downloaded weights files: ``<core weights cache>/s3`` (``$HARMONIZE_CACHE_DIR``)."""
    from harmonize_core.weights import cache_dir

    return cache_dir() / S3_SUBDIR


def local_weights(source: str) -> str:
    """Return a weights source the core can load: an ``s3://`` file becomes a downloaded local path.

    A ``#caffe``/``#torchvision`` input-convention suffix is kept: ``s3://b/w.pth#caffe`` -> ``/cache/.../w.pth#caffe``.
    """
    if not storage.is_s3(source):
        return source
    uri, mark, convention = source.partition(CONVENTION_MARK)
    return f"{storage.fetch_to_local(uri, weights_cache_dir())}{mark}{convention}"


def backbone_spec(config: HarmonizeConfig, device: str) -> dict[str, Any]:
    """Return ``{name, weights, ceil_mode, digest}`` of the run's backbone, loading it once (on ``device``)."""
    from harmonize_core.vgg import load_backbone

    section = config.backbone
    loaded = load_backbone(section.name, local_weights(section.weights), device=device, ceil_mode=section.ceil_mode)
    return {"name": section.name, "weights": section.weights, "ceil_mode": section.ceil_mode,
            "digest": loaded.digest}


def load_for_task(spec: dict[str, Any], device: str):
    """Return the loaded ``Backbone`` for ``spec`` on ``device``; ``InputError`` if its weights changed since."""
    from harmonize_core.vgg import load_backbone

    loaded = load_backbone(spec["name"], local_weights(spec["weights"]), device=device, ceil_mode=spec["ceil_mode"])
    if loaded.digest != spec["digest"]:
        raise InputError(f"weights {spec['weights']}: digest changed during the run ({loaded.digest[:12]} != "
                         f"{spec['digest'][:12]}); rerun so the cache keys use the new weights")
    return loaded

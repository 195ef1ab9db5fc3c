"""Content-addressed cache keys for the stage tasks, and where the cache records live.

Key (``stage_cache_key``): sha256 over the stage name, the sha256 digests of the item's three input files and of the
upstream stage outputs the task reads, the stage's own config section (``config.stage_section``, every value
written the one way its meaning is: a tau left empty is 5.0), the backbone weights' digest (pass1/pass2) and the
digest of the core code that computes the stage (``tasks.code_digest``: a change to that computation recomputes; a
docstring, a module move, another stage's code or a pipeline-only change does not), plus ``CACHE_SCHEMA`` to
invalidate deliberately. It never
includes a URI, the item id, the row number, the run or the device: a curator's edit to one row changes only that
row's digests, and a config change to one stage changes that stage's key and, through its new output digest, the
keys of the stages after it.

Records: each task returns a small JSON record ``{stage, uri, sha256, metrics_uri, item_uri, summary}`` whose ``uri``
and ``metrics_uri`` name immutable, content-addressed objects (``<out>/.cache/objects/<sha256>.<ext>``) and
``item_uri`` the item's own readable copy; Prefect persists it
(JSON serializer) under ``<out>/.cache/<key>``, i.e. in the run's own output storage, so any worker on any machine
that writes to the same output location finds it:

- a local output folder: ``result_storage=Path("<out>/.cache")`` (Prefect builds a ``LocalFileSystem`` at run time;
  a ``Path`` needs no saved block);
- an ``s3://`` output prefix: Prefect only accepts *saved* blocks (or their slug) as task result storage, so
  ``prepare_result_storage`` saves an ``S3Bucket`` block named after a digest of the output prefix
  (``s3-bucket/harmonize-cache-<digest>``) on whatever Prefect API the flow runs against (the ephemeral local one
  or a server), and the tasks get the slug, resolved lazily when they run. Its ``AwsCredentials()`` carry no
  secrets or endpoint: boto3's standard chain (``AWS_ENDPOINT_URL_S3`` ...) applies, as in ``tasks.storage``.

Each stage runs in a SERIALIZABLE transaction whose lock manager (``tasks.storage.locks.StorageLockManager``) keeps its
locks in the same output storage: two workers reaching one key at once compute it once (``stage_policy``).

The flow applies the storage and the policy with ``task.with_options(...)`` at run time (decorators run at import,
before the output location is known). Because keys ignore the item id, a hit may return a record computed for
another item (an identical row) or whose objects were deleted since; ``flows.item`` checks every record's object by
digest and refreshes the item's own copy, or recomputes with ``refresh_cache=True``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy

from harmonize_core.config import HarmonizeConfig, apply_overrides, stage_section

from . import storage
from .code_digest import installed_code_digests
from .storage.locks import lock_manager_for

CACHE_SCHEMA = "2"  # bump to invalidate every stage record at once (2: records name content-addressed objects)
FILE_INPUTS: tuple[str, ...] = ("content", "style", "mask")
# The upstream stage records each task reads (parameter names of the tasks in tasks.stages).
UPSTREAM: dict[str, tuple[str, ...]] = {
    "dilate": (),
    "pass1": ("loose",),
    "blend": ("pass1",),
    "pass2": ("loose", "blended"),
    "reconstruct": ("pass2",),
}
NAMED_WEIGHTS_PREFIXES = ("imagenet", "offline-", "random:")  # weights sources that are names, not files
BLOCK_PREFIX = "harmonize-cache-"
BLOCK_DIGEST_CHARS = 16


def config_from_dict(values: dict[str, Any]) -> HarmonizeConfig:
    """Return the ``HarmonizeConfig`` whose ``to_dict()`` is ``values`` (rebuilt through ``apply_overrides``)."""
    flat: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat.update({f"{name}.{field}": item for field, item in value.items()})
        else:
            flat[name] = value
    return apply_overrides(HarmonizeConfig(), flat)


def key_section(config: HarmonizeConfig, stage: str) -> dict[str, Any]:
    """Return the config section that keys ``stage``; a weights *file*'s location becomes "file" (its digest counts,
    its ``#convention`` suffix stays)."""
    section = stage_section(config, stage)
    backbone = section.get("backbone")
    if backbone and not str(backbone["weights"]).startswith(NAMED_WEIGHTS_PREFIXES):
        _, mark, convention = str(backbone["weights"]).partition("#")
        section = {**section, "backbone": {**backbone, "weights": f"file{mark}{convention}"}}
    return section


def key_payload(stage: str, digests: dict[str, str], config: HarmonizeConfig, weights_digest: str | None = None,
                code: str | None = None) -> dict[str, Any]:
    """Return everything ``stage``'s cache key is made of (also recorded in its metrics, so ``harmonize plan`` can
    say what changed). ``code`` defaults to the installed core's digest for the stage (``tasks.code_digest``)."""
    return {"schema": CACHE_SCHEMA, "code": code or installed_code_digests()[stage], "stage": stage,
            "inputs": dict(sorted(digests.items())), "config": key_section(config, stage),
            "weights": weights_digest if stage in ("pass1", "pass2") else None}


def key_from_payload(payload: dict[str, Any]) -> str:
    """Return the ``<stage>-<hex sha256>`` cache key of a ``key_payload``."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return f"{payload['stage']}-{hashlib.sha256(text.encode()).hexdigest()}"


def stage_cache_key(stage: str, digests: dict[str, str], config: HarmonizeConfig,
                    weights_digest: str | None = None, code: str | None = None) -> str:
    """Return the ``<stage>-<hex sha256>`` cache key of one stage run (see the module docstring for what goes in)."""
    return key_from_payload(key_payload(stage, digests, config, weights_digest, code))


def task_key_payload(stage: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """Return the key payload of a stage task called with ``inputs`` (its keyword arguments)."""
    config = config_from_dict(inputs["item"]["config"])
    backbone = inputs.get("backbone") or {}
    return key_payload(stage, input_digests(stage, inputs), config, backbone.get("digest"))


def input_digests(stage: str, inputs: dict[str, Any]) -> dict[str, str]:
    """Return ``{name: sha256}`` of a stage task's inputs: the item's files and its upstream records."""
    files = inputs["item"]["files"]
    digests = {name: files[name]["sha256"] for name in FILE_INPUTS}
    digests.update({name: inputs[name]["sha256"] for name in UPSTREAM[stage]})
    return digests


@dataclass
class StageCache(CachePolicy):
    """Prefect cache policy computing ``stage_cache_key`` from a stage task's parameters."""

    stage: str = ""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        """Return the stage's content-addressed key (ignores ``out``, ``device`` and the item id)."""
        return key_from_payload(task_key_payload(self.stage, inputs))


def stage_policy(stage: str, out: str) -> StageCache:
    """Return ``stage``'s cache policy for output ``out``: serializable, locked in that storage (computed once)."""
    return StageCache(stage=stage).configure(isolation_level="SERIALIZABLE", lock_manager=lock_manager_for(out))


def block_name(out: str) -> str:
    """Return the name of the saved S3 result-storage block for output location ``out``."""
    digest = hashlib.sha256(storage.cache_uri(out).encode()).hexdigest()[:BLOCK_DIGEST_CHARS]
    return f"{BLOCK_PREFIX}{digest}"


def result_storage_for(out: str) -> Path | str:
    """Return what to pass as ``result_storage`` for output location ``out``: a ``Path`` or a block slug."""
    if storage.is_s3(out):
        return f"s3-bucket/{block_name(out)}"
    return storage.local_path(storage.cache_uri(out))


def prepare_result_storage(out: str) -> Path | str:
    """Create what ``result_storage_for(out)`` names (a folder, or a saved ``S3Bucket`` block) and return it."""
    reference = result_storage_for(out)
    if isinstance(reference, Path):
        reference.mkdir(parents=True, exist_ok=True)
        return reference
    from prefect_aws import AwsCredentials, S3Bucket

    bucket, prefix = storage.split_s3(storage.cache_uri(out))
    S3Bucket(bucket_name=bucket, bucket_folder=prefix, credentials=AwsCredentials()).save(
        block_name(out), overwrite=True)
    return reference

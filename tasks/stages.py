"""The five stage tasks: dilate -> pass1 -> blend -> pass2 -> reconstruct, each a thin wrapper of one core stage.

A task reads its inputs by URI, calls ``harmonize_core.passes.stages``, and writes its image and metrics twice: once as
immutable objects named by their sha256 (``<out>/.cache/objects/<sha256>.png|json``, what the records and the
downstream stages read, so a reader never sees a file another writer is replacing) and once as the item's own
readable copy ``<out>/<id>[/<variant>]/<stage>.png|json``. A task that computes first removes the item's copies of
its stage and the later ones (``discard_copies``): the copies in an item's folder always come from one computation,
never a new ``dilate.png`` beside pass images of an older size. It returns a small JSON record (never tensors)::

    {"stage": "pass1", "uri": ".../.cache/objects/<sha>.png", "sha256": "<sha>", "metrics_uri": "...json",
     "item_uri": ".../<id>/pass1.png", "summary": {"seconds": 12.3, "final_loss": 0.41}}

Policies live on the decorator (``stage_task``): the content-addressed cache (``tasks.caching``), retries with
exponential backoff on transient errors only (storage hiccups, CUDA out of memory after freeing the cache; never bad
input or a deadline), and a ``gpu`` tag on the network stages. Network stages take their device exclusively
(``tasks.gpu``) and end the process on a sticky CUDA error.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.tasks import exponential_backoff

from harmonize_core.errors import HarmonizeError, InputError
from harmonize_core.images import decode_image, decode_mask, decode_png_exact, encode_png
from harmonize_core.passes import stages as core

from . import storage
from .backbones import load_for_task
from .caching import StageCache, config_from_dict, task_key_payload
from .gpu import exclusive_device, free_device_memory, guard_cuda, is_out_of_memory, worker_name

GPU_TAG = "gpu"
RETRIES = 3
BACKOFF_SECONDS = 2.0  # waits 2, 4, 8 s between attempts
PROGRESS = {"harmonize_progress": True}  # log-record marker the CLI uses to show progress lines when quiet
SUMMARY_KEYS = ("seconds", "tau", "evaluations", "loose_fraction")
VARIANT_STAGES = ("pass2", "reconstruct")  # stages whose outputs differ per style-level variant (tau-<value>)
COMPUTE_LOG_ENV = "HARMONIZE_COMPUTE_LOG"  # a local file: one JSON line per stage actually computed (audits, tests)


class ComputeLog:
    """Which (stage, item id) pairs actually ran a core stage in this process (cache hits never do)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: list[tuple[str, str]] = []

    def add(self, stage: str, item_id: str) -> None:
        """Record that ``stage`` computed for ``item_id``."""
        with self._lock:
            self._runs.append((stage, item_id))

    def runs(self) -> list[tuple[str, str]]:
        """Return the recorded (stage, item id) pairs in order."""
        with self._lock:
            return list(self._runs)

    def clear(self) -> None:
        """Forget everything recorded so far."""
        with self._lock:
            self._runs.clear()


COMPUTED = ComputeLog()


def is_transient(exc: BaseException) -> bool:
    """Return True for errors a retry may cure: connections, timeouts, CUDA OOM; never a ``HarmonizeError``
    (bad input, a stage past its ``max_seconds`` deadline)."""
    if isinstance(exc, HarmonizeError):
        return False
    return isinstance(exc, (ConnectionError, TimeoutError, torch.cuda.OutOfMemoryError))


def retry_on_transient(task_: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient errors; free the device cache before an OOM retry."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - state.result re-raises the task's own exception
        retry = is_transient(exc)
        if retry and is_out_of_memory(exc):
            exc.__traceback__ = None  # the failed attempt's frames hold its tensors
            free_device_memory()
        return retry
    return False


def stage_task(stage: str, gpu: bool = False) -> Callable:
    """Return the ``@task`` decorator shared by the stage tasks (cache, JSON records, retries, tags)."""
    return task(name=stage, task_run_name=f"{stage}-{{item[id]}}", cache_policy=StageCache(stage=stage),
                result_serializer="json", cache_result_in_memory=False, persist_result=True,
                retries=RETRIES, retry_delay_seconds=exponential_backoff(backoff_factor=BACKOFF_SECONDS),
                retry_condition_fn=retry_on_transient, tags=[GPU_TAG] if gpu else [])


def read_verified(ref: dict[str, str]) -> bytes:
    """Return the bytes at ``ref["uri"]``, checking they still have digest ``ref["sha256"]`` (the key's input)."""
    data = storage.read_bytes(ref["uri"])
    if storage.sha256_bytes(data) != ref["sha256"]:
        raise InputError(f"{ref['uri']}: changed since it was validated or written; rerun the manifest")
    return data


def load_inputs(item: dict[str, Any], device: str) -> tuple[core.ItemInputs, Any]:
    """Return (the item's inputs at working size on ``device``, its ``HarmonizeConfig``)."""
    from harmonize_core.network.vgg import resolve_device

    config = config_from_dict(item["config"])
    files = item["files"]
    target = resolve_device(device)
    content = decode_image(read_verified(files["content"]), files["content"]["uri"]).to(target)
    style = decode_image(read_verified(files["style"]), files["style"]["uri"]).to(target)
    mask = decode_mask(read_verified(files["mask"]), files["mask"]["uri"], config.masks.binarize_threshold)
    names = (files["content"]["uri"], files["style"]["uri"], files["mask"]["uri"])
    return core.prepare_inputs(content, style, mask.to(target), config, names=names), config


def load_stage_image(record: dict[str, Any], device: str) -> torch.Tensor:
    """Return an upstream stage's PNG as ``(1, C, H, W)`` float in [0, 1] on ``device`` (exact 8-bit levels)."""
    from harmonize_core.network.vgg import resolve_device

    return decode_png_exact(read_verified(record), record["uri"]).to(resolve_device(device))


def summarize(metrics: dict[str, Any]) -> dict[str, Any]:
    """Return the few metrics worth carrying in the record: seconds, final loss, tau, evaluations."""
    summary = {key: metrics[key] for key in SUMMARY_KEYS if isinstance(metrics.get(key), (int, float, str))}
    final = metrics.get("final")
    if isinstance(final, dict) and "total" in final:
        summary["final_loss"] = final["total"]
    quality = metrics.get("quality")
    if isinstance(quality, dict):
        summary["quality"] = {k: v for k, v in quality.items() if isinstance(v, (int, float))}
    return summary


def variant_of(item: dict[str, Any], stage: str) -> str:
    """Return the output sub-folder of ``stage`` for this item: its variant (``tau-5``) for pass2/reconstruct."""
    return item.get("variant", "") if stage in VARIANT_STAGES else ""


def metrics_for_item(metrics: dict[str, Any], item: dict[str, Any]) -> bytes:
    """Return the item's readable metrics JSON: the stage's metrics plus the item id (and variant)."""
    extra = {"item": item["id"], **({"variant": item["variant"]} if item.get("variant") else {})}
    return json.dumps({**metrics, **extra}, indent=2, sort_keys=True, default=str).encode()


def save_stage(out: str, item: dict[str, Any], output: core.StageOutput, stage: str,
               **key_inputs: Any) -> dict[str, Any]:
    """Write the stage's PNG and metrics as content-addressed objects and as the item's copies; return the record.

    ``key_inputs`` are the task's upstream records and backbone: the metrics record what the cache key was made of
    (``cache``), which ``harmonize plan`` compares with a manifest's current state to say why a stage is stale.
    """
    png = encode_png(output.image)
    metrics = {**output.metrics, "inputs": {k: v["sha256"] for k, v in item["files"].items()},
               "cache": task_key_payload(stage, {"item": item, **key_inputs})}
    metrics_json = json.dumps(metrics, indent=2, sort_keys=True, default=str).encode()
    digest, metrics_digest = storage.sha256_bytes(png), storage.sha256_bytes(metrics_json)
    uri, metrics_uri = storage.object_uri(out, digest, "png"), storage.object_uri(out, metrics_digest, "json")
    storage.put_if_absent(uri, png)
    storage.put_if_absent(metrics_uri, metrics_json)
    variant = variant_of(item, stage)
    item_uri = storage.uri_for(out, item["id"], stage, "png", variant)
    storage.write_bytes(item_uri, png)
    storage.write_bytes(storage.uri_for(out, item["id"], stage, "json", variant), metrics_for_item(metrics, item))
    COMPUTED.add(stage, item["id"])
    journal(stage, item, digest, output.metrics.get("seconds"))
    return {"stage": stage, "uri": uri, "sha256": digest, "metrics_uri": metrics_uri, "item_uri": item_uri,
            "summary": summarize(output.metrics)}


def discard_copies(out: str, item: dict[str, Any], stage: str, including: bool = True) -> list[str]:
    """Remove the item's readable copies (``.png`` and ``.json``) of ``stage`` (unless ``including`` is False) and of
    every stage after it, so that no copy from an older computation sits beside a newer one looking current; return
    the URIs removed.

    A shared stage (dilate, pass1, blend) feeds every variant: the later stages' copies go from the item's folder
    and from each variant folder under it. A variant stage (pass2, reconstruct) only clears its own folder. The
    content-addressed objects and cache records are never touched: a later cache hit restores a copy.
    """
    later = core.STAGES[core.STAGES.index(stage) + (0 if including else 1):]
    names = {f"{name}.{ext}" for name in later for ext in ("png", "json")}
    folder = storage.join(out, storage.check_item_id(item["id"]))
    own = variant_of(item, stage)
    removed = []
    for uri in storage.list_uris(folder):
        parts = uri[len(folder):].lstrip("/" + os.sep).replace(os.sep, "/").split("/")
        if parts[-1] not in names or len(parts) > 2:
            continue
        in_variant = parts[0] if len(parts) == 2 else ""
        if stage in VARIANT_STAGES and in_variant != own:
            continue
        storage.delete(uri)
        removed.append(uri)
    return removed


def journal(stage: str, item: dict[str, Any], digest: str, seconds: Any) -> None:
    """Append one JSON line to ``$HARMONIZE_COMPUTE_LOG`` (if set) recording a stage that really computed."""
    path = os.environ.get(COMPUTE_LOG_ENV)
    if not path:
        return
    line = json.dumps({"stage": stage, "item": item["id"], "variant": item.get("variant", ""), "sha256": digest,
                       "seconds": seconds, "worker": worker_name(), "pid": os.getpid(), "at": time.time()})
    with open(path, "a", encoding="utf-8") as stream:  # O_APPEND: whole short lines from concurrent writers
        stream.write(line + "\n")


def progress_logger(item_id: str) -> Callable[[core.Iterate], None]:
    """Return a callback logging the core's ``Iterate`` events (emitted every ``log_every`` iterations)."""
    logger = get_run_logger()

    def report(event: core.Iterate) -> None:
        logger.info("%s %s", item_id, event.summary(), extra=PROGRESS)

    return report


@stage_task("dilate")
def dilate_task(item: dict[str, Any], out: str, device: str = "cpu") -> dict[str, Any]:
    """Write the loose mask M+ (``dilate.png``, 0/255 grey) and return its record."""
    discard_copies(out, item, "dilate")
    inputs, config = load_inputs(item, device)
    return save_stage(out, item, core.dilate(inputs, config), "dilate")


@stage_task("pass1", gpu=True)
def pass1_task(item: dict[str, Any], loose: dict[str, Any], backbone: dict[str, Any], out: str,
          device: str = "cpu") -> dict[str, Any]:
    """Write pass 1's optimised image (``pass1.png``, unblended) and its loss curves; return the record."""
    discard_copies(out, item, "pass1")
    inputs, config = load_inputs(item, device)
    network = load_for_task(backbone, device)
    with exclusive_device(device), guard_cuda():
        output = core.pass1(inputs, load_stage_image(loose, device), network, config, progress_logger(item["id"]))
    return save_stage(out, item, output, "pass1", loose=loose, backbone=backbone)


@stage_task("blend")
def blend_task(item: dict[str, Any], pass1: dict[str, Any], out: str, device: str = "cpu") -> dict[str, Any]:
    """Write pass 1's image feathered into the painting (``blend.png``) and return its record."""
    discard_copies(out, item, "blend")
    inputs, config = load_inputs(item, device)
    return save_stage(out, item, core.blend(load_stage_image(pass1, device), inputs, config), "blend", pass1=pass1)


@stage_task("pass2", gpu=True)
def pass2_task(item: dict[str, Any], loose: dict[str, Any], blended: dict[str, Any], backbone: dict[str, Any],
          out: str, device: str = "cpu") -> dict[str, Any]:
    """Write pass 2's image blended into the painting (``pass2.png``) and its loss curves; return the record."""
    discard_copies(out, item, "pass2")
    inputs, config = load_inputs(item, device)
    network = load_for_task(backbone, device)
    with exclusive_device(device), guard_cuda():
        output = core.pass2(inputs, load_stage_image(loose, device), load_stage_image(blended, device), network,
                            config, progress_logger(item["id"]))
    return save_stage(out, item, output, "pass2", loose=loose, blended=blended, backbone=backbone)


@stage_task("reconstruct", gpu=True)
def reconstruct_task(item: dict[str, Any], pass2: dict[str, Any], out: str, device: str = "cpu") -> dict[str, Any]:
    """Write the post-processed final image (``reconstruct.png``) and return its record."""
    discard_copies(out, item, "reconstruct")
    inputs, config = load_inputs(item, device)
    with exclusive_device(device), guard_cuda():
        output = core.reconstruct(load_stage_image(pass2, device), inputs, config)
    return save_stage(out, item, output, "reconstruct", pass2=pass2)


# The stage tasks are named <stage>_task: the same stage is ``harmonize_core.passes.stages.<stage>`` in the core (tensors
# in, a StageOutput out), which this layer wraps with storage, caching and the device lock.
STAGE_TASKS = {"dilate": dilate_task, "pass1": pass1_task, "blend": blend_task, "pass2": pass2_task,
               "reconstruct": reconstruct_task}

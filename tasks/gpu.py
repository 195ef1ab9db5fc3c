"""One device, one network stage at a time; CUDA failures handled the way a fleet needs.

- ``exclusive_device(device)``: items run as threads inside one process (a shard, or a local run); the network
  stages (pass1, pass2, reconstruct) of different items take turns on a device, so a GPU never holds two passes'
  activations at once. Workers are pinned one per GPU (``CUDA_VISIBLE_DEVICES``, see ``flows.workers``), so a lock
  per device inside the process is exact and costs nothing: a Prefect global concurrency limit would add a server
  round trip per stage and a lease that outlives a killed process, for a resource no other process can reach.
- ``free_device_memory()``: called before a CUDA out-of-memory error is retried, so the retry starts from an empty
  cache instead of the fragments of the failed attempt.
- ``is_sticky_cuda_error`` / ``stop_process``: an illegal memory access or a device-side assert poisons the CUDA
  context for the rest of the process; every later stage would fail too. The process therefore ends at once (exit
  code ``STICKY_EXIT``): its flow run crashes, the fan-out resubmits the shard to another worker, and the worker
  supervisor (``harmonize worker``) retires the worker of that GPU (it finds the marker this writes).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

STICKY_EXIT = 75  # the process ended itself after a sticky CUDA error (EX_TEMPFAIL: the work may go elsewhere)
STATE_DIR_ENV = "HARMONIZE_WORKER_STATE_DIR"  # set by `harmonize worker`: where a retiring worker leaves its marker
WORKER_NAME_ENV = "HARMONIZE_WORKER_NAME"
STICKY_MARKER = "sticky-cuda-error"
# Messages of CUDA errors after which the context is unusable (cudaErrorIllegalAddress, assert, launch failure, ...).
STICKY_MESSAGES = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address",
                   "illegal instruction", "an illegal", "uncorrectable ecc", "hardware stop", "cuda error: unknown")
logger = logging.getLogger(__name__)

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def device_lock(device: str) -> threading.Lock:
    """Return the process-wide lock of ``device`` (one per device string, e.g. ``cuda:0``, ``cpu``)."""
    with _locks_guard:
        return _locks.setdefault(str(device), threading.Lock())


@contextmanager
def exclusive_device(device: str) -> Iterator[None]:
    """Hold ``device`` for one network stage: other threads of this process wait for it."""
    with device_lock(device):
        yield


def free_device_memory() -> None:
    """Drop unreachable tensors and return CUDA's cached blocks to the driver (no-op without CUDA)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    """Return True for a CUDA (or CPU allocator) out-of-memory error."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def is_sticky_cuda_error(exc: BaseException) -> bool:
    """Return True for a CUDA error that leaves this process's CUDA context unusable (never for out of memory)."""
    if is_out_of_memory(exc):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    text = str(exc).lower()
    cuda_error = (accelerator_error is not None and isinstance(exc, accelerator_error)) or (
        isinstance(exc, RuntimeError) and "cuda" in text)
    return cuda_error and any(message in text for message in STICKY_MESSAGES)


def worker_name() -> str:
    """Return this worker's name (``$HARMONIZE_WORKER_NAME``, else host:pid), recorded in each summary row."""
    import socket

    return os.environ.get(WORKER_NAME_ENV) or f"{socket.gethostname()}:{os.getpid()}"


def stop_process(exc: BaseException, exit_fn=os._exit) -> None:
    """End this process after a sticky CUDA error, leaving a marker for the worker supervisor; does not return."""
    message = f"{worker_name()}: sticky CUDA error, ending this process so the work moves to a healthy GPU: {exc}"
    logger.critical(message)
    print(message, file=sys.stderr, flush=True)
    state_dir = os.environ.get(STATE_DIR_ENV)
    if state_dir:
        marker = Path(state_dir) / f"{worker_name()}.{STICKY_MARKER}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{exc}\n")
    logging.shutdown()
    exit_fn(STICKY_EXIT)


@contextmanager
def guard_cuda() -> Iterator[None]:
    """Run a stage body: a sticky CUDA error ends the process (``stop_process``); other errors propagate."""
    try:
        yield
    except Exception as exc:
        if is_sticky_cuda_error(exc):
            stop_process(exc)
        raise

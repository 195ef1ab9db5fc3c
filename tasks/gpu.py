"""One device, one network stage at a time; CUDA failures handled the way a fleet needs.

- ``exclusive_device(device)``: items run as threads inside one process (a shard, or a local run); the network
  stages (pass1, pass2, reconstruct) of different items take turns on a device, so a GPU never holds two passes'
  activations at once. Workers are pinned one per GPU (``CUDA_VISIBLE_DEVICES``, see ``flows.fleet.workers``), so a lock
  per device inside the process is exact and costs nothing: a Prefect global concurrency limit would add a server
  round trip per stage and a lease that outlives a killed process, for a resource no other process can reach. A
  stage that waits for the device says behind which item's stage it waits (``tasks.waits``).
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
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from . import waits

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


_holders: dict[str, str] = {}  # device -> the stage call holding it ("item 1/4 a pass1"), for waiters' lines
HOLDER_POLL_SECONDS = 0.5  # a waiter looks this often at who holds the device (it may change while it waits)


@contextmanager
def exclusive_device(device: str) -> Iterator[None]:
    """Hold ``device`` for one network stage: other threads of this process wait for it.

    A wait is said on the current stage call's progress line (``tasks.waits``) once it lasts ``NOTICE_SECONDS``,
    and again every ``REMIND_SECONDS``, naming the stage call that holds the device; its seconds, and every holder
    it waited behind, are added to the stage call's ``StageWaits``.
    """
    key, lock, scope = str(device), device_lock(device), waits.current()
    if not lock.acquire(blocking=False):
        started = time.monotonic()
        behind: list[str] = []
        next_notice = waits.NOTICE_SECONDS
        while not lock.acquire(timeout=HOLDER_POLL_SECONDS):
            holder = _holders.get(key)
            if holder and holder not in behind:
                behind.append(holder)
            waited = time.monotonic() - started
            if waited >= next_notice:
                what = f"waiting for the device ({key}) behind {holder or 'another stage'} for {waited:.0f} s"
                waits.announce(what)
                next_notice += waits.REMIND_SECONDS
        if scope is not None:
            scope.device_s += time.monotonic() - started
            scope.device_holder = " and ".join(behind)
    _holders[key] = scope.doing if scope else "another stage"
    try:
        yield
    finally:
        _holders.pop(key, None)
        lock.release()


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

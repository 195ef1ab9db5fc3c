"""Benchmark harness for the harmonisation core (issue 5): ``python -m bench --help``.

This module holds the measuring instruments shared by the sections of ``python -m bench`` (``bench.sections``):
a timer that synchronises the device around the timed call, a peak-memory meter (CUDA ``max_memory_allocated``
reset per measurement; on the CPU the kernel's peak RSS, reset per measurement), the machine record (load average,
threads), and ``with_memory_format``, which gives the NCHW and NHWC (channels_last, the core's default) copies of a
backbone that the layout comparison times. Nothing in ``harmonize_core`` imports this package.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")
MIB = 2**20
RSS_SAMPLE_SECONDS = 0.02  # fallback RSS sampling period (where the kernel peak cannot be reset)


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU), so wall-clock timers see finished kernels."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """Return (wall seconds, result) of ``fn()``, synchronising ``device`` before and after the call."""
    synchronize(device)
    started = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - started, result


def best_of(fn: Callable[[], T], device: torch.device, repeats: int) -> tuple[float, T]:
    """Return (the fastest of ``repeats`` timed calls in seconds, the last result)."""
    times, result = [], None
    for _ in range(max(1, repeats)):
        seconds, result = timed(fn, device)
        times.append(seconds)
    return min(times), result


def current_rss() -> int:
    """Return this process's resident set size in bytes (psutil; /proc/self/statm where psutil is missing)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as stream:
            return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def current_memory(device: torch.device) -> int:
    """Return the bytes in use now: CUDA memory allocated on ``device``, else the process RSS."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss()


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; return False where that is not possible.

    Linux >= 4.0: writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS (proc(5)).
    """
    try:
        with open("/proc/self/clear_refs", "w") as stream:
            stream.write("5")
        return _rss_peak() is not None
    except OSError:
        return False


def _rss_peak() -> int | None:
    """Return VmHWM (peak RSS since the last reset) in bytes from /proc/self/status, or None."""
    try:
        with open("/proc/self/status") as stream:
            for line in stream:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Context manager measuring the peak memory of the code inside it on ``device``.

    CUDA: ``torch.cuda.reset_peak_memory_stats`` on entry, ``max_memory_allocated`` on exit (bytes held by
    tensors; the caching allocator's reserve is ``reserved_bytes``). CPU: the kernel's own peak RSS (VmHWM),
    reset on entry, so nothing runs beside the timed code; where that counter cannot be reset, the RSS is sampled
    every ``RSS_SAMPLE_SECONDS`` by a thread (which on a 2-core box slows torch's worker threads measurably, and
    can miss a spike shorter than the period). ``peak_bytes`` is the absolute peak, ``extra_bytes`` the peak minus
    the level on entry.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start_bytes = self.peak_bytes = self.reserved_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kernel_peak = False

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = self.peak_bytes = torch.cuda.memory_allocated(self.device)
            return self
        self.start_bytes = self.peak_bytes = current_rss()
        self._kernel_peak = _reset_rss_peak()
        if not self._kernel_peak:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_SECONDS):
            self.peak_bytes = max(self.peak_bytes, current_rss())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.reserved_bytes = torch.cuda.max_memory_reserved(self.device)
            return
        if self._kernel_peak:
            self.peak_bytes = max(self.peak_bytes, _rss_peak() or 0)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
        self.peak_bytes = max(self.peak_bytes, current_rss())

    @property
    def extra_bytes(self) -> int:
        """Peak minus the level on entry, in bytes."""
        return max(0, self.peak_bytes - self.start_bytes)


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo (``platform.processor()`` where that is unreadable)."""
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict[str, Any]:
    """Return a JSON-able record of where and under what load the figures were taken: load average (1, 5, 15 min),
    torch threads, CPU cores and model, torch version, and the GPU name when ``device`` is CUDA."""
    info: dict[str, Any] = {
        "loadavg": [round(v, 2) for v in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def with_memory_format(backbone: Any, memory_format: torch.memory_format) -> Any:
    """Return a copy of ``backbone`` (a ``harmonize_core.network.vgg.Backbone``) whose conv weights are in
    ``memory_format``; the original is untouched. Convolutions pick their layout from the weight (oneDNN on the
    CPU, cuDNN on CUDA), so this switches the whole network. ``load_backbone`` builds channels_last nets; the
    benchmark compares them with a ``torch.contiguous_format`` (NCHW) copy. Features keep their shape and values.
    """
    net = copy.deepcopy(backbone.net).to(memory_format=memory_format)
    return dataclasses.replace(backbone, net=net)


__all__ = [
    "MIB",
    "PeakMemory",
    "best_of",
    "with_memory_format",
    "current_memory",
    "current_rss",
    "machine_info",
    "synchronize",
    "timed",
]

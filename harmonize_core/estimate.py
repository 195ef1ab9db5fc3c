"""The core's own estimate of how long an item takes on a CPU, before anything runs.

One L-BFGS evaluation costs a VGG forward and backward over the working image, so its time grows with the number of
pixels. The rates below are seconds per evaluation at the paper's 564 x 700 working image on the reference machine
of docs/performance.md (a 2-core AVX-512 server, torch with 2 threads, fp32, quiet), from its stage table; other
sizes scale by pixel count and other thread counts by 2 / threads. A pass's total is its iterations times that,
plus its setup (matching), which is small beside it. Good to a factor of about 1.5 on other CPUs: the point is to
tell a user whether an item takes minutes or hours. There are no GPU figures yet, so on CUDA this says nothing.
"""

from __future__ import annotations

import torch

from .config import HarmonizeConfig
from .passes.stages import STAGES

REFERENCE_PIXELS = 564 * 700
REFERENCE_THREADS = 2
# Seconds per evaluation at REFERENCE_PIXELS (docs/performance.md, stage table; VGG16 from the quick preset's runs).
SECONDS_PER_EVALUATION: dict[str, dict[str, float]] = {
    "vgg19": {"pass1": 2.14, "pass2": 2.70},
    "vgg16": {"pass1": 1.50, "pass2": 1.90},
}
FIXED_SECONDS = {"dilate": 0.01, "blend": 0.01, "reconstruct": 1.5}  # at REFERENCE_PIXELS
PASSES = ("pass1", "pass2")
DEFAULT_ASPECT = 564 / 700  # height / width when the image's own shape is not known


def working_pixels(size: int, shape: tuple[int, int] | None = None) -> int:
    """Return the pixel count at working long side ``size`` for an image of ``shape`` (H, W), or a typical one."""
    if shape is None:
        return int(size * size * DEFAULT_ASPECT)
    height, width = shape
    scale = size / max(height, width)
    return int(round(height * scale) * round(width * scale))


def stage_seconds(config: HarmonizeConfig, stage: str, *, pixels: int | None = None, device_type: str = "cpu",
                  threads: int | None = None) -> float | None:
    """Return the estimated seconds of one stage on a CPU (None on other devices: not measured yet)."""
    if device_type != "cpu":
        return None
    pixels = pixels or working_pixels(config.sizing.size)
    scale = (pixels / REFERENCE_PIXELS) * (REFERENCE_THREADS / max(1, threads or torch.get_num_threads()))
    if stage in PASSES:
        rates = SECONDS_PER_EVALUATION.get(config.backbone.name, SECONDS_PER_EVALUATION["vgg19"])
        iterations = getattr(config, stage).iterations
        return rates[stage] * (iterations + 1) * scale
    return FIXED_SECONDS.get(stage, 0.0) * scale


def item_seconds(config: HarmonizeConfig, *, pixels: int | None = None, device_type: str = "cpu",
                 threads: int | None = None) -> float | None:
    """Return the estimated seconds of a whole item (all five stages) on a CPU, or None on other devices."""
    parts = [stage_seconds(config, stage, pixels=pixels, device_type=device_type, threads=threads) for stage in STAGES]
    return None if any(p is None for p in parts) else float(sum(parts))


def describe_seconds(seconds: float) -> str:
    """Return a duration for people: ``45 s``, ``12 min``, ``3.4 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

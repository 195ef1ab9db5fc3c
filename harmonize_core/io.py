"""Local-file convenience for notebooks and ``harmonize one``: load an item, write its stage outputs."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .images import decode_image, decode_mask, encode_png, read_bytes
from .passes.stages import StageOutput


def load_item(content: str | Path, style: str | Path, mask: str | Path,
              mask_threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (content (1,3,H,W), style (1,3,H,W), mask (1,1,H,W) in {0,1}) read from local files.

    Raises ``InputError`` naming the file for a missing or unreadable image or an empty mask.
    """
    return (decode_image(read_bytes(content), str(content)), decode_image(read_bytes(style), str(style)),
            decode_mask(read_bytes(mask), str(mask), mask_threshold))


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so no half-written file is ever seen."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def save_outputs(outputs: dict[str, StageOutput], out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``<out_dir>/<stage>.png`` for each stage and ``<out_dir>/metrics.json``; return the metrics path."""
    out_dir = Path(out_dir)
    for stage, output in outputs.items():
        atomic_write(out_dir / f"{stage}.png", encode_png(output.image))
    metrics = {**(extra or {}), "stages": {stage: output.metrics for stage, output in outputs.items()}}
    path = out_dir / "metrics.json"
    atomic_write(path, json.dumps(metrics, indent=2, sort_keys=True, default=str).encode())
    return path

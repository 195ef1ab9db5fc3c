"""Image and mask decoding, resizing to the working size, and PNG encoding.

Works on bytes and local paths only (storage lives in ``tasks/``). Images are ``(1, 3, H, W)`` float32 RGB in
[0, 1]; masks are ``(1, 1, H, W)`` float32 in {0, 1}.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .errors import InputError


def decode_image(data: bytes, name: str) -> torch.Tensor:
    """Return an RGB image ``(1, 3, H, W)`` float32 in [0, 1] decoded from encoded bytes.

    Raises ``InputError`` naming ``name`` when the bytes are not a readable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"{name}: not a readable image ({exc.__class__.__name__}: {exc})") from None
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0)


def decode_mask(data: bytes, name: str, threshold: float = 0.5) -> torch.Tensor:
    """Return a binary mask ``(1, 1, H, W)`` float32 in {0, 1} from an encoded grey (or RGB) image.

    JPEG masks carry compression noise, so grey levels are averaged over channels and split at ``threshold``.
    Raises ``InputError`` when unreadable or when no pixel is inside the mask.
    """
    grey = decode_image(data, name).mean(dim=1, keepdim=True)
    mask = (grey > threshold).float()
    if mask.sum() == 0:
        raise InputError(f"{name}: the mask is empty (no pixel above {threshold:g}); paint the pasted object white")
    return mask


def read_bytes(path: str | Path) -> bytes:
    """Return the bytes of a local file; ``InputError`` names the file when it is missing or unreadable."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected an image file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None


def working_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Return (H, W) with the long side equal to ``size`` (torch/image ``scale``: h*size/max, w*size/max)."""
    long_side = max(height, width)
    if long_side == size:
        return height, width
    return max(1, int(round(height * size / long_side))), max(1, int(round(width * size / long_side)))


def resize(image: torch.Tensor, shape: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Return ``image`` (N, C, H, W) resized to ``shape``; a no-op (same object) when already that shape."""
    if tuple(image.shape[-2:]) == tuple(shape):
        return image
    if mode == "nearest":
        return F.interpolate(image, size=shape, mode="nearest")
    antialias = shape[0] < image.shape[-2] or shape[1] < image.shape[-1]
    return F.interpolate(image, size=shape, mode=mode, align_corners=False, antialias=antialias).clamp(0, 1)


def to_working_size(image: torch.Tensor, size: int) -> torch.Tensor:
    """Return ``image`` resized so that its long side is ``size`` (inputs already at that size are untouched)."""
    return resize(image, working_shape(image.shape[-2], image.shape[-1], size))


def quantize(image: torch.Tensor) -> torch.Tensor:
    """Return ``image`` clamped and rounded to 8-bit levels (what a PNG round trip gives), float in [0, 1]."""
    return torch.round(image.clamp(0, 1) * 255.0) / 255.0


def encode_png(image: torch.Tensor) -> bytes:
    """Return PNG bytes of an image ``(1, 3|1, H, W)`` in [0, 1] (clamped, rounded to 8 bits)."""
    array = torch.round(image.detach().clamp(0, 1) * 255.0).to(torch.uint8).cpu()[0].permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        pil = Image.fromarray(array[:, :, 0], mode="L")
    else:
        pil = Image.fromarray(array, mode="RGB")
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png_exact(data: bytes, name: str) -> torch.Tensor:
    """Return a PNG written by ``encode_png`` as ``(1, C, H, W)`` float in [0, 1], keeping 1 channel for greys."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            array = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"{name}: not a readable image ({exc})") from None
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array[:, :, :3].copy()).permute(2, 0, 1).unsqueeze(0)

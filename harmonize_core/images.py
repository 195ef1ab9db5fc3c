"""Image and mask decoding, resizing to the working size, and PNG encoding.

Works on bytes and local paths only (storage lives in ``tasks/``). Images are ``(1, 3, H, W)`` float32 RGB in
[0, 1]; masks are ``(1, 1, H, W)`` float32 in {0, 1}.

Hostile files are refused before they are decoded: an input larger than ``max_input_bytes()`` is not read, and an
image whose header declares more than ``max_pixels()`` pixels is not decoded (Pillow reads the size from the header
when it opens a file; decoding happens only on ``load``). Both limits are environment settings
(``HARMONIZE_MAX_PIXELS``, ``HARMONIZE_MAX_INPUT_BYTES``) so that validation and every worker apply the same ones.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .errors import InputError, LimitError, quoted

MAX_PIXELS_ENV = "HARMONIZE_MAX_PIXELS"
MAX_INPUT_BYTES_ENV = "HARMONIZE_MAX_INPUT_BYTES"
# 40 megapixels: 80 times the paper's 700 x 700 px and a 7700 x 5200 scan; decoded as float32 RGB it takes 480 MB.
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_INPUT_BYTES = 256 * 2**20  # 256 MiB: an uncompressed 16-bit RGB TIFF of 40 megapixels is 240 MB
_OBJECT_REPR = re.compile(r"\s*<[^<>]* (object )?at 0x[0-9a-fA-F]+>")  # Pillow names its stream: "<_io.BytesIO object at 0x...>"

# Validation and decoding check the declared size against max_pixels() themselves and refuse in one line; Pillow's
# own warning for large images (above its MAX_IMAGE_PIXELS, set to the same limit) would only repeat that as noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def max_pixels() -> int:
    """Return the largest pixel count (width x height) an input image may declare: ``$HARMONIZE_MAX_PIXELS`` or 40 M.

    Raises ``InputError`` for a setting that is not a positive whole number.
    """
    return _limit(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS)


def max_input_bytes() -> int:
    """Return the largest input file, in bytes: ``$HARMONIZE_MAX_INPUT_BYTES`` or 256 MiB (``InputError`` if bad)."""
    return _limit(MAX_INPUT_BYTES_ENV, DEFAULT_MAX_INPUT_BYTES)


def _limit(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip().replace("_", "")
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value.is_integer() or value < 1:
        raise InputError(f"{name}={quoted(os.environ[name])}: expected a positive whole number (default {default})")
    return int(value)


def check_input_bytes(size: int, name: str) -> None:
    """Raise ``LimitError`` naming ``name`` when a file of ``size`` bytes is over ``max_input_bytes()``; else None."""
    limit = max_input_bytes()
    if size > limit:
        raise LimitError(f"{name}: {size:,} bytes, over the limit of {limit:,} bytes per input file; use a smaller "
                         f"file or raise {MAX_INPUT_BYTES_ENV}")


def image_size(data: bytes, name: str) -> tuple[int, int]:
    """Return the (height, width) an image's header declares, without decoding its pixels.

    Raises ``InputError`` naming ``name`` for an unreadable header, ``LimitError`` (an ``InputError``) for bytes
    over ``max_input_bytes()`` or a size over ``max_pixels()``.
    """
    with _open(data, name) as img:
        return img.height, img.width


def _open(data: bytes, name: str) -> Image.Image:
    """Return the image of ``data`` opened lazily (header read, pixels not decoded) after the byte and pixel checks."""
    check_input_bytes(len(data), name)
    limit = max_pixels()
    # Pillow's own check (a warning above MAX_IMAGE_PIXELS, an error above twice it) follows the configured limit,
    # so it never refuses what the limit allows and protects every other Image.open in the process at the same level.
    Image.MAX_IMAGE_PIXELS = limit
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # over Pillow's hard limit, so over ours too
        found = re.search(r"\((\d+) pixels\)", str(exc))
        declared = f"{int(found.group(1)):,} pixels" if found else "more pixels than Pillow accepts"
        raise LimitError(_too_many_pixels(name, declared, limit)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(_unreadable(name, exc)) from None
    try:
        check_pixels(img.height, img.width, name)
    except LimitError:
        img.close()
        raise
    return img


def check_pixels(height: int, width: int, name: str) -> None:
    """Raise ``LimitError`` naming ``name`` when ``width x height`` is over ``max_pixels()``; else None."""
    limit = max_pixels()
    if width * height > limit:
        raise LimitError(_too_many_pixels(name, f"{width}x{height} ({width * height:,} pixels)", limit))


def _too_many_pixels(name: str, declared: str, limit: int) -> str:
    return (f"{name}: declares {declared}, over the limit of {limit:,} pixels; it was not decoded. Use a smaller "
            f"image (the pipeline works at a long side of 700 px) or raise {MAX_PIXELS_ENV}")


def _unreadable(name: str, exc: BaseException) -> str:
    """Return the one-line message of an image Pillow cannot read: the reason without Python object reprs."""
    if isinstance(exc, UnidentifiedImageError):
        reason = "not a format Pillow recognises, or a damaged header"
    else:
        reason = _OBJECT_REPR.sub("", (str(exc).strip().splitlines() or [""])[0]).strip() or exc.__class__.__name__
    return f"{name}: not a readable image ({reason})"


def decode_image(data: bytes, name: str) -> torch.Tensor:
    """Return an RGB image ``(1, 3, H, W)`` float32 in [0, 1] decoded from encoded bytes.

    Raises ``InputError`` naming ``name`` when the bytes are not a readable image, ``LimitError`` (an
    ``InputError``) when they are over the byte limit or declare more pixels than the pixel limit (checked from the
    header, before decoding).
    """
    with _open(data, name) as img:
        try:
            img.load()
            rgb = img.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise InputError(_unreadable(name, exc)) from None
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
    """Return the bytes of a local file; ``InputError`` names the file when it is missing, unreadable or over
    ``max_input_bytes()`` (checked before reading)."""
    path = Path(path)
    try:
        if path.is_file():
            check_input_bytes(path.stat().st_size, str(path))
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
    with _open(data, name) as img:
        try:
            img.load()
            array = np.asarray(img, dtype=np.float32) / 255.0
        except (OSError, ValueError, SyntaxError) as exc:
            raise InputError(_unreadable(name, exc)) from None
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array[:, :, :3].copy()).permute(2, 0, 1).unsqueeze(0)

"""The report's thumbnails, and the storage look-ups the report needs to place and link its files.

A thumbnail is a JPEG (long side ``THUMB_LONG_SIDE``, never enlarged) of one stage image, or of the composite with
the mask outlined in magenta edged in black. It is written beside the image it shows, named by a digest of its
sources' identities (``<folder>/thumbs/<stage>-<sha12>.jpg``), so a rebuild re-encodes nothing that has not
changed. Inputs that live elsewhere (another bucket, an absolute path) or in the cache are thumbnailed into
``<out>/<id>/thumbs/``. Works the same on local paths and ``s3://`` URIs.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from PIL import Image, ImageChops, ImageFilter, UnidentifiedImageError

from harmonize_core.errors import InputError
from tasks import storage

THUMBS_DIR = "thumbs"
THUMB_LONG_SIDE = 256  # pixels
THUMB_JPEG_QUALITY = 80
THUMB_VERSION = "1"  # part of every thumbnail's digest: bump it when the rendering changes, so old thumbs are not reused
DIGEST_CHARS = 12
OUTLINE_COLOUR = (255, 0, 200)  # mask outline on the composite: a magenta paintings rarely contain ...
OUTLINE_EDGE = (0, 0, 0)  # ... edged in black outside, so it shows on magenta too
OUTLINE_FILTER = 5  # MaxFilter size: the colour ring is (OUTLINE_FILTER - 1) / 2 px outside the mask (thumbnail px)
OUTLINE_EDGE_FILTER = 7  # the black edge is the next pixel out
MASK_THRESHOLD = 128
MISSING = (None, "missing")  # the (thumbnail URI, why not) of a source that does not exist

# ----------------------------------------------------------------------------------------------- storage look-ups

def _head(uri: str) -> dict[str, Any] | None:
    """Return ``{identity, modified}`` of the object at ``uri`` (identity: sha256, else the S3 ETag), None if absent."""
    if not storage.is_s3(uri):
        path = storage.local_path(uri)
        if not path.is_file():
            return None
        return {"identity": storage.sha256_bytes(path.read_bytes()),
                "modified": datetime.fromtimestamp(path.stat().st_mtime, tz=UTC)}
    bucket, key = storage.split_s3(uri)
    try:
        head = storage.s3_client().head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        error = storage.classify(exc, uri)
        if isinstance(error, InputError) and "not found" in str(error):
            return None
        raise error from exc
    identity = head.get("Metadata", {}).get(storage.DIGEST_METADATA) or str(head.get("ETag", "")).strip('"')
    return {"identity": identity, "modified": head.get("LastModified")}


def modified_at(uri: str) -> datetime | None:
    """Return when the object at ``uri`` was last written (timezone-aware), or None when it does not exist."""
    head = _head(uri)
    return head["modified"] if head else None


def relative_key(folder: str, uri: str) -> str:
    """Return ``uri`` relative to ``folder`` with ``/`` separators ("" parts when ``uri`` is not below it)."""
    if storage.is_s3(folder):
        if not storage.is_s3(uri) or storage.split_s3(uri)[0] != storage.split_s3(folder)[0]:
            return ""
        base, key = storage.split_s3(folder)[1].strip("/"), storage.split_s3(uri)[1]
        return posixpath.relpath("/" + key, "/" + base)
    if storage.is_s3(uri):
        return ""
    return os.path.relpath(storage.local_path(uri), storage.local_path(folder)).replace(os.sep, "/")


def inside(out: str, uri: str) -> bool:
    """Return True when ``uri`` lies under the output location ``out`` (so a relative link to it stays inside)."""
    if not uri:
        return False
    relative = relative_key(out, uri)
    return bool(relative) and relative != "." and not relative.startswith("../") and relative != ".."


# ----------------------------------------------------------------------------------------------- thumbnails

def _encode_thumbnail(image: Image.Image) -> bytes:
    """Return ``image`` shrunk to ``THUMB_LONG_SIDE`` (never enlarged) as JPEG bytes."""
    image = image.convert("RGB")
    image.thumbnail((THUMB_LONG_SIDE, THUMB_LONG_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=THUMB_JPEG_QUALITY, optimize=True, progressive=True)
    return buffer.getvalue()


def _plain(sources: list[bytes]) -> Image.Image:
    return Image.open(io.BytesIO(sources[0]))


def _outlined(sources: list[bytes]) -> Image.Image:
    """Return the composite (first source) at thumbnail size with the mask's (second source) outline drawn on it."""
    composite = Image.open(io.BytesIO(sources[0])).convert("RGB")
    composite.thumbnail((THUMB_LONG_SIDE, THUMB_LONG_SIDE), Image.Resampling.LANCZOS)
    mask = Image.open(io.BytesIO(sources[1])).convert("L").resize(composite.size, Image.Resampling.BILINEAR)
    mask = mask.point(lambda value: 255 if value >= MASK_THRESHOLD else 0)
    composite.paste(OUTLINE_EDGE, mask=ImageChops.subtract(mask.filter(ImageFilter.MaxFilter(OUTLINE_EDGE_FILTER)), mask))
    composite.paste(OUTLINE_COLOUR, mask=ImageChops.subtract(mask.filter(ImageFilter.MaxFilter(OUTLINE_FILTER)), mask))
    return composite


def thumbnail(folder: str, stage: str, sources: list[str],
              render: Callable[[list[bytes]], Image.Image] = _plain) -> tuple[str | None, str]:
    """Return (URI of ``<folder>/thumbs/<stage>-<sha12>.jpg`` or None, why not) for ``sources`` rendered by ``render``.

    The digest covers ``THUMB_VERSION`` and each source's identity (its sha256; an S3 object written by another tool:
    its ETag), so an existing thumbnail is reused and a changed source gets a new one. None when a source is
    missing ("missing") or cannot be decoded ("unreadable").
    """
    heads = [_head(uri) if uri else None for uri in sources]
    if any(head is None for head in heads):
        return None, "missing"
    identity = ":".join([THUMB_VERSION, stage, *(head["identity"] for head in heads)])
    uri = storage.join(folder, THUMBS_DIR, f"{stage}-{hashlib.sha256(identity.encode()).hexdigest()[:DIGEST_CHARS]}.jpg")
    if storage.exists(uri):
        return uri, ""
    try:
        data = _encode_thumbnail(render([storage.read_bytes(source) for source in sources]))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None, "unreadable"
    storage.write_bytes(uri, data)
    return uri, ""


def _thumb_folder(out: str, item_id: str, image_uri: str) -> str | None:
    """Return where a thumbnail of ``image_uri`` goes: beside it when it is under ``out`` (not in its cache), else
    ``<out>/<id>/``; None for an unsafe id."""
    if inside(out, image_uri) and relative_key(out, image_uri).split("/")[0] != storage.CACHE_DIR:
        return storage.parent(image_uri)
    try:
        return storage.join(out, storage.check_item_id(item_id))
    except InputError:
        return None  # an invalid row's unsafe id: never write outside <out>/<id>/


def stage_thumb(out: str, item_id: str, uri: str, stage: str) -> tuple[str | None, str]:
    """Return ``thumbnail``'s (URI or None, why not) for one stage image of an item (``MISSING``: no ``uri``, or no safe
    folder for it)."""
    folder = _thumb_folder(out, item_id, uri) if uri else None
    return thumbnail(folder, stage, [uri]) if folder else MISSING


def input_thumbs(out: str, row: dict[str, str]) -> tuple[tuple[str | None, str], tuple[str | None, str]]:
    """Return the (painting, composite with the mask outlined) thumbnails of the item of a summary ``row``.

    Each is ``thumbnail``'s (URI or None, why not); both ``MISSING`` for an id that is unsafe as a folder name.
    """
    folder = _thumb_folder(out, row.get("id", ""), "")
    if not folder:
        return MISSING, MISSING
    painting = thumbnail(folder, "painting", [row.get("style_uri", "")])
    composite = thumbnail(folder, "composite", [row.get("content_uri", ""), row.get("mask_uri", "")], _outlined)
    return painting, composite

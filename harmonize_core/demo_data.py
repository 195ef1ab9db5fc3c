"""A small demo dataset made procedurally (no downloaded images, so no licence question).

Each item is a seeded "painting" of random oriented brush strokes drawn from a small palette, a "photo-like" object
(a smoothly shaded, panelled ball with a specular highlight, as a photographed object would look) pasted into it, and the
object's tight mask, as arrays; ``manifests.demo`` writes them as files with a manifest.
"""

from __future__ import annotations

import colorsys
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEMO_SIZE = 192  # painting height in pixels (width 256: the working size below, so nothing is resampled)
JPEG_QUALITY = 92
STROKES_PER_MEGAPIXEL = 40_000  # dense enough that no canvas shows through
PALETTE_SIZE = 5
STROKE_BLUR = 0.6  # pixels: softens stroke edges like wet paint
OBJECT_FRACTION = (0.42, 0.55)  # object diameter as a fraction of the painting's short side
OBJECT_SEGMENTS = 6  # colour panels of the ball (beach-ball-like), so the object has structure to keep
LIGHT = np.array([-0.5, -0.6, 0.62])  # direction of the key light on the object (x right, y down, z to viewer)
SPECULAR_POWER = 24.0


@dataclass(frozen=True)
class DemoItem:
    """One demo item as uint8 arrays: ``composite``/``painting`` (H, W, 3) and ``mask`` (H, W) in {0, 255}."""

    composite: np.ndarray
    painting: np.ndarray
    mask: np.ndarray


def palette(rng: np.random.Generator, count: int = PALETTE_SIZE) -> np.ndarray:
    """Return ``count`` RGB colours (count, 3) uint8 around a random base hue (an analogous painter's palette)."""
    base = rng.random()
    colours = []
    for _ in range(count):
        hue = (base + rng.normal(0, 0.08)) % 1.0
        colours.append(colorsys.hsv_to_rgb(hue, rng.uniform(0.3, 0.8), rng.uniform(0.35, 0.95)))
    return (np.array(colours) * 255).round().astype(np.uint8)


def painting(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Return a brush-stroke painting (H, W, 3) uint8: oriented strokes with a dominant flow direction."""
    colours = palette(rng)
    canvas = Image.new("RGB", (width, height), tuple(int(c) for c in colours[0]))
    draw = ImageDraw.Draw(canvas)
    flow = rng.uniform(0, math.pi)
    scale = max(height, width) / DEMO_SIZE
    for _ in range(max(1, int(STROKES_PER_MEGAPIXEL * height * width / 1e6))):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        angle = flow + rng.normal(0, 0.35) + 0.6 * math.sin(3 * y / height + 2 * x / width)
        length, thickness = rng.uniform(4, 14) * scale, max(1, int(rng.uniform(1.5, 4.5) * scale))
        dx, dy = 0.5 * length * math.cos(angle), 0.5 * length * math.sin(angle)
        tint = colours[rng.integers(len(colours))].astype(float) + rng.normal(0, 10, 3)
        fill = tuple(int(c) for c in np.clip(tint, 0, 255))
        draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=fill, width=thickness, joint="curve")
    return np.asarray(canvas.filter(ImageFilter.GaussianBlur(STROKE_BLUR)))


def shaded_object(height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return (object RGB (H, W, 3) float in [0, 1], mask (H, W) bool): a lit, panelled ellipsoid at random."""
    short = min(height, width)
    radius_y, radius_x = (rng.uniform(*OBJECT_FRACTION) * short / 2 for _ in range(2))
    centre_y = rng.uniform(radius_y + 2, height - radius_y - 2)
    centre_x = rng.uniform(radius_x + 2, width - radius_x - 2)
    yy, xx = np.mgrid[0:height, 0:width].astype(float)
    u, v = (xx - centre_x) / radius_x, (yy - centre_y) / radius_y
    inside = u**2 + v**2 < 1.0
    z = np.sqrt(np.clip(1.0 - u**2 - v**2, 0.0, 1.0))
    normal = np.stack([u, v, z], axis=-1)
    light = LIGHT / np.linalg.norm(LIGHT)
    diffuse = np.clip(normal @ light, 0.0, 1.0)
    reflect_z = 2 * diffuse * z - light[2]  # z of the mirrored light: a highlight toward the viewer
    specular = np.clip(reflect_z, 0.0, 1.0) ** SPECULAR_POWER
    panel = np.floor((np.arctan2(v, u) + math.pi) / (2 * math.pi) * OBJECT_SEGMENTS) % OBJECT_SEGMENTS
    hues = (rng.random() + np.arange(OBJECT_SEGMENTS) / OBJECT_SEGMENTS) % 1.0
    panels = np.array([colorsys.hsv_to_rgb(h, 0.85, 0.92) for h in hues])  # saturated, unlike the palette
    base = panels[panel.astype(int)]
    colour = 0.12 + 0.78 * diffuse[..., None] * base + 0.5 * specular[..., None]
    return np.clip(colour, 0.0, 1.0), inside


def make_item(seed: int, height: int = DEMO_SIZE, width: int | None = None) -> DemoItem:
    """Return one seeded demo item of ``height`` x ``width`` (default 4:3 landscape) pixels."""
    width = width or round(height * 4 / 3)
    rng = np.random.default_rng(seed)
    art = painting(height, width, rng)
    colour, inside = shaded_object(height, width, rng)
    composite = np.where(inside[..., None], (colour * 255).round().astype(np.uint8), art)
    return DemoItem(composite=composite, painting=art, mask=inside.astype(np.uint8) * 255)


def encode(array: np.ndarray, fmt: str) -> bytes:
    """Return ``array`` (H, W[, 3]) uint8 encoded as ``fmt`` ("PNG" or "JPEG")."""
    buffer = io.BytesIO()
    options = {"quality": JPEG_QUALITY} if fmt == "JPEG" else {}
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()

"""The demo dataset as files: each procedural item of ``harmonize_core.demo_data`` with a ``manifest.csv``::

    <out>/manifest.csv
    <out>/<id>/composite.png   the naive composite (content)
    <out>/<id>/painting.jpg    the painting (style)
    <out>/<id>/mask.png        the tight mask (white = object)

The shipped ``manifests/examples/demo.csv`` is the manifest ``write_demo`` writes with its defaults.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from harmonize_core.demo_data import DEMO_SIZE, encode, make_item

DEMO_IDS: tuple[str, ...] = ("demo-01", "demo-02", "demo-03")
# Demo-specific cells (differ from the quick preset so that three items finish in about 2 minutes on 2 CPU cores).
# tau 1 (the authors' level for smooth paintings) keeps the objects' shapes at this small working size: at tau 5 two
# of the three balls fade into these dense stroke paintings (structure score 0.30-0.38, against 0.43-0.48 at tau 1).
DEMO_OVERRIDES: dict[str, str] = {"size": "256", "pass1_iters": "50", "pass2_iters": "50", "tau": "1"}
DEMO_STRUCTURE_MIN = 0.35  # every demo result keeps its object at least this well (tests/test_demo.py)


def manifest_rows(ids: tuple[str, ...] = DEMO_IDS, overrides: dict[str, str] | None = None) -> list[dict[str, str]]:
    """Return the demo manifest rows (relative paths ``<id>/composite.png`` etc., plus ``overrides`` columns)."""
    extra = DEMO_OVERRIDES if overrides is None else overrides
    return [{"id": item_id, "content": f"{item_id}/composite.png", "style": f"{item_id}/painting.jpg",
             "mask": f"{item_id}/mask.png", **extra} for item_id in ids]


def manifest_text(rows: list[dict[str, str]]) -> str:
    """Return ``rows`` as CSV text (header from the first row, ``\\n`` line ends)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_demo(out: str | Path, ids: tuple[str, ...] = DEMO_IDS, size: int = DEMO_SIZE,
               overrides: dict[str, str] | None = None, seed: int = 0) -> Path:
    """Write the demo items and ``manifest.csv`` under ``out``; return the manifest path.

    ``size`` is the paintings' height (width 4:3); ``overrides`` replaces ``DEMO_OVERRIDES`` in the manifest.
    """
    out = Path(out)
    for index, item_id in enumerate(ids):
        item = make_item(seed + index, size)
        folder = out / item_id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "composite.png").write_bytes(encode(item.composite, "PNG"))
        (folder / "painting.jpg").write_bytes(encode(item.painting, "JPEG"))
        (folder / "mask.png").write_bytes(encode(item.mask, "PNG"))
    manifest = out / "manifest.csv"
    manifest.write_text(manifest_text(manifest_rows(ids, overrides)))
    return manifest

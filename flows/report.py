"""The run report a curator opens: ``<out>/runs/<run_id>/report.html`` (then ``report-2.html``, ...).

A static page built from storage alone (the run's ``summary.csv``, the stage PNGs and their metrics JSON), so it
opens from local disk or an S3 static site: every ``src``/``href`` is relative and stays inside ``<out>``.

Per item, one card: the painting, the composite with the mask outlined, pass 1, the final image (one per tau
variant, side by side, with its tau and quality scores), the loss curves of both passes as small inline SVG plots,
the status, error, warnings, tau, per-stage seconds and any extra manifest columns. Failed items come first, then
invalid, then warned, then completed (each by manifest row). A filter (failed/invalid/warned/completed) works by
CSS ``:target`` alone; with JS off every card is shown and the filter still works. Pages hold ``page_size`` cards.

Thumbnails (JPEG, long side ``THUMB_LONG_SIDE``) are written beside the outputs, named by a digest of their
sources (``<folder>/thumbs/<stage>-<sha12>.jpg``), so a rebuild re-encodes nothing that has not changed. Inputs
that live elsewhere (another bucket, an absolute path) are thumbnailed into ``<out>/<id>/thumbs/``.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import math
import os
import posixpath
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image, ImageChops, ImageFilter, UnidentifiedImageError

from harmonize_core.errors import InputError
from tasks import storage

REPORT_NAME = "report.html"  # page 1; page n > 1 is report-<n>.html
RUN_SUMMARY_DEPTH = 2  # runs/<run_id>/summary.csv: two parts below runs/
REPORT_PAGE = re.compile(r"report-(\d+)\.html")
SUMMARY_NAME = "summary.csv"  # the name flows.summary writes (kept here so the report never imports torch-heavy code)
THUMBS_DIR = "thumbs"
THUMB_LONG_SIDE = 256  # pixels
THUMB_JPEG_QUALITY = 80
THUMB_VERSION = "1"  # part of every thumbnail's digest: bump it when the rendering changes, so old thumbs are not reused
DIGEST_CHARS = 12
DEFAULT_PAGE_SIZE = 200
WORKERS = 8  # cards rendered at once (mostly storage round trips)
OUTLINE_COLOUR = (255, 0, 200)  # mask outline on the composite: a magenta paintings rarely contain ...
OUTLINE_EDGE = (0, 0, 0)  # ... edged in black outside, so it shows on magenta too
OUTLINE_FILTER = 5  # MaxFilter size: the colour ring is (OUTLINE_FILTER - 1) / 2 px outside the mask (thumbnail px)
OUTLINE_EDGE_FILTER = 7  # the black edge is the next pixel out
MASK_THRESHOLD = 128
MARKDOWN_MAX_ITEMS = 50
COMPLETED, FAILED, INVALID, WARNED = "completed", "failed", "invalid", "warned"
STATUS_ORDER = (FAILED, INVALID, WARNED, COMPLETED)  # the card order and the filters
NO_ROW = 10**9  # sorts rows without a manifest row number last
UNKNOWN_STATUS_RANK = 1.5  # a status this report does not know sorts after failed, before warned
TIMED_STAGES = ("dilate", "pass1", "blend", "pass2", "reconstruct")
SHARED_STAGES = ("dilate", "pass1", "blend")  # tau variants of one id share these
QUALITY_COLUMNS = ("quality_style", "quality_structure", "quality_seam")
CONTRACT_COLUMNS = frozenset((
    "id", "variant", "row", "status", "error", "warnings", "cached", "worker", "tau", *QUALITY_COLUMNS,
    *(f"{stage}_s" for stage in TIMED_STAGES), "total_s", "pass1_loss", "pass2_loss", "final_uri",
    *(f"{stage}_uri" for stage in TIMED_STAGES), "content_uri", "style_uri", "mask_uri", "outputs",
))
# What each quality score says and which way is better (harmonize_core/quality.py's docstring, in a line each).
QUALITY_LEGEND = {
    "quality_style": "style: distance of the object's texture to the painting around it, lower is better "
                     "(about 1 = as close as the painting is to itself)",
    "quality_structure": "structure: the object's edges kept, 0 to 1, higher is better",
    "quality_seam": "seam: edge strength across the mask border, lower is better (about 1 = as strong as the "
                    "painting's own edges)",
}
QUALITY_BEST = {"quality_style": min, "quality_structure": max, "quality_seam": min}  # among tau variants: bold
NUMBER_DIGITS = 4  # significant digits of losses and scores on the cards

# Curve plots: an inline SVG per pass, each term relative to its first value on a log scale.
PLOT_WIDTH, PLOT_HEIGHT, PLOT_LEGEND_WIDTH = 160, 86, 112
PLOT_PAD = 4
PLOT_LINE_HEIGHT = 12  # legend lines
PLOT_MIN_DECADES = 0.5  # the y axis spans at least this many decades
PLOT_DECADES_DOWN, PLOT_DECADES_UP = 4.0, 2.0  # the y axis is clipped to [1e-4, 1e2] of the reference value
PLOT_TICK_ROOM = 9  # px a decade label needs
PLOT_MAX_POINTS = 60  # per curve
PLOT_MAX_TICKS = 4  # decade labels: every other decade when there are more than this
TERM_GROUP = re.compile(r"_(relu|conv|pool)\d.*$")  # style_relu3_1 -> style: per-layer terms are summed per group
PLOT_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
TOTAL_CURVE = "total"
DASHED_CURVES = ("image_change",)  # not a loss term: drawn dashed


@dataclass
class Card:
    """One card of the report: the summary rows of one item id (several when it has tau variants)."""

    key: str
    rows: list[dict[str, str]]
    status: str = ""
    warned: bool = False
    anchor: str = ""
    rank: float = 0.0
    row_number: int = 0
    markup: str = field(default="", repr=False)  # the rendered <article>


# ----------------------------------------------------------------------------------------------- public functions

def build_report(out: str, run_id: str | None = None, *, page_size: int = DEFAULT_PAGE_SIZE) -> str:
    """Write the run's report pages and thumbnails from storage; return the URI of ``report.html`` (page 1).

    ``run_id`` None takes the most recent run that has a summary. Idempotent: thumbnails already written for the
    same source bytes are reused, and the pages are the same bytes when nothing changed. Raises ``InputError``
    when the output location holds no run summary.
    """
    run_id = run_id or latest_run(out)
    if not run_id:
        raise InputError(f"{out}: no run with a {SUMMARY_NAME} under {storage.RUNS_DIR}/ (run `harmonize run` first)")
    summary_uri = storage.run_uri(out, run_id, SUMMARY_NAME)
    rows = read_rows(summary_uri)
    folder = storage.parent(summary_uri)
    cards = group_cards(rows)
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        htmls = list(pool.map(lambda card: render_card(card, out, folder), cards))
    for card, text in zip(cards, htmls, strict=True):
        card.markup = text
    modified = _modified(summary_uri)
    header = {"run_id": run_id, "date": modified.strftime("%Y-%m-%d %H:%M UTC") if modified else "",
              "totals": count_cards(cards), "seconds": _total_seconds(rows), "rows": len(rows)}
    pages = [cards[start:start + page_size] for start in range(0, len(cards), max(1, page_size))] or [[]]
    for number, page in enumerate(pages, start=1):
        storage.write_bytes(page_uri(folder, number), render_page(page, number, len(pages), header).encode())
    _remove_stale_pages(folder, len(pages))
    return page_uri(folder, 1)


def report_markdown(rows: list[dict], report_uri: str, summary_uri: str) -> str:
    """Return the markdown of the run's Prefect artifact: counts, a link to the report, the failed/invalid items."""
    cards = group_cards([{k: "" if v is None else str(v) for k, v in row.items()} for row in rows])
    totals = count_cards(cards)
    lines = ["## Harmonization run report", "",
             f"**{totals[COMPLETED]} completed, {totals[FAILED]} failed, {totals[INVALID]} invalid**, "
             f"{totals[WARNED]} with warnings ({len(cards)} items, {_duration(_total_seconds(rows))}).", "",
             f"[Open the report]({_link_target(report_uri)}) (thumbnails, loss curves, tau variants side by side); "
             f"summary: `{summary_uri}`"]
    broken = [card for card in cards if card.status != COMPLETED]
    if broken:
        lines += ["", "### Failed and invalid items", ""]
        for card in broken[:MARKDOWN_MAX_ITEMS]:
            error = next((r.get("error", "") for r in card.rows if r.get("error")), "") or "(no error recorded)"
            lines.append(f"- `{card.key}` (row {card.rows[0].get('row') or '?'}, {card.status}): {_markdown_text(error)}")
        if len(broken) > MARKDOWN_MAX_ITEMS:
            lines.append(f"- and {len(broken) - MARKDOWN_MAX_ITEMS} more (see the report)")
    return "\n".join(lines) + "\n"


def latest_run(out: str) -> str | None:
    """Return the id of the run under ``<out>/runs/`` whose ``summary.csv`` was written last, or None."""
    runs = storage.join(out, storage.RUNS_DIR)
    found = []
    for uri in storage.list_uris(runs):
        relative = _relative_key(runs, uri)
        parts = relative.split("/")
        if len(parts) == RUN_SUMMARY_DEPTH and parts[1] == SUMMARY_NAME:
            modified = _modified(uri)
            found.append((modified or datetime.min.replace(tzinfo=UTC), parts[0]))
    return max(found)[1] if found else None


def page_name(number: int) -> str:
    """Return the file name of report page ``number`` (1-based): ``report.html``, ``report-2.html``, ..."""
    return REPORT_NAME if number == 1 else f"report-{number}.html"


def page_uri(folder: str, number: int) -> str:
    """Return the URI of report page ``number`` (1-based) in the run folder."""
    return storage.join(folder, page_name(number))


# ----------------------------------------------------------------------------------------------- summary rows

def read_rows(summary_uri: str) -> list[dict[str, str]]:
    """Return the summary's rows as dicts of strings (missing cells "", cells beyond the header dropped)."""
    text = storage.read_bytes(summary_uri).decode("utf-8-sig")
    return [{key: value or "" for key, value in row.items() if key is not None} for row in csv.DictReader(io.StringIO(text))]


def group_cards(rows: list[dict[str, str]]) -> list[Card]:
    """Return one card per item id (tau variants together; each invalid row its own), in report order."""
    grouped: dict[str, Card] = {}
    for row in rows:
        item_id = row.get("id", "")
        key = item_id if item_id and row.get("status") != INVALID else f"{item_id or 'row'}@{row.get('row', '')}"
        grouped.setdefault(key, Card(key=item_id or "(no id)", rows=[])).rows.append(row)
    cards = list(grouped.values())
    anchors: set[str] = set()
    for card in cards:
        card.rows.sort(key=lambda r: (_as_float(r.get("tau")), r.get("variant", "")))
        _classify(card)
        card.anchor = _unique_anchor(card, anchors)
    cards.sort(key=lambda c: (c.rank, c.row_number, c.key))
    return cards


def _classify(card: Card) -> None:
    statuses = [row.get("status", "") for row in card.rows]
    known = [s for s in (FAILED, INVALID) if s in statuses]
    card.status = known[0] if known else (COMPLETED if all(s == COMPLETED for s in statuses) else statuses[0] or "unknown")
    card.warned = any(row.get("warnings", "").strip() for row in card.rows)
    rank = STATUS_ORDER.index(card.status) if card.status in STATUS_ORDER else UNKNOWN_STATUS_RANK
    card.rank = STATUS_ORDER.index(WARNED) if card.status == COMPLETED and card.warned else rank
    card.row_number = min(_row_number(row) for row in card.rows)


def _row_number(row: dict[str, str]) -> int:
    value = _as_float(row.get("row"))
    return int(value) if value < math.inf else NO_ROW


def _unique_anchor(card: Card, taken: set[str]) -> str:
    name = card.rows[0].get("id", "") or f"row-{card.rows[0].get('row', '')}"
    base = "item-" + re.sub(r"[^A-Za-z0-9._-]", "-", name)
    anchor, suffix = base, 2
    while anchor in taken:
        anchor, suffix = f"{base}-{suffix}", suffix + 1
    taken.add(anchor)
    return anchor


def count_cards(cards: list[Card]) -> dict[str, int]:
    """Return {completed, failed, invalid, warned, other: number of cards}; warned counts any card with warnings."""
    counts = {status: sum(card.status == status for card in cards) for status in (COMPLETED, FAILED, INVALID)}
    counts[WARNED] = sum(card.warned for card in cards)
    counts["other"] = len(cards) - counts[COMPLETED] - counts[FAILED] - counts[INVALID]
    return counts


def _as_float(text: Any, default: float = math.inf) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return default
    return value if math.isfinite(value) else default


def _total_seconds(rows: list[dict]) -> float:
    return sum(_as_float(row.get("total_s"), 0.0) for row in rows)


# ----------------------------------------------------------------------------------------------- storage helpers

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


def _modified(uri: str) -> datetime | None:
    head = _head(uri)
    return head["modified"] if head else None


def _relative_key(folder: str, uri: str) -> str:
    """Return ``uri`` relative to ``folder`` with ``/`` separators ("" parts when ``uri`` is not below it)."""
    if storage.is_s3(folder):
        if not storage.is_s3(uri) or storage.split_s3(uri)[0] != storage.split_s3(folder)[0]:
            return ""
        base, key = storage.split_s3(folder)[1].strip("/"), storage.split_s3(uri)[1]
        return posixpath.relpath("/" + key, "/" + base)
    if storage.is_s3(uri):
        return ""
    return os.path.relpath(storage.local_path(uri), storage.local_path(folder)).replace(os.sep, "/")


def _inside(out: str, uri: str) -> bool:
    """Return True when ``uri`` lies under the output location ``out`` (so a relative link to it stays inside)."""
    if not uri:
        return False
    relative = _relative_key(out, uri)
    return bool(relative) and relative != "." and not relative.startswith("../") and relative != ".."


def _href(page_folder: str, target: str) -> str:
    """Return the relative, URL-quoted link from a page in ``page_folder`` to ``target`` (both under ``out``)."""
    return html.escape(quote(_relative_key(page_folder, target)), quote=True)


def _link_target(uri: str) -> str:
    if storage.is_s3(uri) or uri.startswith(storage.FILE_SCHEME):
        return uri
    return Path(uri).resolve().as_uri()


def _remove_stale_pages(folder: str, pages: int) -> None:
    """Delete ``report-<n>.html`` pages left by an earlier build with more pages."""
    for uri in storage.list_uris(folder):
        match = REPORT_PAGE.fullmatch(uri.replace("\\", "/").rsplit("/", 1)[-1])
        if match and int(match.group(1)) > pages:
            storage.delete(uri)


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
    if _inside(out, image_uri) and _relative_key(out, image_uri).split("/")[0] != storage.CACHE_DIR:
        return storage.parent(image_uri)
    try:
        return storage.join(out, storage.check_item_id(item_id))
    except InputError:
        return None  # an invalid row's unsafe id: never write outside <out>/<id>/


# ----------------------------------------------------------------------------------------------- curves

def _read_metrics(image_uri: str) -> dict[str, Any]:
    """Return the metrics JSON beside a stage PNG (same stem), or {} when it is absent or unreadable."""
    if not image_uri:
        return {}
    stem, dot, _ = image_uri.rpartition(".")
    try:
        data = json.loads(storage.read_bytes(f"{stem}.json" if dot else f"{image_uri}.json"))
    except (InputError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _points(curve: Any) -> list[tuple[float, float]]:
    points = []
    for point in curve if isinstance(curve, list) else []:
        if isinstance(point, (list, tuple)) and len(point) == len(("evaluation", "value")):
            x, y = _as_float(point[0], math.nan), _as_float(point[1], math.nan)
            if math.isfinite(x) and math.isfinite(y):
                points.append((x, y))
    return points


def _grouped_curves(curves: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """Return the curves with per-layer terms summed per group (style_relu3_1 + style_relu4_1 -> style)."""
    sums: dict[str, dict[float, float]] = {}
    for name, curve in curves.items():
        group = TERM_GROUP.sub("", str(name)) or str(name)
        for x, y in _points(curve):
            sums.setdefault(group, {})[x] = sums.get(group, {}).get(x, 0.0) + y
    return {group: sorted(values.items()) for group, values in sums.items()}


def _relative_log(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Return ``points`` as (x, log10(value / reference)), dropping values <= 0.

    The reference is the first value, or the last one for a term that starts at 0 (pass 2's content term).
    """
    positive = [(x, y) for x, y in points if y > 0]
    if not positive:
        return []
    reference = points[0][1] if points[0][1] > 0 else positive[-1][1]
    step = math.ceil(len(positive) / PLOT_MAX_POINTS)  # a plot is 150 px wide: more points only weigh on the page
    kept = positive[::step] + ([positive[-1]] if (len(positive) - 1) % step else [])
    return [(x, min(max(math.log10(y / reference), -PLOT_DECADES_DOWN), PLOT_DECADES_UP)) for x, y in kept]


def curve_svg(metrics: dict[str, Any], title: str) -> str:
    """Return an inline SVG of a pass's loss curves (each term relative to its first value, log scale), or ""."""
    curves = metrics.get("curves") if isinstance(metrics.get("curves"), dict) else {}
    series = _grouped_curves(curves)
    names = sorted(series, key=lambda name: (name == TOTAL_CURVE, name in DASHED_CURVES, name))
    logs = {name: _relative_log(series[name]) for name in names}
    logs = {name: points for name, points in logs.items() if points}
    if not logs:
        return ""
    xs = [x for points in logs.values() for x, _ in points]
    ys = [y for points in logs.values() for _, y in points]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(min(ys), 0.0), max(max(ys), 0.0)
    if y1 - y0 < PLOT_MIN_DECADES:
        y0 = y1 - PLOT_MIN_DECADES

    def sx(x: float) -> float:
        return PLOT_PAD + (x - x0) / (x1 - x0) * (PLOT_WIDTH - 2 * PLOT_PAD)

    def sy(y: float) -> float:
        return PLOT_PAD + (y1 - y) / (y1 - y0) * (PLOT_HEIGHT - 2 * PLOT_PAD)

    parts = [_axis_svg(y0, y1, sy)]
    for index, name in enumerate(logs):
        colour = "#111" if name == TOTAL_CURVE else PLOT_COLOURS[index % len(PLOT_COLOURS)]
        path = " ".join(f"{sx(x):.0f},{sy(y):.0f}" for x, y in logs[name])  # whole pixels: the page stays light
        style = ' stroke-dasharray="3 2"' if name in DASHED_CURVES else ""
        width = 1.8 if name == TOTAL_CURVE else 1.2
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="{width}"{style}>'
                     f"<title>{html.escape(name)}</title></polyline>")
        final = series[name][-1][1]
        parts.append(f'<text x="{PLOT_WIDTH + 6}" y="{PLOT_LINE_HEIGHT * (index + 1)}" fill="{colour}">'
                     f"{html.escape(name)} {final:.3g}</text>")
    parts.append(f'<text x="{PLOT_WIDTH + 6}" y="{PLOT_LINE_HEIGHT * (len(logs) + 1)}" class="tick">'
                 f"{x1:g} evaluations</text>")
    height = max(PLOT_HEIGHT, PLOT_LINE_HEIGHT * (len(logs) + 2))
    label = html.escape(f"{title} loss curves", quote=True)  # how to read them: the page's legend
    return (f'<svg class="curve" viewBox="0 0 {PLOT_WIDTH + PLOT_LEGEND_WIDTH} {height}" role="img" '
            f'aria-label="{label}">{"".join(parts)}</svg>')


def _axis_svg(y0: float, y1: float, sy: Callable[[float], float]) -> str:
    """Return the plot frame and a gridline per decade (labelled 1, 0.1, ...)."""
    parts = [f'<rect x="{PLOT_PAD}" y="{PLOT_PAD}" width="{PLOT_WIDTH - 2 * PLOT_PAD}" '
             f'height="{PLOT_HEIGHT - 2 * PLOT_PAD}" class="frame"/>']
    decades = range(math.ceil(y0), math.floor(y1) + 1)
    every = 1 if len(decades) <= PLOT_MAX_TICKS else 2
    for decade in decades:
        y = sy(decade)
        parts.append(f'<line x1="{PLOT_PAD}" x2="{PLOT_WIDTH - PLOT_PAD}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        if decade % every == 0:
            below = y - PLOT_TICK_ROOM < PLOT_PAD  # no room above the top line: label it below
            parts.append(f'<text x="{PLOT_PAD + 2}" y="{y + PLOT_TICK_ROOM if below else y - 2:.1f}" class="tick">'
                         f"{10.0 ** decade:g}</text>")
    return "".join(parts)


# ----------------------------------------------------------------------------------------------- cards

def _figure(page_folder: str, out: str, thumb: tuple[str | None, str], caption: str, full: str = "",
            extra_class: str = "") -> str:
    """Return a <figure> with the thumbnail (linked to the full image when it is under ``out``) or a placeholder."""
    uri, why = thumb
    caption_html = f"<figcaption>{caption}</figcaption>"
    cls = f' class="{extra_class}"' if extra_class else ""
    if uri is None:
        note = "image unreadable" if why == "unreadable" else "not produced"
        return f'<figure{cls}><div class="missing">{note}</div>{caption_html}</figure>'
    alt = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", caption)).split())  # the caption as plain text
    image = f'<img src="{_href(page_folder, uri)}" alt="{html.escape(alt, quote=True)}" loading="lazy">'
    if full and _inside(out, full):  # its thumbnail exists, so it does too
        image = f'<a href="{_href(page_folder, full)}" title="full size">{image}</a>'
    return f"<figure{cls}>{image}{caption_html}</figure>"


def _stage_thumb(out: str, item_id: str, uri: str, stage: str) -> tuple[str | None, str]:
    folder = _thumb_folder(out, item_id, uri) if uri else None
    return thumbnail(folder, stage, [uri]) if folder else (None, "missing")


def render_card(card: Card, out: str, page_folder: str) -> str:
    """Return the card's HTML (writing its thumbnails): header, error/warnings, images, curves, details.

    An invalid row never ran: its card shows only the inputs that exist.
    """
    figures, plots = _input_figures(card, out, page_folder), []
    if card.status != INVALID:
        item_id = card.rows[0].get("id", "")
        pass1_uri = next((r.get("pass1_uri", "") for r in card.rows if r.get("pass1_uri")), "")
        figures.append(_figure(page_folder, out, _stage_thumb(out, item_id, pass1_uri, "pass1"), "pass 1", pass1_uri))
        plots.append(_plot_figure(_read_metrics(pass1_uri), "pass 1"))
        several, best = len(card.rows) > 1, _best_scores(card.rows)
        for row in card.rows:
            final, tau = row.get("final_uri", ""), row.get("tau", "")
            figures.append(_figure(page_folder, out, _stage_thumb(out, item_id, final, "final"),
                                   _variant_caption(row, several, best), final, "variant" if several else ""))
            title = f"pass 2, \u03c4 {_plain_number(tau)}" if several else "pass 2"
            plots.append(_plot_figure(_read_metrics(row.get("pass2_uri", "")), title))
    cls = f"card s-{_css_word(card.status)}" + (" warned" if card.warned else "") + (" variants" if len(card.rows) > 1 else "")
    strip = f'<div class="strip">{"".join(figures)}</div>' if figures else ""
    plot_row = f'<div class="plots">{"".join(plots)}</div>' if plots else ""
    return (f'<article class="{cls}" id="{card.anchor}">{_card_header(card)}{_card_messages(card)}'
            f"{strip}{plot_row}{_card_details(card)}</article>")


def _input_figures(card: Card, out: str, page_folder: str) -> list[str]:
    """Return the painting and the composite-with-mask-outline figures (for an invalid card: only those that exist)."""
    first = card.rows[0]
    folder = _thumb_folder(out, first.get("id", ""), "")
    missing = (None, "missing")
    painting = thumbnail(folder, "painting", [first.get("style_uri", "")]) if folder else missing
    composite = (thumbnail(folder, "composite", [first.get("content_uri", ""), first.get("mask_uri", "")], _outlined)
                 if folder else missing)
    shown = [(painting, "painting"), (composite, "composite + mask outline")]
    if card.status == INVALID:
        shown = [(thumb, caption) for thumb, caption in shown if thumb[0]]
    return [_figure(page_folder, out, thumb, caption) for thumb, caption in shown]


def _plot_figure(metrics: dict[str, Any], title: str) -> str:
    svg = curve_svg(metrics, title)
    body = svg or '<div class="missing plot">no loss curve</div>'
    return f"<figure class=\"plot\">{body}<figcaption>{html.escape(title)}</figcaption></figure>"


def _best_scores(rows: list[dict[str, str]]) -> dict[str, float]:
    """Return the best value of each quality column among several variants (none for a single one)."""
    if len(rows) == 1:
        return {}
    best = {}
    for column, pick in QUALITY_BEST.items():
        values = [v for v in (_as_float(row.get(column), math.nan) for row in rows) if math.isfinite(v)]
        if len(values) > 1:
            best[column] = pick(values)
    return best


def _variant_caption(row: dict[str, str], several: bool, best: dict[str, float]) -> str:
    """Return a final image's caption: its tau, its status when not completed, its quality scores (best in bold)."""
    tau = _number(row.get("tau", "")) or "?"
    status = row.get("status", "")
    lines = [f"final, <b>&tau; = {tau}</b>" if several else f"final (&tau; = {tau})"]
    if several and status != COMPLETED:
        lines.append(f'<span class="bad">{html.escape(status)}</span>')
    scores = []
    for column in (c for c in QUALITY_COLUMNS if row.get(c)):
        text = f"{html.escape(_short(column))} {_number(row[column])}"
        if best.get(column) == _as_float(row[column], math.nan):
            text = f"<b>{text}</b>"
        scores.append(f'<span title="{html.escape(QUALITY_LEGEND.get(column, column), quote=True)}">{text}</span>')
    if scores:
        lines.append('<span class="quality">' + " ".join(scores) + "</span>")
    return "<br>".join(lines)


def _plain_number(text: str) -> str:
    """Return a numeric cell with ``NUMBER_DIGITS`` significant digits (other text as it is)."""
    value = _as_float(text, math.nan)
    return f"{value:.{NUMBER_DIGITS}g}" if math.isfinite(value) else (text or "")


def _number(text: str) -> str:
    """Return ``_plain_number(text)`` HTML-escaped."""
    return html.escape(_plain_number(text))


def _short(column: str) -> str:
    return column.removeprefix("quality_")


def _css_word(text: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", text.lower()) or "unknown"


def _card_header(card: Card) -> str:
    first = card.rows[0]
    taus = [r.get("tau", "") for r in card.rows if r.get("tau", "")]
    facts = []
    if taus:
        facts.append("&tau; " + " / ".join(_number(t) for t in taus))
    seconds = sum(_as_float(r.get("total_s"), 0.0) for r in card.rows)
    if seconds:
        facts.append(_duration(seconds))
    cached = _cell_list(card.rows, "cached")
    if cached:  # the stages a cache hit skipped (older summaries: True/False)
        facts.append("cached" if cached == ["true"] else "cached: " + ", ".join(html.escape(c) for c in cached))
    workers = _cell_list(card.rows, "worker")
    if workers:
        facts.append("worker " + ", ".join(html.escape(w) for w in workers))
    badge = "completed, warned" if card.status == COMPLETED and card.warned else card.status
    row = html.escape(first.get("row", "") or "?")
    return (f'<header><h2><span class="badge">{html.escape(badge)}</span> {html.escape(card.key)} '
            f'<small>row {row}</small><a class="anchor" href="#{card.anchor}" title="link to this item">#</a></h2>'
            f'<p class="facts">{" &middot; ".join(facts)}</p></header>')


def _cell_list(rows: list[dict[str, str]], column: str) -> list[str]:
    """Return the distinct ``;``-separated values of ``column`` over ``rows`` (empty and "false" dropped)."""
    values = (v.strip() for row in rows for v in row.get(column, "").split(";"))
    return list(dict.fromkeys(v.lower() if v.lower() in ("true", "false") else v for v in values
                              if v and v.lower() != "false"))


def _card_messages(card: Card) -> str:
    parts = []
    for row in card.rows:
        prefix = f"&tau; {_number(row.get('tau', ''))}: " if len(card.rows) > 1 and row.get("error") else ""
        if row.get("error"):
            parts.append(f'<p class="error">{prefix}{html.escape(row["error"])}</p>')
    warnings = dict.fromkeys(w.strip() for r in card.rows for w in r.get("warnings", "").split(";") if w.strip())
    if warnings:
        parts.append('<ul class="warnings">' + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul>")
    if len(card.rows) > 1:
        parts.append('<p class="hint">Pick a variant: put its &tau; value in the manifest&#39;s <code>tau</code> column '
                     'and rerun.</p>')
    return "".join(parts)


def _card_details(card: Card) -> str:
    """Return the details line: seconds per stage, final losses, extra manifest columns."""
    first = card.rows[0]
    times = [f"{stage} {_seconds(first.get(f'{stage}_s', ''))}" for stage in SHARED_STAGES if first.get(f"{stage}_s")]
    for row in card.rows:
        label = f" (&tau; {_number(row.get('tau', ''))})" if len(card.rows) > 1 else ""
        times += [f"{stage}{label} {_seconds(row[f'{stage}_s'])}" for stage in ("pass2", "reconstruct")
                  if row.get(f"{stage}_s")]
    losses = [f"{name.replace('_', ' ')} {_number(first[name])}" for name in ("pass1_loss", "pass2_loss")
              if first.get(name) and len(card.rows) == 1]
    extra = {k: v for row in card.rows for k, v in row.items() if k not in CONTRACT_COLUMNS and v.strip()}
    parts = []
    if times:
        parts.append(f'<p class="times">seconds: {" &middot; ".join(times)}</p>')
    if losses:
        parts.append(f'<p class="times">final loss: {" &middot; ".join(losses)}</p>')
    if extra:
        parts.append('<dl class="extra">' + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>"
                                                     for k, v in extra.items()) + "</dl>")
    return "".join(parts)


def _seconds(text: str) -> str:
    value = _as_float(text, math.nan)
    return f"{value:.1f}" if math.isfinite(value) else html.escape(text)


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {rest:02d} s" if minutes else f"{seconds:.1f} s"


def _markdown_text(text: str) -> str:
    """Return ``text`` on one line with markdown's active characters escaped."""
    line = " ".join(str(text).split())
    return re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", line)


# ----------------------------------------------------------------------------------------------- pages

STYLE = """
:root{--failed:#c62828;--invalid:#6d4c41;--warned:#ef8f00;--completed:#2e7d32;--ink:#222;--muted:#666;--line:#ddd}
*{box-sizing:border-box}body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--ink);
background:#f4f4f2}header.run{padding:14px 20px 8px;background:#fff;border-bottom:1px solid var(--line)}
h1{font-size:19px;margin:0 0 4px}h1 code{font-size:15px}.meta{color:var(--muted);margin:0 0 8px}
.totals{display:flex;flex-wrap:wrap;gap:6px;margin:0 0 8px;padding:0;list-style:none}
.totals li{padding:2px 10px;border-radius:12px;background:#eee}.totals li b{font-size:15px}
.totals .s-failed{background:#fde7e7;color:var(--failed)}.totals .s-invalid{background:#efe7e4;color:var(--invalid)}
.totals .s-warned{background:#fff1db;color:#995c00}.totals .s-completed{background:#e5f3e6;color:var(--completed)}
nav{margin:4px 0}nav a{display:inline-block;margin:0 2px 2px 0;padding:2px 8px;border:1px solid var(--line);
border-radius:4px;background:#fff;color:var(--ink);text-decoration:none}nav a:hover{background:#f0f0f0}
nav .current{font-weight:700;border-color:#888}nav .label{color:var(--muted);margin-right:4px}
.legend{color:var(--muted);font-size:12px;margin:4px 0 0}
main{display:grid;align-items:start;grid-template-columns:repeat(auto-fill,minmax(min(100%,640px),1fr));gap:14px;padding:14px 20px}
.card{background:#fff;border:1px solid var(--line);border-left:6px solid var(--completed);border-radius:6px;
padding:10px 12px;min-width:0}.card.variants{grid-column:1/-1}
.card.s-failed{border-left-color:var(--failed)}.card.s-invalid{border-left-color:var(--invalid)}
.card.warned.s-completed{border-left-color:var(--warned)}
.card h2{font-size:16px;margin:0;display:flex;align-items:baseline;gap:8px;overflow-wrap:anywhere}
.card h2 small{color:var(--muted);font-weight:400;font-size:12px}.anchor{color:#bbb;text-decoration:none;margin-left:auto}
.badge{font-size:11px;text-transform:uppercase;letter-spacing:.04em;padding:1px 7px;border-radius:9px;color:#fff;
background:var(--completed);white-space:nowrap}.s-failed .badge{background:var(--failed)}
.s-invalid .badge{background:var(--invalid)}.warned.s-completed .badge{background:var(--warned)}
.facts{margin:2px 0 6px;color:var(--muted)}.error{margin:4px 0;padding:5px 8px;background:#fde7e7;color:#8e1b1b;
border-radius:4px;font-family:ui-monospace,monospace;font-size:12.5px;overflow-wrap:anywhere}
.warnings{margin:4px 0;padding:4px 8px 4px 24px;background:#fff1db;color:#6b4100;border-radius:4px;font-size:13px}
.hint{margin:4px 0;color:var(--muted);font-size:12.5px}
.strip,.plots{display:flex;flex-wrap:wrap;gap:10px;margin:6px 0}figure{margin:0;width:148px}
figure img,.missing{display:block;width:148px;height:148px;object-fit:contain;background:#eceae6;border-radius:3px}
.missing{display:flex;align-items:center;justify-content:center;color:#999;font-size:12px;
border:1px dashed #ccc}.missing.plot{width:272px;height:86px}
figcaption{font-size:12px;color:#444;margin-top:3px;line-height:1.3}figure.variant{width:208px;
outline:2px solid #e3e0da;outline-offset:3px;border-radius:3px}figure.variant img,figure.variant .missing{width:208px;
height:208px}code{background:#f0efec;padding:0 3px;border-radius:3px;font-size:12px}
.bad{color:var(--failed);font-weight:600}.quality{color:var(--muted)}.quality span{display:inline-block;
white-space:nowrap;margin-right:6px}.quality b{color:var(--ink)}
figure.plot{width:auto}svg.curve{display:block;width:272px;height:auto;font-size:10px;font-family:inherit}
svg .frame{fill:#fafafa;stroke:#ccc}svg .grid{stroke:#e6e6e6}svg .tick{fill:#999;font-size:8px}
.times{margin:2px 0;color:var(--muted);font-size:12.5px}
.extra{display:grid;grid-template-columns:max-content 1fr;gap:1px 10px;margin:4px 0 0;font-size:12.5px}
.extra dt{color:var(--muted)}.extra dd{margin:0;overflow-wrap:anywhere}
.empty{padding:30px;color:var(--muted)}footer{padding:0 20px 20px}
.ft{display:none}
#only-failed:target~main .card:not(.s-failed),#only-invalid:target~main .card:not(.s-invalid),
#only-warned:target~main .card:not(.warned),#only-completed:target~main .card:not(.s-completed){display:none}
#only-failed:target~header a[href="#only-failed"],#only-invalid:target~header a[href="#only-invalid"],
#only-warned:target~header a[href="#only-warned"],#only-completed:target~header a[href="#only-completed"]
{font-weight:700;border-color:#888;background:#f3f3f3}
"""
# Keeps the chosen filter (the URL's #fragment) when moving between pages. The filter itself is CSS only.
SCRIPT = """document.querySelectorAll('a.page').forEach(function (a) {
  a.addEventListener('click', function () { if (location.hash.indexOf('#only-') === 0) { a.hash = location.hash; } });
});"""
FILTER_LABELS = {FAILED: "failed", INVALID: "invalid", WARNED: "warned", COMPLETED: "completed"}


def render_page(cards: list[Card], number: int, pages: int, header: dict[str, Any]) -> str:
    """Return one report page: run header (totals, filters, page links), the cards, the page links again."""
    title = f"Harmonization run {header['run_id']}" + (f" (page {number} of {pages})" if pages > 1 else "")
    nav = _page_nav(number, pages)
    body = "".join(card.markup for card in cards) or '<p class="empty">This run has no items.</p>'
    targets = "".join(f'<i class="ft" id="only-{status}"></i>' for status in STATUS_ORDER)
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>{targets}"
            f'<header class="run">{_run_header(header)}{_filter_nav(cards)}{nav}{_legend(cards)}</header>'
            f"<main>{body}</main><footer>{nav}</footer><script>{SCRIPT}</script></body></html>\n")


def _run_header(header: dict[str, Any]) -> str:
    totals = header["totals"]
    items = sum(totals[s] for s in (COMPLETED, FAILED, INVALID)) + totals["other"]
    meta = [header["date"], f"{items} items" + (f" ({header['rows']} summary rows)" if header["rows"] != items else ""),
            f"{_duration(header['seconds'])} of item time", f'<a href="{SUMMARY_NAME}">{SUMMARY_NAME}</a>']
    chips = [(FAILED, totals[FAILED]), (INVALID, totals[INVALID]), (WARNED, totals[WARNED]),
             (COMPLETED, totals[COMPLETED])] + ([("other", totals["other"])] if totals["other"] else [])
    return (f"<h1>Harmonization run <code>{html.escape(header['run_id'])}</code></h1>"
            f'<p class="meta">{" &middot; ".join(m for m in meta if m)}</p><ul class="totals">'
            + "".join(f'<li class="s-{status}"><b>{count}</b> {status}</li>' for status, count in chips) + "</ul>")


def _filter_nav(cards: list[Card]) -> str:
    counts = count_cards(cards)
    links = [f'<a href="#show-all">all {len(cards)}</a>'] + [
        f'<a href="#only-{status}">{FILTER_LABELS[status]} {counts[status]}</a>' for status in STATUS_ORDER]
    return f'<nav class="filters" id="show-all"><span class="label">Show on this page:</span>{"".join(links)}</nav>'


def _page_nav(number: int, pages: int) -> str:
    if pages <= 1:
        return ""

    def link(target: int, text: str) -> str:
        href = page_name(target)
        current = ' aria-current="page"' if target == number and text == str(target) else ""
        return f'<a class="page{" current" if current else ""}" href="{href}"{current}>{text}</a>'

    links = ([link(number - 1, "&larr; previous")] if number > 1 else []) + [link(n, str(n)) for n in range(1, pages + 1)]
    links += [link(number + 1, "next &rarr;")] if number < pages else []
    return f'<nav class="pages"><span class="label">Page:</span>{"".join(links)}</nav>'


def _legend(cards: list[Card]) -> str:
    """Return how to read the curves, the quality scores (when any card has them) and the mask outline."""
    text = ("Curves: each loss term (per-layer terms summed) relative to its first value, or its last when it starts "
            "at 0, on a log scale; the numbers beside them are the final values. The composite shows the mask "
            "outline in magenta.")
    used = [c for c in QUALITY_COLUMNS if any(row.get(c) for card in cards for row in card.rows)]
    if used:
        text += " Quality: " + "; ".join(QUALITY_LEGEND.get(c, c) for c in used) + "."
    return f'<p class="legend">{html.escape(text)}</p>'

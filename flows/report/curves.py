"""The loss curves on a report card: a stage's metrics JSON drawn as a small inline SVG plot.

Each loss term (per-layer terms summed per group: ``style_relu3_1`` + ``style_relu4_1`` -> ``style``) is plotted
relative to its first value (its last when it starts at 0) on a log scale clipped to a few decades, thinned to at
most ``PLOT_MAX_POINTS`` points, with its final value in the legend beside the plot.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Callable
from typing import Any

from harmonize_core.errors import InputError
from tasks import storage

from .cards import as_float

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


def read_metrics(image_uri: str) -> dict[str, Any]:
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
            x, y = as_float(point[0], math.nan), as_float(point[1], math.nan)
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

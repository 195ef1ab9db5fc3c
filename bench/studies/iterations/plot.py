"""The study's curves as one PNG (PIL): per score, each case's difference from 1000 + 1000."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from .common import MAX_ITERATIONS, SCORES, STEP
from .scoring import by_schedule, relative_difference

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
PANEL = (420, 260)  # px per panel
MARGIN = (56, 34, 16, 40)  # left, top, right, bottom inside a panel


def _x_position(iterations: float, left: int, width: int) -> float:
    """Return the x pixel of an iteration count on the log axis from STEP to MAX_ITERATIONS."""
    span = math.log(MAX_ITERATIONS / STEP)
    return left + width * math.log(max(iterations, STEP) / STEP) / span


def draw_panel(draw, origin: tuple[int, int], title: str, series: list[tuple[str, list[tuple[float, float]], bool]],
               y_range: tuple[float, float], band: float | None) -> None:
    """Draw one panel: ``series`` of (colour, [(iterations, y)], dashed), a grey noise band around 0 when given."""
    x0, y0 = origin[0] + MARGIN[0], origin[1] + MARGIN[1]
    width, height = PANEL[0] - MARGIN[0] - MARGIN[2], PANEL[1] - MARGIN[1] - MARGIN[3]
    low, high = y_range

    def ypos(value: float) -> float:
        return y0 + height * (high - min(max(value, low), high)) / (high - low)

    if band is not None:
        draw.rectangle([x0, ypos(band), x0 + width, ypos(-band)], fill="#e4e4e4")
        draw.line([x0, ypos(0), x0 + width, ypos(0)], fill="#888888")
    draw.rectangle([x0, y0, x0 + width, y0 + height], outline="#000000")
    draw.text((origin[0] + 8, origin[1] + 8), title, fill="#000000")
    for tick in (50, 100, 200, 400, 1000):
        x = _x_position(tick, x0, width)
        draw.line([x, y0 + height, x, y0 + height + 4], fill="#000000")
        draw.text((x - 10, y0 + height + 8), str(tick), fill="#000000")
    for value in (low, (low + high) / 2, high):
        draw.text((origin[0] + 4, ypos(value) - 6), f"{value:.2g}", fill="#000000")
    for colour, points, dashed in series:
        xy = [(_x_position(x, x0, width), ypos(y)) for x, y in points]
        if dashed:
            for point in xy:
                draw.ellipse([point[0] - 3, point[1] - 3, point[0] + 3, point[1] + 3], outline=colour)
        if len(xy) > 1:
            for start, end in zip(xy, xy[1:], strict=False):
                draw.line([start, end], fill=colour, width=1 if dashed else 2)


def plot(rows: list[dict], band: dict[str, dict[str, float]], path: Path) -> None:
    """Write the study's curves as a PNG: per score, each case's difference from its 1000 + 1000 result against
    pass-2 iterations (solid: pass 1 = 1000; circles: the diagonal n + n), the noise band in grey; last panel the
    pass-2 style loss (its Gram terms) relative to its value at 1000."""
    grid_rows = by_schedule(rows)
    reference = grid_rows[(MAX_ITERATIONS, MAX_ITERATIONS)]
    cases = sorted(reference)
    image = Image.new("RGB", (PANEL[0] * 2, PANEL[1] * 2 + 24), "white")  # 4 panels and a legend line
    draw = ImageDraw.Draw(image)
    titles = {"style": "style: ln(score / score at 1000+1000)", "structure": "structure: score - score at 1000+1000",
              "seam": "seam: ln(score / score at 1000+1000)"}
    for k, name in enumerate(SCORES):
        series = []
        for j, case in enumerate(cases):
            colour = PALETTE[j % len(PALETTE)]
            def diff(row, case=case, name=name):
                return relative_difference(name, float(row[name]), float(reference[case][name]))
            row_points = sorted((b, diff(r[case])) for (a, b), r in grid_rows.items() if a == MAX_ITERATIONS and case in r)
            diagonal = sorted((a, diff(r[case])) for (a, b), r in grid_rows.items() if a == b and case in r)
            series += [(colour, row_points, False), (colour, diagonal, True)]
        limit = max(0.05, 3 * band[name]["band"])
        draw_panel(draw, ((k % 2) * PANEL[0], (k // 2) * PANEL[1]), titles[name], series, (-limit, limit),
                   band[name]["band"])
    series = []
    for j, case in enumerate(cases):
        colour = PALETTE[j % len(PALETTE)]
        row = sorted((b, r[case]["p2_style"] / reference[case]["p2_style"]) for (a, b), r in grid_rows.items()
                     if a == MAX_ITERATIONS and case in r)
        series.append((colour, [(x, math.log10(y)) for x, y in row], False))
    # The style terms, not the total: pass 2's total is mostly TV, whose gradient is normalised and which barely moves.
    draw_panel(draw, (PANEL[0], PANEL[1]), "pass-2 style loss: log10(loss / loss at 1000)", series, (0.0, 1.2), None)
    x = 8
    for j, case in enumerate(cases):
        draw.text((x, PANEL[1] * 2 + 6), f"case {case}", fill=PALETTE[j % len(PALETTE)])
        x += 62
    draw.text((x + 10, PANEL[1] * 2 + 6), "x: pass-2 iterations (log); lines: pass 1 = 1000; circles: n + n; "
              "grey: noise band", fill="#000000")
    image.save(path, optimize=True)

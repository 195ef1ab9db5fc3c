"""One report card as HTML: header, error and warnings, the image strip, the loss curves and the details.

The strip shows the painting, the composite with the mask outlined, pass 1 and the final image (one per tau variant,
side by side, captioned with its tau and quality scores, the best of each score in bold); each thumbnail links to
the full image when it lies under ``<out>``, and every link is relative. The details give per-stage seconds, final
losses and any extra manifest columns. Rendering a card writes its thumbnails (``flows.report.thumbs``). A text
cell longer than ``CELL_CHARS`` is cut there on the card, saying how much more ``summary.csv`` holds.
"""

from __future__ import annotations

import html
import math
import re
from typing import Any
from urllib.parse import quote

from ..run_record import UNFINISHED
from ..summary import COMPLETED, INVALID, QUALITY_COLUMNS, SUMMARY_NAME
from .cards import CONTRACT_COLUMNS, SHARED_STAGES, Card, as_float
from .curves import curve_svg, read_metrics
from .thumbs import input_thumbs, inside, relative_key, stage_thumb

# What each quality score says and which way is better (harmonize_core/quality/scores.py's docstring, in a line each).
QUALITY_LEGEND = {
    "quality_style": "style: distance of the object's texture to the painting around it, lower is better "
                     "(about 1 = as close as the painting is to itself)",
    "quality_structure": "structure: the object's edges kept, 0 to 1, higher is better",
    "quality_seam": "seam: edge strength across the mask border, lower is better (about 1 = as strong as the "
                    "painting's own edges)",
}
QUALITY_BEST = {"quality_style": min, "quality_structure": max, "quality_seam": min}  # among tau variants: bold
NUMBER_DIGITS = 4  # significant digits of losses and scores on the cards
CELL_CHARS = 2000  # a longer error, warning or extra cell is cut on the card (summary.csv has it whole)


def render_card(card: Card, out: str, page_folder: str) -> str:
    """Return the card's HTML (writing its thumbnails): header, error/warnings, images, curves, details.

    An invalid row never ran: its card shows only the inputs that exist. An item none of whose outputs finished
    (``unfinished``) shows only its inputs.
    """
    figures, plots = _input_figures(card, out, page_folder), []
    if card.status != INVALID and any(row.get("status") != UNFINISHED for row in card.rows):
        item_id = card.rows[0].get("id", "")
        pass1_uri = next((r.get("pass1_uri", "") for r in card.rows if r.get("pass1_uri")), "")
        figures.append(_figure(page_folder, out, stage_thumb(out, item_id, pass1_uri, "pass1"), "pass 1", pass1_uri))
        plots.append(_plot_figure(read_metrics(pass1_uri), "pass 1"))
        several, best = len(card.rows) > 1, _best_scores(card.rows)
        for row in card.rows:
            final, tau = row.get("final_uri", ""), row.get("tau", "")
            figures.append(_figure(page_folder, out, stage_thumb(out, item_id, final, "final"),
                                   _variant_caption(row, several, best), final, "variant" if several else ""))
            title = f"pass 2, \u03c4 {_plain_number(tau)}" if several else "pass 2"
            plots.append(_plot_figure(read_metrics(row.get("pass2_uri", "")), title))
    cls = f"card s-{_css_word(card.status)}" + (" warned" if card.warned else "") + (" variants" if len(card.rows) > 1 else "")
    strip = f'<div class="strip">{"".join(figures)}</div>' if figures else ""
    plot_row = f'<div class="plots">{"".join(plots)}</div>' if plots else ""
    return (f'<article class="{cls}" id="{card.anchor}">{_card_header(card)}{_card_messages(card)}'
            f"{strip}{plot_row}{_card_details(card)}</article>")


def _input_figures(card: Card, out: str, page_folder: str) -> list[str]:
    """Return the painting and the composite-with-mask-outline figures (for an invalid card: only those that exist)."""
    painting, composite = input_thumbs(out, card.rows[0])
    shown = [(painting, "painting"), (composite, "composite + mask outline")]
    if card.status == INVALID:
        shown = [(thumb, caption) for thumb, caption in shown if thumb[0]]
    return [_figure(page_folder, out, thumb, caption) for thumb, caption in shown]


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
    if full and inside(out, full):  # its thumbnail exists, so it does too
        image = f'<a href="{_href(page_folder, full)}" title="full size">{image}</a>'
    return f"<figure{cls}>{image}{caption_html}</figure>"


def _href(page_folder: str, target: str) -> str:
    """Return the relative, URL-quoted link from a page in ``page_folder`` to ``target`` (both under ``out``)."""
    return html.escape(quote(relative_key(page_folder, target)), quote=True)


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
        values = [v for v in (as_float(row.get(column), math.nan) for row in rows) if math.isfinite(v)]
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
        if best.get(column) == as_float(row[column], math.nan):
            text = f"<b>{text}</b>"
        scores.append(f'<span title="{html.escape(QUALITY_LEGEND.get(column, column), quote=True)}">{text}</span>')
    if scores:
        lines.append('<span class="quality">' + " ".join(scores) + "</span>")
    return "<br>".join(lines)


def _plain_number(text: str) -> str:
    """Return a numeric cell with ``NUMBER_DIGITS`` significant digits (other text as it is)."""
    value = as_float(text, math.nan)
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
    seconds = sum(as_float(r.get("total_s"), 0.0) for r in card.rows)
    if seconds:
        facts.append(duration(seconds))
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
            parts.append(f'<p class="error">{prefix}{clip(row["error"])}</p>')
    warnings = dict.fromkeys(w.strip() for r in card.rows for w in r.get("warnings", "").split(";") if w.strip())
    if warnings:
        parts.append('<ul class="warnings">' + "".join(f"<li>{clip(w)}</li>" for w in warnings) + "</ul>")
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
        parts.append('<dl class="extra">' + "".join(f"<dt>{clip(k)}</dt><dd>{clip(v)}</dd>"
                                                     for k, v in extra.items()) + "</dl>")
    return "".join(parts)


def clip(text: str, limit: int = CELL_CHARS) -> str:
    """Return ``text`` HTML-escaped, cut after ``limit`` characters with a note of how many more there are."""
    if len(text) <= limit:
        return html.escape(text)
    return f'{html.escape(text[:limit])}<span class="cut">&hellip; ({len(text) - limit:,} more characters in {SUMMARY_NAME})</span>'


def _seconds(text: str) -> str:
    value = as_float(text, math.nan)
    return f"{value:.1f}" if math.isfinite(value) else html.escape(text)


def duration(seconds: float) -> str:
    """Return ``seconds`` for a reader: "12.5 s", "3 min 05 s" or "2 h 07 min"."""
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {rest:02d} s" if minutes else f"{seconds:.1f} s"

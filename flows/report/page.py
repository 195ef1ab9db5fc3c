"""A report page's HTML around its cards: the run header, the status filter, page links, the legend, CSS and JS.

Page 1 is ``report.html``, page n > 1 ``report-<n>.html``. The header gives the run id, date, item count, item time
and a chip per status; above them, a banner when the run did not finish (or still runs), and on page 1 the count
and most common problems of the invalid rows that are not shown as cards. The filter
(failed/unfinished/invalid/warned/completed) works by CSS ``:target`` alone, so with JS off every card is shown and
the filter still works; the small script only keeps the chosen filter across page links.
"""

from __future__ import annotations

import html
import re
from typing import Any

from ..run_record import UNFINISHED
from ..summary import COMPLETED, FAILED, INVALID, QUALITY_COLUMNS, SUMMARY_NAME
from .cards import BROKEN, STATUS_ORDER, WARNED, Card, count_cards
from .html import QUALITY_LEGEND, clip, duration

REPORT_NAME = "report.html"  # page 1; page n > 1 is report-<n>.html
REPORT_PAGE = re.compile(r"report-(\d+)\.html")


def page_name(number: int) -> str:
    """Return the file name of report page ``number`` (1-based): ``report.html``, ``report-2.html``, ..."""
    return REPORT_NAME if number == 1 else f"report-{number}.html"


STYLE = """
:root{--failed:#c62828;--unfinished:#5e35b1;--invalid:#6d4c41;--warned:#ef8f00;--completed:#2e7d32;--ink:#222;
--muted:#666;--line:#ddd}
*{box-sizing:border-box}body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--ink);
background:#f4f4f2}header.run{padding:14px 20px 8px;background:#fff;border-bottom:1px solid var(--line)}
h1{font-size:19px;margin:0 0 4px}h1 code{font-size:15px}.meta{color:var(--muted);margin:0 0 8px}
.totals{display:flex;flex-wrap:wrap;gap:6px;margin:0 0 8px;padding:0;list-style:none}
.totals li{padding:2px 10px;border-radius:12px;background:#eee}.totals li b{font-size:15px}
.totals .s-failed{background:#fde7e7;color:var(--failed)}.totals .s-invalid{background:#efe7e4;color:var(--invalid)}
.totals .s-warned{background:#fff1db;color:#995c00}.totals .s-completed{background:#e5f3e6;color:var(--completed)}
.totals .s-unfinished{background:#ede7f6;color:var(--unfinished)}
.banner{margin:0 0 10px;padding:10px 14px;border:2px solid var(--failed);border-left-width:8px;border-radius:6px;
background:#fff3f0;color:#4a1010;font-size:14.5px;max-width:1100px}.banner strong{font-size:17px;color:var(--failed)}
.banner.running{border-color:var(--unfinished);background:#f4f0fb;color:#2d1b55}
.banner.running strong{color:var(--unfinished)}.banner p{margin:4px 0 0}.banner code{font-size:12.5px}
.more-invalid{margin:6px 0 8px;max-width:1100px}.more-invalid summary{cursor:pointer;font-weight:600;color:var(--invalid)}
.more-invalid table{border-collapse:collapse;margin:6px 0;font-size:12.5px;background:#fff}
.more-invalid td,.more-invalid th{border:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top}
.more-invalid td.n{text-align:right;white-space:nowrap}.more-invalid td.e{font-family:ui-monospace,monospace;
overflow-wrap:anywhere}.cut{color:var(--muted);font-style:italic}
nav{margin:4px 0}nav a{display:inline-block;margin:0 2px 2px 0;padding:2px 8px;border:1px solid var(--line);
border-radius:4px;background:#fff;color:var(--ink);text-decoration:none}nav a:hover{background:#f0f0f0}
nav .current{font-weight:700;border-color:#888}nav .label{color:var(--muted);margin-right:4px}
.legend{color:var(--muted);font-size:12px;margin:4px 0 0}
main{display:grid;align-items:start;grid-template-columns:repeat(auto-fill,minmax(min(100%,640px),1fr));gap:14px;padding:14px 20px}
.card{background:#fff;border:1px solid var(--line);border-left:6px solid var(--completed);border-radius:6px;
padding:10px 12px;min-width:0}.card.variants{grid-column:1/-1}
.card.s-failed{border-left-color:var(--failed)}.card.s-invalid{border-left-color:var(--invalid)}
.card.s-unfinished{border-left-color:var(--unfinished)}.s-unfinished .badge{background:var(--unfinished)}
.card.s-unfinished .error{background:#f1ecfa;color:#3b2173}
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
#only-unfinished:target~main .card:not(.s-unfinished),
#only-warned:target~main .card:not(.warned),#only-completed:target~main .card:not(.s-completed){display:none}
#only-failed:target~header a[href="#only-failed"],#only-invalid:target~header a[href="#only-invalid"],
#only-unfinished:target~header a[href="#only-unfinished"],
#only-warned:target~header a[href="#only-warned"],#only-completed:target~header a[href="#only-completed"]
{font-weight:700;border-color:#888;background:#f3f3f3}
"""
# Keeps the chosen filter (the URL's #fragment) when moving between pages. The filter itself is CSS only.
SCRIPT = """document.querySelectorAll('a.page').forEach(function (a) {
  a.addEventListener('click', function () { if (location.hash.indexOf('#only-') === 0) { a.hash = location.hash; } });
});"""
FILTER_LABELS = {FAILED: "failed", UNFINISHED: "unfinished", INVALID: "invalid", WARNED: "warned", COMPLETED: "completed"}


def render_page(cards: list[Card], number: int, pages: int, header: dict[str, Any]) -> str:
    """Return one report page: run header (totals, filters, page links), the cards, the page links again."""
    title = f"Harmonization run {header['run_id']}" + (f" (page {number} of {pages})" if pages > 1 else "")
    nav = _page_nav(number, pages)
    body = "".join(card.markup for card in cards) or '<p class="empty">This run has no items.</p>'
    targets = "".join(f'<i class="ft" id="only-{status}"></i>' for status in STATUS_ORDER)
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>{targets}"
            f'<header class="run">{_end_banner(header)}{_run_header(header)}'
            f'{_more_invalid(header) if number == 1 else ""}{_filter_nav(cards)}{nav}{_legend(cards)}</header>'
            f"<main>{body}</main><footer>{nav}</footer><script>{SCRIPT}</script></body></html>\n")


def _end_banner(header: dict[str, Any]) -> str:
    """Return the banner of a run that did not finish or is still running ("" when it finished)."""
    end = header.get("end")
    if not end:
        return ""
    how = html.escape(end["how"][:1].upper() + end["how"][1:])
    out, manifest = html.escape(end.get("out") or "OUT"), html.escape(end.get("manifest") or "MANIFEST")
    missing = f"{end['unfinished']} of {end['planned']} planned output{'s' if end['planned'] != 1 else ''}"
    if end["running"]:
        return (f'<div class="banner running" role="status"><strong>This run is still running.</strong>'
                f"<p>{missing} have no result yet (marked <b>unfinished</b>). {how}.</p>"
                f"<p>Rebuild this report when it has ended: <code>harmonize report --out {out} --run "
                f"{html.escape(header['run_id'])}</code></p></div>")
    return (f'<div class="banner stopped" role="alert"><strong>This run did not finish.</strong>'
            f"<p>{missing} never finished: their cards say <b>unfinished</b> and come right after the failed ones; "
            f"the counts below are what finished before it stopped. {how}.</p>"
            f"<p>Rerun what is left: <code>harmonize run {manifest} --out {out} --only-failed {out}/status.csv</code></p>"
            "</div>")


def _more_invalid(header: dict[str, Any]) -> str:
    """Return the table of the invalid rows not shown as cards (count, most common problems), or ""."""
    more = header.get("more_invalid")
    if not more:
        return ""
    lines = "".join(f'<tr><td class="n">{count:,}</td><td>{html.escape(", ".join(rows))}'
                    f'{"&hellip;" if count > len(rows) else ""}</td><td class="e">{clip(error, 300)}</td></tr>'
                    for error, count, rows in more["problems"])
    other, other_rows = more["other"]
    if other:
        lines += (f'<tr><td class="n">{other_rows:,}</td><td></td><td>{other:,} other distinct problem(s): see '
                  f'<a href="{SUMMARY_NAME}">{SUMMARY_NAME}</a></td></tr>')
    return (f'<details class="more-invalid" open><summary>{more["count"]:,} more invalid rows are not shown as cards '
            f'(the first {more["shown"]} are); every row is in <a href="{SUMMARY_NAME}">{SUMMARY_NAME}</a>. Their '
            f"most common problems:</summary><table><tr><th>rows</th><th>first rows</th><th>problem</th></tr>{lines}"
            "</table></details>")


def _run_header(header: dict[str, Any]) -> str:
    totals = header["totals"]
    items = sum(totals[s] for s in (COMPLETED, *BROKEN)) + totals["other"]
    meta = [header["date"], f"{items} items" + (f" ({header['rows']} summary rows)" if header["rows"] != items else ""),
            f"{duration(header['seconds'])} of item time", f'<a href="{SUMMARY_NAME}">{SUMMARY_NAME}</a>']
    chips = [(FAILED, totals[FAILED])] + ([(UNFINISHED, totals[UNFINISHED])] if totals[UNFINISHED] else []) + [
        (INVALID, totals[INVALID]), (WARNED, totals[WARNED]), (COMPLETED, totals[COMPLETED])] + (
        [("other", totals["other"])] if totals["other"] else [])
    return (f"<h1>Harmonization run <code>{html.escape(header['run_id'])}</code></h1>"
            f'<p class="meta">{" &middot; ".join(m for m in meta if m)}</p><ul class="totals">'
            + "".join(f'<li class="s-{status}"><b>{count}</b> {status}</li>' for status, count in chips) + "</ul>")


def _filter_nav(cards: list[Card]) -> str:
    counts = count_cards(cards)
    links = [f'<a href="#show-all">all {len(cards)}</a>'] + [
        f'<a href="#only-{status}">{FILTER_LABELS[status]} {counts[status]}</a>' for status in STATUS_ORDER
        if status != UNFINISHED or counts[status]]
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

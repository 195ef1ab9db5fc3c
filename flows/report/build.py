"""The run report a curator opens: ``<out>/runs/<run_id>/report.html`` (then ``report-2.html``, ...).

A static page built from storage alone (the run's ``summary.csv``, the stage PNGs and their metrics JSON), so it
opens from local disk or an S3 static site: every ``src``/``href`` is relative and stays inside ``<out>``.

Per item, one card: the painting, the composite with the mask outlined, pass 1, the final image (one per tau
variant, side by side, with its tau and quality scores), the loss curves of both passes as small inline SVG plots,
the status, error, warnings, tau, per-stage seconds and any extra manifest columns. Failed items come first, then
unfinished, invalid, warned, completed (each by manifest row). A filter (failed/unfinished/invalid/warned/completed)
works by CSS ``:target`` alone; with JS off every card is shown and the filter still works. Pages hold
``page_size`` cards. Invalid rows beyond the first ``INVALID_CARDS`` are not cards: page 1 counts them and lists
their most common problems (``summary.csv`` keeps every row), so a manifest of 100,000 bad rows gives one page.

A run that did not finish (``flows.run_record``: stopped with a reason, killed without an end, or still running)
gets a banner on every page saying so, with how many planned outputs never finished (their cards say
``unfinished``).

Thumbnails (JPEG, long side ``THUMB_LONG_SIDE``) are written beside the outputs, named by a digest of their
sources (``<folder>/thumbs/<stage>-<sha12>.jpg``), so a rebuild re-encodes nothing that has not changed. Inputs
that live elsewhere (another bucket, an absolute path) are thumbnailed into ``<out>/<id>/thumbs/``.

This module holds the entry points (``build_report``, ``report_markdown``, ``latest_run``, ``page_uri``); the
modules that do the work are listed in ``flows.report``.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from harmonize_core.errors import InputError
from tasks import storage

from ..run_record import STARTED_NAME, UNFINISHED, run_state
from ..summary import COMPLETED, FAILED, INVALID, SUMMARY_NAME, read_summary
from .cards import WARNED, Card, count_cards, group_cards, total_seconds
from .html import duration, render_card
from .page import REPORT_PAGE, page_name, render_page
from .thumbs import modified_at, relative_key

RUN_SUMMARY_DEPTH = 2  # runs/<run_id>/summary.csv: two parts below runs/
DEFAULT_PAGE_SIZE = 200
WORKERS = 8  # cards rendered at once (mostly storage round trips)
MARKDOWN_MAX_ITEMS = 50
INVALID_CARDS = 100  # invalid rows shown as cards; the others are counted and their problems tabled on page 1
PROBLEM_LINES = 10  # the most common problems of the invalid rows that are not cards
PROBLEM_ROW_EXAMPLES = 5  # manifest rows named per problem line
PROBLEM_TEXT_CHARS = 300


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
    rows = read_summary(summary_uri)
    folder = storage.parent(summary_uri)
    cards = group_cards(rows)
    totals = count_cards(cards)
    cards, more_invalid = _cap_invalid(cards)
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        htmls = list(pool.map(lambda card: render_card(card, out, folder), cards))
    for card, text in zip(cards, htmls, strict=True):
        card.markup = text
    modified = modified_at(summary_uri)
    header = {"run_id": run_id, "date": modified.strftime("%Y-%m-%d %H:%M UTC") if modified else "",
              "totals": totals, "seconds": total_seconds(rows), "rows": len(rows), "more_invalid": more_invalid,
              "end": _end_banner(out, run_id, totals)}
    pages = [cards[start:start + page_size] for start in range(0, len(cards), max(1, page_size))] or [[]]
    for number, page in enumerate(pages, start=1):
        storage.write_bytes(page_uri(folder, number), render_page(page, number, len(pages), header).encode())
    _remove_stale_pages(folder, len(pages))
    return page_uri(folder, 1)


def _cap_invalid(cards: list[Card]) -> tuple[list[Card], dict | None]:
    """Return (the cards to render, the summary of the invalid cards beyond ``INVALID_CARDS`` or None).

    The summary: ``count`` and ``problems``, the ``PROBLEM_LINES`` most common errors as (error, rows, first
    manifest rows), and ``other`` (errors not listed, rows with them).
    """
    invalid = [card for card in cards if card.status == INVALID]
    if len(invalid) <= INVALID_CARDS:
        return cards, None
    hidden = {id(card) for card in invalid[INVALID_CARDS:]}
    by_error: dict[str, list[str]] = {}
    for card in invalid[INVALID_CARDS:]:
        error = next((r.get("error", "") for r in card.rows if r.get("error")), "") or "(no error recorded)"
        by_error.setdefault(error, []).append(card.rows[0].get("row", "") or "?")
    common = sorted(by_error.items(), key=lambda pair: -len(pair[1]))
    listed = common[:PROBLEM_LINES]
    summary = {"count": len(hidden), "shown": INVALID_CARDS,
               "problems": [(error, len(rows), rows[:PROBLEM_ROW_EXAMPLES]) for error, rows in listed],
               "other": (len(common) - len(listed), sum(len(rows) for _, rows in common[PROBLEM_LINES:]))}
    return [card for card in cards if id(card) not in hidden], summary


def _end_banner(out: str, run_id: str, totals: dict[str, int]) -> dict | None:
    """Return what the banner of a run that did not finish says (None when it finished or predates the records)."""
    state = run_state(out, run_id)
    if state.finished:
        return None
    return {"running": state.running, "how": state.how_it_ended(), "planned": len(state.planned),
            "unfinished": totals[UNFINISHED], "out": out, "manifest": (state.started or {}).get("manifest", "")}


def report_markdown(rows: list[dict], report_uri: str, summary_uri: str) -> str:
    """Return the markdown of the run's Prefect artifact: counts, a link to the report, the failed/invalid items."""
    cards = group_cards([{k: "" if v is None else str(v) for k, v in row.items()} for row in rows])
    totals = count_cards(cards)
    unfinished = f", {totals[UNFINISHED]} unfinished" if totals[UNFINISHED] else ""
    lines = ["## Harmonization run report", "",
             f"**{totals[COMPLETED]} completed, {totals[FAILED]} failed, {totals[INVALID]} invalid{unfinished}**, "
             f"{totals[WARNED]} with warnings ({len(cards)} items, {duration(total_seconds(rows))}).", "",
             f"[Open the report]({_link_target(report_uri)}) (thumbnails, loss curves, tau variants side by side); "
             f"summary: `{summary_uri}`"]
    broken = [card for card in cards if card.status != COMPLETED]
    if broken:
        lines += ["", "### Failed, unfinished and invalid items" if totals[UNFINISHED] else "### Failed and invalid items", ""]
        for card in broken[:MARKDOWN_MAX_ITEMS]:
            error = next((r.get("error", "") for r in card.rows if r.get("error")), "") or "(no error recorded)"
            lines.append(f"- `{card.key}` (row {card.rows[0].get('row') or '?'}, {card.status}): {_markdown_text(error)}")
        if len(broken) > MARKDOWN_MAX_ITEMS:
            lines.append(f"- and {len(broken) - MARKDOWN_MAX_ITEMS} more (see the report)")
    return "\n".join(lines) + "\n"


def latest_run(out: str) -> str | None:
    """Return the id of the run under ``<out>/runs/`` whose ``summary.csv`` (or ``started.json``, for a run killed
    before its first summary) was written last, or None."""
    runs = storage.join(out, storage.RUNS_DIR)
    found = []
    for uri in storage.list_uris(runs):
        relative = relative_key(runs, uri)
        parts = relative.split("/")
        if len(parts) == RUN_SUMMARY_DEPTH and parts[1] in (SUMMARY_NAME, STARTED_NAME):
            modified = modified_at(uri)
            found.append((modified or datetime.min.replace(tzinfo=UTC), parts[0]))
    return max(found)[1] if found else None


def page_uri(folder: str, number: int) -> str:
    """Return the URI of report page ``number`` (1-based) in the run folder."""
    return storage.join(folder, page_name(number))


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


def _markdown_text(text: str) -> str:
    """Return ``text`` on one line with markdown's active characters escaped."""
    line = " ".join(str(text).split())
    return re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", line)

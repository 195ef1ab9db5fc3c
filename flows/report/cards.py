"""The report's cards: a run summary's rows, grouped per item and put in the order the report shows them.

One card per item id (its tau variants together, sorted by tau; each invalid row a card of its own). Cards come
failed first, then unfinished (a run that stopped before them), then invalid, then warned, then completed, each by
manifest row, and each gets a unique HTML anchor.
Also the columns the report knows (every other column is an extra manifest column); the statuses and file names
are ``flows.summary``'s.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..run_record import UNFINISHED
from ..summary import COLUMNS, COMPLETED, FAILED, INVALID

WARNED = "warned"  # a card's status when a completed row carries warnings (summary.csv has no such status)
STATUS_ORDER = (FAILED, UNFINISHED, INVALID, WARNED, COMPLETED)  # the card order and the filters
BROKEN = (FAILED, UNFINISHED, INVALID)  # a card with any row in one of these takes the first of them
NO_ROW = 10**9  # sorts rows without a manifest row number last
UNKNOWN_STATUS_RANK = 1.5  # a status this report does not know sorts after failed, before warned
SHARED_STAGES = ("dilate", "pass1", "blend")  # tau variants of one id share these (flows.item's, without Prefect)
CONTRACT_COLUMNS = frozenset(COLUMNS)  # the summary's own columns; any other is an extra manifest column


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


def group_cards(rows: list[dict[str, str]]) -> list[Card]:
    """Return one card per item id (tau variants together; each invalid row its own), in report order."""
    grouped: dict[str, Card] = {}
    for row in rows:
        item_id = row.get("id", "")
        key = item_id if item_id and row.get("status") != INVALID else f"{item_id or 'row'}@{row.get('row', '')}"
        grouped.setdefault(key, Card(key=item_id or "(no id)", rows=[])).rows.append(row)
    cards = list(grouped.values())
    anchors: dict[str, int] = {}  # anchor taken -> the next suffix to try for it as a base
    for card in cards:
        card.rows.sort(key=lambda r: (as_float(r.get("tau")), r.get("variant", "")))
        _classify(card)
        card.anchor = _unique_anchor(card, anchors)
    cards.sort(key=lambda c: (c.rank, c.row_number, c.key))
    return cards


def _classify(card: Card) -> None:
    statuses = [row.get("status", "") for row in card.rows]
    known = [s for s in BROKEN if s in statuses]
    card.status = known[0] if known else (COMPLETED if all(s == COMPLETED for s in statuses) else statuses[0] or "unknown")
    card.warned = any(row.get("warnings", "").strip() for row in card.rows)
    rank = STATUS_ORDER.index(card.status) if card.status in STATUS_ORDER else UNKNOWN_STATUS_RANK
    card.rank = STATUS_ORDER.index(WARNED) if card.status == COMPLETED and card.warned else rank
    card.row_number = min(_row_number(row) for row in card.rows)


def _row_number(row: dict[str, str]) -> int:
    value = as_float(row.get("row"))
    return int(value) if value < math.inf else NO_ROW


def _unique_anchor(card: Card, taken: dict[str, int]) -> str:
    """Return ``item-<id>``, or ``item-<id>-<n>`` with the first free n >= 2 (linear in the number of repeats: 50,000
    invalid rows with one id once took minutes)."""
    name = card.rows[0].get("id", "") or f"row-{card.rows[0].get('row', '')}"
    base = "item-" + re.sub(r"[^A-Za-z0-9._-]", "-", name)
    anchor, suffix = base, taken.get(base, 2)
    while anchor in taken:
        anchor, suffix = f"{base}-{suffix}", suffix + 1
    if anchor != base:
        taken[base] = suffix
    taken[anchor] = taken.get(anchor, 2)
    return anchor


def count_cards(cards: list[Card]) -> dict[str, int]:
    """Return {completed, failed, unfinished, invalid, warned, other: number of cards}; warned counts any card with
    warnings."""
    counts = {status: sum(card.status == status for card in cards) for status in (COMPLETED, *BROKEN)}
    counts[WARNED] = sum(card.warned for card in cards)
    counts["other"] = len(cards) - sum(counts[status] for status in (COMPLETED, *BROKEN))
    return counts


def as_float(text: Any, default: float = math.inf) -> float:
    """Return a cell as a finite float, or ``default`` when it is empty, not a number, infinite or NaN."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return default
    return value if math.isfinite(value) else default


def total_seconds(rows: list[dict]) -> float:
    """Return the sum of the rows' ``total_s`` cells (a cell that is not a number counts 0)."""
    return sum(as_float(row.get("total_s"), 0.0) for row in rows)

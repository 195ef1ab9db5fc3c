"""The manifest schema: columns, the records validation produces, and per-row config resolution.

A manifest is a CSV with one item per row::

    id,content,style,mask[,tau][,size][,pass1_iters][,pass2_iters][,preset][,any other column]
    cat-01,cat-01/composite.png,cat-01/painting.jpg,cat-01/mask.png,1;5;10,,,,,from the 2019 set

``content`` is the naive composite (the painting with the object pasted in), ``style`` the painting, ``mask`` the
tight mask (white = object). Paths are relative to the manifest's own folder or ``s3://`` prefix, or absolute, or
``s3://`` URIs. Empty override cells keep the run's value. A ``tau`` cell (or the run's tau) may list several values
separated by ``;``: each is its own output (``tau_variants``). Columns the schema does not know (notes, source,
licence) are kept as the item's ``extra`` cells. Rows are numbered as a spreadsheet shows them: the header is row 1,
the first item row 2 (blank lines are skipped and not counted).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

from harmonize_core.config import PRESETS, HarmonizeConfig, apply_overrides, parse_tau, preset
from harmonize_core.errors import InputError, quoted
from tasks import storage

REQUIRED_COLUMNS: tuple[str, ...] = ("id", "content", "style", "mask")
FILE_COLUMNS: tuple[str, ...] = ("content", "style", "mask")
# Per-row overrides: the config fields a curator may change for one item (names from config.OVERRIDE_FIELDS).
OVERRIDE_COLUMNS: tuple[str, ...] = ("tau", "size", "pass1_iters", "pass2_iters", "max_seconds")
PRESET_COLUMN = "preset"
INTEGER_COLUMNS: tuple[str, ...] = ("size", "pass1_iters", "pass2_iters")
OPTIONAL_COLUMNS: tuple[str, ...] = (*OVERRIDE_COLUMNS, PRESET_COLUMN)
COLUMNS: tuple[str, ...] = (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)
FIRST_DATA_ROW = 2  # the header is row 1
# Run-level settings that rows may not change (one backbone per run: it is loaded once and shared).
RUN_ONLY_FIELDS: tuple[str, ...] = ("backbone", "weights")
TAU_COLUMN = "tau"
TAU_SEPARATOR = ";"  # a tau cell (or the run's tau) listing several values: "1;5;10"; each value is its own output
ERROR, WARNING = "error", "warning"  # Problem.severity

# Limits on what a manifest may hold (docs/manifests.md, "Limits"). A manifest over MAX_MANIFEST_BYTES is not read; one
# with more rows than max_rows() or more columns than MAX_COLUMNS is refused whole; a cell over its limit makes its row
# invalid (and is cut in the run's files). Python's csv module, which reads summary.csv and status.csv back, refuses
# fields over 131,072 characters: every cell limit stays far below it.
MAX_ROWS_ENV = "HARMONIZE_MAX_ROWS"
DEFAULT_MAX_ROWS = 100_000
MAX_MANIFEST_BYTES = 256 * 2**20
MAX_COLUMNS = 256
MAX_CELL_CHARS = 10_000  # a notes, source or licence cell
MAX_PATH_CHARS = 4_096  # a content, style or mask cell (Linux's PATH_MAX)
MAX_SETTING_CHARS = 200  # tau, size, iterations, max_seconds, preset ("1;2;5;10;20" is 11)

# Item ids become folder names (<out>/<id>/) and record names (runs/<run>/items/<id>[__<variant>].json), so an id may
# not be a name the output layout uses itself (compared regardless of case, as macOS and Windows file systems do),
# may not contain the separator of a variant's record name, and must survive a copy to a Windows share.
ID_CHARS = storage.SAFE_ID.pattern  # 1-128 letters, digits, '.', '_', '-', starting with a letter or digit
ID_MAX_CHARS = 128
VARIANT_SEPARATOR = "__"  # storage.row_uri: <id>__<variant>.json
# <out>/: runs/, status.csv, .cache/ (a leading '.' is refused anyway); runs/<run>/: summary.csv, items/, report.html,
# report-<n>.html; <id>/: thumbs/. Reserved everywhere, so no id ever sits beside a file of the same name.
RESERVED_IDS: tuple[str, ...] = (storage.RUNS_DIR, "status.csv", storage.CACHE_DIR, "summary.csv", storage.ROWS_DIR,
                                 "report.html", "thumbs")
RESERVED_ID_PATTERNS: tuple[str, ...] = (r"report-\d+\.html",)
WINDOWS_DEVICE_NAMES = re.compile(r"(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?", re.IGNORECASE)


@dataclass(frozen=True)
class Problem:
    """One validation finding: ``row`` (spreadsheet numbering, None = the whole file), ``column``, ``message``.

    ``severity`` is ``"error"`` (the row does not run) or ``"warning"`` (the row runs; strict validation makes it an
    error).
    """

    row: int | None
    column: str | None
    message: str
    item_id: str = ""
    severity: str = ERROR

    @property
    def is_warning(self) -> bool:
        """True for a warning (the row still runs)."""
        return self.severity == WARNING

    def describe(self, manifest: str) -> str:
        """Return the finding as one line naming the manifest, the row and the column (warnings say so)."""
        where = [manifest] + ([f"row {self.row}"] if self.row is not None else [])
        where += [f"column {self.column}"] if self.column else []
        return f"{', '.join(where)}: {'warning: ' if self.is_warning else ''}{self.message}"

    def as_error(self) -> Problem:
        """Return this warning as an error (strict validation); errors are returned unchanged."""
        if not self.is_warning:
            return self
        return dataclasses.replace(self, severity=ERROR, message=f"{self.message} (a warning; strict makes it an error)")


@dataclass(frozen=True)
class FileRef:
    """An input file of an item: its resolved ``uri`` and the sha256 of its bytes (the cache keys use the digest)."""

    uri: str
    sha256: str

    def to_dict(self) -> dict[str, str]:
        """Return ``{"uri", "sha256"}``."""
        return {"uri": self.uri, "sha256": self.sha256}


@dataclass(frozen=True)
class Item:
    """One valid manifest row: id, row number, its three input files and its resolved configuration.

    ``config.pass2.tau`` is the row's (first) tau; ``tau_variants`` lists every tau when the row or the run gives
    several (empty for one or none). ``extra`` holds the cells of columns the schema does not know (header names as
    written, in header order); ``warnings`` the row's one-line warnings (``column: message``).
    """

    id: str
    row: int
    files: dict[str, FileRef]
    config: HarmonizeConfig
    overrides: dict[str, str] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    tau_variants: tuple[float | str, ...] = ()

    def variant_configs(self) -> dict[str, HarmonizeConfig]:
        """Return ``{tau_label: config}`` for each tau variant (empty when the row has a single tau)."""
        return {tau_label(tau): _with_tau(self.config, tau) for tau in self.tau_variants}

    def to_record(self) -> dict[str, Any]:
        """Return the JSON-able form passed to tasks: id, row, files {column: {uri, sha256}}, config dict, overrides,
        extra {column: cell}, warnings [str] and tau_variants [float | "auto"]."""
        return {"id": self.id, "row": self.row, "files": {k: v.to_dict() for k, v in self.files.items()},
                "config": self.config.to_dict(), "overrides": dict(self.overrides), "extra": dict(self.extra),
                "warnings": list(self.warnings), "tau_variants": list(self.tau_variants)}


@dataclass(frozen=True)
class RunSettings:
    """What a run applies to every row before the row's own overrides: a preset and flat/dotted overrides."""

    preset: str = "quick"
    overrides: dict[str, Any] = field(default_factory=dict)

    def with_overrides(self, **values: Any) -> RunSettings:
        """Return a copy with more run-level overrides (None values ignored)."""
        extra = {k: v for k, v in values.items() if v is not None}
        return dataclasses.replace(self, overrides={**self.overrides, **extra})


def resolve_config(run: RunSettings, row_overrides: dict[str, str]) -> HarmonizeConfig:
    """Return one row's config: the row's preset (or the run's), then the run's overrides, then the row's cells.

    A row's cells win over the run's flags (a flag is the default for rows that leave the cell empty).
    The backbone section always comes from the run (``RUN_ONLY_FIELDS``): a row's preset may not switch the
    network, which is loaded once per run. A tau list (``1;5;10``) sets ``pass2.tau`` to its first value (see
    ``resolve_tau_variants`` for all of them). Raises ``ValueError`` naming the field for a bad value.
    """
    name = row_overrides.get(PRESET_COLUMN) or run.preset
    config = apply_overrides(preset(name), _first_tau(run.overrides))
    config = apply_overrides(config, _first_tau({k: v for k, v in row_overrides.items() if k in OVERRIDE_COLUMNS}))
    run_backbone = apply_overrides(preset(run.preset), _first_tau(run.overrides)).backbone
    return dataclasses.replace(config, backbone=run_backbone)


def resolve_tau_variants(run: RunSettings, row_overrides: dict[str, str]) -> tuple[float | str, ...]:
    """Return the row's tau variants: its tau cell's values, else the run's tau values; empty for one value or none.

    Raises ``ValueError`` naming the bad value of a list.
    """
    cell = row_overrides.get(TAU_COLUMN)
    values = parse_tau_list(cell if cell not in (None, "") else run.overrides.get(TAU_COLUMN))
    return values if len(values) > 1 else ()


def parse_tau_list(value: Any) -> tuple[float | str, ...]:
    """Return the tau values of ``value`` in order, duplicates dropped: a number, ``auto`` or ``1;5;10``.

    Each value goes through ``config.parse_tau`` (positive float or ``"auto"``); empty entries are ignored, so
    ``None`` or ``""`` give ``()``. Raises ``ValueError`` naming the bad value.
    """
    if value is None or not isinstance(value, str):
        parsed = parse_tau(value)
        return () if parsed is None else (parsed,)
    values: list[float | str] = []
    for part in (p.strip() for p in value.split(TAU_SEPARATOR)):
        try:
            parsed = parse_tau(part)
        except (ValueError, TypeError) as exc:
            reason = str(exc) if "tau must be" in str(exc) else "not a number"
            raise ValueError(f"bad tau value {quoted(part)}" + (f" in the list {quoted(value)}" if TAU_SEPARATOR in value else "")
                             + f": {reason}; use positive numbers or 'auto', separated by '{TAU_SEPARATOR}'") from None
        if parsed is not None and parsed not in values:
            values.append(parsed)
    return tuple(values)


def tau_label(value: float | str) -> str:
    """Return the folder label of a tau value: ``5.0 -> "5"``, ``2.5 -> "2.5"``, ``"auto" -> "auto"``.

    Distinct floats give distinct labels (the shortest round-trip form, without ``.0`` or ``+``); outputs of a
    variant go under ``<out>/<id>/tau-<label>/``.
    """
    if isinstance(value, str):
        return value.strip().lower()
    number = float(value)
    text = repr(number)
    return (text[:-2] if text.endswith(".0") else text).replace("+", "")


def _first_tau(overrides: dict[str, Any]) -> dict[str, Any]:
    """Return ``overrides`` with a tau list replaced by its first value (the item's main config)."""
    value = overrides.get(TAU_COLUMN)
    if not isinstance(value, str) or TAU_SEPARATOR not in value:
        return overrides
    values = parse_tau_list(value)
    return {**overrides, TAU_COLUMN: values[0] if values else None}


def _with_tau(config: HarmonizeConfig, tau: float | str) -> HarmonizeConfig:
    return dataclasses.replace(config, pass2=dataclasses.replace(config.pass2, tau=tau))


def max_rows() -> int:
    """Return the most item rows a manifest may have: ``$HARMONIZE_MAX_ROWS`` or 100,000 (``InputError`` if bad)."""
    text = os.environ.get(MAX_ROWS_ENV, "").strip().replace("_", "")
    if not text:
        return DEFAULT_MAX_ROWS
    if not text.isdigit() or int(text) < 1:
        raise InputError(f"{MAX_ROWS_ENV}={quoted(os.environ[MAX_ROWS_ENV])}: expected a positive whole number "
                         f"(default {DEFAULT_MAX_ROWS})")
    return int(text)


def cell_limit(column: str) -> int:
    """Return the most characters a cell of ``column`` may hold (paths, settings and other cells differ)."""
    if column in FILE_COLUMNS:
        return MAX_PATH_CHARS
    if column in OPTIONAL_COLUMNS:
        return MAX_SETTING_CHARS
    return MAX_CELL_CHARS


def id_problem(item_id: str) -> str:
    """Return why ``item_id`` cannot name an item's outputs, as one line with the fix, or "" when it can.

    Refused: an empty id; anything but 1-128 letters, digits, ``.``, ``_``, ``-`` starting with a letter or digit;
    ``..``; ``__`` (the separator of a variant's record, ``<id>__tau-5.json``); a name the output layout uses
    (``RESERVED_IDS``, ``report-<n>.html``, regardless of case); a trailing ``.`` and Windows device names (``CON``,
    ``nul.png``, ``COM1``...), which a copy of the outputs to a Windows share could not keep.
    """
    if not item_id:
        return "the id is empty; give every row a unique id"
    if len(item_id) > ID_MAX_CHARS:
        return f"unsafe item id {quoted(item_id, 40)}: over the limit of {ID_MAX_CHARS} characters; use a shorter id"
    if not re.fullmatch(ID_CHARS, item_id) or ".." in item_id:
        return (f"unsafe item id {quoted(item_id)}: use 1-{ID_MAX_CHARS} letters, digits, '.', '_' or '-', starting "
                "with a letter or digit and never containing '..'")
    if VARIANT_SEPARATOR in item_id:
        before, _, after = item_id.partition(VARIANT_SEPARATOR)
        return (f"id {quoted(item_id)} contains '{VARIANT_SEPARATOR}', which joins an id to its tau variant in the "
                f"run's record names ({item_id}.json would also be the record of item {before} with variant {after}); "
                "use a single '_' or '-'")
    folded = item_id.casefold()
    reserved = next((name for name in RESERVED_IDS if name.casefold() == folded), "")
    if reserved or any(re.fullmatch(pattern, folded) for pattern in RESERVED_ID_PATTERNS):
        same = "" if item_id == (reserved or item_id) else f" (as {reserved}: names are compared regardless of case)"
        return (f"id {quoted(item_id)} is a name the output folder uses for its own files{same}; the reserved names "
                f"are {', '.join(RESERVED_IDS)} and report-<n>.html. Rename the item")
    if item_id.endswith("."):
        return (f"id {quoted(item_id)} ends with '.', which Windows drops ({item_id} and {item_id.rstrip('.')} would "
                "share a folder there); remove the trailing '.'")
    if WINDOWS_DEVICE_NAMES.fullmatch(item_id):
        return (f"id {quoted(item_id)} is a device name on Windows (CON, PRN, AUX, NUL, COM0-9, LPT0-9, with or "
                "without an extension), where its outputs could not be copied; rename the item")
    return ""


def check_run_settings(run: RunSettings) -> HarmonizeConfig:
    """Return the run-level config (no row cells); ``InputError`` naming the bad preset or flag value."""
    try:
        return resolve_config(run, {})
    except (ValueError, TypeError) as exc:
        raise InputError(f"run settings: {exc}") from None


def check_override(column: str, value: str) -> str | None:
    """Return why ``value`` is not acceptable in override ``column``, or None when it is."""
    if column == PRESET_COLUMN:
        return None if value in PRESETS else f"unknown preset {quoted(value)}: use one of {', '.join(PRESETS)}"
    if column == TAU_COLUMN and TAU_SEPARATOR in value:
        try:
            parse_tau_list(value)
        except ValueError as exc:
            return str(exc)
        return None
    if column in INTEGER_COLUMNS and not _is_whole(value):
        return f"bad value {quoted(value)} for {column}: expected a whole number"
    try:
        apply_overrides(HarmonizeConfig(), {column: value})
    except (ValueError, TypeError) as exc:
        return f"bad value {quoted(value)} for {column}: {exc}"
    return None


def _is_whole(value: str) -> bool:
    try:
        return float(value).is_integer()
    except ValueError:
        return False

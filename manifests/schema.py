"""The manifest schema: columns, the records validation produces, and per-row config resolution.

A manifest is a CSV with one item per row::

    id,content,style,mask[,tau][,size][,pass1_iters][,pass2_iters][,preset]
    cat-01,cat-01/composite.png,cat-01/painting.jpg,cat-01/mask.png,,,,,

``content`` is the naive composite (the painting with the object pasted in), ``style`` the painting, ``mask`` the
tight mask (white = object). Paths are relative to the manifest's own folder or ``s3://`` prefix, or absolute, or
``s3://`` URIs. Empty override cells keep the run's value. Rows are numbered as a spreadsheet shows them: the
header is row 1, the first item row 2 (blank lines are skipped and not counted).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from harmonize_core.config import OVERRIDE_FIELDS, PRESETS, HarmonizeConfig, apply_overrides, preset
from harmonize_core.errors import InputError

REQUIRED_COLUMNS: tuple[str, ...] = ("id", "content", "style", "mask")
FILE_COLUMNS: tuple[str, ...] = ("content", "style", "mask")
# Per-row overrides: the config fields a curator may change for one item (names from config.OVERRIDE_FIELDS).
OVERRIDE_COLUMNS: tuple[str, ...] = ("tau", "size", "pass1_iters", "pass2_iters")
PRESET_COLUMN = "preset"
INTEGER_COLUMNS: tuple[str, ...] = ("size", "pass1_iters", "pass2_iters")
OPTIONAL_COLUMNS: tuple[str, ...] = (*OVERRIDE_COLUMNS, PRESET_COLUMN)
COLUMNS: tuple[str, ...] = (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)
FIRST_DATA_ROW = 2  # the header is row 1
# Run-level settings that rows may not change (one backbone per run: it is loaded once and shared).
RUN_ONLY_FIELDS: tuple[str, ...] = ("backbone", "weights")


@dataclass(frozen=True)
class Problem:
    """One validation problem: ``row`` (spreadsheet numbering, None = the whole file), ``column``, ``message``."""

    row: int | None
    column: str | None
    message: str
    item_id: str = ""

    def describe(self, manifest: str) -> str:
        """Return the problem as one line naming the manifest, the row and the column."""
        where = [manifest] + ([f"row {self.row}"] if self.row is not None else [])
        where += [f"column {self.column}"] if self.column else []
        return f"{', '.join(where)}: {self.message}"


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
    """One valid manifest row: id, row number, its three input files and its resolved configuration."""

    id: str
    row: int
    files: dict[str, FileRef]
    config: HarmonizeConfig
    overrides: dict[str, str] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """Return the JSON-able form passed to tasks: id, row, files {column: {uri, sha256}}, config dict."""
        return {"id": self.id, "row": self.row, "files": {k: v.to_dict() for k, v in self.files.items()},
                "config": self.config.to_dict(), "overrides": dict(self.overrides)}


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
    network, which is loaded once per run. Raises ``ValueError`` naming the field for a bad value.
    """
    name = row_overrides.get(PRESET_COLUMN) or run.preset
    config = apply_overrides(preset(name), run.overrides)
    config = apply_overrides(config, {k: v for k, v in row_overrides.items() if k in OVERRIDE_COLUMNS})
    run_backbone = apply_overrides(preset(run.preset), run.overrides).backbone
    return dataclasses.replace(config, backbone=run_backbone)


def check_run_settings(run: RunSettings) -> HarmonizeConfig:
    """Return the run-level config (no row cells); ``InputError`` naming the bad preset or flag value."""
    try:
        return resolve_config(run, {})
    except (ValueError, TypeError) as exc:
        raise InputError(f"run settings: {exc}") from None


def check_override(column: str, value: str) -> str | None:
    """Return why ``value`` is not acceptable in override ``column``, or None when it is."""
    if column == PRESET_COLUMN:
        return None if value in PRESETS else f"unknown preset {value!r}: use one of {', '.join(PRESETS)}"
    if column in INTEGER_COLUMNS and not _is_whole(value):
        return f"bad value {value!r} for {OVERRIDE_FIELDS[column]}: expected a whole number"
    try:
        apply_overrides(HarmonizeConfig(), {column: value})
    except (ValueError, TypeError) as exc:
        return f"bad value {value!r} for {OVERRIDE_FIELDS[column]}: {exc}"
    return None


def _is_whole(value: str) -> bool:
    try:
        return float(value).is_integer()
    except ValueError:
        return False

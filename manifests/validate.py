"""Read a manifest (local or ``s3://``) and validate every row, reporting every problem at once.

Checked: the header (missing required columns, unknown columns), ids (empty, unsafe as a folder name, duplicated),
files (empty cell, missing, unreadable, not an image), sizes (the composite, the painting and the mask must match),
masks (empty, or empty at the working size) and override cells (parsed through ``config.apply_overrides``). Each
problem names its row and column. Valid rows come back as ``Item`` records carrying their inputs' sha256 digests,
which seed the stage cache keys; invalid rows are reported and skipped (the caller decides whether that is fatal).
"""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from harmonize_core.config import MaskConfig
from harmonize_core.errors import InputError
from harmonize_core.images import decode_image, decode_mask, resize, working_shape
from tasks import storage

from .schema import (
    COLUMNS,
    FILE_COLUMNS,
    FIRST_DATA_ROW,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    FileRef,
    Item,
    Problem,
    RunSettings,
    check_override,
    resolve_config,
)

DEFAULT_THRESHOLD = MaskConfig().binarize_threshold
READ_WORKERS = 8  # rows checked concurrently (I/O bound: S3 GETs and image decodes)


@dataclass
class ValidationReport:
    """The outcome of validating one manifest: valid ``items``, every ``problem``, and the number of rows."""

    manifest: str
    items: list[Item] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    row_count: int = 0
    fatal: bool = False  # the file itself is unusable (unreadable, no rows, required columns missing)

    @property
    def ok(self) -> bool:
        """True when there is no problem at all."""
        return not self.problems

    def invalid_rows(self) -> dict[int, list[Problem]]:
        """Return ``{row: [problems]}`` for the rows that will not run."""
        rows: dict[int, list[Problem]] = {}
        for problem in self.problems:
            if problem.row is not None:
                rows.setdefault(problem.row, []).append(problem)
        return rows

    def table(self) -> str:
        """Return the problems as an aligned text table (row, id, column, problem), or a one-line all-clear."""
        if self.ok:
            return f"{self.manifest}: {len(self.items)} rows, all valid"
        header = ("row", "id", "column", "problem")
        lines = [(str(p.row) if p.row is not None else "-", p.item_id or "-", p.column or "-", p.message)
                 for p in self.problems]
        widths = [max(len(r[i]) for r in [header, *lines]) for i in range(3)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        invalid = len(self.invalid_rows())
        title = (f"{self.manifest}: {len(self.problems)} problem(s); {invalid} of {self.row_count} rows invalid, "
                 f"{len(self.items)} valid")
        return "\n".join([title, fmt.format(*header), *(fmt.format(*r) for r in lines)])


def read_rows(uri: str) -> tuple[list[str], list[dict[str, str]]]:
    """Return (column names, rows as {column: stripped cell}) of the CSV at ``uri``; ``InputError`` if unusable."""
    import pandas as pd

    data = storage.read_bytes(uri)
    try:
        frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, skip_blank_lines=True)
    except pd.errors.EmptyDataError:
        raise InputError(f"{uri}: the manifest is empty; it needs a header row {','.join(REQUIRED_COLUMNS)}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputError(f"{uri}: not a readable CSV ({str(exc).strip().splitlines()[-1]})") from None
    columns = [str(c).strip().lower() for c in frame.columns]
    frame.columns = columns
    rows = [{c: str(v).strip() for c, v in record.items()} for record in frame.to_dict(orient="records")]
    return columns, rows


def validate_manifest(uri: str, run: RunSettings | None = None, only_ids: set[str] | list[str] | None = None,
                      ) -> ValidationReport:
    """Return the ``ValidationReport`` of the manifest at ``uri`` (every problem, row and column named).

    ``run`` supplies the preset and run-level overrides each row's config starts from. ``only_ids`` restricts the
    rows checked (and the items returned) to those ids; duplicates are still found across every row. An unreadable
    manifest raises ``InputError``.
    """
    run = run or RunSettings()
    columns, rows = read_rows(uri)
    report = ValidationReport(manifest=uri, row_count=len(rows))
    report.problems.extend(_header_problems(columns))
    if any(c not in columns for c in REQUIRED_COLUMNS) or not rows:
        if not rows:
            report.problems.append(Problem(None, None, "the manifest has no rows"))
        report.fatal = True
        return report
    id_problems = _id_problems(rows)
    wanted = set(only_ids) if only_ids is not None else None
    unknown = sorted(wanted - {row["id"] for row in rows}) if wanted is not None else []
    if unknown:
        report.problems.append(Problem(None, "id", f"selected id(s) not in the manifest: {', '.join(unknown)}"))
    base = storage.parent(uri)
    checker = _FileChecker()
    selected = [(FIRST_DATA_ROW + i, r) for i, r in enumerate(rows) if wanted is None or r["id"] in wanted]
    with ThreadPoolExecutor(max_workers=READ_WORKERS) as pool:
        results = list(pool.map(lambda pair: _check_row(*pair, base, run, checker, id_problems), selected))
    for item, problems in results:
        report.problems.extend(problems)
        if item is not None:
            report.items.append(item)
    report.problems.sort(key=lambda p: (p.row or 0, COLUMNS.index(p.column) if p.column in COLUMNS else 99))
    return report


def _header_problems(columns: list[str]) -> list[Problem]:
    problems = []
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        problems.append(Problem(None, ", ".join(missing), f"missing required column(s) {', '.join(missing)}; the "
                                f"header must include {','.join(REQUIRED_COLUMNS)}"))
    for name in columns:
        if name not in COLUMNS:
            problems.append(Problem(None, name, f"unknown column {name!r}; optional columns are "
                                    f"{', '.join(OPTIONAL_COLUMNS)} (rename or remove it)"))
    seen = set()
    for name in columns:
        if name in seen:
            problems.append(Problem(None, name, f"column {name!r} appears twice"))
        seen.add(name)
    return problems


def _id_problems(rows: list[dict[str, str]]) -> dict[int, list[Problem]]:
    by_id: dict[str, list[int]] = {}
    problems: dict[int, list[Problem]] = {}
    for index, row in enumerate(rows):
        number, item_id = FIRST_DATA_ROW + index, row["id"]
        by_id.setdefault(item_id, []).append(number)
        try:
            storage.check_item_id(item_id)
        except InputError as exc:
            message = "the id is empty" if not item_id else str(exc)
            problems.setdefault(number, []).append(Problem(number, "id", message, item_id))
    for item_id, numbers in by_id.items():
        if item_id and len(numbers) > 1:
            for number in numbers:
                others = ", ".join(str(n) for n in numbers if n != number)
                problems.setdefault(number, []).append(
                    Problem(number, "id", f"duplicate id {item_id!r} (also on row {others}); ids must be unique",
                            item_id))
    return problems


def _check_row(number: int, row: dict[str, str], base: str, run: RunSettings, checker: _FileChecker,
               id_problems: dict[int, list[Problem]]) -> tuple[Item | None, list[Problem]]:
    item_id = row["id"]
    problems = list(id_problems.get(number, []))
    overrides = {c: row[c] for c in OPTIONAL_COLUMNS if row.get(c, "")}  # empty cells keep the run's value

    def add(column: str, message: str) -> None:
        problems.append(Problem(number, column, message, item_id))

    for column, value in overrides.items():
        reason = check_override(column, value)
        if reason:
            add(column, reason)
    config = None
    if not any(p.column in overrides for p in problems):
        try:
            config = resolve_config(run, overrides)
        except (ValueError, TypeError) as exc:
            add(next(iter(overrides), "preset"), str(exc))
    files: dict[str, FileRef] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for column in FILE_COLUMNS:
        if not row[column]:
            add(column, f"the {column} cell is empty; give a path relative to the manifest, absolute, or s3://")
            continue
        uri = storage.resolve(base, row[column])
        threshold = config.masks.binarize_threshold if config else DEFAULT_THRESHOLD
        checked = checker.check(uri, column, threshold, config.sizing.size if config else None)
        if checked.error:
            add(column, checked.error)
            continue
        files[column], shapes[column] = FileRef(uri, checked.sha256), checked.shape
    problems.extend(_shape_problems(number, item_id, shapes))
    if problems:
        return None, problems
    return Item(id=item_id, row=number, files=files, config=config, overrides=overrides), []


def _shape_problems(number: int, item_id: str, shapes: dict[str, tuple[int, int]]) -> list[Problem]:
    if "content" not in shapes:
        return []
    height, width = shapes["content"]
    return [Problem(number, column, f"size {w}x{h} differs from the content's {width}x{height}; the composite, "
                    "the painting and the mask must have the same size", item_id)
            for column, (h, w) in shapes.items() if (h, w) != (height, width)]


@dataclass(frozen=True)
class _Checked:
    sha256: str = ""
    shape: tuple[int, int] = (0, 0)
    error: str = ""


class _FileChecker:
    """Reads and decodes each distinct file once per kind: paintings are often shared by many rows."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done: dict[tuple, _Checked] = {}

    def check(self, uri: str, column: str, threshold: float, size: int | None) -> _Checked:
        """Return the file's digest and (H, W), or the reason it cannot be used as ``column``."""
        key = (uri, column == "mask", threshold, size) if column == "mask" else (uri, False)
        with self._lock:
            if key in self._done:
                return self._done[key]
        result = self._decode(uri, column, threshold, size)
        with self._lock:
            self._done[key] = result
        return result

    @staticmethod
    def _decode(uri: str, column: str, threshold: float, size: int | None) -> _Checked:
        try:
            data = storage.read_bytes(uri)
            if column == "mask":
                tensor = decode_mask(data, uri, threshold)
                reason = _empty_at_size(tensor, uri, size) if size else ""
                if reason:
                    return _Checked(error=reason)
            else:
                tensor = decode_image(data, uri)
        except InputError as exc:
            return _Checked(error=str(exc))
        except storage.TransientStorageError as exc:
            return _Checked(error=f"{exc} (storage unavailable; try again)")
        return _Checked(sha256=storage.sha256_bytes(data), shape=tuple(tensor.shape[-2:]))


def _empty_at_size(mask: torch.Tensor, uri: str, size: int) -> str:
    """Return why ``mask`` vanishes at the working size (resized as ``stages.prepare_inputs`` does), or ""."""
    shape = working_shape(mask.shape[-2], mask.shape[-1], size)
    if (resize(mask, shape) > 0.5).sum() == 0:
        return f"{uri}: the mask vanishes at the working size {shape[1]}x{shape[0]}; enlarge it or raise size"
    return ""

"""Read a manifest (local or ``s3://``) and validate every row, reporting every problem at once.

Errors (the row does not run): the header (missing required or duplicated columns), ids (empty, unsafe as a folder
name, duplicated regardless of case), files (empty cell, missing, unreadable, not an image), sizes (the composite,
the painting and the mask must match), masks (empty, or empty at the working size) and override cells (parsed
through ``config.apply_overrides``; a tau cell may list values, ``1;5;10``). Warnings (the row runs; strict
validation makes them errors): an unknown column that looks like a typo of a known one, a mostly grey mask, pixels
changed outside the dilated mask, a composite with nothing pasted (``manifests.checks``). Unknown columns are kept
as each item's ``extra`` cells. Each finding names its row and column. Valid rows come back as ``Item`` records
carrying their inputs' sha256 digests, which seed the stage cache keys.

With an ``index`` prefix, what was learnt about each input is kept there (``manifests.index``): an input whose
stat (size + mtime, or size + ETag on S3) is unchanged is not read again, and an unchanged row's content checks
are not recomputed.
"""

from __future__ import annotations

import difflib
import io
import threading
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from harmonize_core.config import HarmonizeConfig, MaskConfig
from harmonize_core.errors import InputError, LimitError, quoted
from harmonize_core.images import (
    check_input_bytes,
    check_pixels,
    decode_image,
    decode_mask,
    max_input_bytes,
    max_pixels,
    resize,
    working_shape,
)
from tasks import storage

from .checks import (
    ANALYSIS_SIZE,
    ANALYSIS_VERSION,
    CHANGE_TOLERANCE_LEVELS,
    Consistency,
    consistency_warnings,
    grey_fraction,
    grey_mask_warning,
    measure_consistency,
)
from .index import InputIndex, analysis_key
from .schema import (
    COLUMNS,
    ERROR,
    FILE_COLUMNS,
    FIRST_DATA_ROW,
    MAX_COLUMNS,
    MAX_MANIFEST_BYTES,
    MAX_SETTING_CHARS,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    TAU_COLUMN,
    WARNING,
    FileRef,
    Item,
    Problem,
    RunSettings,
    cell_limit,
    check_override,
    id_problem,
    max_rows,
    resolve_config,
    resolve_tau_variants,
)

DEFAULT_MASKS = MaskConfig()
READ_WORKERS = 8  # rows checked concurrently (I/O bound: S3 GETs and image decodes)
TYPO_CUTOFF = 0.8  # difflib similarity above which an unknown column is taken for a misspelt known one
UNNAMED_COLUMN = "column_"  # an unnamed column with cells is kept as column_<position>
BYTES_CACHE_LIMIT = 64 * 2**20  # bytes of recently read inputs kept for the row checks (not read twice)
BOM = "\ufeff"
SHOWN_FINDINGS = 50  # errors and warnings listed by table() and lines(); the rest are counted
SHOWN_ID_CHARS = 40  # an id in the table's id column (the finding's message says what is wrong with a long one)
ROWS_PER_TASK = 64  # rows one thread checks in a go: one task per row costs more than an empty row's checks


@dataclass
class ValidationReport:
    """The outcome of validating one manifest.

    ``items``: the valid rows; ``problems``: every error (rows with one do not run); ``warnings``: every warning
    (those rows still run; empty under strict validation, which turns them into problems); ``extra_columns``: the
    header's unknown columns in order; ``extras``: ``{row: {column: cell}}`` of those columns for every row.
    """

    manifest: str
    items: list[Item] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    row_count: int = 0
    fatal: bool = False  # the file itself is unusable (unreadable, no rows, required columns missing, unknown ids)
    extra_columns: list[str] = field(default_factory=list)
    extras: dict[int, dict[str, str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.problems

    @property
    def clean(self) -> bool:
        """True when there is neither an error nor a warning."""
        return not self.problems and not self.warnings

    def invalid_rows(self) -> dict[int, list[Problem]]:
        """Return ``{row: [problems]}`` for the rows that will not run."""
        rows: dict[int, list[Problem]] = {}
        for problem in self.problems:
            if problem.row is not None:
                rows.setdefault(problem.row, []).append(problem)
        return rows

    def title(self) -> str:
        """Return the one-line verdict: rows, problems, invalid and valid rows, warnings."""
        warned = f"; {len(self.warnings)} warning(s)" if self.warnings else ""
        if self.ok:
            return f"{self.manifest}: {len(self.items)} rows, all valid{warned}"
        return (f"{self.manifest}: {len(self.problems)} problem(s); {len(self.invalid_rows())} of {self.row_count} "
                f"rows invalid, {len(self.items)} valid{warned}")

    def table(self, limit: int | None = SHOWN_FINDINGS) -> str:
        """Return the title, then errors then warnings as an aligned text table (row, id, column, problem).

        At most ``limit`` findings are listed (None: all), followed by one line counting the rest; a clean manifest
        gives the title alone.
        """
        if self.clean:
            return self.title()
        findings = [*self.problems, *self.warnings]
        shown = findings if limit is None else findings[:limit]
        header = ("row", "id", "column", "problem")
        lines = [(str(p.row) if p.row is not None else "-", _shown_id(p.item_id), p.column or "-",
                  f"warning: {p.message}" if p.is_warning else p.message) for p in shown]
        widths = [max(len(r[i]) for r in [header, *lines]) for i in range(3)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        rest = self._rest(len(shown))
        return "\n".join([self.title(), fmt.format(*header), *(fmt.format(*r) for r in lines), *([rest] if rest else [])])

    def lines(self, limit: int | None = SHOWN_FINDINGS) -> list[str]:
        """Return at most ``limit`` findings (errors first) as one line each (``Problem.describe``; errors start with
        ``invalid:``), then one line counting the rest when some are left out; None lists all."""
        findings = [*self.problems, *self.warnings]
        shown = findings if limit is None else findings[:limit]
        lines = [p.describe(self.manifest) if p.is_warning else f"invalid: {p.describe(self.manifest)}" for p in shown]
        rest = self._rest(len(shown))
        return [*lines, *([rest] if rest else [])]

    def _rest(self, shown: int) -> str:
        """Return the line counting the findings after the first ``shown`` (errors, then warnings), or ""."""
        errors = max(0, len(self.problems) - shown)
        warnings = min(len(self.warnings), len(self.problems) + len(self.warnings) - shown)
        if not errors and not warnings:
            return ""
        parts = [f"{errors:,} more problem(s)"] if errors else []
        parts += [f"{warnings:,} more warning(s)"] if warnings else []
        return (f"... and {' and '.join(parts)} not shown (the first {shown} are); fix these and validate again, "
                "or see the run's summary.csv, which lists every invalid row")


def read_manifest(uri: str) -> tuple[list[str], list[dict[str, str]]]:
    """Return (column names, rows as {column: cell}) of the CSV at ``uri``; ``InputError`` if unusable.

    Known column names are normalised (case, surrounding spaces) and their cells stripped; unknown columns keep
    their name and cells verbatim (surrounding spaces and tabs included). An unnamed
    column with cells becomes ``column_<position>``; one without cells is dropped. A repeated name keeps its first
    column's cells (``validate_manifest`` reports the repeat).
    """
    import pandas as pd

    found = storage.stat(uri)
    if found is not None and found["size"] > MAX_MANIFEST_BYTES:
        raise InputError(f"{uri}: {found['size']:,} bytes, over the limit of {MAX_MANIFEST_BYTES:,} bytes for a "
                         "manifest; split it into several manifests")
    data = storage.read_bytes(uri)
    try:
        frame = pd.read_csv(io.BytesIO(data), dtype=str, header=None, keep_default_na=False, skip_blank_lines=True)
    except pd.errors.EmptyDataError:
        raise InputError(f"{uri}: the manifest is empty; it needs a header row {','.join(REQUIRED_COLUMNS)}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputError(f"{uri}: not a readable CSV ({str(exc).strip().splitlines()[-1]})") from None
    # Known columns' cells are stripped; extra columns (notes, ...) are kept verbatim: stripping "\t=1+1" would
    # turn text into a live spreadsheet formula in summary.csv and lose the value the curator wrote.
    if frame.shape[1] > MAX_COLUMNS:
        raise InputError(f"{uri}: {frame.shape[1]:,} columns, over the limit of {MAX_COLUMNS}; keep one column per "
                         "setting or note")
    cells = frame.fillna("").astype(str).to_numpy().tolist()  # NaN only where a line has fewer fields
    header, body = cells[0], cells[1:]
    for name in header:
        if len(name) > MAX_SETTING_CHARS:
            raise InputError(f"{uri}: the header's column name {quoted(name)} is over the limit of "
                             f"{MAX_SETTING_CHARS} characters; give the column a short name")
    columns, keep = [], []
    for position, raw in enumerate(header):
        name = raw.replace(BOM, "").strip()
        if not name and not any(line[position].strip() for line in body):
            continue  # a trailing separator: no name and no cells
        known = name.lower() in COLUMNS
        columns.append(name.lower() if known else (raw.replace(BOM, "") if name else f"{UNNAMED_COLUMN}{position + 1}"))
        keep.append(position)
    rows = []
    for line in body:
        row: dict[str, str] = {}
        for name, position in zip(columns, keep, strict=True):
            row.setdefault(name, line[position].strip() if name in COLUMNS else line[position])
        rows.append(row)
    return columns, rows


def validate_manifest(uri: str, run: RunSettings | None = None, only_ids: set[str] | list[str] | None = None, *,
                      strict_warnings: bool = False, index: str | None = None) -> ValidationReport:
    """Return the ``ValidationReport`` of the manifest at ``uri`` (every problem and warning, row and column named).

    ``run`` supplies the preset and run-level overrides each row's config starts from. ``only_ids`` restricts the
    rows checked (and the items returned) to those ids; duplicates are still found across every row, and an id
    that is not in the manifest makes the report fatal. ``strict_warnings`` turns every warning into an error (the
    row is invalid). ``index`` is a storage prefix (folder or ``s3://``) where inputs' digests and checks are kept
    between runs (``manifests.index``); None reads every input. An unreadable manifest raises ``InputError``.
    """
    run = run or RunSettings()
    max_pixels(), max_input_bytes()  # a bad limit setting is one InputError here, not an error on every file
    columns, rows = read_manifest(uri)
    report = ValidationReport(manifest=uri, row_count=len(rows))
    report.extra_columns = list(dict.fromkeys(c for c in columns if c not in COLUMNS))
    report.extras = {FIRST_DATA_ROW + i: {c: _cut(r[c], cell_limit(c)) for c in report.extra_columns}
                     for i, r in enumerate(rows)}
    header_problems = _header_problems(columns)
    _file_findings(report, header_problems, strict_warnings)
    limit = max_rows()
    if any(c not in columns for c in REQUIRED_COLUMNS) or not rows or len(rows) > limit:
        if not rows:
            report.problems.append(Problem(None, None, "the manifest has no rows"))
        if len(rows) > limit:
            report.problems.append(Problem(None, None, f"the manifest has {len(rows):,} rows, over the limit of "
                                           f"{limit:,}; split it into several manifests (or raise HARMONIZE_MAX_ROWS)"))
        report.fatal = True
        return report
    wanted = set(only_ids) if only_ids is not None else None
    unknown = sorted(wanted - {row["id"] for row in rows}) if wanted is not None else []
    if unknown:
        report.problems.append(Problem(None, "id", f"selected id(s) not in the manifest: {', '.join(unknown)}; they "
                                       "may have been renamed or removed since they were selected"))
        report.fatal = True
        return report
    context = _RowContext(storage.parent(uri), run, _Inputs(InputIndex(index)), _id_problems(rows), strict_warnings,
                          report.extra_columns)
    selected = [(FIRST_DATA_ROW + i, r) for i, r in enumerate(rows) if wanted is None or r["id"] in wanted]
    # Rows go to the threads in chunks: one task per row spent most of 100,000 empty rows' time handing tasks over.
    # Small manifests still get one row per thread (their rows read images: the threads overlap the reads).
    step = max(1, min(ROWS_PER_TASK, len(selected) // (READ_WORKERS * 4)))
    chunks = [selected[start:start + step] for start in range(0, len(selected), step)]
    with ThreadPoolExecutor(max_workers=READ_WORKERS) as pool:
        results = [found for chunk in pool.map(lambda part: [_check_row(*pair, context) for pair in part], chunks)
                   for found in chunk]
    for item, findings in results:
        _file_findings(report, findings, strict_warnings)
        if item is not None:
            report.items.append(item)
    order = {name: position for position, name in enumerate(COLUMNS)}
    for findings in (report.problems, report.warnings):
        findings.sort(key=lambda p: (p.row or 0, order.get(p.column, len(order))))
    return report


def _file_findings(report: ValidationReport, findings: list[Problem], strict: bool) -> None:
    for finding in findings:
        if finding.is_warning and not strict:
            report.warnings.append(finding)
        else:
            report.problems.append(finding.as_error())


def _header_problems(columns: list[str]) -> list[Problem]:
    problems = []
    unknown = [c for c in columns if c not in COLUMNS]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        guesses = [quoted(u) for u in unknown if _typo_of(u) in missing]
        hint = f" ({', '.join(guesses)} may be misspelt)" if guesses else ""
        problems.append(Problem(None, ", ".join(missing), f"missing required column(s) {', '.join(missing)}; the "
                                f"header must include {','.join(REQUIRED_COLUMNS)}{hint}"))
    for name in dict.fromkeys(unknown):
        guess = _typo_of(name)
        if guess:
            problems.append(Problem(None, name, f"unknown column {quoted(name)} kept as an extra column; did you mean "
                                    f"{guess}?", severity=WARNING))
        elif name.startswith(UNNAMED_COLUMN):
            problems.append(Problem(None, name, f"a column without a name is kept as the extra column {quoted(name)}; "
                                    "give it a name in the header", severity=WARNING))
    seen = set()
    for name in columns:
        if name in seen:
            problems.append(Problem(None, name, f"column {quoted(name)} appears twice; only its first column is read"))
        seen.add(name)
    return problems


def _typo_of(name: str) -> str:
    """Return the known column ``name`` is probably a misspelling of, or ""."""
    close = difflib.get_close_matches(name.strip().lower(), COLUMNS, n=1, cutoff=TYPO_CUTOFF)
    return close[0] if close else ""


def _id_problems(rows: list[dict[str, str]]) -> dict[int, list[Problem]]:
    """Return ``{row: [problems]}`` for ids that cannot name outputs (``schema.id_problem``) and ids used twice, case
    ignored (as some file systems do). A duplicate's message names at most ``SHOWN_FINDINGS`` of its other rows."""
    by_key: dict[str, list[tuple[int, str]]] = {}
    problems: dict[int, list[Problem]] = {}
    for index, row in enumerate(rows):
        number, item_id = FIRST_DATA_ROW + index, row["id"]
        by_key.setdefault(item_id.casefold(), []).append((number, item_id))
        message = id_problem(item_id)
        if message:
            problems.setdefault(number, []).append(Problem(number, "id", message, _cut(item_id, cell_limit("id"))))
    for key, uses in by_key.items():
        if not key or len(uses) == 1:
            continue
        case_only = len({item_id for _, item_id in uses}) > 1
        rule = "ids must be unique regardless of case (some file systems ignore case)" if case_only else "ids must be unique"
        for number, item_id in uses:
            others = []  # the first SHOWN_FINDINGS other rows (linear in the rows however many share the id)
            for n, other in uses:
                if len(others) == SHOWN_FINDINGS:
                    break
                if n != number:
                    others.append(f"{n}" if other == item_id else f"{n} as {quoted(other)}")
            more = len(uses) - 1 - len(others)
            listed = ", ".join(others) + (f" and {more:,} more" if more > 0 else "")
            problems.setdefault(number, []).append(Problem(number, "id", f"duplicate id {quoted(item_id)} (also on "
                                                           f"row {listed}); {rule}", _cut(item_id, cell_limit("id"))))
    return problems


def _cut(text: str, limit: int) -> str:
    """Return ``text`` cut to ``limit`` characters (marked, with its length) when longer, else unchanged."""
    return text if len(text) <= limit else f"{text[:limit]}... [cut: {len(text):,} characters]"


def _shown_id(item_id: str) -> str:
    return "-" if not item_id else item_id if len(item_id) <= SHOWN_ID_CHARS else f"{item_id[:SHOWN_ID_CHARS]}..."


@dataclass(frozen=True)
class _RowContext:
    base: str
    run: RunSettings
    inputs: _Inputs
    id_problems: dict[int, list[Problem]]
    strict: bool
    extra_columns: list[str]
    configs: dict[tuple, tuple] = field(default_factory=dict)  # row cells -> (config, variants, bad cells)


def _check_row(number: int, row: dict[str, str], context: _RowContext) -> tuple[Item | None, list[Problem]]:
    """Return the row's ``Item`` (None when it has an error) and its findings (errors and warnings)."""
    item_id = row["id"]
    findings = list(context.id_problems.get(number, []))
    shown_id = findings[0].item_id if findings else item_id  # cut when over the cell limit

    def add(column: str, message: str, severity: str = ERROR) -> None:
        findings.append(Problem(number, column, message, shown_id, severity))

    long_cells = [(c, len(v)) for c, v in row.items() if c != "id" and len(v) > cell_limit(c)]
    for column, length in long_cells:
        add(column, f"the {column} cell has {length:,} characters, over the limit of {cell_limit(column):,} for "
                    "this column; shorten it (keep long texts in a file and give its path)")
    if long_cells:
        return None, findings
    overrides = {c: row[c] for c in OPTIONAL_COLUMNS if row.get(c, "")}  # empty cells keep the run's value

    config, variants = _row_config(overrides, context, add)
    masks = config.masks if config else DEFAULT_MASKS
    files: dict[str, FileRef] = {}
    facts: dict[str, _Facts] = {}
    for column in FILE_COLUMNS:
        if not row[column]:
            add(column, f"the {column} cell is empty; give a path relative to the manifest, absolute, or s3://")
            continue
        uri = storage.resolve(context.base, row[column])
        found = context.inputs.facts(uri)
        if found.error:
            add(column, found.error)
            continue
        files[column], facts[column] = FileRef(uri, found.sha256), found
    shape_problems = _shape_problems(number, item_id, {c: f.shape for c, f in facts.items()})
    findings.extend(shape_problems)
    if "mask" in facts:
        grey = grey_mask_warning(facts["mask"].grey_fraction, masks.binarize_threshold)
        if grey:
            add("mask", grey, WARNING)
        _add_analysis(files, not shape_problems, config, context.inputs, add)
    if context.strict:
        findings = [f.as_error() for f in findings]
    if any(not f.is_warning for f in findings):
        return None, findings
    warnings = tuple(f"{f.column}: {f.message}" for f in findings)
    extra = {c: row.get(c, "") for c in context.extra_columns}
    return Item(id=item_id, row=number, files=files, config=config, overrides=overrides, extra=extra,
                warnings=warnings, tau_variants=variants), findings


def _row_config(overrides: dict[str, str], context: _RowContext, add) -> tuple[HarmonizeConfig | None, tuple]:
    """Return the row's config and tau variants, or (None, ()) after reporting each bad cell through ``add``.

    Rows with the same cells share one resolution (``context.configs``): resolving a config builds it through
    the preset and every override, which cost more than all other checks of an empty row together.
    """
    key = tuple(sorted(overrides.items()))
    found = context.configs.get(key)
    if found is None:
        found = context.configs[key] = _resolve_row_config(overrides, context.run)
    config, variants, bad = found
    for column, reason in bad:
        add(column, reason)
    return config, variants


def _resolve_row_config(overrides: dict[str, str], run: RunSettings) -> tuple[HarmonizeConfig | None, tuple, list]:
    """Return (config, tau variants, [(column, reason)]): (None, (), reasons) when some cell is bad."""
    bad = [(column, reason) for column, reason in ((c, check_override(c, v)) for c, v in overrides.items()) if reason]
    if bad:
        return None, (), bad
    try:
        return resolve_config(run, overrides), resolve_tau_variants(run, overrides), []
    except (ValueError, TypeError) as exc:
        return None, (), [(TAU_COLUMN if "tau" in str(exc) else next(iter(overrides), "preset"), str(exc))]


def _add_analysis(files: dict[str, FileRef], same_size: bool, config: HarmonizeConfig | None, inputs: _Inputs,
                  add) -> None:
    """Report the mask's emptiness (errors) and the composite/painting consistency (warnings) through ``add``."""
    masks = config.masks if config else DEFAULT_MASKS
    size = config.sizing.size if config else None
    try:
        mask_error = inputs.mask_error(files["mask"], masks.binarize_threshold, size)
        if mask_error:
            add("mask", mask_error)
            return
        if not (same_size and all(c in files for c in FILE_COLUMNS)):
            return
        measured = inputs.consistency(files, masks)
    except InputError as exc:
        add("mask", str(exc))
        return
    except storage.TransientStorageError as exc:
        add("mask", f"{exc} (storage unavailable; try again)")
        return
    for column, message in consistency_warnings(measured):
        add(column, message, WARNING)


def _shape_problems(number: int, item_id: str, shapes: dict[str, tuple[int, int]]) -> list[Problem]:
    """Return one problem per file whose (H, W) differs from the others: the odd one out when two agree, else each.

    A 12000 x 12000 composite beside a 700 x 500 painting and mask is the composite's problem, not theirs.
    """
    if len(set(shapes.values())) <= 1:
        return []
    common, agreeing = Counter(shapes.values()).most_common(1)[0]
    rule = "the composite, the painting and the mask must have the same size"
    problems = []
    for column, (height, width) in shapes.items():
        if agreeing > 1 and (height, width) == common:
            continue
        if agreeing > 1:
            peers = " and ".join(f"the {c}'s" for c, s in shapes.items() if s == common)
            found = f"size {width}x{height} differs from {peers} {common[1]}x{common[0]}"
        else:
            peers = " and ".join(f"the {c} is {w}x{h}" for c, (h, w) in shapes.items() if c != column)
            found = f"size {width}x{height}, while {peers}"
        problems.append(Problem(number, column, f"{found}; {rule}", item_id))
    return problems


class _InputChanged(InputError):
    """An input's bytes differ from the digest taken earlier in the same validation (the file was replaced)."""


@dataclass(frozen=True)
class _Facts:
    """What validation keeps about one input file: digest, (H, W), grey share (as a mask), or why it is unusable."""

    sha256: str = ""
    shape: tuple[int, int] = (0, 0)
    grey_fraction: float = 0.0
    error: str = ""

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> _Facts:
        return cls(sha256=record["sha256"], shape=tuple(record["shape"]), grey_fraction=float(record["grey_fraction"]),
                   error=record["error"])


class _Inputs:
    """Reads, digests and checks each distinct input once per run (paintings are often shared by many rows).

    Consults the ``InputIndex`` first: a file whose stat is unchanged and a row whose digests and settings are
    unchanged are not read. Recently read bytes are kept (up to ``BYTES_CACHE_LIMIT``) for the row checks.
    """

    def __init__(self, index: InputIndex) -> None:
        self.index = index
        self._lock = threading.Lock()
        self._key_locks: dict[tuple, threading.Lock] = {}
        self._facts: dict[str, _Facts] = {}
        self._analyses: dict[str, dict[str, Any]] = {}
        self._recent: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._recent_bytes = 0

    def facts(self, uri: str) -> _Facts:
        """Return the file's digest, (H, W) and grey share, or the reason it cannot be used."""
        with self._key_lock(("file", uri)):
            if uri not in self._facts:
                self._facts[uri] = self._find_facts(uri)
            return self._facts[uri]

    def mask_error(self, mask: FileRef, threshold: float, size: int | None) -> str:
        """Return why the mask is unusable (empty at ``threshold``, or vanishing at working ``size``), or ""."""
        settings = {"version": ANALYSIS_VERSION, "check": "mask", "uri": mask.uri, "sha256": mask.sha256,
                    "threshold": threshold, "size": size}
        return self._cached(settings, lambda: {"mask_error": self._mask_error(mask, threshold, size)})["mask_error"]

    def consistency(self, files: dict[str, FileRef], masks: MaskConfig) -> Consistency:
        """Return the composite/painting ``Consistency`` of a row whose three files are usable and the same size."""
        settings = {"version": ANALYSIS_VERSION, "check": "consistency", "masks": asdict(masks),
                    "digests": {c: f.sha256 for c, f in files.items()}, "tolerance": CHANGE_TOLERANCE_LEVELS,
                    "analysis_size": ANALYSIS_SIZE}

        def measure() -> dict[str, Any]:
            tight = decode_mask(self._bytes(files["mask"]), files["mask"].uri, masks.binarize_threshold)
            content = decode_image(self._bytes(files["content"]), files["content"].uri)
            style = decode_image(self._bytes(files["style"]), files["style"].uri)
            return {"consistency": measure_consistency(content, style, tight, masks).to_dict()}

        return Consistency(**self._cached(settings, measure)["consistency"])

    def _cached(self, settings: dict[str, Any], compute) -> dict[str, Any]:
        """Return the record of ``settings`` from this run, else the index, else ``compute()`` (then stored)."""
        key = analysis_key(settings)
        with self._key_lock(("analysis", key)):
            if key not in self._analyses:
                found = self.index.analysis(key)
                if found is None:
                    found = compute()
                    self.index.put_analysis(key, found)
                self._analyses[key] = found
            return self._analyses[key]

    def _find_facts(self, uri: str) -> _Facts:
        current = self.index.stat(uri)  # taken before reading: a change while reading shows up next time
        record = self.index.file_record(uri, current)
        try:
            if record is not None:
                facts = _Facts.from_record(record)
                if not facts.error:  # checked against today's limits: they may have been lowered since
                    check_input_bytes(current["size"], uri)
                    check_pixels(*facts.shape, uri)
                return facts
            found = current if current is not None else _stat(uri)
            if found is not None:
                check_input_bytes(found["size"], uri)  # before reading: a huge file is never read
            data = storage.read_bytes(uri)
            image = decode_image(data, uri)  # refuses a declared size over the pixel limit before decoding
        except LimitError as exc:  # depends on the limits, not only on the file: never kept in the index
            return _Facts(error=str(exc))
        except InputError as exc:
            if current is not None:  # unreadable content: keep the verdict until the file changes
                self.index.put_file_record(uri, current, _Facts(error=str(exc)).to_record())
            return _Facts(error=str(exc))
        except storage.TransientStorageError as exc:
            return _Facts(error=f"{exc} (storage unavailable; try again)")
        found = _Facts(sha256=storage.sha256_bytes(data), shape=tuple(image.shape[-2:]),
                       grey_fraction=grey_fraction(image.mean(dim=1, keepdim=True)))
        self._remember(uri, found.sha256, data)
        self.index.put_file_record(uri, current, found.to_record())
        return found

    def _mask_error(self, mask: FileRef, threshold: float, size: int | None) -> str:
        try:
            tight = decode_mask(self._bytes(mask), mask.uri, threshold)
        except _InputChanged:
            raise
        except InputError as exc:
            return str(exc)
        return _empty_at_size(tight, mask.uri, size) if size else ""

    def _bytes(self, ref: FileRef) -> bytes:
        """Return the bytes of ``ref`` (kept from the digest read when possible); ``InputError`` if they changed."""
        with self._lock:
            kept = self._recent.get(ref.uri)
            if kept is not None and kept[0] == ref.sha256:
                self._recent.move_to_end(ref.uri)
                return kept[1]
        data = storage.read_bytes(ref.uri)
        if storage.sha256_bytes(data) != ref.sha256:
            raise _InputChanged(f"{ref.uri}: changed while being validated; validate again")
        self._remember(ref.uri, ref.sha256, data)
        return data

    def _remember(self, uri: str, digest: str, data: bytes) -> None:
        if len(data) > BYTES_CACHE_LIMIT:
            return
        with self._lock:
            previous = self._recent.pop(uri, None)
            self._recent_bytes -= len(previous[1]) if previous else 0
            self._recent[uri] = (digest, data)
            self._recent_bytes += len(data)
            while self._recent_bytes > BYTES_CACHE_LIMIT:
                _, (_, dropped) = self._recent.popitem(last=False)
                self._recent_bytes -= len(dropped)

    def _key_lock(self, key: tuple) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())


def _stat(uri: str) -> dict[str, Any] | None:
    """Return ``storage.stat(uri)``, or None when it fails (the read that follows reports why)."""
    try:
        return storage.stat(uri)
    except (InputError, storage.TransientStorageError):
        return None


def _empty_at_size(mask: torch.Tensor, uri: str, size: int) -> str:
    """Return why ``mask`` vanishes at the working size (resized as ``stages.prepare_inputs`` does), or ""."""
    shape = working_shape(mask.shape[-2], mask.shape[-1], size)
    if (resize(mask, shape) > 0.5).sum() == 0:
        return f"{uri}: the mask vanishes at the working size {shape[1]}x{shape[0]}; enlarge it or raise size"
    return ""

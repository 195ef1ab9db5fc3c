"""Manifests: the CSV schema of a batch (one item per row), reading from local paths or ``s3://``, validation."""

from .schema import (
    COLUMNS,
    FILE_COLUMNS,
    OPTIONAL_COLUMNS,
    OVERRIDE_COLUMNS,
    REQUIRED_COLUMNS,
    FileRef,
    Item,
    Problem,
    RunSettings,
    check_run_settings,
    resolve_config,
)
from .validate import ValidationReport, read_rows, validate_manifest

__all__ = [
    "COLUMNS",
    "FILE_COLUMNS",
    "OPTIONAL_COLUMNS",
    "OVERRIDE_COLUMNS",
    "REQUIRED_COLUMNS",
    "FileRef",
    "Item",
    "Problem",
    "RunSettings",
    "ValidationReport",
    "check_run_settings",
    "read_rows",
    "resolve_config",
    "validate_manifest",
]

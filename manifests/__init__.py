"""Manifests: the CSV schema of a batch (one item per row), reading from local paths or ``s3://``, validation
(errors and warnings), and the input index that spares unchanged inputs a second read."""

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
    parse_tau_list,
    resolve_config,
    resolve_tau_variants,
    tau_label,
)
from .validate import ValidationReport, read_manifest, validate_manifest

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
    "parse_tau_list",
    "read_manifest",
    "resolve_config",
    "resolve_tau_variants",
    "tau_label",
    "validate_manifest",
]

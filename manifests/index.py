"""The input index: what validation learnt about each input file, kept so unchanged inputs are never read again.

Under a storage prefix (a local folder or ``s3://`` prefix) it keeps two kinds of small JSON records:

- ``files/<sha256 of the URI>.json``: ``{uri, stat, sha256, shape, grey_fraction, error}`` of one input file, where
  ``stat`` is what storage reports without reading the bytes (``storage.stat``: size + mtime locally, size + ETag +
  last-modified on S3). A record is reused only while the file's current stat equals the stored one.
- ``analyses/<key>.json``: a row's content checks, keyed by a digest of the inputs' sha256 digests and every
  setting the check depends on: the mask's emptiness (mask, threshold, working size) and the consistency
  measurements (the three digests, the mask settings). An unchanged row costs stats and small JSON reads only; a
  new working size re-reads the masks alone.

The index is a cache: a missing, unreadable or foreign record is a miss, and a failure to write one is logged and
otherwise ignored (validation never depends on it). Thread-safe: records are written atomically by storage and
in-memory state is guarded by a lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from typing import Any

from harmonize_core.errors import InputError
from tasks import storage

INDEX_VERSION = 1  # bump when a record's meaning changes: older records are then ignored
FILES_DIR, ANALYSES_DIR = "files", "analyses"
_log = logging.getLogger(__name__)


def analysis_key(settings: dict[str, Any]) -> str:
    """Return the sha256 hex of a JSON-able ``settings`` dict (digests and parameters of one row's checks)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


class InputIndex:
    """File and analysis records under ``prefix``; every method is a no-op miss when ``prefix`` is None."""

    def __init__(self, prefix: str | None) -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._warned = False

    def stat(self, uri: str) -> dict[str, Any] | None:
        """Return ``storage.stat(uri)`` (None when missing, or when there is no index: nothing to compare with)."""
        if self.prefix is None:
            return None
        try:
            return storage.stat(uri)
        except (InputError, storage.TransientStorageError):
            return None  # the read that follows reports the problem

    def file_record(self, uri: str, current: dict[str, Any] | None) -> dict[str, Any] | None:
        """Return the stored record of ``uri`` when its stat equals ``current``, else None."""
        if self.prefix is None or current is None:
            return None
        record = self._read(self._file_uri(uri))
        if record is None or record.get("uri") != uri or record.get("stat") != current:
            return None
        return record

    def put_file_record(self, uri: str, current: dict[str, Any] | None, facts: dict[str, Any]) -> None:
        """Store ``facts`` about ``uri`` with the stat taken before it was read (nothing without a stat)."""
        if self.prefix is not None and current is not None:
            self._write(self._file_uri(uri), {"uri": uri, "stat": current, **facts})

    def analysis(self, key: str) -> dict[str, Any] | None:
        """Return the stored analysis under ``key`` (see ``analysis_key``), or None."""
        return None if self.prefix is None else self._read(storage.join(self.prefix, ANALYSES_DIR, f"{key}.json"))

    def put_analysis(self, key: str, record: dict[str, Any]) -> None:
        """Store one row's analysis under ``key``."""
        if self.prefix is not None:
            self._write(storage.join(self.prefix, ANALYSES_DIR, f"{key}.json"), record)

    def _file_uri(self, uri: str) -> str:
        return storage.join(self.prefix, FILES_DIR, f"{hashlib.sha256(uri.encode()).hexdigest()}.json")

    @staticmethod
    def _read(uri: str) -> dict[str, Any] | None:
        try:
            record = json.loads(storage.read_bytes(uri))
        except (InputError, storage.TransientStorageError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("version") != INDEX_VERSION:
            return None
        return record

    def _write(self, uri: str, record: dict[str, Any]) -> None:
        try:
            storage.write_bytes(uri, json.dumps({"version": INDEX_VERSION, **record}, sort_keys=True).encode())
        except (InputError, storage.TransientStorageError, OSError) as exc:
            with self._lock:
                first, self._warned = not self._warned, True
            if first:  # one line per run: the index is a cache, validation goes on without it
                _log.warning("input index %s not written (%s); unchanged inputs will be read again next time",
                             self.prefix, exc)

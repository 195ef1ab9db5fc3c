"""A Prefect lock manager backed by the output storage itself, so every worker on every machine shares it.

Prefect's SERIALIZABLE transactions take a lock per cache key before they look for a cached record: with this lock
manager two workers (or two runs) that reach the same stage key at once never both compute it: the first computes
and commits the record, the second waits and then finds the record (a cache hit).

Why not Prefect's ``FileSystemLockManager`` or ``prefect-redis``: the file-system manager only works on one host
and its locks never expire when a worker dies; Redis would add a third shared service, while the fleet's only
shared state is the output storage and the Prefect server. So the lock is an object next to the cache records:

- local outputs: ``<out>/.cache/locks/<key>.lock`` created with ``O_EXCL`` semantics (a hard link of a complete
  temporary file, so the lock never exists half-written);
- ``s3://`` outputs: the same key created with a conditional PUT (``If-None-Match: *``), renewed and taken over
  with ``If-Match`` on its ETag.

Each lock is a **lease**: its holder renews it every third of ``lease_seconds`` from a background thread; a lock
whose last renewal is older than the lease (a killed worker, a lost machine) counts as free and the next waiter
takes it over. Ages are read on the storage's own clock (file mtime against the local clock; S3 ``LastModified``
against the ``Date`` of the same response), so machines with skewed clocks agree. Correctness never depends on the
lock: stage outputs are content-addressed and written atomically, so in the worst case (a lease lost to a frozen
process) a stage is computed twice, never wrongly.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

from . import storage

LOCKS_DIR = "locks"  # under <out>/.cache
LEASE_ENV = "HARMONIZE_LOCK_LEASE_SECONDS"
DEFAULT_LEASE_SECONDS = 90.0
RENEWALS_PER_LEASE = 3
POLL_SECONDS = (0.2, 1.0)  # waiting for a lock: first poll, then backing off up to this
PRECONDITION_FAILED = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
logger = logging.getLogger(__name__)


def lease_seconds() -> float:
    """Return the lease length: ``$HARMONIZE_LOCK_LEASE_SECONDS`` or 90 s."""
    return float(os.environ.get(LEASE_ENV) or DEFAULT_LEASE_SECONDS)


@dataclass(frozen=True)
class Lease:
    """A lock object as read from storage: who holds it, its version tag, and seconds since its last renewal."""

    holder: str
    tag: str
    age: float


class _LocalLeases:
    """Lease primitives on a local (or network-mounted) folder."""

    resolution = 0.0  # mtimes have sub-second precision

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.lock"

    def create(self, key: str, body: bytes) -> str | None:
        """Create the lock atomically if absent; return its tag, or None when it already exists."""
        self.folder.mkdir(parents=True, exist_ok=True)
        temp = self.folder / f".{key}.{os.getpid()}.{threading.get_ident()}.{random.getrandbits(32):08x}.tmp"
        temp.write_bytes(body)
        try:
            os.link(temp, self.path(key))  # fails if the lock exists: O_EXCL with the content already in place
        except FileExistsError:
            return None
        finally:
            temp.unlink(missing_ok=True)
        return self._tag(self.path(key))

    def read(self, key: str) -> Lease | None:
        path = self.path(key)
        try:
            body = path.read_bytes()
            stat = path.stat()
        except FileNotFoundError:
            return None
        return Lease(_holder_of(body), self._tag(path, stat), time.time() - stat.st_mtime)

    def renew(self, key: str, lease: Lease) -> str | None:
        """Refresh the lock's clock if it is still ``lease``; return the new tag or None when it changed."""
        path = self.path(key)
        try:
            if self._tag(path) != lease.tag:
                return None
            os.utime(path)
            return self._tag(path)
        except FileNotFoundError:
            return None

    def take_over(self, key: str, stale: Lease, body: bytes) -> str | None:
        """Replace a stale lock by ours; return our tag, or None when someone else was quicker or it was renewed."""
        path = self.path(key)
        grave = self.folder / f".{key}.stale.{os.getpid()}.{threading.get_ident()}"
        try:
            os.rename(path, grave)  # atomic: only one contender moves this very file away
        except FileNotFoundError:
            return None
        try:
            if self._tag(grave) != stale.tag:  # renewed between our read and the rename: put it back
                try:
                    os.link(grave, path)
                except FileExistsError:
                    pass
                return None
        finally:
            grave.unlink(missing_ok=True)
        return self.create(key, body)

    def delete(self, key: str, lease: Lease) -> None:
        path = self.path(key)
        try:
            if self._tag(path) == lease.tag:
                path.unlink()
        except FileNotFoundError:
            pass

    @staticmethod
    def _tag(path: Path, stat: os.stat_result | None = None) -> str:
        stat = stat or path.stat()
        return f"{stat.st_ino}-{stat.st_mtime_ns}"


class _S3Leases:
    """Lease primitives on an S3 prefix (conditional writes: ``If-None-Match`` to create, ``If-Match`` to change)."""

    resolution = 1.0  # LastModified and Date have whole seconds: an age may read up to 1 s high

    def __init__(self, prefix: str) -> None:
        self.bucket, self.prefix = storage.split_s3(prefix)

    def _key(self, key: str) -> str:
        return f"{self.prefix.rstrip('/')}/{key}.lock"

    def create(self, key: str, body: bytes) -> str | None:
        return self._put(key, body, IfNoneMatch="*")

    def read(self, key: str) -> Lease | None:
        try:
            answer = storage.s3_client().get_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            if _code(exc) in {"NoSuchKey", "404", "NotFound"}:
                return None
            raise storage.classify(exc, self._key(key)) from exc
        body = answer["Body"].read()
        date = answer["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        server_now = parsedate_to_datetime(date) if date else datetime.now(UTC)
        return Lease(_holder_of(body), answer["ETag"], (server_now - answer["LastModified"]).total_seconds())

    def renew(self, key: str, lease: Lease) -> str | None:
        return self._put(key, _body(lease.holder), IfMatch=lease.tag)

    def take_over(self, key: str, stale: Lease, body: bytes) -> str | None:
        return self._put(key, body, IfMatch=stale.tag)

    def delete(self, key: str, lease: Lease) -> None:
        try:
            storage.s3_client().delete_object(Bucket=self.bucket, Key=self._key(key), IfMatch=lease.tag)
        except Exception as exc:
            if _code(exc) not in PRECONDITION_FAILED | {"NoSuchKey", "404"}:
                raise storage.classify(exc, self._key(key)) from exc

    def _put(self, key: str, body: bytes, **condition: str) -> str | None:
        try:
            answer = storage.s3_client().put_object(Bucket=self.bucket, Key=self._key(key), Body=body, **condition)
        except Exception as exc:
            if _code(exc) in PRECONDITION_FAILED or (condition.get("IfMatch") and _code(exc) in {"NoSuchKey", "404"}):
                return None
            raise storage.classify(exc, self._key(key)) from exc
        return answer["ETag"]


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _body(holder: str) -> bytes:
    return json.dumps({"holder": holder, "host": socket.gethostname(), "pid": os.getpid(),
                       "since": time.time()}).encode()


def _holder_of(body: bytes) -> str:
    try:
        return str(json.loads(body).get("holder", ""))
    except (ValueError, AttributeError):
        return ""


class StorageLockManager:
    """Prefect ``LockManager`` whose locks are leased objects under ``<out>/.cache/locks`` (see the module doc).

    Shared by deep copies (Prefect copies cache policies): the held leases and their renewal thread belong to one
    instance per output location and process.
    """

    def __init__(self, out: str, lease: float | None = None) -> None:
        root = storage.join(storage.cache_uri(out), LOCKS_DIR)
        self.root = root
        self.lease = lease or lease_seconds()
        self._backend = _S3Leases(root) if storage.is_s3(root) else _LocalLeases(storage.local_path(root))
        self._held: dict[str, Lease] = {}
        self._guard = threading.Lock()
        self._renewer: threading.Thread | None = None
        self._stop = threading.Event()

    def __deepcopy__(self, memo: dict) -> StorageLockManager:
        return self

    # -- the LockManager protocol ---------------------------------------------------------------------------------
    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        """Return True once ``holder`` holds ``key`` (waiting while another live holder has it), False on timeout."""
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        pause = POLL_SECONDS[0]
        while True:
            if self.is_lock_holder(key, holder):
                return True
            if self._try_take(key, holder):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(pause * random.uniform(0.8, 1.2))
            pause = min(pause * 2, POLL_SECONDS[1])

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        """Async form of ``acquire_lock`` (runs it in a worker thread)."""
        import anyio

        return await anyio.to_thread.run_sync(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        """Give up ``key`` if ``holder`` holds it (a lease lost meanwhile is only logged: the work is done)."""
        with self._guard:
            lease = self._held.pop(key, None)
        if lease is None or lease.holder != holder:
            if lease is not None:
                with self._guard:
                    self._held[key] = lease
            return
        self._backend.delete(key, lease)

    def is_locked(self, key: str) -> bool:
        """Return True when a live (recently renewed) lease on ``key`` exists."""
        lease = self._backend.read(key)
        return lease is not None and not self._lapsed(lease)

    def is_lock_holder(self, key: str, holder: str) -> bool:
        """Return True when this process holds ``key`` for ``holder``."""
        with self._guard:
            lease = self._held.get(key)
        return lease is not None and lease.holder == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Return True once ``key`` is free (or its lease lapsed), False after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = POLL_SECONDS[0]
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, POLL_SECONDS[1])
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Async form of ``wait_for_lock``."""
        import anyio

        return await anyio.to_thread.run_sync(self.wait_for_lock, key, timeout)

    # -- leases -----------------------------------------------------------------------------------------------------
    def _try_take(self, key: str, holder: str) -> bool:
        body = _body(holder)
        tag = self._backend.create(key, body)
        if tag is None:
            current = self._backend.read(key)
            if current is None:
                return False  # released between our create and read: the next round creates it
            if not self._lapsed(current):
                return False
            logger.warning("lock %s: taking over from %s, silent for %.0f s (lease %.0f s)", key, current.holder,
                           current.age, self.lease)
            tag = self._backend.take_over(key, current, body)
            if tag is None:
                return False
        with self._guard:
            self._held[key] = Lease(holder, tag, 0.0)
        self._ensure_renewer()
        return True

    def _lapsed(self, lease: Lease) -> bool:
        return lease.age > self.lease + self._backend.resolution

    def _ensure_renewer(self) -> None:
        with self._guard:
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(target=self._renew_forever, name="harmonize-lock-renewer",
                                                 daemon=True)
                self._renewer.start()

    def _renew_forever(self) -> None:
        while not self._stop.wait(self.lease / RENEWALS_PER_LEASE):
            self.renew_all()

    def renew_all(self) -> None:
        """Renew every lease this process holds (the background thread calls this every third of a lease)."""
        with self._guard:
            held = dict(self._held)
        for key, lease in held.items():
            try:
                tag = self._backend.renew(key, lease)
            except Exception as exc:  # noqa: BLE001 - a failed renewal is retried next round
                logger.warning("lock %s: renewal failed (%s); retrying", key, exc)
                continue
            with self._guard:
                if self._held.get(key) is not lease:
                    continue  # released meanwhile
                if tag is None:
                    logger.warning("lock %s: lease lost to another worker; this stage may be computed twice", key)
                    self._held.pop(key, None)
                else:
                    self._held[key] = Lease(lease.holder, tag, 0.0)

    def held(self) -> list[str]:
        """Return the keys this process holds now (for tests and diagnostics)."""
        with self._guard:
            return sorted(self._held)


_MANAGERS: dict[str, StorageLockManager] = {}
_MANAGERS_GUARD = threading.Lock()


def lock_manager_for(out: str) -> StorageLockManager:
    """Return this process's ``StorageLockManager`` for output location ``out`` (one per location)."""
    root = storage.cache_uri(out)
    with _MANAGERS_GUARD:
        if root not in _MANAGERS:
            _MANAGERS[root] = StorageLockManager(out)
        return _MANAGERS[root]

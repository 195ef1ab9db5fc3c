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

A lock's body records who took it: the host and process, when, and the run, item and stage (``tasks.waits``). A
stage that waits for a lock says so on its progress line, naming that holder, how long it has held the lock and when
its lease lapses (a rerun behind a killed run's lock waits up to one lease, and says that is what it waits for).
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

from tasks import storage, waits

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
    """A lock object as read from storage: who holds it, its version tag, seconds since its last renewal, and its
    body (JSON: holder, host, pid, since, and the run, item and stage that took it, see ``_body``)."""

    holder: str
    tag: str
    age: float
    body: bytes = b""

    @property
    def info(self) -> dict:
        """Return the parsed body ({} when it is not a JSON object)."""
        return _parse(self.body)


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
        return Lease(_holder_of(body), self._tag(path, stat), time.time() - stat.st_mtime, body)

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
        return Lease(_holder_of(body), answer["ETag"], (server_now - answer["LastModified"]).total_seconds(), body)

    def renew(self, key: str, lease: Lease) -> str | None:
        return self._put(key, lease.body or _body(lease.holder), IfMatch=lease.tag)  # the body as first written

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
    """Return a new lock's body: the holder, this process, the time, and the stage call taking it (``tasks.waits``),
    so that a stage waiting for it can say whose it is."""
    scope = waits.current()
    stage_call = {"run": scope.run_id, "who": scope.who, "stage": scope.stage} if scope else {}
    return json.dumps({"holder": holder, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
                       **stage_call}).encode()


def _parse(body: bytes) -> dict:
    try:
        info = json.loads(body)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _holder_of(body: bytes) -> str:
    return str(_parse(body).get("holder", ""))


def describe_holder(lease: Lease) -> str:
    """Return whose a lock is, from its body: ``run <id> (item 1/4 a dilate, pid 812 on host-a)``; a body without
    a run (another tool, an older version) gives ``pid 812 on host-a``, an unreadable one ``an unknown holder``."""
    info = lease.info
    process = f"pid {info['pid']} on {info.get('host') or 'an unknown host'}" if info.get("pid") else ""
    scope = waits.current()
    if info.get("run"):
        run = "this run" if scope is not None and info["run"] == scope.run_id else f"run {info['run']}"
        stage_call = " ".join(str(info[k]) for k in ("who", "stage") if info.get(k))
        return f"{run} ({', '.join(p for p in (stage_call, process) if p)})"
    return process or "an unknown holder"


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
        wait = _LockWait(self, key)
        while True:
            if self.is_lock_holder(key, holder):
                return True
            taken, blocking = self._try_take(key, holder)
            if taken:
                wait.done()
                return True
            wait.blocked_by(blocking)
            if deadline is not None and time.monotonic() >= deadline:
                wait.done()
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
    def _try_take(self, key: str, holder: str) -> tuple[bool, Lease | None]:
        """Return (True, None) once ``holder`` holds ``key``, else (False, the live lease in the way or None)."""
        body = _body(holder)
        tag = self._backend.create(key, body)
        if tag is None:
            current = self._backend.read(key)
            if current is None:
                return False, None  # released between our create and read: the next round creates it
            if not self._lapsed(current):
                return False, current
            logger.warning("lock %s: taking over from %s, silent for %.0f s (lease %.0f s)", key, current.holder,
                           current.age, self.lease)
            tag = self._backend.take_over(key, current, body)
            if tag is None:
                return False, None
            waits.announce(f"took over its stage lock from {describe_holder(current)}, silent for "
                           f"{current.age:.0f} s (lease {self.lease:.0f} s)")
        with self._guard:
            self._held[key] = Lease(holder, tag, 0.0, body)
        self._ensure_renewer()
        return True, None

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
                    self._held[key] = Lease(lease.holder, tag, 0.0, lease.body)

    def held(self) -> list[str]:
        """Return the keys this process holds now (for tests and diagnostics)."""
        with self._guard:
            return sorted(self._held)


class _LockWait:
    """One ``acquire_lock`` call's wait: said on the stage call's line (``tasks.waits``) once it lasts
    ``NOTICE_SECONDS`` and every ``REMIND_SECONDS`` after, naming the holder, how long it has held the lock and when
    its lease lapses; its seconds and holder go to the stage call's ``StageWaits`` when it ends."""

    def __init__(self, manager: StorageLockManager, key: str) -> None:
        self.manager, self.key = manager, key
        self.started: float | None = None
        self.next_notice = waits.NOTICE_SECONDS
        self.holder = ""

    def blocked_by(self, lease: Lease | None) -> None:
        """Note one round in which the lock was not free (``lease``: the live lease in the way, when read)."""
        now = time.monotonic()
        if self.started is None:
            self.started = now
        if lease is None:
            return
        self.holder = describe_holder(lease)
        if now - self.started >= self.next_notice:
            self.next_notice += waits.REMIND_SECONDS
            since = lease.info.get("since")
            held = f" for {max(0.0, time.time() - since):.0f} s" if isinstance(since, (int, float)) else ""
            lapses = max(0.0, self.manager.lease + self.manager._backend.resolution - lease.age)
            waits.announce(f"waiting for its stage lock, held by {self.holder}{held}: last renewed {lease.age:.0f} s "
                           f"ago, so it lapses in {lapses:.0f} s unless renewed (lease {self.manager.lease:.0f} s)")

    def done(self) -> None:
        """Add the seconds waited (if any) and the holder to the current stage call."""
        scope = waits.current()
        if self.started is not None and scope is not None:
            scope.lock_s += time.monotonic() - self.started
            scope.lock_holder = self.holder


_MANAGERS: dict[str, StorageLockManager] = {}
_MANAGERS_GUARD = threading.Lock()


def lock_manager_for(out: str) -> StorageLockManager:
    """Return this process's ``StorageLockManager`` for output location ``out`` (one per location)."""
    root = storage.cache_uri(out)
    with _MANAGERS_GUARD:
        if root not in _MANAGERS:
            _MANAGERS[root] = StorageLockManager(out)
        return _MANAGERS[root]

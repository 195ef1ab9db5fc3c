"""One storage layer for local paths (the default) and ``s3://bucket/key`` URIs.

Every read and write of the pipeline goes through here, so that:

- writes are atomic: a temporary name then ``os.replace`` locally, a single PUT on S3, so a half-written output is
  never mistaken for a finished one;
- errors are classified once: a missing object, a bad bucket or a refused permission is the user's to fix and
  becomes ``InputError`` (never retried); a dropped connection, a timeout, throttling or a 5xx becomes
  ``TransientStorageError`` (a ``ConnectionError``, retried with backoff by the tasks);
- S3 goes through ``boto3.client("s3")`` with no endpoint argument, so AWS, MinIO, moto or s3rver differ only in
  the standard environment (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, credentials, region);
- output locations come from ``uri_for`` alone, so no URI literal is repeated anywhere.

Objects written here carry their sha256 (S3 user metadata ``sha256``), so ``digest`` is a HEAD on S3. The stage
locks live in the same storage (``tasks.storage.locks``). This package imports no other part of the pipeline but
``tasks.waits`` (where a lock wait is said), so ``manifests`` can use it.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from pathlib import Path, PurePosixPath

from harmonize_core.errors import InputError

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"
DIGEST_METADATA = "sha256"  # S3 user metadata key holding the object's content digest
CACHE_DIR = ".cache"  # under the output location: Prefect's cache records (see tasks.caching)
OBJECTS_DIR = "objects"  # under CACHE_DIR: immutable stage outputs named by their sha256
RUNS_DIR = "runs"  # under the output location: one folder per flow run (summary.csv, report, finished rows)
ROWS_DIR = "items"  # under a run's folder: one JSON per finished item (written the moment it finishes)
# Item ids become folder names under the output location: letters, digits, '.', '_', '-' only, never '..'.
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# The environment a client is built from: a change (tests, a new endpoint) builds a new client.
_CLIENT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_PROFILE",
               "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")
_S3_NOT_FOUND = {"NoSuchKey", "NotFound", "404", "NoSuchBucket"}
_S3_TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestLimitExceeded",
                 "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}
_HTTP_SERVER_ERROR = 500
_UMASK = os.umask(0)  # read once (os.umask can only be read by setting it): mkstemp files are 0600, ours follow it
os.umask(_UMASK)


class TransientStorageError(ConnectionError):
    """A storage failure that may pass on retry: connection dropped, timeout, throttling, a 5xx answer."""


def is_s3(uri: str) -> bool:
    """Return True for an ``s3://bucket/key`` URI."""
    return str(uri).startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """Return ``(bucket, key)`` of an ``s3://`` URI; ``InputError`` when the bucket is missing."""
    bucket, _, key = str(uri)[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise InputError(f"{uri}: an s3 URI needs a bucket, e.g. s3://bucket/path")
    return bucket, key


def _local(uri: str | Path) -> Path:
    text = str(uri)
    return Path(text.removeprefix(FILE_SCHEME))


def join(base: str, *parts: str) -> str:
    """Return ``base`` with ``parts`` appended by ``/`` (S3) or the OS separator (local)."""
    if is_s3(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(_local(base).joinpath(*parts))


def parent(uri: str) -> str:
    """Return the folder (local) or prefix (S3, without trailing slash) that holds ``uri``."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        folder = str(PurePosixPath(key).parent)
        return f"{S3_SCHEME}{bucket}" if folder in ("", ".") else f"{S3_SCHEME}{bucket}/{folder}"
    return str(_local(uri).parent)


def resolve(base: str, path: str) -> str:
    """Return ``path`` as a URI: ``s3://`` and absolute paths as given, relative ones joined to ``base``."""
    path = str(path).strip()
    if is_s3(path) or path.startswith(FILE_SCHEME) or os.path.isabs(path):
        return path
    if is_s3(base):
        bucket, key = split_s3(join(base, path))
        normal = os.path.normpath("/" + key).lstrip("/")  # fold "a/../b" the way a local path would
        return f"{S3_SCHEME}{bucket}/{normal}"
    return os.path.normpath(join(base, path))


def check_item_id(item_id: str) -> str:
    """Return ``item_id`` when it is safe as a folder name under the output location; ``InputError`` otherwise."""
    if not SAFE_ID.fullmatch(item_id or "") or ".." in item_id:
        raise InputError(f"unsafe item id {item_id!r}: use 1-128 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit and never containing '..'")
    return item_id


def uri_for(out: str, item_id: str, stage: str, ext: str, variant: str = "") -> str:
    """Return the URI of one item's stage output: ``<out>/<item_id>[/<variant>]/<stage>.<ext>`` (built only here).

    ``variant`` names a style-level variant's folder (``tau-5``) for the stages that differ per variant.
    """
    parts = [check_item_id(item_id), *([check_item_id(variant)] if variant else []), f"{stage}.{ext}"]
    return join(out, *parts)


def object_uri(out: str, sha256: str, ext: str) -> str:
    """Return ``<out>/.cache/objects/<sha256>.<ext>``: where a stage output lives under its content digest."""
    return join(out, CACHE_DIR, OBJECTS_DIR, f"{sha256}.{ext}")


def row_uri(out: str, run_id: str, item_id: str, variant: str = "") -> str:
    """Return ``<out>/runs/<run_id>/items/<item_id>[__<variant>].json``, one finished summary row."""
    name = f"{check_item_id(item_id)}__{check_item_id(variant)}" if variant else check_item_id(item_id)
    return run_uri(out, run_id, f"{ROWS_DIR}/{name}.json")


def run_uri(out: str, run_id: str, name: str) -> str:
    """Return ``<out>/runs/<run_id>/<name>``, where a flow run writes its summary (``name`` may hold ``/``)."""
    return join(out, RUNS_DIR, check_item_id(run_id), *name.split("/"))


def cache_uri(out: str) -> str:
    """Return ``<out>/.cache``, the folder or prefix holding the stage cache records."""
    return join(out, CACHE_DIR)


def sha256_bytes(data: bytes) -> str:
    """Return the sha256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


_client_lock = threading.Lock()
_clients: dict[tuple, object] = {}


def s3_client():
    """Return a boto3 S3 client built from the current environment (one per distinct endpoint/credentials)."""
    import boto3

    key = tuple(os.environ.get(name) for name in _CLIENT_ENV)
    with _client_lock:  # boto3's default session is not thread-safe to build clients from
        if key not in _clients:
            _clients[key] = boto3.client("s3")
        return _clients[key]


def classify(exc: BaseException, uri: str) -> BaseException:
    """Return ``exc`` as ``InputError`` (permanent: missing, forbidden, bad request) or ``TransientStorageError``.

    Exceptions that are neither storage nor botocore errors are returned unchanged.
    """
    from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _S3_TRANSIENT or status >= _HTTP_SERVER_ERROR:
            return TransientStorageError(f"{uri}: storage answered {code or status}; will retry")
        if code in _S3_NOT_FOUND:
            return InputError(f"{uri}: not found (check the path, the bucket and AWS_ENDPOINT_URL)")
        return InputError(f"{uri}: storage refused the request ({code or status}: check credentials and bucket)")
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return TransientStorageError(f"{uri}: {exc.__class__.__name__}: {exc}")
    if isinstance(exc, BotoCoreError):
        return InputError(f"{uri}: {exc} (check the S3 configuration)")
    return exc


def _local_error(exc: OSError, path: Path) -> BaseException:
    if isinstance(exc, FileNotFoundError):
        return InputError(f"{path}: file not found")
    if isinstance(exc, IsADirectoryError):
        return InputError(f"{path}: is a directory, expected a file")
    if isinstance(exc, (PermissionError, NotADirectoryError)):
        return InputError(f"{path}: {exc.strerror} (check the path and its permissions)")
    return exc


def read_bytes(uri: str) -> bytes:
    """Return the bytes stored at ``uri``; ``InputError`` if missing, ``TransientStorageError`` if flaky."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            raise classify(exc, uri) from exc
    path = _local(uri)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _local_error(exc, path) from None


def write_bytes(uri: str, data: bytes) -> str:
    """Write ``data`` to ``uri`` atomically and return its sha256 hex digest (stored with it on S3)."""
    digest = sha256_bytes(data)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, Metadata={DIGEST_METADATA: digest})
        except Exception as exc:
            raise classify(exc, uri) from exc
        return digest
    path = _local(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            os.fchmod(stream.fileno(), 0o666 & ~_UMASK)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return digest


def exists(uri: str) -> bool:
    """Return True when an object or file exists at ``uri``."""
    return digest(uri, compute=False) is not None


def _head(uri: str) -> dict | None:
    """Return the S3 HEAD answer of ``uri``, or None when there is no such object."""
    bucket, key = split_s3(uri)
    try:
        return s3_client().head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        error = classify(exc, uri)
        if isinstance(error, InputError) and "not found" in str(error):
            return None
        raise error from exc


def digest(uri: str, compute: bool = True) -> str | None:
    """Return the sha256 hex of the object at ``uri``, or None if there is none.

    S3: the ``sha256`` metadata written by ``write_bytes`` (a HEAD); objects written by other tools are downloaded
    and hashed when ``compute``. ``compute=False`` only tests existence (returns "" for an object without digest).
    """
    if is_s3(uri):
        head = _head(uri)
        if head is None:
            return None
        stored = head.get("Metadata", {}).get(DIGEST_METADATA)
        return stored or (sha256_bytes(read_bytes(uri)) if compute else "")
    path = _local(uri)
    if not path.is_file():
        return None
    return sha256_bytes(path.read_bytes()) if compute else ""


def copy(source: str, target: str) -> str:
    """Copy the object at ``source`` to ``target`` (atomically, keeping the digest) and return its sha256.

    Between two ``s3://`` URIs the copy is server-side (no download), carrying the stored digest along.
    """
    if is_s3(source) and is_s3(target):
        stored = digest(source)
        if stored is None:
            raise InputError(f"{source}: not found (check the path, the bucket and AWS_ENDPOINT_URL)")
        (bucket, key), (source_bucket, source_key) = split_s3(target), split_s3(source)
        try:
            s3_client().copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": source_bucket, "Key": source_key},
                                    Metadata={DIGEST_METADATA: stored}, MetadataDirective="REPLACE")
        except Exception as exc:
            raise classify(exc, target) from exc
        return stored
    return write_bytes(target, read_bytes(source))


def put_if_absent(uri: str, data: bytes) -> str:
    """Write ``data`` at ``uri`` unless an object is already there (content-addressed objects); return the sha256."""
    if not exists(uri):
        return write_bytes(uri, data)
    return sha256_bytes(data)


def list_uris(prefix: str) -> list[str]:
    """Return the URIs of all files/objects under ``prefix`` (recursive), sorted."""
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        found: list[str] = []
        try:
            for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                found.extend(f"{S3_SCHEME}{bucket}/{item['Key']}" for item in page.get("Contents", []))
        except Exception as exc:
            raise classify(exc, prefix) from exc
        return sorted(found)
    root = _local(prefix)
    return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def delete(uri: str) -> None:
    """Remove the object or file at ``uri`` if it exists."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().delete_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise classify(exc, uri) from exc
        return
    _local(uri).unlink(missing_ok=True)


def local_path(uri: str) -> Path:
    """Return the absolute local path of a non-S3 URI (``file://`` stripped)."""
    if is_s3(uri):
        raise ValueError(f"{uri} is not a local path")
    return _local(uri).resolve()


def fetch_to_local(uri: str, cache_dir: Path) -> Path:
    """Return a local path holding the object at ``uri``: local paths as they are, S3 objects downloaded once.

    The local copy is named by the object's digest, so a changed object is downloaded again.
    """
    if not is_s3(uri):
        return local_path(uri)
    remote_digest = digest(uri)
    if remote_digest is None:
        raise InputError(f"{uri}: not found (check the path, the bucket and AWS_ENDPOINT_URL)")
    target = Path(cache_dir) / remote_digest / PurePosixPath(split_s3(uri)[1]).name
    if not target.is_file():
        data = read_bytes(uri)
        write_bytes(str(target), data)
    return target


def stat(uri: str) -> dict | None:
    """Return what storage reports about ``uri`` without reading it, or None when there is no file/object.

    S3: a HEAD, ``{"size", "etag", "last_modified"}`` (ISO 8601); local: ``{"size", "mtime_ns"}``. Two equal stats
    mean an unchanged input (the input index reuses its digest). Other failures raise as ``read_bytes`` does.
    """
    if is_s3(uri):
        head = _head(uri)
        if head is None:
            return None
        modified = head.get("LastModified")
        return {"size": int(head.get("ContentLength", 0)), "etag": str(head.get("ETag", "")),
                "last_modified": modified.isoformat() if modified is not None else ""}
    import stat as stat_mode

    path = _local(uri)
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise _local_error(exc, path) from None
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns} if stat_mode.S_ISREG(info.st_mode) else None

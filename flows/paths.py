"""Paths that mean the same in every process of a run: made absolute where the command is typed, checked where used.

A run hands its manifest, its output location, its input files and its weights file to other processes: the flow-run
process a Prefect worker starts in a temporary working folder, a worker on another machine, a scheduled run next
night. A relative path would be resolved there against the wrong folder (or the wrong machine), so:

- the ``harmonize`` commands make every local path absolute against the folder they were typed in
  (``absolute_location``, ``absolute_weights``), and refuse, in one line, what is neither a local path nor ``s3://``;
- a pooled run warns once when it hands local paths to workers that may not share the disk (``local_paths_warning``);
- the coordinator of a pooled run leaves a marker in the run's folder (``write_pool_marker``) and the shard flow on
  each worker checks that it sees it (``pool_marker_problem``) before it computes anything, so a worker that cannot
  see the output folder fails the shard with one line instead of computing into a folder nobody will read;
- flows run by a deployment refuse relative paths (``relative_path_problem``) instead of resolving them against the
  worker's temporary folder.

Nothing here imports Prefect at module level: ``harmonize validate`` stays free of it.
"""

from __future__ import annotations

import json
import os
import re
import socket
from typing import Any

from harmonize_core.errors import InputError
from tasks import storage

from .text import one_line

POOL_MARKER = "pool.json"  # under <out>/runs/<run_id>/: written by the coordinator before any shard starts
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
WEIGHTS_CONVENTION_MARK = "#"  # harmonize_core.network.weights.CONVENTION_MARK ("<file>#caffe")
WEIGHTS_RANDOM_PREFIX = "random:"  # harmonize_core.network.weights.RANDOM_PREFIX
SHARED_DISK_HINT = "give s3:// URIs, or put them on a disk every worker mounts at the same path"


def absolute_location(value: str, what: str) -> str:
    """Return ``value`` as a location every process reads the same way: an ``s3://`` URI as given, a local path
    made absolute against the current folder (``~`` expanded, ``file://`` dropped).

    Raises ``InputError`` naming ``what`` (``--out``, ``manifest``) for an empty value or another URI scheme.
    """
    text = str(value).strip()
    if not text:
        raise InputError(f"{what}: empty path: give a local path or an s3:// URI")
    if storage.is_s3(text):
        if not text[len(storage.S3_SCHEME):].partition("/")[0]:
            raise InputError(f"{what} {text}: an s3 URI needs a bucket, e.g. s3://bucket/path")
        return text
    if text.startswith(storage.FILE_SCHEME):
        text = text[len(storage.FILE_SCHEME):]
    elif SCHEME.match(text):
        raise InputError(f"{what} {text}: only local paths and s3:// URIs are supported")
    return os.path.abspath(os.path.expanduser(text))


def split_weights(source: str) -> tuple[str, str]:
    """Return ``(body, suffix)`` of a ``--weights`` source: ``("w.pth", "#caffe")`` for ``w.pth#caffe``, the source
    and ``""`` when it has no input-convention suffix (the core's own rule, ``harmonize_core.network.weights``)."""
    from harmonize_core.network.preprocessing import PREPROCESSINGS

    text = source.strip()
    body, mark, convention = text.rpartition(WEIGHTS_CONVENTION_MARK)
    return (body, f"{mark}{convention}") if mark and convention in PREPROCESSINGS else (text, "")


def is_local_weights_file(source: str) -> bool:
    """Return True when a ``--weights`` source names a local file (not a registered name, ``random:``, ``s3://``)."""
    from harmonize_core.network.weights import REGISTERED_NAMES

    body = split_weights(source)[0]
    return not (body in REGISTERED_NAMES or body.startswith(WEIGHTS_RANDOM_PREFIX) or SCHEME.match(body))


def absolute_weights(source: str | None) -> str | None:
    """Return a ``--weights`` source with a local file's path made absolute (its ``#caffe``-style suffix kept);
    names (``offline-vgg16``, ``imagenet``), ``random:<seed>`` and ``s3://`` URIs unchanged; None stays None."""
    if source is None or not is_local_weights_file(source):
        return source
    body, suffix = split_weights(source)
    return f"{absolute_location(body, '--weights')}{suffix}"


def local_paths_warning(pool: str, paths: dict[str, str | None]) -> str | None:
    """Return the one-line warning for a run on ``pool`` that hands local paths to its workers, or None when every
    path in ``paths`` (``{"--out": ..., "manifest": ...}``, None values ignored) is an ``s3://`` URI."""
    local = [f"{name} {value}" for name, value in paths.items() if value and not storage.is_s3(value)]
    if not local:
        return None
    return (f"warning: {', '.join(local)} {'is a local path' if len(local) == 1 else 'are local paths'}: "
            f"every worker of pool {pool} must see {'it' if len(local) == 1 else 'them'} at the same path, "
            f"with the manifest's input files; otherwise {SHARED_DISK_HINT}")


def relative_path_problem(paths: dict[str, str | None]) -> str | None:
    """Return a one-line problem for the first relative local path in ``paths`` (``{"out": ...}``), else None.

    A flow run started by a worker runs in a temporary folder: a relative path would name a folder there.
    """
    for name, value in paths.items():
        if value and not storage.is_s3(value) and not os.path.isabs(value.removeprefix(storage.FILE_SCHEME)):
            return (f"{name} {value!r} is a relative path, which a worker would resolve against its own "
                    f"temporary folder: give an absolute path or an s3:// URI (the harmonize commands resolve "
                    f"relative paths where they are typed)")
    return None


def refuse_relative_when_deployed(paths: dict[str, str | None]) -> None:
    """Raise ``InputError`` (``relative_path_problem``) when this flow run was started from a deployment (a worker or
    ``serve`` runs it, in a folder of its own) and one of ``paths`` is relative; return None otherwise."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    run = getattr(context, "flow_run", None)
    if run is None or run.deployment_id is None:
        return
    problem = relative_path_problem(paths)
    if problem:
        raise InputError(problem)


def marker_uri(out: str, run_id: str) -> str:
    """Return ``<out>/runs/<run_id>/pool.json``: the marker a pooled run's shards look for."""
    return storage.run_uri(out, run_id, POOL_MARKER)


def write_pool_marker(out: str, run_id: str, pool: str) -> str:
    """Write the run's pool marker (run id, pool, the coordinator's host and ``out``); return its URI."""
    uri = marker_uri(out, run_id)
    record = {"run_id": run_id, "pool": pool, "out": out, "coordinator": socket.gethostname()}
    storage.write_bytes(uri, json.dumps(record, sort_keys=True).encode())
    return uri


def pool_marker_problem(out: str, run_id: str, worker: str) -> str | None:
    """Return why ``worker`` cannot write this run's outputs (``out`` relative, or the coordinator's marker not
    visible here: another disk), or None when it sees the marker the coordinator wrote."""
    relative = relative_path_problem({"out": out})
    if relative:
        return relative
    try:
        seen = storage.exists(marker_uri(out, run_id))
    except (InputError, ConnectionError) as error:
        seen, why = False, f" ({one_line(error)})"
    else:
        why = ""
    if seen:
        return None
    return (f"worker {worker} cannot see the run's output folder {out}: {marker_uri(out, run_id)}, written by the "
            f"run that sent this shard, is not there{why}; the workers must share the output storage: "
            f"{SHARED_DISK_HINT}")


def invisible_input(item: dict[str, Any]) -> str | None:
    """Return a one-line problem for the first local input file of ``item`` (a flow record) that this process
    cannot see, else None (``s3://`` inputs are left to the stages, which retry transient errors)."""
    for column, ref in item.get("files", {}).items():
        uri = ref["uri"]
        if storage.is_s3(uri):
            continue
        path = uri.removeprefix(storage.FILE_SCHEME)
        if not os.path.isabs(path):
            return f"{column} {uri!r} is a relative path; this worker cannot tell which folder it is relative to"
        if not os.path.isfile(path):
            return (f"{column} {uri} is not on this worker ({socket.gethostname()}): the workers must see the "
                    f"manifest's input files at the same paths; {SHARED_DISK_HINT}")
    return None

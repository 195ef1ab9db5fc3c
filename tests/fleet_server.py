"""The fleet tests' server side: a throwaway PostgreSQL cluster on loopback and what the Prefect server logged.

``postgres_cluster()`` runs the system's PostgreSQL binaries (Debian's ``postgresql`` package, found with
``pg_config --bindir`` or under ``/usr/lib/postgresql/*/bin``): ``initdb`` into a temporary folder, ``pg_ctl start`` on
a free loopback port, ``createdb prefect``, and yields the ``postgresql+asyncpg://`` URL that
``PREFECT_API_DATABASE_CONNECTION_URL`` takes. ``initdb`` refuses to run as root, so as root the cluster belongs to
the ``postgres`` system user (else ``nobody``). Durability is off (``fsync``, ``synchronous_commit``,
``full_page_writes``): the cluster lives as long as one test module.

``server_log_problems`` counts the Prefect server's own error texts (Prefect 3.8.8) that mean its database could not
keep up with the fleet: on SQLite two workers on a few tiny items already produce them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

REQUIRE_ENV = "HARMONIZE_REQUIRE_POSTGRES"
DATABASE = "prefect"
USER = "prefect"

# Prefect 3.8.8's texts: sqlite3's lock error (prefect.server.api.server.SQLITE_LOCKED_MSG), the orchestration
# rule's log line when committing a proposed state fails (prefect/server/orchestration/rules.py), and the in-memory
# message broker's line for a message that failed its retries (prefect/server/utilities/messaging/memory.py).
SERVER_LOG_PROBLEMS = {
    "database is locked": "database is locked",
    "state validation errors": "Encountered error during state validation",
    "dead-lettered messages": "will be moved to the dead letter queue",
}


def free_port() -> int:
    """Return a TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bindir() -> Path | None:
    """Return the folder holding PostgreSQL's server binaries (``initdb``, ``pg_ctl``, ``createdb``), or ``None``."""
    candidates = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10,
                                check=True).stdout.strip()
        candidates.append(bindir)
    # newest major version first: /usr/lib/postgresql/9.6 sorts after /usr/lib/postgresql/15 as text
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                      key=lambda path: [int(part) if part.isdigit() else 0
                                        for part in Path(path).parent.name.split(".")], reverse=True)
    for folder in [*candidates, *versions]:
        if all((Path(folder) / tool).is_file() for tool in ("initdb", "pg_ctl", "createdb")):
            return Path(folder)
    return None


def cluster_owner() -> pwd.struct_passwd | None:
    """Return the unprivileged user to own the cluster when running as root (``postgres``, else ``nobody``); ``None``
    when not root (the cluster belongs to the current user)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root with neither a 'postgres' nor a 'nobody' user: initdb refuses to run as root")


def missing_postgres_reason() -> str | None:
    """Return one line saying why no PostgreSQL cluster can be started here, or ``None`` when one can."""
    if postgres_bindir() is None:
        return ("PostgreSQL is not installed (no initdb/pg_ctl/createdb via pg_config --bindir or under "
                "/usr/lib/postgresql/*/bin): apt-get install postgresql")
    try:
        cluster_owner()
    except RuntimeError as error:
        return str(error)
    return None


def require_postgres() -> None:
    """Return when a PostgreSQL cluster can be started here; else skip the calling test with one line, or fail it
    where ``HARMONIZE_REQUIRE_POSTGRES=1`` (CI, set by ``.ci/run``)."""
    import pytest

    reason = missing_postgres_reason()
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1)", pytrace=False)
    pytest.skip(f"the fleet tests need PostgreSQL: {reason}")


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    """Start a throwaway PostgreSQL cluster on a free loopback port; yield the Prefect server's database URL
    (``postgresql+asyncpg://prefect@127.0.0.1:PORT/prefect``, trust authentication); stop and delete it after."""
    bindir = postgres_bindir()
    if bindir is None:
        raise RuntimeError(missing_postgres_reason())
    owner = cluster_owner()
    as_owner = {} if owner is None else {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
    # not under pytest's tmp_path: its parents are private to root, and the cluster's user must reach its folder
    root = Path(tempfile.mkdtemp(prefix="harmonize-pg-"))
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data, log = root / "data", root / "postgres.log"
    port = free_port()
    env = {**os.environ, "HOME": str(root), "PGHOST": "127.0.0.1", "PGPORT": str(port), "PGUSER": USER}

    def tool(*args: str, timeout: float = 120) -> None:
        done = subprocess.run([str(bindir / args[0]), *args[1:]], env=env, cwd=root, capture_output=True,
                              text=True, timeout=timeout, check=False, **as_owner)
        if done.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {(done.stderr or done.stdout).strip()}\n{tail}")

    started = False
    try:
        tool("initdb", "-D", str(data), "-U", USER, "--auth=trust", "--no-locale", "-E", "UTF8", "--no-sync")
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off "
                   f"-c full_page_writes=off")
        tool("pg_ctl", "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
        started = True
        tool("createdb", DATABASE)
        yield f"postgresql+asyncpg://{USER}@127.0.0.1:{port}/{DATABASE}"
    finally:
        if started:
            with contextlib.suppress(Exception):
                tool("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop", timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def server_log_problems(text: str, dead_letter_folder: Path | None = None) -> dict[str, int]:
    """Return how many times the Prefect server's log ``text`` shows each of ``SERVER_LOG_PROBLEMS`` and how many
    ERROR or CRITICAL records it has (``"logged errors"``), every key with zeros included; ``dead_letter_folder`` (the
    server's ``$PREFECT_HOME/dlq``) adds the messages stored there."""
    counts = {name: text.count(needle) for name, needle in SERVER_LOG_PROBLEMS.items()}
    counts["logged errors"] = len(server_log_errors(text, limit=None))
    if dead_letter_folder is not None and dead_letter_folder.is_dir():
        counts["dead-lettered messages"] = max(counts["dead-lettered messages"],
                                               sum(1 for _ in dead_letter_folder.iterdir()))
    return counts


def server_log_errors(text: str, limit: int | None = 20) -> list[str]:
    """Return the first ``limit`` (``None``: all) ERROR and CRITICAL record lines of the Prefect server's log
    ``text``."""
    return [line for line in text.splitlines() if "| ERROR" in line or "| CRITICAL" in line][:limit]

"""The fleet tests' harness (``tests/fleet_server.py``): the PostgreSQL cluster, the skip/fail rule, the log counts."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import fleet_server
import pytest
from fleet_server import (
    REQUIRE_ENV,
    missing_postgres_reason,
    postgres_cluster,
    require_postgres,
    server_log_errors,
    server_log_problems,
)

NOT_INSTALLED = ("PostgreSQL is not installed (no initdb/pg_ctl/createdb via pg_config --bindir or under "
                 "/usr/lib/postgresql/*/bin): apt-get install postgresql")


def test_without_postgres_the_fleet_tests_skip_in_one_line(monkeypatch):
    monkeypatch.setattr(fleet_server, "postgres_bindir", lambda: None)
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    assert missing_postgres_reason() == NOT_INSTALLED
    with pytest.raises(pytest.skip.Exception) as skipped:
        require_postgres()
    assert str(skipped.value) == f"the fleet tests need PostgreSQL: {NOT_INSTALLED}"


def test_without_postgres_the_fleet_tests_fail_where_it_is_required(monkeypatch):
    monkeypatch.setattr(fleet_server, "postgres_bindir", lambda: None)
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception) as failed:
        require_postgres()
    assert str(failed.value) == f"{NOT_INSTALLED} ({REQUIRE_ENV}=1)"
    assert failed.value.pytrace is False  # one line, no traceback


def test_a_throwaway_cluster_serves_prefects_database_url_and_leaves_nothing_behind():
    require_postgres()
    import asyncpg

    async def ask(url: str) -> tuple[str, str, str]:
        connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            return (await connection.fetchval("select current_database()"),
                    await connection.fetchval("select current_user"),
                    await connection.fetchval("show fsync"))
        finally:
            await connection.close()

    folders = lambda: set(Path(tempfile.gettempdir()).glob("harmonize-pg-*"))  # noqa: E731
    before = folders()
    with postgres_cluster() as url:
        assert url.startswith("postgresql+asyncpg://prefect@127.0.0.1:") and url.endswith("/prefect")
        assert asyncio.run(ask(url)) == ("prefect", "prefect", "off")  # its database, its user, durability off
        mine = folders() - before
        assert len(mine) == 1 and (mine.pop() / "data" / "PG_VERSION").is_file()
    assert folders() <= before  # stopped and deleted


def test_the_servers_database_problems_are_counted_by_prefects_own_texts(tmp_path):
    log = "\n".join([
        "18:01:02.123 | ERROR   | prefect.server - Encountered error during state validation",
        "sqlite3.OperationalError: database is locked",
        "sqlalchemy.exc.OperationalError: (sqlite3.OperationalError) database is locked",
        "18:01:03.000 | WARNING | prefect.server.utilities.messaging.memory - Message failed after 4 retries and "
        "will be moved to the dead letter queue",
        "18:01:04.000 | INFO    | prefect.server - all fine",
        "18:01:05.000 | ERROR   | prefect.server.utilities.messaging.memory - Failed in consume_loop",
    ])
    assert server_log_problems(log) == {"database is locked": 2, "state validation errors": 1,
                                        "dead-lettered messages": 1, "logged errors": 2}
    assert server_log_problems("") == {"database is locked": 0, "state validation errors": 0,
                                       "dead-lettered messages": 0, "logged errors": 0}
    dlq = tmp_path / "dlq"
    dlq.mkdir()
    for name in ("a", "b", "c"):
        (dlq / name).write_text("{}")
    assert server_log_problems(log, dlq)["dead-lettered messages"] == 3  # the stored messages, logged or not
    assert server_log_problems("", tmp_path / "none")["dead-lettered messages"] == 0
    assert server_log_errors(log) == [
        "18:01:02.123 | ERROR   | prefect.server - Encountered error during state validation",
        "18:01:05.000 | ERROR   | prefect.server.utilities.messaging.memory - Failed in consume_loop"]

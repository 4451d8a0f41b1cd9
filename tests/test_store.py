"""Store behaviour that no RPC shows directly."""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from dembrane.webhooks.domain.access import Tier
from dembrane.webhooks.store import directory
from dembrane.webhooks.store.database import (
    WAL_SIZE_LIMIT,
    Database,
    DriverSession,
    OutageLog,
    Transaction,
)
from dembrane.webhooks.store.tables import WebhookRow

from harness import fresh_database_url


def test_database_errors_never_show_secrets(tmp_path: Path) -> None:
    """A failed statement's error, which may reach a log, hides the parameters (secrets)."""
    database = Database(fresh_database_url(tmp_path))
    database.migrate()
    now = time.time()

    def seed(session: object) -> None:
        directory.upsert_workspace(session, "w", "W", Tier.GUARDIAN, now)  # type: ignore[arg-type]
        directory.upsert_project(session, "p", "w", "P", "en", now)  # type: ignore[arg-type]

    database.call(seed)
    row = dict(
        project_id="p",
        name="Hook",
        url="https://example.com/h",
        events="[]",
        status="published",
        secret="whsec_super-secret-value",
        created_at=now,
        updated_at=now,
    )
    database.call(lambda s: s.add(WebhookRow(id="wh_1", **row)))
    with pytest.raises(IntegrityError) as caught:
        database.call(lambda s: s.add(WebhookRow(id="wh_1", **row)))
    assert "super-secret-value" not in str(caught.value)
    database.close()


def test_an_outage_is_logged_when_it_starts_and_ends_not_at_every_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A loop failing on an unreachable store logs one line when the outage starts and one
    when it ends; an error that is not an outage is logged, with its traceback, each time."""
    logger = logging.getLogger("test.outage")
    outage = OutageLog(logger, "claiming deliveries")
    down = OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))
    caplog.set_level("INFO", logger="test.outage")
    for _ in range(50):
        try:
            raise down
        except OperationalError as error:
            outage.failed(error)
    outage.succeeded()
    outage.succeeded()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "the store is unavailable (connection refused)" in messages[0]
    assert "works again" in messages[1]
    caplog.clear()
    for _ in range(2):
        try:
            raise ValueError("a bug")
        except ValueError as error:
            outage.failed(error)
    assert [r.exc_info is not None for r in caplog.records] == [True, True]


@pytest.mark.sqlite_only
def test_a_new_sqlite_file_and_its_journal_are_private(
    tmp_path: Path,
) -> None:
    """The database holds every signing secret: under a permissive umask it is still created
    readable by its owner only, and so are the journal files SQLite makes beside it."""
    old = os.umask(0o022)
    try:
        path = tmp_path / "data" / "webhooks.db"
        database = Database(f"sqlite:///{path}")
        database.migrate()
        database.call(lambda s: s.execute(text("SELECT 1")))
        files = [path, *tmp_path.joinpath("data").glob("webhooks.db-*")]
        assert any(f.name.endswith("-wal") for f in files)
        for file in files:
            assert stat.S_IMODE(file.stat().st_mode) == 0o600, file.name
        database.close()
    finally:
        os.umask(old)


def test_sqlite_connections_cap_the_write_ahead_log(tmp_path: Path) -> None:
    """Every connection caps the WAL a checkpoint leaves behind, so one large deletion does
    not keep its size on disk for as long as the service runs."""
    database = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    database.migrate()
    limit = database.call(lambda s: s.execute(text("PRAGMA journal_size_limit")).scalar())
    assert limit == WAL_SIZE_LIMIT
    database.close()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:pw@db.internal:6432/hooks", "PostgreSQL db.internal:6432/hooks"),
        ("postgresql://u@/hooks?host=/run/pg&port=5433", "PostgreSQL /run/pg:5433/hooks"),
        ("postgresql://u@/hooks", "PostgreSQL localhost/hooks"),
    ],
)
def test_the_start_up_line_names_the_server_without_credentials(url: str, shown: str) -> None:
    """A PostgreSQL database is named by its host (a Unix socket's folder too, given as a
    query parameter) and port, never with the user or password."""
    database = Database(url)
    try:
        assert database.describe() == shown
    finally:
        database.close()


@pytest.mark.sqlite_only
@pytest.mark.parametrize("kind", ["folder", "other data"])
def test_a_database_path_that_holds_no_database_keeps_its_mode(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A URL naming a folder, or a file of other data, fails to open without its mode being
    narrowed: a mistyped URL (sqlite://// is the root folder) must change nothing."""
    path = tmp_path / "shared"
    if kind == "folder":
        path.mkdir()
        path.chmod(0o755)
    else:
        path.write_text("not a database\n")
        path.chmod(0o644)
    database = Database(f"sqlite:///{path}")
    try:
        with pytest.raises(SQLAlchemyError):
            database.migrate()
    finally:
        database.close()
    assert stat.S_IMODE(path.stat().st_mode) == (0o755 if kind == "folder" else 0o644)
    assert "was readable by others" not in caplog.text


@pytest.mark.sqlite_only
def test_an_existing_database_others_may_read_is_narrowed_and_lock_files_are_private(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A database file left readable by others (as older versions made it) is narrowed to
    its owner with a warning, and the lock files beside it are created private too."""
    path = tmp_path / "webhooks.db"
    first = Database(f"sqlite:///{path}")
    first.migrate()
    first.close()
    path.chmod(0o644)
    old = os.umask(0o000)
    try:
        database = Database(f"sqlite:///{path}")
        database.migrate()
        database.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "was readable by others" in caplog.text
    lock = tmp_path / "webhooks.db.migrate-lock"
    lock.unlink()
    again = Database(f"sqlite:///{path}")
    old = os.umask(0o000)
    try:
        again.migrate()
    finally:
        os.umask(old)
        again.close()
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600


async def test_a_driver_transaction_commits_whole_or_not_at_all(tmp_path: Path) -> None:
    """A hot transaction on SQLite's driver connection keeps every write when it returns and
    none when it raises, as a Session's transaction would."""
    database = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    database.migrate()

    def add(session: Transaction, workspace_id: str, fail: bool) -> None:
        assert isinstance(session, DriverSession)
        cursor = session.cursor()
        cursor.execute(
            "INSERT INTO workspaces (id, name, tier, created_at, updated_at) "
            "VALUES (?, 'W', 'changemaker', 0, 0)",
            (workspace_id,),
        )
        if fail:
            raise RuntimeError("refused after the write")

    await database.run_driver(add, "kept", False)
    with pytest.raises(RuntimeError):
        await database.run_driver(add, "undone", True)
    stored = database.call(lambda s: s.execute(text("SELECT id FROM workspaces")).scalars().all())
    assert stored == ["kept"]
    database.close()


async def test_driver_transactions_sync_to_disk_unless_relaxed(tmp_path: Path) -> None:
    """A hot transaction commits at the configured sync level (what publishing promises a
    caller), and a relaxed one (bookkeeping) without the disk sync."""
    database = Database(f"sqlite:///{tmp_path / 'db.sqlite'}", sqlite_synchronous="FULL")
    database.migrate()

    def level(session: Transaction) -> int:
        assert isinstance(session, DriverSession)
        return int(session.cursor().execute("PRAGMA synchronous").fetchone()[0])

    full, normal = 2, 1
    assert await database.run_driver(level) == full
    assert await database.run_driver(level, relaxed=True) == normal
    assert await database.run_driver(level) == full
    database.close()

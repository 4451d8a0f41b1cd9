"""The database lane: which database each run of the service gets, and how it starts empty.

By default every run gets a fresh SQLite file in the benchmark's temporary folder. With a URL
(``--database-url`` or ``WEBHOOKS_DATABASE_URL``), every run uses that database, migrated and
emptied first, so a PostgreSQL lane is the same benchmark with one flag.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import make_url

from bench.client import WORKSPACE_ID
from dembrane.webhooks.store.database import Database, normalize_url

# Children before parents, so deleting never trips a foreign key.
_TABLES = ("attempts", "deliveries", "events", "webhooks", "memberships", "projects", "workspaces")


class DatabaseLane:
    """Hands out an empty, migrated database for each run of the service."""

    def __init__(self, url: str | None, workdir: Path) -> None:
        self.url = normalize_url(url) if url else None
        self.workdir = workdir

    @property
    def is_sqlite(self) -> bool:
        return self.url is None or make_url(self.url).get_backend_name() == "sqlite"

    def fresh(self, name: str) -> str:
        """An empty database for the run called ``name``.

        A new SQLite file gets its schema from the service, which migrates on start; a
        database given by URL is migrated and emptied here.
        """
        if self.url is None:
            path = self.workdir / f"{name}.db"
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            return f"sqlite:///{path}"
        database = Database(self.url)
        try:
            database.migrate()
            _empty(database)
        finally:
            database.close()
        return self.url

    def check(self) -> None:
        """Refuse, before anything runs, a database given by URL that holds others' data."""
        if self.url is None:
            return
        database = Database(self.url)
        try:
            database.migrate()
            with database.engine.connect() as connection:
                _refuse_foreign(connection)
        finally:
            database.close()

    def describe(self) -> str:
        """The database engine and version, for the report."""
        if self.is_sqlite:
            where = "a fresh file per run" if self.url is None else "the given file"
            return f"SQLite {sqlite3.sqlite_version} ({where})"
        assert self.url is not None
        engine = create_engine(self.url)
        try:
            with engine.connect() as connection:
                version = connection.execute(text("SHOW server_version")).scalar_one()
        finally:
            engine.dispose()
        return f"PostgreSQL {version}"

    def redacted_url(self) -> str:
        if self.url is None:
            return "sqlite:///<temporary folder>/<run>.db"
        return make_url(self.url).render_as_string(hide_password=True)


class ForeignDataError(RuntimeError):
    """The database holds data the benchmark did not write, so it is left alone."""


def _refuse_foreign(connection: Connection) -> None:
    foreign = connection.execute(
        text("SELECT count(*) FROM workspaces WHERE id <> :mine"), {"mine": WORKSPACE_ID}
    ).scalar_one()
    if foreign:
        raise ForeignDataError(
            "The benchmark empties its database before every run, and this one holds "
            "workspaces it did not create. Give it a scratch database."
        )


def _empty(database: Database) -> None:
    with database.engine.begin() as connection:
        _refuse_foreign(connection)
        if database.is_sqlite:
            for table in _TABLES:
                connection.execute(text(f"DELETE FROM {table}"))  # noqa: S608 - fixed names
        else:
            connection.execute(text(f"TRUNCATE {', '.join(_TABLES)} CASCADE"))

"""The schema comes from the migrations, and the migrations match the table classes."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlmodel import SQLModel

from dembrane.webhooks.store import tables  # noqa: F401  (registers the tables)
from dembrane.webhooks.store.database import Database

from harness import fresh_database_url


def test_first_start_creates_the_schema(tmp_path: Path) -> None:
    """Migrating a missing SQLite file creates its folder, the file and every table."""
    database = Database(f"sqlite:///{tmp_path / 'nested' / 'w.db'}")
    database.migrate()
    names = set(inspect(database.engine).get_table_names())
    assert {
        "workspaces",
        "projects",
        "memberships",
        "webhooks",
        "events",
        "deliveries",
        "attempts",
        "alembic_version",
    } <= names
    database.migrate()  # a second start finds nothing to do
    database.close()


def test_migrations_match_the_table_classes(tmp_path: Path) -> None:
    """Autogenerate finds no difference between the migrated schema and the models."""
    database = Database(fresh_database_url(tmp_path))
    database.migrate()
    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection)
        assert compare_metadata(context, SQLModel.metadata) == []
    database.close()

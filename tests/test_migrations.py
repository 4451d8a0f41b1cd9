"""The schema comes from the migrations, and the migrations match the table classes."""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlmodel import SQLModel

from dembrane.webhooks.store import tables  # noqa: F401  (registers the tables)
from dembrane.webhooks.store.database import Database, SchemaError

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
    """Autogenerate finds no difference between the migrated schema and the models, but the
    one SQLite is made without: the deliveries' key to their webhook (migration 0006)."""
    database = Database(fresh_database_url(tmp_path))
    database.migrate()
    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection)
        differences = compare_metadata(context, SQLModel.metadata)
    database.close()
    if database.is_sqlite:
        webhook_key = [
            d
            for d in differences
            if d[0] == "add_fk"
            and d[1].parent.name == "deliveries"
            and [c.name for c in d[1].columns] == ["webhook_id"]
        ]
        assert len(webhook_key) == 1
        differences = [d for d in differences if d not in webhook_key]
    assert differences == []


def test_an_existing_database_upgrades_with_its_events(tmp_path: Path) -> None:
    """A database made by the first migration keeps its rows on upgrade, loses the index of
    events by project, gets the webhook into the due index, and gets a count of lost
    attempts on its deliveries that starts at zero."""
    database = Database(fresh_database_url(tmp_path))
    database.migrate("0001")
    with database.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO events (id, type, project_id, occurred_at, created_at, body,"
                " skip_reason, delivery_count) VALUES ('evt-old', 'conversation.started',"
                " 'p-old', 1.0, 1.0, :body, '', 0)"
            ),
            {"body": b"{}"},
        )
    assert "ix_events_project_id" in _index_names(database, "events")

    database.migrate()

    assert "ix_events_project_id" not in _index_names(database, "events")
    (due,) = [
        i
        for i in inspect(database.engine).get_indexes("deliveries")
        if i["name"] == "ix_deliveries_due"
    ]
    assert due["column_names"] == ["next_attempt_at", "webhook_id"]
    columns = {c["name"]: c for c in inspect(database.engine).get_columns("deliveries")}
    assert not columns["lost_attempts"]["nullable"]
    assert str(columns["lost_attempts"]["default"]).strip("'\"") == "0"
    with database.engine.connect() as connection:
        rows = connection.execute(text("SELECT id, project_id FROM events")).all()
    assert [tuple(row) for row in rows] == [("evt-old", "p-old")]
    database.close()


def test_the_log_says_when_the_schema_was_created_or_migrated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Creating the schema and migrating it each leave one line naming the revisions, so an
    empty database made where an existing one was expected shows in the log; a start that
    changes nothing leaves none."""
    caplog.set_level("INFO", logger="dembrane.webhooks.store.database")
    database = Database(fresh_database_url(tmp_path))
    database.migrate("0001")
    database.migrate()
    database.migrate()
    database.close()
    lines = [r.getMessage() for r in caplog.records if "schema" in r.getMessage()]
    assert lines == [
        "database: created the schema (revision 0001)",
        "database: migrated the schema from revision 0001 to 0006",
    ]


def _index_names(database: Database, table: str) -> set[str]:
    return {str(index["name"]) for index in inspect(database.engine).get_indexes(table)}


def test_the_alembic_command_uses_the_services_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`alembic upgrade head` with the repository's alembic.ini migrates the database that
    WEBHOOKS_DATABASE_URL names, not the file alembic.ini names."""
    root = Path(__file__).resolve().parents[1]
    target = tmp_path / "other.db"
    monkeypatch.setenv("WEBHOOKS_DATABASE_URL", f"sqlite:///{target}")
    monkeypatch.chdir(root)
    command.upgrade(Config(str(root / "alembic.ini")), "head")
    engine = create_engine(f"sqlite:///{target}")
    assert "deliveries" in inspect(engine).get_table_names()
    engine.dispose()


def test_a_schema_newer_than_the_code_is_named_not_traced(tmp_path: Path) -> None:
    """A database another version migrated further is refused with a sentence naming its
    revision and this version's newest, and is left as it was."""
    database = Database(fresh_database_url(tmp_path))
    database.migrate()
    with database.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(SchemaError) as caught:
        database.migrate()
    assert "revision 0099" in str(caught.value)
    assert "newest is 0006" in str(caught.value)
    with database.engine.connect() as connection:
        assert MigrationContext.configure(connection).get_current_revision() == "0099"
    database.close()


def test_replicas_starting_together_migrate_one_after_another(tmp_path: Path) -> None:
    """Several processes migrating one empty database at once all succeed and leave one
    schema (on PostgreSQL an advisory lock makes them take turns)."""
    url = fresh_database_url(tmp_path)
    databases = [Database(url) for _ in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda database: database.migrate(), databases))
    with databases[0].engine.connect() as connection:
        assert MigrationContext.configure(connection).get_current_revision() == "0006"
    for database in databases:
        database.close()


@pytest.mark.sqlite_only
def test_rows_whose_keys_name_nothing_are_reported_after_a_migration(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Migrations run on SQLite with foreign keys off (a table's rebuild must not cascade);
    rows already there whose keys name no row are named in the log afterwards, and kept."""
    url = fresh_database_url(tmp_path)
    database = Database(url)
    database.migrate("0005")
    database.close()
    with sqlite3.connect(url.removeprefix("sqlite:///")) as raw:
        raw.execute(
            "INSERT INTO attempts (delivery_id, number, attempted_at, status_code, latency_ms,"
            " response_body, error, success) VALUES ('dlv_gone', 1, 1.0, 200, 1.0, '', '', 1)"
        )
    caplog.set_level("WARNING", logger="dembrane.webhooks.store.database")
    database = Database(url)
    database.migrate()
    messages = [record.getMessage() for record in caplog.records]
    assert "database: 1 rows name a row that is not there (the first in table attempts)" in (
        messages
    )
    count = database.call(lambda s: s.execute(text("SELECT count(*) FROM attempts")).scalar_one())
    assert count == 1
    database.migrate()  # a start with nothing to migrate does not check (nor warn) again
    assert len(caplog.records) == 1
    database.close()

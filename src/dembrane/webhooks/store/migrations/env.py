"""Alembic environment: runs the migrations on the connection the service hands over."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import engine_from_config, pool
from sqlmodel import SQLModel

from dembrane.webhooks.store import tables  # noqa: F401  (registers the tables)
from dembrane.webhooks.store.database import normalize_url

target_metadata = SQLModel.metadata
config = context.config


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=True
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    section = dict(config.get_section(config.config_ini_section) or {})
    # The alembic command line works on the database the service would use.
    url = os.environ.get("WEBHOOKS_DATABASE_URL", "").strip()
    if url:
        section["sqlalchemy.url"] = normalize_url(url)
    engine = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


run_migrations()

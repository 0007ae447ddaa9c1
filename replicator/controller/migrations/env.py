"""Alembic environment: runs on the engine db.upgrade() hands over (config.attributes["engine"]), or on the
URL in REPLICATOR_CONTROLLER_DB when a developer runs alembic by hand to write a new revision."""
from __future__ import annotations

import os

from alembic import context

from replicator.controller import history, models  # noqa: F401 (history's tables join Base.metadata)
from replicator.controller.db import make_engine

config = context.config
engine = config.attributes.get("engine") or make_engine(os.environ["REPLICATOR_CONTROLLER_DB"])

MIGRATION_LOCK = 0x7265706C  # "repl": one PostgreSQL advisory lock, so controllers starting together migrate in turn

with engine.connect() as connection:
    if connection.dialect.name == "postgresql":
        # held until the transaction ends; SQLite's BEGIN IMMEDIATE (db.py) already serializes the same way
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
    context.configure(connection=connection, target_metadata=models.Base.metadata,
                      render_as_batch=True,          # SQLite alters tables by copying them
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()

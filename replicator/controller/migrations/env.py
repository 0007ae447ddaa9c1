"""Alembic environment: runs on the engine db.upgrade() hands over (config.attributes["engine"]), or on the
URL in REPLICATOR_CONTROLLER_DB when a developer runs alembic by hand to write a new revision."""
from __future__ import annotations

import os

from alembic import context

from replicator.controller import models
from replicator.controller.db import make_engine

config = context.config
engine = config.attributes.get("engine") or make_engine(os.environ["REPLICATOR_CONTROLLER_DB"])

with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=models.Base.metadata,
                      render_as_batch=True,          # SQLite alters tables by copying them
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()

"""Alembic revisions of the controller's schema, applied in order at every start (db.upgrade)."""

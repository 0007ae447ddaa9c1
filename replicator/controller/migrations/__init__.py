"""Alembic environment for the controller's store; a package so it ships inside the installed wheel."""

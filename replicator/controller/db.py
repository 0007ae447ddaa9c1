"""Opening the store: an engine for SQLite (`--data DIR` -> DIR/controller.db, WAL) or PostgreSQL (by URL),
the Alembic migrations applied at start, and a session factory.

Migrations run programmatically from the package (no alembic.ini), so an installed controller finds them.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from ..errors import UsageError

MIGRATIONS = Path(__file__).with_name("migrations")
DB_FILE = "controller.db"


class StoreError(UsageError):
    """The database URL or the database itself cannot be used; the message says why, on one line."""


def sqlite_url(data_dir: str | os.PathLike) -> str:
    return f"sqlite:///{os.path.abspath(os.path.join(data_dir, DB_FILE))}"


def normalize_url(url: str) -> str:
    """postgresql:// means psycopg 3 (the driver this project ships); sqlite:// and postgresql+psycopg:// as is."""
    try:
        u = make_url(url)
    except ArgumentError:
        raise StoreError(f"not a database URL: {url!r} (sqlite:///PATH or postgresql://USER@HOST/DB)") from None
    if u.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        u = u.set(drivername="postgresql+psycopg")
    elif u.drivername != "sqlite":
        raise StoreError(f"unsupported database {u.drivername!r}: use sqlite:///PATH or postgresql://...")
    return u.render_as_string(hide_password=False)


def make_engine(url: str) -> Engine:
    """An engine with each dialect's settings: SQLite in WAL with foreign keys on and a busy timeout (a second
    writer waits instead of failing); PostgreSQL with pre-ping (a restarted server costs one retry, not a 500)."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            dbapi_conn.isolation_level = None      # let SQLAlchemy's BEGIN below own the transactions
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):
            # IMMEDIATE: a transaction takes the write lock at its start, so read-then-write never deadlocks
            # into SQLITE_BUSY between two processes (each waits its turn under busy_timeout instead).
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        return engine
    return create_engine(url, pool_pre_ping=True)


def alembic_config(engine: Engine | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", str(MIGRATIONS / "versions"))
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision` (every start does this; a fresh database gets the whole history)."""
    command.upgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


class Store:
    """The engine and its sessions; `Store.open(url)` migrates first."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, url: str, *, migrate: bool = True) -> Store:
        engine = make_engine(url)
        if url.startswith("sqlite:///"):
            parent = os.path.dirname(make_url(url).database or "")
            if parent and not os.path.isdir(parent):
                raise StoreError(f"{parent}: no such directory for the SQLite database")
        if migrate:
            upgrade(engine)
        return cls(engine)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: committed when the block ends, rolled back if it raises."""
        with self.sessions() as s, s.begin():
            yield s

    def close(self) -> None:
        self.engine.dispose()

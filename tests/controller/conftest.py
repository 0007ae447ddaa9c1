"""Fixtures for the controller's tests, shared by every test under tests/controller/.

- `pg_server` (session): a real throwaway PostgreSQL cluster (Debian's initdb/pg_ctl, run as the `postgres`
  user since initdb refuses root) on 127.0.0.1 at a free port, stopped and removed at the session's end.
- `database_url`: parametrized `sqlite` / `postgresql`; a fresh, empty database for each test.
- `database_url_pg`: the same on PostgreSQL only, for the multi-process fleet tests (why: at the fixture).
- `store`: a migrated `Store` on that URL.
- `controller`: the FastAPI app on that store and an admin token (`.app`, `.store`, `.token`, `.client`,
  `.headers`, `.make_token(role)`).
"""
from __future__ import annotations

import dataclasses
import glob
import itertools
import os
import shutil
import subprocess
import tempfile

import pytest

from replicator.controller.db import Store
from ..ports import free_port  # noqa: F401 (the tests import it from here)

INITDB = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))


def pytest_configure(config):
    # starlette's TestClient warns about its httpx transport at every import: noise, not ours to fix
    config.addinivalue_line("filterwarnings", "ignore:Using `httpx` with `starlette.testclient`")


@dataclasses.dataclass
class PgServer:
    bindir: str
    datadir: str
    port: int
    _seq: itertools.count = dataclasses.field(default_factory=lambda: itertools.count(1))

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{dbname}"

    def psql(self, sql: str) -> None:
        """Run one statement as the superuser (CREATE/DROP DATABASE cannot run in a transaction block)."""
        import psycopg
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self) -> str:
        name = f"t{os.getpid()}_{next(self._seq)}"
        self.psql(f'CREATE DATABASE "{name}"')
        return name


def _as_postgres(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True, **kw)


@pytest.fixture(scope="session")
def pg_server():
    if not INITDB:
        pytest.skip("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb; tools/bootstrap installs it)")
    bindir = os.path.dirname(INITDB[-1])
    top = tempfile.mkdtemp(prefix="replicator-pg-")
    os.chmod(top, 0o755)
    datadir, sockdir = os.path.join(top, "data"), os.path.join(top, "sock")
    os.mkdir(sockdir)
    shutil.chown(top, "postgres", "postgres")
    shutil.chown(sockdir, "postgres", "postgres")
    try:
        r = _as_postgres(f"{bindir}/initdb", "-D", datadir, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                         "--no-sync", timeout=120)
        assert r.returncode == 0, f"initdb failed: {r.stderr}"
        port = free_port()
        opts = (f"-c listen_addresses=127.0.0.1 -p {port} -k {sockdir} -c fsync=off -c synchronous_commit=off "
                f"-c full_page_writes=off -c max_connections=100")
        r = _as_postgres(f"{bindir}/pg_ctl", "-D", datadir, "-l", os.path.join(top, "server.log"), "-o", opts,
                         "-w", "-t", "60", "start", timeout=90)
        assert r.returncode == 0, f"pg_ctl start failed: {r.stderr}{_tail(os.path.join(top, 'server.log'))}"
        server = PgServer(bindir, datadir, port)
        yield server
    finally:
        if os.path.exists(os.path.join(datadir, "postmaster.pid")):
            _as_postgres(f"{bindir}/pg_ctl", "-D", datadir, "-m", "fast", "-w", "stop", timeout=60)
        shutil.rmtree(top, ignore_errors=True)


def _tail(path: str) -> str:
    try:
        with open(path) as f:
            return "\n" + "".join(f.readlines()[-20:])
    except OSError:
        return ""


def _pg_database(server: PgServer):
    name = server.create_database()
    yield server.url(name)
    server.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """An empty database, on SQLite (a file in tmp_path) or on the session's PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'controller.db'}"
        return
    yield from _pg_database(request.getfixturevalue("pg_server"))


@pytest.fixture
def database_url_pg(pg_server):
    """An empty database on the session's PostgreSQL server only, for the multi-process fleet tests (a
    controller process and several real replicatord hosts, 5-20 s each). They run once, on PostgreSQL (the
    production database), not once per database: every API and store behaviour they go through is already run on
    both databases by the in-process tests (`database_url`, `store`, `controller`), and a controller process with
    real hosts on SQLite is still run by test_failback_fleet.py and tests/portal/test_fleet_e2e.py."""
    yield from _pg_database(pg_server)


@pytest.fixture
def store(database_url):
    s = Store.open(database_url)
    yield s
    s.close()


@dataclasses.dataclass
class Controller:
    app: object
    store: Store
    token: str
    client: object
    data_dir: str

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def make_token(self, role: str, name: str | None = None) -> str:
        """A new token with `role` ('read-only', 'operator', 'admin'), straight in the store."""
        from replicator.controller.auth import create_token
        with self.store.session() as s:
            return create_token(s, name or f"{role}-{os.urandom(3).hex()}", role, created_by="tests")


@pytest.fixture
def controller(store, tmp_path):
    """The REST API on the test's store; `controller.client` is a TestClient sending the admin token."""
    from fastapi.testclient import TestClient

    from replicator.controller.app import create_app
    from replicator.controller.auth import ensure_admin_token

    data_dir = tmp_path / "controller-data"
    data_dir.mkdir()
    token = ensure_admin_token(store, str(data_dir))
    app = create_app(store, data_dir=str(data_dir))
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}, raise_server_exceptions=True) as client:
        yield Controller(app, store, token, client, str(data_dir))

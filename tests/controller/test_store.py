"""The store on SQLite and on a real PostgreSQL: migrations from empty, and the rules held by constraints."""
from __future__ import annotations

import datetime as dt

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError

from replicator.controller import models as m
from replicator.controller.db import Store, StoreError, current_revision, head_revision, make_engine, upgrade


def test_migrations_from_empty_match_the_models(database_url):
    engine = make_engine(database_url)
    try:
        assert current_revision(engine) is None
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        tables = set(inspect(engine).get_table_names())
        assert set(m.Base.metadata.tables) <= tables
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                    m.Base.metadata)
        assert diff == [], f"the models and the migrations differ (write a new revision): {diff}"
        upgrade(engine)                      # a second start finds nothing to do
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def _topology(s):
    site_a, site_b = m.Site(name="a"), m.Site(name="b")
    s.add_all([site_a, site_b])
    s.flush()
    gold, silver, bronze = (m.Cloud(name=n, site_id=site.id) for n, site in
                            (("gold", site_a), ("silver", site_b), ("bronze", site_b)))
    s.add_all([gold, silver, bronze])
    s.flush()
    return site_a, site_b, gold, silver, bronze


def test_a_cloud_belongs_to_one_pair_and_a_pair_has_one_cloud_per_role(store):
    with store.session() as s:
        _, _, gold, silver, bronze = _topology(s)
        pair = m.CloudPair(name="p1")
        s.add(pair)
        s.flush()
        gold.pair_id, gold.pair_role = pair.id, "primary"
        silver.pair_id, silver.pair_role = pair.id, "recovery"
    with pytest.raises(IntegrityError):
        with store.session() as s:
            bronze = s.query(m.Cloud).filter_by(name="bronze").one()
            bronze.pair_id, bronze.pair_role = s.query(m.CloudPair).one().id, "recovery"
    with pytest.raises(IntegrityError):
        with store.session() as s:
            s.query(m.Cloud).filter_by(name="bronze").one().pair_role = "sideways"
    with store.session() as s:
        pair = s.query(m.CloudPair).one()
        assert pair.cloud("primary").name == "gold" and pair.cloud("recovery").name == "silver"


def test_datetimes_come_back_aware_and_naive_ones_are_refused(store):
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    with store.session() as s:
        site = m.Site(name="a", created_at=when)
        s.add(site)
    with store.session() as s:
        got = s.query(m.Site).one().created_at
        assert got == when and got.tzinfo is not None
    with pytest.raises(Exception, match="naive datetime"):
        with store.session() as s:
            s.add(m.Site(name="b", created_at=dt.datetime(2026, 1, 1)))


def test_foreign_keys_are_enforced(store):
    with pytest.raises(IntegrityError):
        with store.session() as s:
            s.add(m.Cloud(name="orphan", site_id=4242))


def test_bad_urls_are_one_line_errors(tmp_path):
    with pytest.raises(StoreError, match="unsupported database 'mysql'"):
        make_engine("mysql://x@y/z")
    with pytest.raises(StoreError, match="not a database URL"):
        make_engine("::nonsense::")
    with pytest.raises(StoreError, match="no such directory"):
        Store.open(f"sqlite:///{tmp_path}/missing/controller.db")


def test_the_audit_log_is_append_only(store):
    with store.session() as s:
        s.add(m.AuditEntry(actor="admin", action="POST /v1/sites", target="site/a"))
    for change in (lambda e: setattr(e, "outcome", "forged"), lambda e: e._sa_instance_state.session.delete(e)):
        with pytest.raises(PermissionError, match="append-only"):
            with store.session() as s:
                change(s.query(m.AuditEntry).one())
    with store.session() as s:
        assert s.query(m.AuditEntry).one().outcome == "ok"


def test_controllers_starting_together_migrate_in_turn(database_url):
    """Several controller processes started at once on one empty database: each opens it, none fails."""
    import subprocess
    import sys
    code = ("import sys; from replicator.controller.db import Store, current_revision; "
            "s = Store.open(sys.argv[1]); print(current_revision(s.engine)); s.close()")
    procs = [subprocess.Popen([sys.executable, "-c", code, database_url], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=120), p.stdout.read().strip(), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _, _ in results), [err for _, _, err in results]
    assert {out for _, out, _ in results} == {head_revision()}


def test_sqlite_runs_in_wal_with_foreign_keys(tmp_path):
    s = Store.open(f"sqlite:///{tmp_path}/controller.db")
    try:
        with s.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        s.close()

"""schemathesis against the OpenAPI document the app serves (/openapi.json), every operation, on SQLite and
PostgreSQL: no 500, no response outside the document (status codes, content types, headers, body schemas),
requests outside the document refused, and the bearer token required where the document says so.

Not checked: `positive_data_acceptance` -- a request can fit the document and still be refused by design (a
name that exists nowhere: 404/422; a policy that contradicts replicatord's cross-field rules: 422).

One app object serves the whole module (schemathesis reads its document at import); each backend's store is
made and seeded once and the app pointed at it (`app.state.store` is all a request uses)."""
from __future__ import annotations

import atexit
import secrets
import shutil
import tempfile

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from replicator.controller.app import create_app
from replicator.controller import models as m
from replicator.controller.auth import ensure_admin_token, hash_token
from replicator.controller.db import Store

from .conftest import Controller
from .helpers import deployment, ok

EXAMPLES = 8
DATA = tempfile.mkdtemp(prefix="replicator-fuzz-")      # the app's CA; made at import, so removed at exit
atexit.register(shutil.rmtree, DATA, True)
APP = create_app(None, data_dir=DATA)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
TOKEN = "rpc_fuzz_" + secrets.token_urlsafe(24)     # every seeded store gets it as an admin token


@schema.auth()
class AdminToken:
    """An admin token, sent where the document asks for one (and left off when schemathesis checks that a route
    refuses requests without it)."""

    def get(self, case, context):
        return TOKEN

    def set(self, case, data, context):
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def seeded(request, tmp_path_factory):
    if request.param == "sqlite":
        url, drop = f"sqlite:///{tmp_path_factory.mktemp('fuzz')}/controller.db", None
    else:
        server = request.getfixturevalue("pg_server")
        name = server.create_database()
        url, drop = server.url(name), lambda: server.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    store = Store.open(url)
    data = tmp_path_factory.mktemp("fuzz-data")
    with store.session() as s:
        s.add(m.ApiToken(name="fuzz", token_hash=hash_token(TOKEN), role="admin"))
    token = ensure_admin_token(store, str(data)) or TOKEN
    APP.state.store = store
    with TestClient(APP, headers={"Authorization": f"Bearer {token}"}) as client:
        ctl = Controller(APP, store, token, client, str(data))
        deployment(ctl)
        ok(client.post("/v1/machines", json={"name": "vm01", "cloud": "gold", "primary_host": "pa1",
                                             "domain": "vm01"}), 201)
        ok(client.post("/v1/plans", json={"name": "app", "pair": "gold-silver", "groups": [{"members": ["vm01"]}]}),
           201)
        yield ctl
    APP.state.store = None
    store.close()
    if drop:
        drop()




@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
def test_api_conforms_to_its_openapi_document(case, seeded):
    case.call_and_validate(excluded_checks=[positive_data_acceptance])

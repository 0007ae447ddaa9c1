"""Kerberos mode against a real MIT KDC: SPNEGO with mutual authentication, principals authorized by
entry, and bad or missing tickets refused with 401 and counted."""
from __future__ import annotations

import base64

import aiohttp
import gssapi
import pytest
from aiohttp import web

from replicator.transport import (AuthenticationError, AuthorizationEntry, AuthorizationError, ReplicaClient)
from replicator.transport.server import ReplicaServer

from .conftest import Primary, image_bytes, run, write
from .kdc import REALM


@pytest.fixture
def krb_server(servers, kdc, tmp_path):
    entries = [AuthorizationEntry(f"primary1@{REALM}", str(tmp_path / "root"))]
    return servers.start(ReplicaServer(entries, mode="kerberos", port=0, keytab=kdc.path("server.keytab")))


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_replicate_with_kerberos_mutual_auth(krb_server, kdc, tmp_path, host):
    primary = Primary()
    path = write(tmp_path, "c1.delta", primary.cycle())

    async def go():
        url = f"http://{host}:{krb_server.port}"
        async with ReplicaClient(url, kerberos=True, ccache=kdc.ccaches["primary1"]) as c:
            await c.ensure_disk(primary.disk_id, primary.size)
            point = await c.send_stream(primary.disk_id, "c1", path)
            return point, await c.health()

    point, health = run(go())
    assert point["generation"] == 1
    assert health["principal"] == f"primary1@{REALM}"
    disk = krb_server._stores[str(tmp_path / "root")].disk(primary.disk_id)
    assert image_bytes(disk) == bytes(primary.data)


def test_ticket_for_another_service_is_refused(krb_server, kdc):
    async def go():
        async with ReplicaClient(f"http://localhost:{krb_server.port}", kerberos=True, retries=0,
                                 service="HTTP@otherhost", ccache=kdc.ccaches["primary1"]) as c:
            await c.health()

    with pytest.raises(AuthenticationError, match="refused our credentials: Kerberos ticket refused"):
        run(go())
    assert krb_server.counters["refused:unauthenticated"] == 1


def test_client_without_credentials_cannot_start(krb_server, kdc):
    async def go():
        async with ReplicaClient(f"http://localhost:{krb_server.port}", kerberos=True,
                                 ccache="FILE:" + kdc.path("empty.ccache")) as c:
            await c.health()

    with pytest.raises(AuthenticationError, match="no Kerberos ticket for HTTP@localhost"):
        run(go())


@pytest.mark.parametrize("header", [None, "Negotiate", "Negotiate !!notbase64", "Negotiate " +
                                    base64.b64encode(b"\x60\x10garbage-token-xx").decode(), "Basic dXNlcjpwdw=="])
def test_request_without_a_valid_ticket_gets_401(krb_server, header):
    async def go():
        async with aiohttp.ClientSession() as s:
            headers = {"Authorization": header} if header else {}
            async with s.get(f"http://127.0.0.1:{krb_server.port}/v1/health", headers=headers) as r:
                return r.status, r.headers.get("WWW-Authenticate"), await r.json()

    status, challenge, body = run(go())
    assert (status, challenge, body["error"]) == (401, "Negotiate", "unauthenticated")
    assert krb_server.counters["refused:unauthenticated"] == 1


def test_unauthorized_principal_is_refused(krb_server, kdc):
    async def go():
        async with ReplicaClient(f"http://localhost:{krb_server.port}", kerberos=True, retries=0,
                                 ccache=kdc.ccaches["primary2"]) as c:
            await c.health()

    with pytest.raises(AuthorizationError, match=f"'primary2@{REALM}' is not authorized"):
        run(go())
    assert krb_server.counters["unauthorized"] == 1


@pytest.mark.parametrize("answer,told", [(None, "did not prove its identity"),
                                         ("Negotiate " + base64.b64encode(b"\x6f\x05forged").decode(),
                                          "failed mutual authentication")])
def test_client_refuses_a_server_that_does_not_authenticate_itself(kdc, answer, told):
    """An impostor that answers 200 without the acceptor's token, or with a forged one, is not believed."""
    async def impostor(request):
        assert request.headers["Authorization"].startswith("Negotiate ")
        resp = web.json_response({"principal": "whoever", "server": {}, "disks": {}})
        if answer:
            resp.headers["WWW-Authenticate"] = answer
        return resp

    async def go():
        app = web.Application()
        app.router.add_get("/v1/health", impostor)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with ReplicaClient(f"http://localhost:{port}", kerberos=True,
                                     ccache=kdc.ccaches["primary1"]) as c:
                await c.health()
        finally:
            await runner.cleanup()

    with pytest.raises(AuthenticationError, match=told):
        run(go())


def test_server_refuses_to_start_without_its_key(tmp_path, kdc):
    server = ReplicaServer([AuthorizationEntry("*", str(tmp_path))], mode="kerberos", port=0,
                           keytab=kdc.path("other.keytab"), service="HTTP@localhost")
    with pytest.raises(AuthenticationError, match="cannot use the Kerberos keytab"):
        run(server.start())
    assert gssapi  # the tests really use the library

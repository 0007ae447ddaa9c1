"""Certificate mode: mutual TLS end to end into a real ReplicaStore, and every bad certificate refused in
the handshake itself, with our client and with openssl s_client, counted on the replica."""
from __future__ import annotations

import ssl
import subprocess

import aiohttp
import pytest

from replicator.transport import AuthenticationError, ReplicaClient

from ..externals import tool
from .conftest import Primary, image_bytes, run, write


def client(server, pki, name="primary1", where=None, **kw) -> ReplicaClient:
    return ReplicaClient(server.url, **pki.pair(name, where), **kw)


def test_upload_and_commit_over_mutual_tls(servers, pki, tmp_path):
    server = servers.cert()
    primary = Primary()

    async def go():
        async with client(server, pki) as c:
            st = await c.ensure_disk(primary.disk_id, primary.size, name="vm1-disk0")
            assert (st["generation"], st["points"]) == (0, [])
            results = []
            for i in range(2):
                path = write(tmp_path, f"cycle{i}.delta", primary.cycle())
                results.append(await c.send_stream(primary.disk_id, f"{i + 1:04x}", path))
            return results, await c.state(primary.disk_id), await c.health()

    results, state, health = run(go())
    assert [r["generation"] for r in results] == [1, 2]
    assert state["generation"] == 2 and state["points"][-1]["generation"] == 2
    assert state["uploads"] == {}
    disk = server._stores[str(tmp_path / "root")].disk(primary.disk_id)
    assert image_bytes(disk) == bytes(primary.data)
    assert health["principal"] == "primary1" and health["server"]["commits"] == 2


def test_ensure_disk_refuses_another_size(servers, pki):
    server = servers.cert()
    primary = Primary()

    async def go():
        async with client(server, pki) as c:
            await c.ensure_disk(primary.disk_id, primary.size)
            await c.ensure_disk(primary.disk_id, primary.size)          # idempotent
            await c.ensure_disk(primary.disk_id, primary.size * 2)

    with pytest.raises(Exception, match="sequence.*16777216 bytes"):
        run(go())


BAD = [
    # (certificate, where, what the replica counts, what the primary is told)
    ("expired", None, "certificate has expired", "alert certificate expired"),
    ("primary1", "foreign", "unable to get local issuer certificate", "alert unknown ca"),
    ("serveronly", None, "unsuitable certificate purpose", "alert unsupported certificate"),
]


@pytest.mark.parametrize("name,where,counted,told", BAD, ids=["expired", "foreign-ca", "no-clientAuth"])
def test_bad_client_certificate_is_refused_in_the_handshake(servers, pki, name, where, counted, told):
    server = servers.cert()
    c = client(server, pki, name, pki.foreign if where else None, retries=0)

    async def go():
        async with c:
            await c.health()

    with pytest.raises(AuthenticationError, match=told):
        run(go())
    assert server.counters[f"tls_refused:{counted}"] >= 1
    assert server.counters["requests"] == 0


def test_client_without_a_certificate_is_refused(servers, pki):
    server = servers.cert()
    ctx = ssl.create_default_context(cafile=pki.pair("primary1")["ca"])

    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.get(server.url + "/v1/health", ssl=ctx) as r:
                return r.status

    with pytest.raises((aiohttp.ClientError, ssl.SSLError), match="certificate required"):
        run(go())
    assert server.counters["tls_refused:PEER_DID_NOT_RETURN_A_CERTIFICATE"] >= 1   # aiohttp retries a GET once
    assert server.counters["requests"] == 0


def test_client_refuses_a_replica_from_another_ca(servers, pki):
    fake = pki.pair("replica1", pki.foreign)
    server = servers.cert(certfile=fake["cert"], keyfile=fake["key"])

    async def go():
        async with client(server, pki, retries=0) as c:
            await c.health()

    with pytest.raises(AuthenticationError, match="replica certificate refused.*verify failed"):
        run(go())


def s_client(server, *extra: str, tls: str = "-tls1_3") -> subprocess.CompletedProcess:
    """openssl s_client sending one HTTP request; returns its exit status and output."""
    request = b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    return subprocess.run([tool("openssl"), "s_client", "-connect", f"127.0.0.1:{server.port}", tls,
                           "-servername", "localhost", "-ign_eof", *extra],
                          input=request, capture_output=True, timeout=30)


@pytest.mark.parametrize("tls", ["-tls1_3", "-tls1_2"])
def test_openssl_s_client_without_certificate_is_refused(servers, pki, tls):
    server = servers.cert()
    r = s_client(server, "-CAfile", pki.pair("primary1")["ca"], tls=tls)
    out = (r.stdout + r.stderr).decode(errors="replace")
    assert r.returncode != 0, out
    assert "HTTP/1.1" not in out
    assert ("certificate required" if tls == "-tls1_3" else "handshake failure") in out
    assert server.counters["tls_refused:PEER_DID_NOT_RETURN_A_CERTIFICATE"] == 1


@pytest.mark.parametrize("name,where,counted,told", BAD, ids=["expired", "foreign-ca", "no-clientAuth"])
def test_openssl_s_client_with_bad_certificate_is_refused(servers, pki, name, where, counted, told):
    server = servers.cert()
    p = pki.pair(name, pki.foreign if where else None)
    r = s_client(server, "-CAfile", pki.pair("primary1")["ca"], "-cert", p["cert"], "-key", p["key"])
    out = (r.stdout + r.stderr).decode(errors="replace")
    assert r.returncode != 0 and "HTTP/1.1" not in out, out
    assert told in out
    assert server.counters[f"tls_refused:{counted}"] == 1


def test_openssl_s_client_with_good_certificate_gets_an_answer(servers, pki):
    server = servers.cert()
    p = pki.pair("primary1")
    r = s_client(server, "-CAfile", p["ca"], "-cert", p["cert"], "-key", p["key"], "-verify_return_error")
    out = r.stdout.decode(errors="replace")
    assert "HTTP/1.1 200 OK" in out and '"principal": "primary1"' in out
    assert server.counters["tls_refused"] == 0

"""Fixtures for the hardening tests: the transport tests' PKI (our own `replicator certs`) and replica
servers on loopback, and a Peer: one primary with its own certificate acting over real mutual TLS."""
from __future__ import annotations

import os
import ssl
import uuid

import aiohttp
import pytest

from replicator.transport import ReplicaClient

from ..transport.conftest import MiB, Primary, image_bytes, pki, run, servers, write  # noqa: F401 (fixtures)


class Peer:
    """A primary (by certificate name) talking to a replica server: the project's client for the
    ordinary calls, raw HTTPS requests (aiohttp with our certificate) for the ones an attacker crafts."""

    def __init__(self, server, pki, tmp_path, cert_name: str):
        self.server, self.pki, self.tmp, self.name = server, pki, tmp_path, cert_name
        self.n = 0

    def client(self) -> ReplicaClient:
        return ReplicaClient(self.server.url, retries=0, **self.pki.pair(self.name))

    def call(self, method: str, *args, **kw):
        async def go():
            async with self.client() as c:
                return await getattr(c, method)(*args, **kw)
        return run(go())

    def send(self, disk_id, stream: bytes, stream_id: str | None = None, commit: bool = True) -> dict:
        self.n += 1
        path = write(self.tmp, f"{self.name}-{self.n}.delta", stream)
        return self.call("send_stream", disk_id, stream_id or uuid.uuid4().hex, path, commit=commit)

    def ssl(self) -> ssl.SSLContext:
        p = self.pki.pair(self.name)
        ctx = ssl.create_default_context(cafile=p["ca"])
        ctx.load_cert_chain(p["cert"], p["key"])
        return ctx

    def raw(self, method: str, path: str, **kw) -> tuple[int, bytes]:
        """One request as bytes on the wire: (status, body)."""
        async def go():
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl())) as s:
                async with s.request(method, self.server.url + path, **kw) as r:
                    return r.status, await r.read()
        return run(go())


def tree(root: str) -> dict[str, int]:
    """Every file under root with its size: what a request left behind."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = os.path.getsize(p)
    return out


@pytest.fixture
def peer_factory(servers, pki, tmp_path):
    return lambda server, name: Peer(server, pki, tmp_path, name)

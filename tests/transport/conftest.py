"""Fixtures for the transport tests: a PKI made with our own `certs`, replica servers on free loopback
ports in their own uvloop threads, a real MIT KDC, and primaries that produce real delta streams."""
from __future__ import annotations

import asyncio
import datetime as dt
import io
import os
import random
import uuid
from dataclasses import dataclass

import pytest
import uvloop

from replicator import delta
from replicator.transport import AuthorizationEntry, certs
from replicator.transport.server import ReplicaServer, ServerThread

from .kdc import Kdc

MiB = 1 << 20
SIZE = 16 * MiB


def run(coro):
    """Run a coroutine on a fresh uvloop, as the primary's replication service would."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


@dataclass
class Pki:
    dir: str
    foreign: str

    def pair(self, name: str, where: str | None = None) -> dict:
        d = where or self.dir
        return {"cert": os.path.join(d, f"{name}.pem"), "key": os.path.join(d, f"{name}.key"),
                "ca": os.path.join(self.dir, "ca.pem")}


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    """Our CA with a replica, primaries and an intruder; an expired and a server-only certificate from it;
    a foreign CA with a primary of its own and a self-signed impostor of ours."""
    d = str(tmp_path_factory.mktemp("pki"))
    foreign = str(tmp_path_factory.mktemp("foreign-pki"))
    certs.init_ca(d)
    certs.issue(d, "replica1", dns=["localhost"])
    for name in ("primary1", "primary2", "intruder", "primary1.site-a.example", "host9.site-a.example"):
        certs.issue(d, name)
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
    certs.issue(d, "expired", not_before=past, not_after=past + dt.timedelta(days=1))
    certs.issue(d, "serveronly", usages=("server",))
    certs.init_ca(foreign, name="someone else's CA")
    certs.issue(foreign, "primary1")
    certs.issue(foreign, "replica1", dns=["localhost"])
    return Pki(d, foreign)


class Servers:
    """Start replica servers for one test; all are stopped at its end."""

    def __init__(self, tmp_path, pki: Pki):
        self.tmp, self.pki, self.threads = tmp_path, pki, []

    def cert(self, entries=None, **kw) -> ReplicaServer:
        entries = entries or [AuthorizationEntry("primary*", str(self.tmp / "root"))]
        p = self.pki.pair("replica1")
        kw.setdefault("certfile", p["cert"])
        kw.setdefault("keyfile", p["key"])
        return self.start(ReplicaServer(entries, mode="cert", port=0, cafile=p["ca"], **kw))

    def start(self, server: ReplicaServer) -> ReplicaServer:
        t = ServerThread(server)
        self.threads.append(t)
        return t.start()

    def stop(self) -> None:
        for t in self.threads:
            t.stop()


@pytest.fixture
def servers(tmp_path, pki):
    s = Servers(tmp_path, pki)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def kdc(tmp_path_factory):
    """A realm TEST.REPLICATOR on 127.0.0.1 with service keys for HTTP/localhost and HTTP/127.0.0.1 in
    one keytab, principals primary1, primary2 and HTTP/otherhost, and a ticket cache for each primary."""
    k = Kdc(str(tmp_path_factory.mktemp("kdc"))).start()
    saved = {name: os.environ.get(name) for name in k.env}
    os.environ.update(k.env)
    try:
        for host in ("localhost", "127.0.0.1"):
            k.add_principal(f"HTTP/{host}", k.path("server.keytab"))
        k.add_principal("HTTP/otherhost", k.path("other.keytab"))
        k.ccaches = {}
        for name in ("primary1", "primary2"):
            k.add_principal(name, k.path(f"{name}.keytab"))
            k.ccaches[name] = k.kinit(name, k.path(f"{name}.keytab"), "FILE:" + k.path(f"{name}.ccache"))
        yield k
    finally:
        k.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Primary:
    """A primary disk as bytes, producing real delta streams of its changes."""

    def __init__(self, disk_id=None, size: int = SIZE, seed: int = 1):
        self.disk_id = disk_id or uuid.uuid4()
        self.size = size
        self.data = bytearray(size)
        self.rng = random.Random(seed)
        self.generation = 0

    def cycle(self, n_writes: int = 6, max_write: int = 600_000, compress: bool = True) -> bytes:
        """Change the disk (incompressible data, some zero runs) and return the stream of the changes."""
        header = delta.StreamHeader(disk_id=self.disk_id, disk_size=self.size, block_size=MiB,
                                    generation=self.generation + 1, base_generation=self.generation,
                                    consistency="crash", source_logs=[], created=1.7e9 + self.generation,
                                    kind="delta", extra={})
        sink = io.BytesIO()
        enc = delta.DeltaEncoder(header, sink, compress=compress)
        for _ in range(n_writes):
            n = self.rng.randrange(1, max_write)
            off = self.rng.randrange(0, self.size - n)
            if self.rng.random() < 0.2:
                self.data[off:off + n] = bytes(n)
                enc.add_zero(off, n)
            else:
                chunk = self.rng.randbytes(n)
                self.data[off:off + n] = chunk
                enc.add_data(off, chunk)
        enc.finish()
        self.generation += 1
        return sink.getvalue()


def write(tmp_path, name: str, data: bytes) -> str:
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def image_bytes(disk) -> bytes:
    with disk.open_image() as img:
        return img.read(0, img.size)

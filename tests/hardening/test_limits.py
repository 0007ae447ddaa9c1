"""Kinds 5 and 9: what a peer can make the replica hold. A digest request over a large sparse disk is
answered window by window (the server's memory does not grow with the disk), its block size is bounded;
a connection that sends nothing, half a request header or half a body is closed after the configured
timeouts (a real TLS connection with our client certificate)."""
from __future__ import annotations

import asyncio
import socket
import ssl
import time
import tracemalloc

import aiohttp
import numpy as np

from replicator.resync.scan import digest_disk
from replicator.transport import AuthorizationEntry

from .conftest import MiB, Peer, Primary, run

GiB = 1 << 30


def _stream_digests(peer: Peer, disk_id, block_size: int) -> tuple[int, bytes]:
    """Read the answer as it comes, keeping only its first MiB: (length, first MiB)."""
    async def go():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=peer.ssl())) as s:
            async with s.get(f"{peer.server.url}/v1/disks/{disk_id}/digests",
                             params={"block_size": str(block_size)}) as r:
                assert r.status == 200, await r.text()
                n, head = 0, bytearray()
                async for chunk in r.content.iter_chunked(MiB):
                    n += len(chunk)
                    if len(head) < MiB:
                        head += chunk[:MiB - len(head)]
                return n, bytes(head)
    return run(go())


def test_digests_of_a_large_sparse_disk_are_streamed_in_bounded_memory(servers, pki, tmp_path):
    root = str(tmp_path / "root")
    server = servers.cert([AuthorizationEntry("primary1", root)])
    peer = Peer(server, pki, tmp_path, "primary1")
    p = Primary(size=4 * GiB)
    p.data = bytearray()                                  # the primary's bytes are not kept for this one
    from replicator import delta
    import io
    header = delta.StreamHeader(disk_id=p.disk_id, disk_size=p.size, block_size=MiB, generation=1,
                                base_generation=0, consistency="crash", source_logs=[], created=1.7e9,
                                kind="delta", extra={})
    sink = io.BytesIO()
    enc = delta.DeltaEncoder(header, sink)
    first = np.random.default_rng(3).bytes(65536)
    enc.add_data(0, first)
    enc.finish()
    peer.call("ensure_disk", p.disk_id, p.size)
    peer.send(p.disk_id, sink.getvalue())
    blocks = p.size // 4096                               # 1 Mi blocks: 16 MiB of digests (the old code held 2x)
    tracemalloc.start()
    try:
        n, head = _stream_digests(peer, p.disk_id, 4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == blocks * 16
    assert peak < 20 * MiB, f"the server held {peak / MiB:.0f} MiB to answer"
    disk = server._stores[root].disk(p.disk_id)
    with disk.open_image() as img:                        # the bytes, as the one-shot digest computes them
        from replicator.resync.engine import Grid, digest_window
        grid = Grid(4096, img.size)
        w = digest_window(img, grid, 0, bytearray(grid.window_blocks * 4096))
        assert head[:len(w.digests) * 16] == w.digests.astype("<u8").tobytes()[:MiB]


def test_digests_equal_the_whole_disk_computation_and_block_size_is_bounded(servers, pki, tmp_path):
    root = str(tmp_path / "root")
    server = servers.cert([AuthorizationEntry("primary1", root)])
    peer = Peer(server, pki, tmp_path, "primary1")
    p = Primary()
    peer.call("ensure_disk", p.disk_id, p.size)
    peer.send(p.disk_id, p.cycle())
    got = peer.call("digests", p.disk_id, 65536)
    with server._stores[root].disk(p.disk_id).open_image() as img:
        assert got == digest_disk(img, 65536)[0].astype("<u8").tobytes()
    for bad in ("268435456", "32768000", "abc", "-4096", "9" * 30, "4097"):
        status, raw = peer.raw("GET", f"/v1/disks/{p.disk_id}/digests?block_size={bad}")
        assert status == 400 and b"block_size" in raw, (bad, status)


def _tls(peer: Peer, port: int) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return peer.ssl().wrap_socket(sock, server_hostname="localhost")


def _closed_within(conn: ssl.SSLSocket, seconds: float) -> float:
    start = time.monotonic()
    conn.settimeout(seconds)
    try:
        while conn.recv(4096):
            pass
    except (ConnectionResetError, ssl.SSLError):
        pass
    return time.monotonic() - start


def test_half_a_header_nothing_or_half_a_body_is_timed_out(servers, pki, tmp_path):
    server = servers.cert([AuthorizationEntry("primary1", str(tmp_path / "root"))], header_timeout=1.0,
                          read_timeout=1.0)
    peer = Peer(server, pki, tmp_path, "primary1")
    silent = _tls(peer, server.port)
    half = _tls(peer, server.port)
    half.sendall(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
    assert _closed_within(half, 10) < 5
    assert _closed_within(silent, 10) < 5
    body = _tls(peer, server.port)
    p = Primary()
    body.sendall(f"PUT /v1/disks/{p.disk_id} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 f"Content-Length: 200\r\n\r\n{{\"size\": ".encode())
    body.settimeout(10)
    answer = body.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400") and b"not received within" in answer, answer
    assert not (tmp_path / "root" / "disks" / str(p.disk_id)).exists()
    # an ordinary client is not disturbed: requests on one connection within the timeout
    assert run(_health_twice(peer))


async def _health_twice(peer: Peer) -> bool:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=peer.ssl())) as s:
        for _ in range(2):
            async with s.get(peer.server.url + "/v1/health") as r:
                assert r.status == 200
            await asyncio.sleep(0.2)
    return True

"""Resumable uploads: a dropped connection or an aborted sender continues from what the replica holds
durably (only the missing bytes travel), a resume token that does not match what was sent is refused,
the bandwidth limit holds, and several disks and cycles can be in flight at once."""
from __future__ import annotations

import asyncio
import os
import time

import pytest

from replicator.transport import ReplicaClient, ResumeTokenError

from .conftest import MiB, Primary, image_bytes, run, write


class CuttingProxy:
    """A TCP relay in front of the replica that kills its first connection (both directions, with a
    reset) once `cut_after` bytes came from the client, and counts the client's bytes on the wire."""

    def __init__(self, target_port: int, cut_after: int):
        self.target_port, self.cut_after = target_port, cut_after
        self.pending_cut = True
        self.wire_bytes = 0              # client bytes read, all connections
        self.after_cut = 0               # client bytes on the connections opened after the cut
        self.connections = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _relay(self, reader, writer):
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        first = self.connections == 1

        async def pump(src, dst, from_client: bool):
            try:
                while data := await src.read(1 << 16):
                    if from_client:
                        self.wire_bytes += len(data)
                        self.after_cut += 0 if first else len(data)
                        if first and self.pending_cut and self.wire_bytes >= self.cut_after:
                            self.pending_cut = False
                            writer.transport.abort()
                            up_writer.transport.abort()
                            return
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))

    async def stop(self):
        self.server.close()


def big_cycle(seed: int = 7) -> tuple[Primary, bytes]:
    """A ~12 MiB incompressible cycle on a 64 MiB disk."""
    p = Primary(size=64 * MiB, seed=seed)
    return p, p.cycle(n_writes=24, max_write=MiB)


def test_dropped_connection_resumes_with_only_the_missing_bytes(servers, pki, tmp_path):
    server = servers.cert(sync_interval=MiB)
    primary, stream = big_cycle()
    path = write(tmp_path, "c1.delta", stream)

    async def go():
        proxy = CuttingProxy(server.port, cut_after=5 * MiB)
        port = await proxy.start()
        try:
            async with ReplicaClient(f"https://127.0.0.1:{port}", **pki.pair("primary1"), backoff=0.1) as c:
                await c.ensure_disk(primary.disk_id, primary.size)
                result = await c.send_stream(primary.disk_id, "c1", path)
                return result, proxy, dict(c.counters)
        finally:
            await proxy.stop()

    result, proxy, client_counters = run(go())
    assert result["generation"] == 1
    disk = server._stores[str(tmp_path / "root")].disk(primary.disk_id)
    assert image_bytes(disk) == bytes(primary.data)
    assert not proxy.pending_cut and proxy.connections >= 2
    assert disk.state.counters["upload_interrupted"] == 1
    assert client_counters["retries"] >= 1
    # every stream byte reached the spool exactly once; after the cut, the wire carried only what the
    # replica was missing (the cut connection had carried 5 MiB, some of it lost in socket buffers)
    assert server.counters["bytes_received"] == len(stream)
    assert len(stream) - 5 * MiB < proxy.after_cut < len(stream) - MiB


def test_a_dropped_upload_over_a_recycled_spool_resumes_with_only_the_missing_bytes(servers, pki, tmp_path):
    """The second cycle's upload writes over the first one's spool in place (replica/store.py, Upload) and
    its connection is cut: what the replica holds durably is the new stream's bytes only, and the resume
    sends just the rest."""
    server = servers.cert(sync_interval=MiB)
    primary, first = big_cycle(seed=9)
    second = primary.cycle(n_writes=24, max_write=MiB)
    p1, p2 = write(tmp_path, "c1.delta", first), write(tmp_path, "c2.delta", second)

    async def go():
        async with ReplicaClient(server.url, **pki.pair("primary1")) as c:
            await c.ensure_disk(primary.disk_id, primary.size)
            await c.send_stream(primary.disk_id, "c1", p1)          # leaves spool/spent.bin behind
        proxy = CuttingProxy(server.port, cut_after=5 * MiB)
        port = await proxy.start()
        try:
            async with ReplicaClient(f"https://127.0.0.1:{port}", **pki.pair("primary1"), backoff=0.1) as c:
                return await c.send_stream(primary.disk_id, "c2", p2), proxy
        finally:
            await proxy.stop()

    result, proxy = run(go())
    assert result["generation"] == 2 and not proxy.pending_cut
    disk = server._stores[str(tmp_path / "root")].disk(primary.disk_id)
    assert image_bytes(disk) == bytes(primary.data)
    assert server.counters["bytes_received"] == len(first) + len(second)
    assert disk.state.counters["upload_interrupted"] == 1


def test_aborted_sender_resumes_where_the_replica_stopped(servers, pki, tmp_path):
    server = servers.cert(sync_interval=MiB)
    primary, stream = big_cycle(seed=8)
    path = write(tmp_path, "c1.delta", stream)

    async def go():
        async with ReplicaClient(server.url, **pki.pair("primary1")) as c:
            await c.ensure_disk(primary.disk_id, primary.size)
        slow = ReplicaClient(server.url, **pki.pair("primary1"), bandwidth_limit=8 * MiB)
        task = asyncio.ensure_future(slow.send_stream(primary.disk_id, "c1", path))
        await asyncio.sleep(0.6)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await slow.close()
        async with ReplicaClient(server.url, **pki.pair("primary1")) as c:
            held, _ = await c.resume_token(primary.disk_id, "c1")
            return held, await c.send_stream(primary.disk_id, "c1", path)

    held, result = run(go())
    assert 0 < held < len(stream)
    assert result["generation"] == 1
    disk = server._stores[str(tmp_path / "root")].disk(primary.disk_id)
    assert image_bytes(disk) == bytes(primary.data)
    assert server.counters["bytes_received"] == len(stream)


def _send_prefix_then(server, pki, tmp_path, primary, prefix: bytes, tamper=None):
    """Spool `prefix` as stream c1 without committing, optionally tamper with the spool on the replica,
    then send the real stream; returns the client's counters, the disk's state and the error."""
    stream_path = write(tmp_path, "c1.delta", primary.stream)
    prefix_path = write(tmp_path, "prefix.delta", prefix)
    disk_root = str(tmp_path / "root")

    async def go():
        async with ReplicaClient(server.url, **pki.pair("primary1"), retries=1) as c:
            await c.ensure_disk(primary.disk_id, primary.size)
            await c.send_stream(primary.disk_id, "c1", prefix_path, commit=False)
            if tamper:
                tamper(os.path.join(disk_root, "disks", str(primary.disk_id), "spool", "c1.delta"))
            with pytest.raises(ResumeTokenError) as err:
                await c.send_stream(primary.disk_id, "c1", stream_path)
            state = await c.state(primary.disk_id)
            again = await c.send_stream(primary.disk_id, "c1", stream_path)      # starts over cleanly
            return dict(c.counters), state, err.value, again

    return run(go())


def _flip_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(100_000)
        b = f.read(1)
        f.seek(100_000)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("case", ["tampered-spool", "claims-too-much"])
def test_forged_resume_token_is_refused(servers, pki, tmp_path, case):
    server = servers.cert()
    primary = Primary()
    primary.stream = primary.cycle(n_writes=8)
    if case == "tampered-spool":
        prefix, tamper, told = primary.stream[:len(primary.stream) // 2], _flip_byte, "are not what was sent"
    else:
        prefix, tamper, told = primary.stream + b"extra", None, "which has only"
    counters, state, err, again = _send_prefix_then(server, pki, tmp_path, primary, prefix, tamper)
    assert told in str(err)
    assert counters["resume_token_refused"] == 1
    assert state["generation"] == 0 and state["uploads"] == {}       # the bad spool was dropped
    disk = server._stores[str(tmp_path / "root")].disk(primary.disk_id)
    assert disk.state.counters["resume_token_refused"] == 1
    assert again["generation"] == 1 and image_bytes(disk) == bytes(primary.data)


def test_bandwidth_limit_is_respected(servers, pki, tmp_path):
    server = servers.cert()
    primary = Primary()
    stream = b""
    while len(stream) < 3 * MiB:                       # a real stream (the replica refuses anything else)
        stream = primary.cycle(n_writes=12)
    path = write(tmp_path, "blob", stream)

    async def go():
        async with ReplicaClient(server.url, **pki.pair("primary1"), bandwidth_limit=2 * MiB) as c:
            await c.ensure_disk(primary.disk_id, primary.size)
            t0 = time.monotonic()
            await c.send_stream(primary.disk_id, "b10b", path, commit=False)
            return time.monotonic() - t0

    elapsed = run(go())
    assert elapsed >= 1.2          # >= 3 MiB at 2 MiB/s, less the initial burst: about 1.4 s at least


def test_several_disks_and_cycles_in_flight(servers, pki, tmp_path):
    server = servers.cert()
    primaries = [Primary(seed=s) for s in range(3)]
    streams = {(i, g): write(tmp_path, f"d{i}g{g}.delta", p.cycle()) for g in (1, 2)
               for i, p in enumerate(primaries)}

    async def go():
        async with ReplicaClient(server.url, **pki.pair("primary1")) as c:
            await asyncio.gather(*(c.ensure_disk(p.disk_id, p.size) for p in primaries))
            # every cycle of every disk uploads at once; commits then go in order per disk
            await asyncio.gather(*(c.send_stream(primaries[i].disk_id, f"{g:x}{i:x}", path, commit=False)
                                   for (i, g), path in streams.items()))

            async def commit_in_order(i, p):
                return [await c.commit(p.disk_id, f"{g:x}{i:x}") for g in (1, 2)]
            return await asyncio.gather(*(commit_in_order(i, p) for i, p in enumerate(primaries)))

    results = run(go())
    assert [[r["generation"] for r in rs] for rs in results] == [[1, 2]] * 3
    for p in primaries:
        disk = server._stores[str(tmp_path / "root")].disk(p.disk_id)
        assert image_bytes(disk) == bytes(p.data)


def test_stalled_upload_is_cut_and_its_lock_released(servers, pki, tmp_path):
    """A sender that stops mid-body without closing (a half-open connection) must not hold the upload
    forever: after read_timeout the replica drops it, keeps what arrived, and a resume proceeds."""
    import socket
    import ssl
    server = servers.cert(read_timeout=0.5)
    primary = Primary()
    stream = primary.cycle()
    path = write(tmp_path, "c1.delta", stream)
    run(_ensure(server, pki, primary))
    p = pki.pair("primary1")
    ctx = ssl.create_default_context(cafile=p["ca"])
    ctx.load_cert_chain(p["cert"], p["key"])
    with socket.create_connection(("127.0.0.1", server.port)) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        head = (f"PUT /v1/disks/{primary.disk_id}/uploads/c1?offset=0 HTTP/1.1\r\nHost: x\r\n"
                f"Content-Length: {len(stream)}\r\n\r\n").encode()
        tls.sendall(head + stream[:1000])
        t0 = time.monotonic()
        assert tls.recv(1) == b""                         # the replica gave up on us
        assert time.monotonic() - t0 < 10

    async def resume():
        async with ReplicaClient(server.url, **p) as c:
            held, _ = await c.resume_token(primary.disk_id, "c1")
            return held, await c.send_stream(primary.disk_id, "c1", path)

    held, result = run(resume())
    assert held == 1000 and result["generation"] == 1
    assert server.counters["bytes_received"] == len(stream)


async def _ensure(server, pki, primary):
    async with ReplicaClient(server.url, **pki.pair("primary1")) as c:
        await c.ensure_disk(primary.disk_id, primary.size)

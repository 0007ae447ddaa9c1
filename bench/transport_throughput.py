"""Throughput of ReplicaClient.send_stream over loopback mutual TLS against the loopback TLS ceiling.

  .venv/bin/python bench/transport_throughput.py [--size-mib 1024] [--sync-mib 16]

The ceiling is a plain Python TLS socket pair (the same certificates, the same negotiated cipher, one
process each side, 1 MiB sendall/recv_into) moving the same file. The transport run starts the replica
server in its own process (spool on the local disk, synced every --sync-mib) and sends the file as one
opaque stream from this process. Peak RSS (VmHWM) of both sides must stay within 256 MiB. Rounds
alternate and medians are reported (the machine is shared). spool_disk_write_MBps is the other bound:
copying the file into --dir the way the spool is written (1 MiB writes, fsync every --sync-mib); with
--dir /dev/shm the disk drops out and the figure is the transport's own.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import ssl
import statistics
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

MiB, GiB = 1 << 20, 1 << 30
RSS_LIMIT = 256 * MiB
mp = multiprocessing.get_context("spawn")     # children start clean: their peak RSS is their own


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def make_file(path: str, size: int) -> None:
    """Incompressible bytes, written in 8 MiB pieces (never held whole)."""
    import numpy as np
    rng = np.random.default_rng(1)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(8 * MiB, left)
            f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n


# ---------------------------------------------------------------------------------------------- ceiling
def _sink(pki: str, ready, result) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(f"{pki}/replica.pem", f"{pki}/replica.key")
    ctx.load_verify_locations(f"{pki}/ca.pem")
    with socket.create_server(("127.0.0.1", 0)) as srv:
        ready.put(srv.getsockname()[1])
        conn, _ = srv.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            expect = int.from_bytes(tls.recv(8), "little")
            buf = bytearray(MiB)
            total = 0
            while total < expect and (n := tls.recv_into(buf)):
                total += n
            tls.sendall(b"k")
            result.put((total, tls.cipher()[0], vm_hwm()))


def _source(pki: str, port: int, path: str, result) -> None:
    from replicator.transport.client import _client_context
    ctx = _client_context(f"{pki}/primary.pem", f"{pki}/primary.key", f"{pki}/ca.pem")
    fd = os.open(path, os.O_RDONLY)
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(os.fstat(fd).st_size.to_bytes(8, "little"))
        off = 0
        while chunk := os.pread(fd, MiB, off):
            tls.sendall(chunk)
            off += len(chunk)
        tls.recv(1)                 # the sink answers once it has read everything
    result.put((time.perf_counter() - t0, vm_hwm()))
    os.close(fd)


def ceiling(pki: str, path: str) -> dict:
    ready, sink_out, source_out = mp.Queue(), mp.Queue(), mp.Queue()
    sink = mp.Process(target=_sink, args=(pki, ready, sink_out))
    sink.start()
    source = mp.Process(target=_source, args=(pki, ready.get(timeout=30), path, source_out))
    source.start()
    elapsed, _ = source_out.get(timeout=600)
    total, cipher, _ = sink_out.get(timeout=60)
    sink.join()
    source.join()
    return {"bytes": total, "seconds": elapsed, "cipher": cipher}


def disk_ceiling(path: str, out: str, sync: int) -> float:
    """Seconds to copy the file into `out` the way the spool is written: 1 MiB writes, fsync every `sync`."""
    src, dst = os.open(path, os.O_RDONLY), os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    t0, off, unsynced = time.perf_counter(), 0, 0
    while chunk := os.pread(src, MiB, off):
        os.pwrite(dst, chunk, off)
        off += len(chunk)
        unsynced += len(chunk)
        if unsynced >= sync:
            os.fsync(dst)
            unsynced = 0
    os.fsync(dst)
    elapsed = time.perf_counter() - t0
    os.close(src)
    os.close(dst)
    os.unlink(out)
    return elapsed


# ---------------------------------------------------------------------------------------------- transport
def _server(pki: str, root: str, sync: int, ready, stop) -> None:
    from replicator.transport import AuthorizationEntry
    from replicator.transport.server import ReplicaServer, ServerThread
    server = ReplicaServer([AuthorizationEntry("primary", root)], port=0, certfile=f"{pki}/replica.pem",
                           keyfile=f"{pki}/replica.key", cafile=f"{pki}/ca.pem", sync_interval=sync)
    thread = ServerThread(server)
    thread.start()
    ready.put(server.port)
    cpu0 = time.process_time()
    stop.get()
    thread.stop()
    ready.put((vm_hwm(), dict(server.counters, cpu=time.process_time() - cpu0)))


async def _send(pki: str, port: int, path: str, size: int) -> float:
    from replicator.transport import ReplicaClient
    disk = uuid.uuid4()
    async with ReplicaClient(f"https://127.0.0.1:{port}", cert=f"{pki}/primary.pem", key=f"{pki}/primary.key",
                             ca=f"{pki}/ca.pem") as c:
        await c.ensure_disk(disk, max(size, 64 * MiB), block_size=32 * MiB)
        t0, c0 = time.perf_counter(), time.process_time()
        result = await c.send_stream(disk, "b1", path, commit=False)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert result["durable"] == size, result
    return elapsed, cpu


def transport(pki: str, root: str, path: str, size: int, sync: int) -> dict:
    import uvloop
    ready, stop = mp.Queue(), mp.Queue()
    server = mp.Process(target=_server, args=(pki, root, sync, ready, stop))
    server.start()
    port = ready.get(timeout=60)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        elapsed, cpu = runner.run(_send(pki, port, path, size))
    stop.put(None)
    server_hwm, counters = ready.get(timeout=60)
    server.join()
    return {"seconds": elapsed, "server_hwm": server_hwm, "client_hwm": vm_hwm(), "client_cpu": cpu,
            "server_cpu": counters.get("cpu", 0),
            "received": counters.get("bytes_received", 0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--sync-mib", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="ceiling and transport alternate; medians reported")
    ap.add_argument("--dir", help="work directory, where the spool goes (default: a temporary one in /var/tmp)")
    args = ap.parse_args()
    size = args.size_mib * MiB
    from replicator.transport import certs
    ceilings, runs, disks = [], [], []
    with tempfile.TemporaryDirectory(dir=args.dir or "/var/tmp", prefix="transport-bench-") as tmp:
        pki = os.path.join(tmp, "pki")
        certs.init_ca(pki)
        certs.issue(pki, "replica")
        certs.issue(pki, "primary")
        path = os.path.join(tmp, "stream.bin")
        make_file(path, size)
        for i in range(args.rounds):
            ceilings.append(ceiling(pki, path))
            disks.append(disk_ceiling(path, os.path.join(tmp, "spool-copy"), args.sync_mib * MiB))
            runs.append(transport(pki, os.path.join(tmp, f"root{i}"), path, size, args.sync_mib * MiB))
    ceil_mbs = statistics.median(size / c["seconds"] / 1e6 for c in ceilings)
    t_mbs = statistics.median(size / t["seconds"] / 1e6 for t in runs)
    client_hwm, server_hwm = max(t["client_hwm"] for t in runs), max(t["server_hwm"] for t in runs)
    report = {"size_mib": args.size_mib, "rounds": args.rounds, "cipher": ceilings[0]["cipher"],
              "ceiling_MBps": round(ceil_mbs), "send_stream_MBps": round(t_mbs),
              "share_of_ceiling": round(t_mbs / ceil_mbs, 2), "sync_every_mib": args.sync_mib,
              "spool_disk_write_MBps": round(statistics.median(size / d / 1e6 for d in disks)),
              "client_cpu_s_per_GiB": round(statistics.median(t["client_cpu"] for t in runs) * GiB / size, 2),
              "server_cpu_s_per_GiB": round(statistics.median(t["server_cpu"] for t in runs) * GiB / size, 2),
              "client_peak_rss_mib": round(client_hwm / MiB, 1), "server_peak_rss_mib": round(server_hwm / MiB, 1)}
    print(json.dumps(report, indent=1))
    ok = all(t["received"] == size for t in runs) and max(client_hwm, server_hwm) <= RSS_LIMIT
    if not ok:
        print("FAIL: peak RSS above 256 MiB or bytes missing", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

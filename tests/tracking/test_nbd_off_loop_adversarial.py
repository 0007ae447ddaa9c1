"""An adversarial pass over the export's reads off the loop (tracking/reads.py, nbd.py's _fill/reads_done):
memory bounds for a hostile client, flow control with reads in flight, the stream's end, the disk's space
while a worker thread reads it, and shutdown while reads are in flight.

Every disk is a real VHDX on this machine's disk; its data is made cold for real (fsync + POSIX_FADV_DONTNEED),
so the reads on the worker threads go to the device. Nothing of the disk is mocked: where a test looks inside
the server it only records what the server does."""
from __future__ import annotations

import socket
import threading
import time

from replicator.tracking import nbd as N

from replicator.tracking.service import ExportService

from .helpers import MiB, make_vhdx, pattern, serving, tracked, wait_until
from .test_nbd_cold_reads import DATA, SIZE, cold, drop_cache, request, simple_reply  # noqa: F401 (cold: a fixture)
from .test_nbd_malformed import Raw

OFF_LOOP_BYTES = getattr(N, "OFF_LOOP_BYTES", 32 * MiB)


def connect(svc) -> Raw:
    raw = Raw(svc.socket_path)
    raw.flags()
    assert raw.go("disk") == SIZE
    return raw


def send_soon(raw: Raw, data: bytes) -> threading.Thread:
    """Send from a thread, so that the replies are read while the requests still go out (a client that
    reads nothing until it has sent everything could fill both directions of the socket)."""
    t = threading.Thread(target=raw.send, args=(data,), daemon=True)
    t.start()
    return t


def on_loop(svc, fn):
    """fn() run on the export's loop (between requests), its result returned."""
    async def call():
        return fn()
    return svc._call(call())


def peak_rss_growth(fn) -> int:
    """How far this process's peak resident memory rose above its resident memory while fn() ran (the peak
    is reset first: /proc/self/clear_refs, 5)."""
    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before


# ------------------------------------------------------------------ memory bounds
def test_pipelined_caches_of_cold_data_hold_no_more_than_the_in_flight_bound(tmp_path):
    """NBD_CMD_CACHE's reply is 16 bytes; reading 32 MiB of cold data for it must not keep 32 MiB buffers
    alive per request. Three pipelined 32 MiB CACHEs of distinct cold data, in flight together: the export
    (in this process) grows by far less than the 96 MiB they cover. Read into a buffer per request, a client
    that reads nothing at all would make the export allocate OFF_LOOP_MAX x 32 MiB = 512 MiB per
    connection."""
    big = pattern(9, 96 * MiB)
    path = make_vhdx(tmp_path / "big.vhdx", 128 * MiB, fill=[(0, big)])
    with serving({"disk": tracked(path)}, tmp_path / "nbd.sock") as svc:
        drop_cache(path)
        before = svc.server.stats["reads_off_loop"]
        raw = Raw(svc.socket_path)
        raw.flags()
        raw.go("disk")

        def caches():
            raw.send(b"".join(request(N.CMD_CACHE, i, i * 32 * MiB, 32 * MiB) for i in range(3)))
            assert sorted(simple_reply(raw)[:2] for _ in range(3)) == [(0, 0), (1, 0), (2, 0)]
        growth = peak_rss_growth(caches)
        raw.close()
        assert svc.server.stats["reads_off_loop"] == before + 3, "the CACHEs of cold data were not read off the loop"
    assert growth < 32 * MiB, f"{growth / MiB:.0f} MiB more resident memory for three CACHEs"


def test_a_client_that_reads_nothing_while_cold_reads_finish_stays_bounded_then_gets_everything(cold):
    """48 cold 2 MiB reads and NBD_CMD_DISC in one send, and the client reads nothing for a while: the export
    stops (held, then paused) with a bounded reply buffer, serves another client meanwhile, and once the client
    reads, every reply arrives with the right bytes and only then does the server close."""
    svc, path = cold
    raw = connect(svc)
    n, size = 48, 2 * MiB
    offsets = [(i * size) % len(DATA) for i in range(n)]
    raw.send(b"".join(request(N.CMD_READ, i, offsets[i], size) for i in range(n)) + request(N.CMD_DISC, 99, 0, 0))
    time.sleep(0.6)
    served = svc.server.stats["requests"]
    time.sleep(0.3)
    assert svc.server.stats["requests"] == served, "the export kept serving a client that reads nothing"
    buffered = on_loop(svc, lambda: max(c.transport.get_write_buffer_size() for c in svc.server.clients))
    assert buffered <= N.WRITE_HIGH + OFF_LOOP_BYTES + N.MAX_PAYLOAD, f"{buffered / MiB:.0f} MiB queued"
    other = connect(svc)                           # served while the first one is stalled
    new = pattern(11, 4096)
    other.send(request(N.CMD_WRITE, 1, 48 * MiB, 4096) + new + request(N.CMD_READ, 2, 48 * MiB, 4096))
    assert simple_reply(other) == (1, 0, b"")
    assert simple_reply(other, 4096) == (2, 0, new)
    other.close()
    seen = set()
    for _ in range(n):
        cookie, err, data = simple_reply(raw, size)
        assert err == 0 and cookie not in seen
        seen.add(cookie)
        assert data == DATA[offsets[cookie]:offsets[cookie] + size], f"read {cookie}"
    assert seen == set(range(n))
    assert raw.closed_by_server()
    raw.close()


# ------------------------------------------------------------------ the end of the stream
def test_a_cold_reads_reply_survives_the_clients_half_close(cold):
    """A client that sends its requests and then shuts down its sending side (no NBD_CMD_DISC) still got
    every reply before the change: the requests were served before eof_received, and the transport's close
    sends what is queued. A read that went to a worker thread is dropped instead (reads_done sees the
    transport closing)."""
    svc, path = cold
    raw = connect(svc)
    raw.send(request(N.CMD_READ, 1, 4 * MiB, 4 * MiB) + request(N.CMD_READ, 2, 40 * MiB, 4096))
    raw.s.shutdown(socket.SHUT_WR)
    got = {}
    for _ in range(2):
        try:
            cookie, err, _ = simple_reply(raw)
        except EOFError:
            break
        assert err == 0
        got[cookie] = raw.recv(4 * MiB if cookie == 1 else 4096)
    raw.close()
    assert got.get(2) == bytes(4096)
    assert got.get(1) == DATA[4 * MiB:8 * MiB], "the cold read's reply was dropped at the client's half-close"


# ------------------------------------------------------------------ the disk's space while a thread reads it
def test_space_freed_under_a_read_in_flight_is_never_reused_for_other_data(cold):
    """A cold 30 MiB read of blocks 2-31 goes to a worker thread with their file offsets; the thread reaches
    block 31 last. Behind it, in the same send (served by the loop at once, while the thread still reads):
    block 31 trimmed, 4 KiB written to block 40 and to block 31 (each a block allocated anew), block 33
    zeroed, and a cold read of block 0. Blocks 2-30 of the long read and all of block 0's read overlap none
    of that: exactly their bytes. Block 31 overlaps the trim and the rewrite, so each 4 KiB of it may be the
    old data, zeros or the new data, but never block 40's: that would mean the trimmed block's space was
    reused under the read."""
    svc, path = cold
    raw = connect(svc)
    x, y = pattern(40, 4096), pattern(41, 4096)
    raw.send(request(N.CMD_READ, 1, 2 * MiB, 30 * MiB)
             + request(N.CMD_TRIM, 2, 31 * MiB, MiB)
             + request(N.CMD_WRITE, 3, 40 * MiB, 4096) + x
             + request(N.CMD_WRITE, 4, 31 * MiB, 4096) + y
             + request(N.CMD_WRITE_ZEROES, 5, 33 * MiB, MiB)
             + request(N.CMD_READ, 6, 0, MiB))
    replies = {}
    for _ in range(6):
        cookie, err, _ = simple_reply(raw)
        assert err == 0, cookie
        replies[cookie] = raw.recv({1: 30 * MiB, 6: MiB}.get(cookie, 0))
    assert replies[6] == DATA[:MiB]
    long = replies[1]
    assert long[:29 * MiB] == DATA[2 * MiB:31 * MiB], "blocks 2-30: not their bytes"
    old = DATA[31 * MiB:32 * MiB]
    last = long[29 * MiB:]
    assert last[:4096] != x, "block 31's read returned block 40's bytes: the trimmed space was reused"
    assert last[:4096] in (old[:4096], bytes(4096), y)
    for k in range(4096, MiB, 4096):
        assert last[k:k + 4096] in (old[k:k + 4096], bytes(4096)), f"block 31 at +{k}: not block 31's bytes"
    raw.send(request(N.CMD_READ, 8, 31 * MiB, 4096) + request(N.CMD_READ, 9, 40 * MiB, 4096))
    want = {8: y, 9: x}
    for _ in range(2):
        cookie, err, data = simple_reply(raw, 4096)
        assert err == 0 and data == want[cookie], cookie
    raw.close()


# ------------------------------------------------------------------ shutdown
def test_stop_closes_the_disks_only_after_every_thread_read(tmp_path):
    """ExportService.stop() with cold reads in flight on worker threads: the disks (their file descriptors)
    are closed only once no thread reads them any more."""
    path = make_vhdx(tmp_path / "disk.vhdx", 128 * MiB, fill=[(0, pattern(9, 96 * MiB))])
    t = tracked(path)
    at_close = []
    close = t.close

    def recorded_close():
        at_close.append(svc.server.off_loop)
        close()

    t.close = recorded_close
    clients = []
    svc = ExportService({"disk": t}, socket_path=str(tmp_path / "nbd.sock")).start()
    try:
        drop_cache(path)
        for i in range(3):                          # one 32 MiB read per connection: each has its own bound
            raw = Raw(svc.socket_path)
            raw.flags()
            raw.go("disk")
            clients.append(raw)
        for i, raw in enumerate(clients):
            raw.send(request(N.CMD_READ, i, i * 32 * MiB, 32 * MiB))
        wait_until(lambda: svc.server.stats["reads_off_loop"] >= 3, timeout=5, what="reads on worker threads")
    finally:
        svc.stop()
    for raw in clients:
        raw.close()
    assert at_close == [0], f"a disk was closed with {at_close} reads still on worker threads"
    assert svc.server.off_loop == 0 and svc.server.pool is None

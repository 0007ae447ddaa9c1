"""Adversarial checks of the export's I/O path changes (e796027, 9cb0ee2): log recycling over a shipped log's
file (hrl.writer.take_spare, tracker.recycle_logs), the page-cache-only dirty mark with boot_id, and the
NBD connection's socket polling (nbd._Connection._poll). Each test drives the real pieces: HrlWriter and
HrlReader on real files, a TrackedDisk on a real VHDX, real NBD client sockets."""
from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

from replicator.hrl import HrlReader, HrlWriter
from replicator.hrl.format import DEFAULT_METADATA_SIZE, entries_per_block
from replicator.hrl.writer import ZERO_PIECE
from replicator.tracking import TrackedDisk
from replicator.tracking.nbdclient import NbdClient
from replicator.tracking.state import Sidecar
from replicator.tracking.tracker import SPARE_LOG

from ..processes import alive
from .helpers import MiB, make_vhdx, pattern, read_vhdx, serving, tracked, wait_until

GiB = 1 << 30
OLD = b"\xa5"
PER_BLOCK = entries_per_block(DEFAULT_METADATA_SIZE)


def _old_log_with_data_past_1gib(path) -> None:
    """A real sealed log whose file holds old data bytes just past 1 GiB: a zero run of 1 GiB + 8 KiB (a
    hole in the file) and then 256 KiB of OLD data."""
    w = HrlWriter(str(path))
    w.append_zeroes(0, GiB + 8192)
    w.append(GiB + 8192, OLD * (256 << 10))
    w.seal(durable=False)
    assert os.path.getsize(path) > GiB + 16384 + (256 << 10)


def _zero_writes_read_back(path, disk_size):
    """(offset, length, bytes read back) of every write recorded as zeros (DataChecksum of zero bytes)."""
    out = []
    with HrlReader(str(path), disk_size) as r:
        for w in r.writes:
            if w.data_checksum == 0xFFFFFFFF:
                out.append((w.offset, w.length, r.read_data(w, verify=False)))
    return out


def test_multi_piece_zero_run_over_a_spare_reads_back_as_zeros(tmp_path):
    spare, path = tmp_path / "spare.hrl", tmp_path / "00000002.hrl"
    _old_log_with_data_past_1gib(spare)
    w = HrlWriter(str(path), recycle=str(spare))
    assert w.stale_end > GiB                               # written over the spare
    for i in range(PER_BLOCK - 1):                         # a metadata block fills up inside the zero run
        w.append(i * 4096, pattern(i, 512))
    w.append_zeroes(2 * GiB, ZERO_PIECE + 4096)
    w.seal(durable=False)
    zeros = _zero_writes_read_back(path, 4 * GiB)
    assert [(o, n) for o, n, _ in zeros] == [(2 * GiB, ZERO_PIECE), (3 * GiB, 4096)]
    for off, n, data in zeros:
        assert data == bytes(n), f"the zero write at {off} reads back {n - data.count(0)} nonzero bytes"
    with HrlReader(str(path), 4 * GiB) as r:
        r.verify_data()


def test_tracked_zeroing_over_the_spare_ships_what_the_disk_holds(tmp_path):
    path = make_vhdx(tmp_path / "d.vhdx", 4 * GiB)
    t = tracked(path)
    try:
        logs = Sidecar(str(path)).logs_dir
        t.write_zeroes(0, GiB + 8192)                     # log A: a hole, then old data just past 1 GiB
        t.write(GiB + 8192, OLD * MiB)
        a = t.cut()
        t.acknowledge(a.unique_id)                        # A's file becomes the spare
        assert os.path.getsize(os.path.join(logs, SPARE_LOG)) > GiB + MiB
        t.cut()                                           # the log after this cut is written over the spare
        assert not os.path.exists(os.path.join(logs, SPARE_LOG))
        for i in range(PER_BLOCK - 1):
            t.write(i * 4096, pattern(i, 4096))
        t.write_zeroes(2 * GiB, GiB + 4096)               # the guest zeroes 1 GiB + 4 KiB (mkfs, fstrim)
        c = t.cut()
        log_path = os.path.join(logs, t.state.sealed_logs[-1].name)
        assert t.state.sealed_logs[-1].unique_id == str(c.unique_id)
        wrong = []
        with HrlReader(log_path, t.size) as r:             # what encode_log ships: the extents, read raw
            for ext in r.extents():
                for pos in range(0, ext.length, 64 * MiB):
                    n = min(64 * MiB, ext.length - pos)
                    if r.read_raw(ext.data_location + pos, n) != t.read(ext.offset + pos, n):
                        wrong.append((ext.offset + pos, n))
        assert wrong == [], f"the log ships bytes the disk does not hold at {wrong}"
    finally:
        t.close()


def _no_spare(disk_path) -> str:
    """The disk's spare log path, with no spare there."""
    spare = Sidecar(str(disk_path)).spare_path
    if os.path.exists(spare):
        os.unlink(spare)
    return spare


def test_a_spare_that_is_a_symlink_is_not_followed(tmp_path):
    path = make_vhdx(tmp_path / "d.vhdx", 64 * MiB)
    victim = tmp_path / "victim.bin"
    content = pattern(7, 3 * MiB)
    victim.write_bytes(content)
    t = tracked(path)
    try:
        os.symlink(str(victim), _no_spare(path))
        t.cut()                                            # the next log takes the spare
        t.write(0, pattern(1, 4096))
        t.cut()
    finally:
        t.close()
    assert victim.read_bytes() == content


def test_a_spare_that_is_a_directory_does_not_break_acknowledgement(tmp_path):
    path = make_vhdx(tmp_path / "d.vhdx", 64 * MiB)
    t = tracked(path)
    try:
        os.mkdir(_no_spare(path))
        t.write(0, pattern(1, 4096))
        a = t.cut()
        t.write(MiB, pattern(2, 4096))
        b = t.cut()
        t.acknowledge(b.unique_id)                         # both logs acknowledged
        assert not os.path.exists(a.path) and not os.path.exists(b.path)
        assert t.state.sealed_logs == []
    finally:
        t.close()
    t2 = TrackedDisk(path)
    try:
        assert not t2.resync_required, t2.reason
    finally:
        t2.close()


# --------------------------------------------------------------------------- NBD polling
REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, CMD_READ, CMD_WRITE, CMD_DISC = 0x25609513, 0x67446698, 0, 1, 2

_STREAMER = r'''
import sys, time
from replicator.tracking.nbdclient import NbdClient
c = NbdClient(sys.argv[1], "d")
end = time.monotonic() + float(sys.argv[2])
n = 0
buf = bytes(range(256)) * 16
sys.stdout.write("go\n"); sys.stdout.flush()
while time.monotonic() < end:
    c.pwrite((n % 512) * 4096, buf)
    n += 1
c.close()
sys.stdout.write(f"{n}\n"); sys.stdout.flush()
'''


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "the server closed the connection"
        buf += chunk
    return bytes(buf)


def test_a_client_streaming_at_queue_depth_1_does_not_starve_other_connections_or_cuts(tmp_path, monkeypatch):
    """A connection that polls gives the loop back: while a client keeps 4 KiB writes coming at queue depth 1
    (with the largest window REPLICATOR_POLL_MAX_US allows, 1000 us), another connection's requests and a
    cut are served. Fails (times out) with a poll that never gives up waiting for its own client."""
    import subprocess
    import sys
    from replicator.tracking import nbd
    monkeypatch.setattr(nbd, "POLL_MAX_NS", 1_000_000)
    path = make_vhdx(tmp_path / "d.vhdx", 64 * MiB)
    t = tracked(path, max_log_share=1000.0)             # the streamer's log may outgrow the disk
    sock_path = str(tmp_path / "nbd.sock")
    with serving({"d": t}, sock_path) as svc:
        env = dict(os.environ, PYTHONPATH=os.getcwd())
        p = subprocess.Popen([sys.executable, "-c", _STREAMER, sock_path, "4"], stdout=subprocess.PIPE,
                             text=True, env=env)
        try:
            assert p.stdout.readline().strip() == "go"
            time.sleep(0.3)                                 # the streamer's window has grown by now
            c = NbdClient(sock_path, "d")
            try:
                worst = 0.0
                for i in range(40):
                    t0 = time.monotonic()
                    c.pwrite(32 * MiB + i * 4096, pattern(i, 4096))
                    buf = bytearray(4096)
                    c.pread_into(32 * MiB + i * 4096, memoryview(buf))
                    assert bytes(buf) == pattern(i, 4096)
                    worst = max(worst, time.monotonic() - t0)
                t0 = time.monotonic()
                sealed = svc.cut()
                cut_time = time.monotonic() - t0
            finally:
                c.close()
            assert p.poll() is None, "the streamer finished before the other connection was served"
            assert worst < 1.0 and cut_time < 1.0, (worst, cut_time)
            assert sealed[0] is not None
        finally:
            out, _ = p.communicate(timeout=30)
        assert p.returncode == 0 and int(out.split()[-1]) > 100
    t.close()


def _handshake(sock_path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    magic, opt, flags = struct.unpack(">QQH", _recv(s, 18))
    s.sendall(struct.pack(">I", 3))                          # FIXED_NEWSTYLE | NO_ZEROES
    name = b"d"
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 1, len(name)) + name)   # EXPORT_NAME
    size, tflags = struct.unpack(">QH", _recv(s, 10))
    assert size == 64 * MiB
    return s


def test_pipelined_requests_in_random_pieces_and_gaps_are_served_in_order_exactly(tmp_path):
    """Requests cut anywhere (inside headers and payloads), sent with gaps around the poll window, so that
    some pieces reach the connection through its own reads and some through the transport's: every reply
    comes back once, in order, and the disk holds exactly what was written."""
    import random
    rng = random.Random(12)
    path = make_vhdx(tmp_path / "d.vhdx", 64 * MiB)
    t = tracked(path)
    sock_path = str(tmp_path / "nbd.sock")
    expect = bytearray(64 * MiB)
    with serving({"d": t}, sock_path):
        s = _handshake(sock_path)
        stream, order = bytearray(), []
        for i in range(600):
            off = rng.randrange(0, 64 * MiB // 512 - 64) * 512
            if rng.random() < 0.6:
                data = pattern(i, rng.choice((512, 4096, 65536, 300_000)))
                stream += struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, i, off, len(data)) + data
                expect[off:off + len(data)] = data
                order.append((i, None))
            else:
                n = rng.choice((512, 4096, 70_000))
                stream += struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, i, off, n)
                order.append((i, bytes(expect[off:off + n])))
        replies = []

        def reader():
            for cookie, data in order:
                magic, err, handle = struct.unpack(">IIQ", _recv(s, 16))
                body = _recv(s, len(data)) if data is not None else None
                replies.append((magic, err, handle, body))
        th = threading.Thread(target=reader)
        th.start()
        pos = 0
        while pos < len(stream):
            n = rng.choice((1, 7, 28, 100, 4096, 65536, 200_000))
            s.sendall(stream[pos:pos + n])
            pos += n
            gap = rng.choice((0, 0, 0, 10e-6, 50e-6, 100e-6, 1e-3))
            if gap:
                time.sleep(gap)
        th.join(60)
        assert not th.is_alive()
        assert [(m, e, h) for m, e, h, _ in replies] == [(SIMPLE_REPLY_MAGIC, 0, c) for c, _ in order]
        assert [b for *_, b in replies] == [d for _, d in order]
        s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 9999, 0, 0))
        s.settimeout(10)
        assert s.recv(1) == b""                           # no reply to DISC, and the server closes
        s.close()
    t.close()
    assert read_vhdx(path) == bytes(expect)


def test_a_client_that_does_not_read_its_replies_is_paused_and_then_served_in_order(tmp_path):
    """pause_writing while polling: 12 MiB of read replies (3x the high mark) queued before the client reads
    any; the connection stops taking requests, and every reply then arrives once, in order."""
    path = make_vhdx(tmp_path / "d.vhdx", 64 * MiB, fill=[(0, pattern(5, 8 * MiB))])
    t = tracked(path)
    sock_path = str(tmp_path / "nbd.sock")
    with serving({"d": t}, sock_path):
        s = _handshake(sock_path)
        n, size = 96, 128 << 10
        reqs = b"".join(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, i, (i % 64) * size, size)
                        for i in range(n))
        sender = threading.Thread(target=s.sendall, args=(reqs,))
        sender.start()
        time.sleep(0.5)                                      # the server fills its buffer and pauses
        ref = pattern(5, 8 * MiB)
        for i in range(n):
            magic, err, handle = struct.unpack(">IIQ", _recv(s, 16))
            assert (magic, err, handle) == (SIMPLE_REPLY_MAGIC, 0, i)
            off = (i % 64) * size
            assert _recv(s, size) == ref[off:off + size]
        sender.join(10)
        s.close()
    t.close()


def test_a_client_that_half_closes_after_its_requests_gets_every_reply(tmp_path):
    """Requests then end of stream (shutdown SHUT_WR) in one go: the poll may read the EOF itself; every
    reply still arrives and the server then closes the connection."""
    path = make_vhdx(tmp_path / "d.vhdx", 64 * MiB)
    t = tracked(path)
    sock_path = str(tmp_path / "nbd.sock")
    with serving({"d": t}, sock_path):
        for round_ in range(20):
            s = _handshake(sock_path)
            k = 1 + round_ % 5
            reqs = b"".join(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, i, i * 4096, 4096)
                            + pattern(100 * round_ + i, 4096) for i in range(k))
            s.sendall(reqs)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(10)
            for i in range(k):
                assert struct.unpack(">IIQ", _recv(s, 16)) == (SIMPLE_REPLY_MAGIC, 0, i)
            assert s.recv(1) == b""
            s.close()
        c = NbdClient(sock_path, "d")
        try:
            buf = bytearray(4096)
            c.pread_into(0, memoryview(buf))
            assert bytes(buf) == pattern(1900, 4096)
        finally:
            c.close()
    t.close()


# --------------------------------------------------------------------------- the real export process
def test_kill9_of_the_export_keeps_every_region_marked_since_the_bits_were_cleared(tmp_path):
    """The first write to a region goes to the bitmap's page cache only (no fdatasync). Through the real export
    process: regions whose bits two acknowledgements cleared (durably) are written again, the export is
    killed with SIGKILL (the page cache survives), and the reopened tracker's dirty regions cover every
    write the replica lacks -- without falling back to comparing every region. The log written over the
    spare in between is exactly what the guest wrote."""
    import signal
    from replicator.tracking.remote import ExportHandle
    rs = 2 * MiB
    path = make_vhdx(tmp_path / "d0.vhdx", 256 * MiB)
    tracked(path).close()
    run = tmp_path / "run"
    run.mkdir()
    h = ExportHandle("vm1", {"d0.vhdx": path}, str(run)).start()
    killed = False
    try:
        d = h.disks["d0.vhdx"]
        c = NbdClient(h.nbd_socket, "d0.vhdx")
        try:
            for r in (0, 5, 9):
                c.pwrite(r * rs + 4096, pattern(r, 8192))
            s1 = h.cut()[0]
            d.acknowledge(s1.unique_id)                    # log 1's file becomes the spare
            c.pwrite(20 * rs, pattern(20, 4096))
            s2 = h.cut()[0]                                # the next log is written over the spare
            d.acknowledge(s2.unique_id)                    # 0, 5 and 9 are clean again (durably)
            assert d.dirty_extents() == [(20 * rs, rs)]
            writes3 = [(5 * rs + 100 * 512, pattern(105, 3 * 4096)), (40 * rs, pattern(140, 300_000))]
            for off, data in writes3:
                c.pwrite(off, data)
            s3 = h.cut()[0]
            with HrlReader(s3.path, 256 * MiB) as r:        # exact, though written over log 1's file
                assert [(w.offset, r.read_data(w)) for w in r.writes] == writes3
                assert os.path.getsize(s3.path) == r.header.eol_location
            c.pwrite(9 * rs + 512, pattern(109, 512))      # marked in the page cache only
            c.pwrite(60 * rs - 512, pattern(160, 1024))    # two regions, both fresh
        finally:
            c.close()
        os.kill(h.pid, signal.SIGKILL)
        killed = True
        wait_until(lambda: not alive(h.pid), what="the export dies")
    finally:
        if not killed:
            h.shutdown()
    t = TrackedDisk(path)
    try:
        assert t.resync_required and "not closed cleanly" in t.reason
        dirty = {o // rs for o, n in t.dirty_extents() for o in range(o, o + n, rs)}
        assert {5, 9, 20, 40, 59, 60} <= dirty, sorted(dirty)
        assert 0 not in dirty and 100 not in dirty, "the bitmap was not trusted after a kill in the same boot"
    finally:
        t.close()

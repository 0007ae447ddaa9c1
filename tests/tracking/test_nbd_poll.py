"""The export polls a connection's socket for a moment after each batch (tracking/nbd.py, _AdaptivePoll):
requests that arrive while it polls, whole or in pieces, are served exactly, and the window adapts to the
client."""
from __future__ import annotations

import socket
import struct
import time

from replicator.tracking import nbd
from replicator.tracking.nbdclient import NbdClient

from .helpers import MiB, make_vhdx, pattern, read_vhdx, serving, tracked

REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, CMD_READ, CMD_WRITE = 0x25609513, 0x67446698, 0, 1


def test_window_grows_for_a_busy_client_and_closes_for_an_idle_one():
    p = nbd._AdaptivePoll()
    assert p.window == nbd.POLL_START_NS
    for _ in range(12):                       # requests arriving right after each sleep: poll longer
        p.idle()
        p.woke()
    assert p.window == nbd.POLL_MAX_NS
    for _ in range(12):                       # requests arriving long after: stop polling at all
        p.idle()
        time.sleep(2 * nbd.POLL_MAX_NS / 1e9 + 0.001)
        p.woke()
    assert p.window == 0
    p.idle()
    p.woke()                                  # and back as soon as they come quickly again
    assert p.window == nbd.POLL_START_NS


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "the server closed the connection"
        buf += chunk
    return buf


def test_requests_sent_in_pieces_while_it_polls_are_served_exactly(tmp_path):
    path = make_vhdx(tmp_path / "d.vhdx", 8 * MiB)
    t = tracked(path)
    with serving({"d": t}, tmp_path / "nbd.sock"):
        c = NbdClient(str(tmp_path / "nbd.sock"), "d")
        try:
            s = c.sock
            expect = bytearray(8 * MiB)
            for i in range(200):              # queue depth 1, as fast as it goes: the poll catches them
                data = pattern(i, 4096)
                off = (i * 37 % 2048) * 4096
                c.pwrite(off, data)
                expect[off:off + 4096] = data
            for i, gap in enumerate((0, 20e-6, 200e-6, 5e-3)):    # header and payload split, with gaps
                data = pattern(1000 + i, 65536)
                off = MiB + i * 65536
                head = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 77 + i, off, len(data))
                s.sendall(head[:10])
                time.sleep(gap)
                s.sendall(head[10:] + data[:1000])
                time.sleep(gap)
                s.sendall(data[1000:])
                magic, err, handle = struct.unpack(">IIQ", _recv(s, 16))
                assert (magic, err, handle) == (SIMPLE_REPLY_MAGIC, 0, 77 + i)
                expect[off:off + len(data)] = data
            got = bytearray(8 * MiB)
            c.pread_into(0, memoryview(got))
            assert got == expect
        finally:
            c.close()
    t.close()
    assert read_vhdx(path) == bytes(expect)

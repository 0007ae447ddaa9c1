"""A guest's FLUSH, and FUA, with the device's part off the export's loop (BlockDevice.flush_begin, nbd.py's
_durable): the reply waits for the device, the other requests do not. A flush that is one fsync (no
metadata commit queued) runs on the export's C read threads; one that waits for commits, on Python's.

The disk commits its metadata on a thread of its own, as the export process sets it up (shim.py:
background_commits). A job that waits on an event, put on that thread's queue, stands in for a device that
takes its time: the flush must wait behind it, and nothing else may."""
from __future__ import annotations

import errno
import select
import struct
import threading
import time

import pytest

from replicator.errors import DiskIOError
from replicator.tracking import nbd as N
from replicator.tracking.service import ExportService

from .helpers import MiB, make_vhdx, pattern, read_vhdx, serving, tracked
from .test_nbd_malformed import Raw

SIZE = 16 * MiB


@pytest.fixture
def held(tmp_path):
    """(service, tracked disk, release): the disk's commit thread blocked until release() is called."""
    path = make_vhdx(tmp_path / "d.vhdx", SIZE, fill=[(0, pattern(1, 4 * MiB))])
    t = tracked(path)
    t.disk.background_commits()
    gate = threading.Event()
    with serving({"disk": t}, tmp_path / "nbd.sock") as svc:
        t.disk._spool.put(gate.wait)
        try:
            yield svc, t, gate.set
        finally:
            gate.set()


def _opened(svc) -> Raw:
    c = Raw(svc.socket_path).flags()
    assert c.go("disk") == SIZE
    return c


def _nothing_yet(c: Raw, wait: float = 0.3) -> bool:
    return not select.select([c.s], [], [], wait)[0]


def test_a_flush_waiting_for_the_device_holds_up_no_other_request(held):
    svc, t, release = held
    a, b = _opened(svc), _opened(svc)
    a.request(N.CMD_FLUSH, 0, 0, handle=1)
    a.request(N.CMD_WRITE, 4096, 4096, b"\x5a" * 4096, handle=2)      # the same connection, after it
    a.request(N.CMD_READ, 4096, 4096, handle=3)
    b.request(N.CMD_WRITE, MiB, 512, b"\x6b" * 512, handle=4)          # another connection
    assert a.simple_reply() == (0, 2, b"")
    assert a.simple_reply(4096) == (0, 3, b"\x5a" * 4096)
    assert b.simple_reply() == (0, 4, b"")
    assert _nothing_yet(a), "the flush was answered before the device had its data"
    assert svc.server.stats["flushes_off_loop"] == 1
    release()
    assert a.simple_reply() == (0, 1, b"")
    a.close()
    b.close()


def test_a_fua_write_is_answered_once_durable_and_others_go_on(held):
    svc, t, release = held
    a = _opened(svc)
    a.request(N.CMD_WRITE, 8192, 4096, b"\x7c" * 4096, handle=1, flags=N.CMD_FLAG_FUA)
    a.request(N.CMD_WRITE_ZEROES, 2 * MiB, 4096, handle=2, flags=N.CMD_FLAG_FUA)
    a.request(N.CMD_READ, 8192, 4096, handle=3)                        # the write is in the disk already
    assert a.simple_reply(4096) == (0, 3, b"\x7c" * 4096)
    assert _nothing_yet(a)
    release()
    assert sorted([a.simple_reply()[:2], a.simple_reply()[:2]]) == [(0, 1), (0, 2)]
    a.close()
    svc.stop()
    t.close()
    data = read_vhdx(t.path)
    assert data[8192:12288] == b"\x7c" * 4096 and data[2 * MiB:2 * MiB + 4096] == bytes(4096)


def test_the_server_stops_only_after_a_flush_in_flight(held):
    """The disk closes after stop(): a flush still on its thread would fsync a descriptor closed under it."""
    svc, t, release = held
    a = _opened(svc)
    a.request(N.CMD_FLUSH, 0, 0, handle=1)
    deadline = time.monotonic() + 5
    while not svc.server.off_loop and time.monotonic() < deadline:
        time.sleep(0.005)
    assert svc.server.off_loop == 1
    timer = threading.Timer(0.3, release)
    timer.start()
    started = time.monotonic()
    svc.stop()
    assert time.monotonic() - started >= 0.25 and svc.server.off_loop == 0
    timer.join()
    a.close()


@pytest.mark.parametrize("structured", [False, True])
def test_a_failed_commit_fails_the_flush_with_its_message(tmp_path, structured):
    path = make_vhdx(tmp_path / "d.vhdx", SIZE)
    t = tracked(path)
    t.disk.background_commits()

    def broken():
        raise OSError(errno.EIO, "the device went away")
    svc = ExportService({"disk": t}, socket_path=str(tmp_path / "nbd.sock")).start()
    try:
        gate = threading.Event()
        t.disk._spool.put(gate.wait)
        t.disk._spool.put(broken)
        c = Raw(svc.socket_path).flags()
        if structured:
            c.option(N.OPT_STRUCTURED_REPLY)
            assert c.reply()[1] == N.REP_ACK
        assert c.go("disk") == SIZE
        c.request(N.CMD_FLUSH, 0, 0, handle=9)          # taken while the failure is still queued: off the loop
        time.sleep(0.1)
        gate.set()
        if structured:
            magic, flags, kind, cookie, length = struct.unpack(">IHHQI", c.recv(20))
            err, mlen = struct.unpack(">IH", c.recv(6))
            message = c.recv(mlen).decode()
            assert (magic, flags, kind, cookie, err) == (N.STRUCTURED_REPLY_MAGIC, N.REPLY_FLAG_DONE,
                                                        N.REPLY_TYPE_ERROR, 9, errno.EIO)
            assert "metadata commit failed" in message and "the device went away" in message
            c.recv(length - 6 - mlen)
        else:
            assert c.simple_reply() == (errno.EIO, 9, b"")
        c.request(N.CMD_FLUSH, 0, 0, handle=10)         # and every flush after it: the data is not known safe
        if not structured:
            assert c.simple_reply() == (errno.EIO, 10, b"")
        c.close()
    finally:
        with pytest.raises(DiskIOError, match="the device went away"):     # and closing the disk says so
            svc.stop()
    assert svc.server.off_loop == 0


def test_a_flush_with_no_commit_queued_is_an_fsync_on_the_c_threads(tmp_path):
    """No metadata commit queued: the flush is one fsync, run by the C read threads (Python's pool of worker
    threads is never started); its reply, and the writes' data, are right."""
    path = make_vhdx(tmp_path / "d.vhdx", SIZE, fill=[(0, pattern(1, 4 * MiB))])
    t = tracked(path)
    t.disk.background_commits()
    with serving({"disk": t}, tmp_path / "nbd.sock") as svc:
        if svc.server.exports["disk"].native is None or not N.NATIVE_READ_POOL:
            pytest.skip("no native read pool here")
        c = _opened(svc)
        for i in range(20):
            c.request(N.CMD_WRITE, i * 8192, 4096, bytes([i]) * 4096, handle=2 * i)
            c.request(N.CMD_FLUSH, 0, 0, handle=2 * i + 1)
        got = sorted(c.simple_reply()[:2] for _ in range(40))
        assert got == [(0, h) for h in range(40)]
        c.request(N.CMD_WRITE, MiB, 4096, b"\x33" * 4096, handle=50, flags=N.CMD_FLAG_FUA)
        assert c.simple_reply() == (0, 50, b"")
        assert svc.server.stats["flushes_off_loop"] == 21
        assert svc.server.pool is None, "a flush went to Python's worker threads"
        assert svc.server.off_loop == 0
        c.close()
    data = read_vhdx(path)
    assert all(data[i * 8192:i * 8192 + 4096] == bytes([i]) * 4096 for i in range(20))
    assert data[MiB:MiB + 4096] == b"\x33" * 4096

"""A guest's read that must wait for the device is read on a worker thread (tracking/reads.py): it holds up
no other request of the export, its reply is the same bytes, and a connection's replies still all arrive.

The data is made cold for real: written, fsynced and dropped from the page cache (POSIX_FADV_DONTNEED), so
the reads go to this machine's disk."""
from __future__ import annotations

import os
import struct

import pytest

from replicator.disk.base import small_folios
from replicator.tracking import nbd as N

from ..externals import run
from .helpers import MiB, make_vhdx, pattern, read_vhdx, serving, tracked
from .test_nbd_malformed import Raw

SIZE = 64 * MiB
DATA = pattern(7, 32 * MiB)                 # blocks 0-31 hold data, 32-63 are holes


def drop_cache(path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def cold(tmp_path):
    path = make_vhdx(tmp_path / "disk.vhdx", SIZE, fill=[(0, DATA)])
    t = tracked(path)
    with serving({"disk": t}, tmp_path / "nbd.sock") as svc:
        small_folios(t.disk.io.fd)      # no readahead, as the export process opens it: every read stays cold
        drop_cache(path)
        yield svc, path


def request(cmd: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", N.REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def simple_reply(raw: Raw, length: int = 0) -> tuple[int, int, bytes]:
    magic, err, cookie = struct.unpack(">IIQ", raw.recv(16))
    assert magic == N.SIMPLE_REPLY_MAGIC
    return cookie, err, raw.recv(length) if length and not err else b""


def structured_replies(raw: Raw, size: int) -> dict[int, bytes]:
    """Every structured reply until the server closes: cookie -> the bytes its chunks describe."""
    got: dict[int, bytearray] = {}
    done: set[int] = set()
    while True:
        try:
            head = raw.recv(20)
        except EOFError:
            break
        magic, flags, kind, cookie, length = struct.unpack(">IHHQI", head)
        assert magic == N.STRUCTURED_REPLY_MAGIC and cookie not in done
        body = raw.recv(length)
        buf = got.setdefault(cookie, bytearray(size))
        if kind == N.REPLY_TYPE_OFFSET_DATA:
            (off,) = struct.unpack_from(">Q", body)
            rel = off - cookie * size
            buf[rel:rel + length - 8] = body[8:]
        elif kind == N.REPLY_TYPE_OFFSET_HOLE:
            off, n = struct.unpack_from(">QI", body)
            rel = off - cookie * size
            buf[rel:rel + n] = bytes(n)
        else:
            assert kind == N.REPLY_TYPE_NONE, (kind, body)
        if flags & N.REPLY_FLAG_DONE:
            done.add(cookie)
    assert done == set(got)
    return {c: bytes(b) for c, b in got.items()}


def test_a_cold_read_holds_up_no_write(cold):
    """A write sent right behind a cold 8 MiB read is answered first; the read's bytes are right. Served on
    the loop, the read was answered first (replies went out in order)."""
    svc, path = cold
    before = svc.server.stats["reads_off_loop"]
    raw = Raw(svc.socket_path)
    raw.flags()
    raw.go("disk")
    new = pattern(8, 4096)
    raw.send(request(N.CMD_READ, 1, 4 * MiB, 8 * MiB) + request(N.CMD_WRITE, 2, 40 * MiB, 4096) + new)
    first = simple_reply(raw)
    assert first[:2] == (2, 0), "the write waited for the cold read"
    cookie, err, data = simple_reply(raw, 8 * MiB)
    assert (cookie, err) == (1, 0)
    assert data == DATA[4 * MiB:12 * MiB]
    assert svc.server.stats["reads_off_loop"] == before + 1
    # the same range again is in the page cache now: read on the loop, in order
    raw.send(request(N.CMD_READ, 3, 4 * MiB, 8 * MiB) + request(N.CMD_READ, 4, 40 * MiB, 4096))
    assert simple_reply(raw, 8 * MiB) == (3, 0, DATA[4 * MiB:12 * MiB])
    assert simple_reply(raw, 4096) == (4, 0, new)
    assert svc.server.stats["reads_off_loop"] == before + 1
    raw.close()


def test_many_cold_reads_then_disconnect_are_all_answered(cold):
    """48 reads pipelined (past the 16 a connection may have in flight), structured, half of them over holes,
    then NBD_CMD_DISC: every reply arrives, with the right bytes, before the server closes."""
    svc, path = cold
    raw = Raw(svc.socket_path)
    raw.flags()
    raw.option(N.OPT_STRUCTURED_REPLY)
    assert raw.reply()[1] == N.REP_ACK
    raw.go("disk")
    size = SIZE // 64
    reqs = b"".join(request(N.CMD_READ, i, i * size, size, N.CMD_FLAG_DF if i % 3 == 0 else 0)
                    for i in range(48))
    raw.send(reqs + request(N.CMD_DISC, 99, 0, 0))
    got = structured_replies(raw, size)
    assert sorted(got) == list(range(48))
    whole = DATA + bytes(SIZE - len(DATA))
    for i, data in got.items():
        assert data == whole[i * size:(i + 1) * size], f"read {i}"
    assert svc.server.stats["reads_off_loop"] >= 16
    raw.close()


def test_a_client_gone_with_reads_in_flight(cold):
    """A client that sends cold reads and hangs up: the export serves the next client, and stops cleanly."""
    svc, path = cold
    raw = Raw(svc.socket_path)
    raw.flags()
    raw.go("disk")
    raw.send(b"".join(request(N.CMD_READ, i, i * MiB, MiB) for i in range(24)))
    raw.close()
    drop_cache(path)
    again = Raw(svc.socket_path)
    again.flags()
    again.go("disk")
    again.send(request(N.CMD_READ, 5, 20 * MiB, MiB))
    assert simple_reply(again, MiB) == (5, 0, DATA[20 * MiB:21 * MiB])
    again.close()


def test_cache_of_cold_data(cold):
    """NBD_CMD_CACHE of cold data: answered once read, and the data is then in the page cache (read on the
    loop)."""
    svc, path = cold
    raw = Raw(svc.socket_path)
    raw.flags()
    raw.go("disk")
    raw.send(request(N.CMD_CACHE, 1, 0, 2 * MiB))
    assert simple_reply(raw) == (1, 0, b"")
    before = svc.server.stats["reads_off_loop"]
    raw.send(request(N.CMD_READ, 2, 0, 2 * MiB))
    assert simple_reply(raw, 2 * MiB) == (2, 0, DATA[:2 * MiB])
    assert svc.server.stats["reads_off_loop"] == before
    raw.close()


def test_nbdcopy_of_a_cold_disk(cold, tmp_path):
    """nbdcopy with four connections copies the cold disk byte for byte."""
    svc, path = cold
    before = svc.server.stats["reads_off_loop"]
    out = tmp_path / "copy.raw"
    run("nbdcopy", "--connections", "4", "--requests", "16", svc.uri("disk"), str(out))
    assert out.read_bytes() == read_vhdx(path)
    assert svc.server.stats["reads_off_loop"] > before

"""The export's reads of pages not cached on C's threads (native/readpool.c, kernels.ReadPool, nbd.py's
reads_taken): the pool alone, then through the export, where a cold read's reply comes from a worker and
the connection's accounting (reads in flight, a client that leaves, a server that stops) must hold."""
from __future__ import annotations

import errno
import os
import random
import select
import struct
import threading
import time

import pytest

from replicator import kernels
from replicator.kernels._nbdserve import REPLIES, TAKE_MAX
from replicator.tracking import nbd as N

from .helpers import MiB
from .test_native_reads import _cold, any_order_run, structured_run
from .test_native_writes import ALLOCATED, SIZE, pack, pair, read, write  # noqa: F401  (pair: a fixture)
from .test_nbd_malformed import Raw

pytestmark = pytest.mark.skipif(kernels.ReadPool is None, reason="the native kernels are not active")

KiB = 1024


def _head(cookie: int, size: int = 16) -> bytes:
    return b"H" * 8 + cookie.to_bytes(8, "big") + b"h" * (size - 16)


def _take_all(pool, n: int, timeout: float = 10) -> list:
    """Every finished read until n have come, waiting on the pool's eventfd between takes."""
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"{len(got)} of {n} reads came back"
        select.select([pool.fd], [], [], left)
        while True:                     # the eventfd wakes once for a run of finished reads: take them all
            taken = pool.take()
            got += [(t, c, e, s, bytes(r)) for t, c, e, s, r in taken]
            if not taken:
                break
    return got


@pytest.fixture
def pool():
    p = kernels.ReadPool(4)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def data_file(tmp_path):
    content = random.Random(11).randbytes(3 * MiB + 1000)
    path = tmp_path / "f"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd, content
    finally:
        os.close(fd)


def test_each_read_comes_back_in_its_reply_after_its_header(pool, data_file):
    """One piece, two pieces (the second anywhere in the file), either header size, a block cut short by the
    file's end, whose missing bytes read as zeros, and a piece at file offset 0, which means zeros."""
    fd, content = data_file
    end = len(content)
    jobs = {   # token: (where, first, head, length, expected data)
        1: ([4096], 4096, _head(101), 4096, content[4096:8192]),
        2: ([MiB - 100, 2 * MiB], 100, _head(102, 28), 5000, content[MiB - 100:MiB] + content[2 * MiB:2 * MiB + 4900]),
        3: ([end - 300], 1000, _head(103), 1000, content[end - 300:] + bytes(700)),
        4: ([1, end - 10], 20, _head(104, 28), 40, content[1:21] + content[end - 10:] + bytes(10)),
        5: ([end + 4096], 512, _head(105), 512, bytes(512)),
        6: ([0, 8192], 300, _head(106), 400, bytes(300) + content[8192:8292]),     # offset 0: a block of zeros
    }
    for token, (where, first, head, length, _) in jobs.items():
        assert pool.submit(token, fd, where, first, head, length) == 0
    got = _take_all(pool, len(jobs))
    assert sorted(t for t, *_ in got) == sorted(jobs)
    for token, cookie, err, size, reply in got:
        where, first, head, length, expected = jobs[token]
        assert (cookie, err, size) == (100 + token, 0, len(head) + length)
        assert reply == head + expected
    assert pool.pending == 0 and pool.take() == []


def test_a_read_that_fails_comes_back_as_its_errno_with_its_cookie(pool, data_file, tmp_path):
    fd, _ = data_file
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert pool.submit(1, -1, [4096], 4096, _head(7), 4096) == 0
        assert pool.submit(2, dfd, [4096], 4096, _head(8, 28), 4096) == 0
        assert pool.submit(3, fd, [1], 16, _head(9), 16) == 0           # a good one between them
        got = {t: rest for t, *rest in _take_all(pool, 3)}
    finally:
        os.close(dfd)
    assert got[1] == [7, errno.EBADF, 16 + 4096, b""]
    assert got[2] == [8, errno.EISDIR, 28 + 4096, b""]
    assert got[3][:3] == [9, 0, 32] and got[3][3][16:] == data_file[1][1:17]


def test_a_job_of_no_pieces_is_an_fsync(pool, data_file, tmp_path):
    """A FLUSH's job: fsync(fd), then its reply as given; an fsync that fails comes back as its errno."""
    fd, _ = data_file
    reply = struct.pack(">IIQ", N.SIMPLE_REPLY_MAGIC, 0, 31)
    assert pool.sync(1, fd, reply) == 0
    assert pool.sync(2, -1, reply) == 0
    got = {t: rest for t, *rest in _take_all(pool, 2)}
    assert got == {1: [31, 0, 16, reply], 2: [31, errno.EBADF, 16, b""]}
    assert pool.submit(3, fd, [], 0, reply, 10) == errno.EINVAL        # no pieces, yet a length


def test_a_malformed_job_is_refused(pool, data_file):
    fd, _ = data_file
    assert pool.submit(1, fd, [0, 0], 100, _head(1), 50) == errno.EINVAL       # first piece past the length
    assert pool.submit(1, fd, [0], 10, _head(1), 50) == errno.EINVAL           # one piece shorter than the read
    assert pool.submit(1, fd, [0], 10, b"short", 10) == errno.EINVAL           # no room for a cookie
    assert pool.pending == 0


def test_take_moves_at_most_its_room_and_the_rest_on_the_next_call(pool, data_file):
    """More finished reads than one take holds (TAKE_MAX of them, or REPLIES bytes): nothing is lost, and
    each reply is whole."""
    fd, content = data_file
    jobs = {}
    for token in range(TAKE_MAX + 40):
        length = 128 * KiB if token % 50 == 0 else 4 * KiB
        off = 1 + (token * 7919 * 512) % (3 * MiB - length - 1)
        jobs[token] = (off, length)
        assert pool.submit(token, fd, [off], length, _head(token), length) == 0
    time.sleep(0.2)
    first = pool.take()
    assert 0 < len(first) <= TAKE_MAX and sum(len(r) for *_, r in first) <= REPLIES
    got = [(t, c, e, s, bytes(r)) for t, c, e, s, r in first] + _take_all(pool, len(jobs) - len(first))
    assert sorted(t for t, *_ in got) == sorted(jobs)
    for token, cookie, err, size, reply in got:
        off, length = jobs[token]
        assert (cookie, err, size, reply[16:]) == (token, 0, 16 + length, content[off:off + length])


def test_close_reads_what_is_queued_first(tmp_path, data_file):
    """close() with 500 reads queued ends (no crash, no hang: the test's timeout) once the workers have read
    them all; what it waits for is read by nobody after, so only its ending is observable."""
    fd, _ = data_file
    p = kernels.ReadPool(2)
    for token in range(500):
        assert p.submit(token, fd, [1 + token * 4096], 4096, _head(token), 4096) == 0
    p.close()


# ------------------------------------------------------------------------------------------- through the export
def _model() -> dict[int, bytes]:
    return {b: random.Random(b).randbytes(MiB) for b in ALLOCATED}


def _cold_reads(rnd: random.Random, n: int) -> list:
    out = []
    for _ in range(n):
        length = rnd.choice([4 * KiB, 4 * KiB, 64 * KiB, 128 * KiB, 700])
        b = rnd.choice(ALLOCATED)
        out.append(read(b * MiB + rnd.randrange(MiB - length), length))
    return out


def _expected(model, request) -> bytes:
    _, _, off, length, _ = request
    b = off // MiB
    return model[b][off - b * MiB:off - b * MiB + length]


def _cold_native(pair):
    """The pair's service, its native export's NativeIO and its count of reads queued so far, the disk's
    pages dropped from the page cache."""
    svc, _, disks = pair
    _cold(disks["native"].path)
    native_io = svc.server.exports["native"].native
    return svc, native_io, native_io.reads_queued


def test_more_cold_reads_than_a_connection_may_have_in_flight(pair):
    """200 reads sent at once to a disk not in the page cache: the connection stops reading requests at
    OFF_LOOP_MAX reads in flight and goes on as they finish; every reply is right, and nothing stays counted."""
    svc, native_io, queued_before = _cold_native(pair)
    model = _model()
    requests = _cold_reads(random.Random(5), 200)
    replies = any_order_run(svc, "native", requests)
    assert native_io.reads_queued - queued_before > N.OFF_LOOP_MAX
    assert all(replies[i] == (0, _expected(model, r)) for i, r in enumerate(requests))
    assert svc.server.off_loop == 0


def test_cold_reads_with_structured_replies_are_one_data_chunk_each(pair):
    svc, native_io, queued_before = _cold_native(pair)
    model = _model()
    requests = _cold_reads(random.Random(6), 40)
    requests += [(N.CMD_READ, N.CMD_FLAG_DF, a * MiB + 8192, 16 * KiB, b"") for a in ALLOCATED]
    replies = structured_run(svc, "native", requests)
    assert native_io.reads_queued - queued_before > 0
    for cookie, (_, _, off, length, _) in enumerate(requests):
        ((flags, kind, payload),) = replies[cookie]
        assert (flags, kind) == (N.REPLY_FLAG_DONE, N.REPLY_TYPE_OFFSET_DATA)
        assert struct.unpack(">Q", payload[:8])[0] == off and payload[8:] == _expected(model, requests[cookie])


def test_writes_on_one_connection_beside_cold_reads_on_another(pair):
    """Writes (C's and Python's) go on while another connection's reads wait for the device; reads of other
    blocks come back as they were, and the writes are all in the disk."""
    svc, _, disks = pair
    _cold(disks["native"].path)
    model = _model()
    rnd = random.Random(8)
    writer = Raw(svc.socket_path).flags()
    assert writer.go("native") == SIZE
    reads = [r for r in _cold_reads(rnd, 150) if r[2] // MiB not in (1, 2)]
    reader = Raw(svc.socket_path).flags()
    assert reader.go("native") == SIZE
    reader.send(pack(reads))
    writes = [write(b * MiB + rnd.randrange(MiB - 8192), rnd.randbytes(rnd.choice([512, 4096, 8192])))
              for b in (1, 2) for _ in range(30)]
    writer.send(pack(writes))
    for i in range(len(writes)):
        assert writer.simple_reply()[:2] == (0, i)
    got = {}
    for _ in reads:
        magic, err, cookie = struct.unpack(">IIQ", reader.recv(16))
        assert magic == N.SIMPLE_REPLY_MAGIC and err == 0 and cookie not in got
        got[cookie] = reader.recv(reads[cookie][3])
    assert all(got[i] == _expected(model, r) for i, r in enumerate(reads))
    for _, _, off, _, payload in writes:
        b = off // MiB
        model[b] = model[b][:off - b * MiB] + payload + model[b][off - b * MiB + len(payload):]
    check = [read(b * MiB, MiB) for b in (1, 2)]
    reader.send(pack(check))
    got = {}
    for _ in check:                     # in either order: a read may wait for the device
        err, cookie, data = reader.simple_reply(MiB)
        got[cookie] = (err, data)
    assert got == {0: (0, model[1]), 1: (0, model[2])}
    writer.close()
    reader.close()


def test_disconnect_after_cold_reads_answers_them_first(pair):
    svc, _, disks = pair
    _cold(disks["native"].path)
    model = _model()
    requests = _cold_reads(random.Random(9), 30)
    c = Raw(svc.socket_path).flags()
    assert c.go("native") == SIZE
    c.send(pack(requests) + struct.pack(">IHHQQI", N.REQUEST_MAGIC, 0, N.CMD_DISC, 999, 0, 0))
    got = {}
    for _ in requests:
        magic, err, cookie = struct.unpack(">IIQ", c.recv(16))
        assert magic == N.SIMPLE_REPLY_MAGIC and err == 0
        got[cookie] = c.recv(requests[cookie][3])
    assert got == {i: _expected(model, r) for i, r in enumerate(requests)}
    assert c.closed_by_server()


def test_a_client_that_leaves_with_reads_in_flight(pair):
    """Its reads finish on the pool and are dropped; the count of reads in flight comes back to zero and
    the next client is served."""
    svc, _, disks = pair
    _cold(disks["native"].path)
    c = Raw(svc.socket_path).flags()
    assert c.go("native") == SIZE
    c.send(pack(_cold_reads(random.Random(10), 60)))
    c.close()
    deadline = time.monotonic() + 10
    while (svc.server.off_loop or svc.server.by_token) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert svc.server.off_loop == 0 and not svc.server.by_token
    model = _model()
    requests = _cold_reads(random.Random(11), 10)
    assert any_order_run(svc, "native", requests) == {i: (0, _expected(model, r)) for i, r in enumerate(requests)}


def test_the_server_stops_with_reads_in_flight(pair):
    """stop() waits for the pool's reads before the disks close (a worker must never read a descriptor the
    disk has given up), then ends the pool."""
    svc, _, disks = pair
    _cold(disks["native"].path)
    c = Raw(svc.socket_path).flags()
    assert c.go("native") == SIZE
    native_io, queued = svc.server.exports["native"].native, svc.server.exports["native"].native.reads_queued
    c.send(pack(_cold_reads(random.Random(12), 60)))
    deadline = time.monotonic() + 5
    while native_io.reads_queued == queued and time.monotonic() < deadline:
        time.sleep(0.0005)
    assert native_io.reads_queued > queued
    server = svc.server
    svc.stop()
    assert server.off_loop == 0 and server.read_pool is None
    assert svc.server.exports["native"].native.pool is None
    c.close()


def test_several_connections_with_reads_on_the_pool_at_once(pair):
    """Finished reads of three connections come back in the same takes: each gets its own replies."""
    svc, native_io, queued_before = _cold_native(pair)
    model = _model()
    clients = [Raw(svc.socket_path).flags() for _ in range(3)]
    streams = [_cold_reads(random.Random(20 + i), 80) for i in range(3)]
    for c in clients:
        assert c.go("native") == SIZE
    for c, requests in zip(clients, streams):
        c.send(pack(requests))
    for c, requests in zip(clients, streams):
        got = {}
        for _ in requests:
            magic, err, cookie = struct.unpack(">IIQ", c.recv(16))
            assert magic == N.SIMPLE_REPLY_MAGIC and err == 0 and cookie not in got
            got[cookie] = c.recv(requests[cookie][3])
        assert got == {i: _expected(model, r) for i, r in enumerate(requests)}
        c.close()
    assert native_io.reads_queued - queued_before > 3 * N.OFF_LOOP_MAX


@pytest.mark.parametrize("structured", [False, True])
def test_a_read_that_fails_on_the_pool_gets_an_error_reply(pair, structured):
    """A worker's failed pread comes back as the request's error reply, simple or an error chunk, with its
    cookie; the connection goes on. (A read that fails in the device is not something a test can make here:
    a job for a descriptor that cannot be read is queued on the connection's behalf, as C queues one.)"""
    svc, _, _ = pair
    c = Raw(svc.socket_path).flags()
    if structured:
        c.option(N.OPT_STRUCTURED_REPLY)
        assert c.reply()[1] == N.REP_ACK
    assert c.go("native") == SIZE
    (conn,) = svc.server.by_token.values()
    head = (struct.pack(">IHHQIQ", N.STRUCTURED_REPLY_MAGIC, N.REPLY_FLAG_DONE, N.REPLY_TYPE_OFFSET_DATA, 77,
                        8 + 4096, 0) if structured else struct.pack(">IIQ", N.SIMPLE_REPLY_MAGIC, 0, 77))
    queued = threading.Event()

    def queue() -> None:                # on the loop, as _parse does for what C queued
        conn._queued(1, len(head) + 4096, "reads_off_loop")
        assert svc.server.read_pool.submit(conn.token, -1, [4096], 4096, head, 4096) == 0
        queued.set()
    svc.loop.call_soon_threadsafe(queue)
    assert queued.wait(5)
    if structured:
        magic, flags, kind, cookie, length = struct.unpack(">IHHQI", c.recv(20))
        err, mlen = struct.unpack(">IH", c.recv(6))
        assert (magic, flags, kind, cookie, err) == (N.STRUCTURED_REPLY_MAGIC, N.REPLY_FLAG_DONE,
                                                    N.REPLY_TYPE_ERROR, 77, errno.EIO)
        assert c.recv(mlen) == os.strerror(errno.EBADF).encode()
    else:
        assert c.simple_reply() == (errno.EIO, 77, b"")
    assert conn.in_flight == 0 and svc.server.off_loop == 0
    model = _model()
    assert any_order_run(svc, "native", [read(MiB, 4096)]) == {0: (0, model[1][:4096])}
    c.close()

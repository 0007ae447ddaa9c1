"""The export's native reads (native/nbdserve.c, tracking/native_io.py) against the Python path.

Reads of blocks the VHDX holds are answered in C: from the page cache at once, or, for pages not cached, by
the server's pool of C threads; everything else a read can meet (holes, the end of the disk, flags, lengths C
does not take) is left to Python. Two copies of one disk are served side by side, one with the native path and one without, and a
socket client sends both the same requests, with simple and with structured replies: every reply must be
the same, byte for byte.
"""
from __future__ import annotations

import errno
import os
import random
import struct

import numpy as np
import pytest

from replicator import kernels
from replicator.kernels._nbdserve import MAX_READ, REPLIES
from replicator.tracking import nbd as N

from .helpers import MiB
from .test_nbd_cold_reads import drop_cache
from .test_native_writes import ALLOCATED, SIZE, pack, pair, read, run, write  # noqa: F401  (pair: a fixture)
from .test_nbd_malformed import Raw

pytestmark = pytest.mark.skipif(kernels.NbdExport is None, reason="the native kernels are not active")

KiB = 1024
HOLES = [b for b in range(16) if b not in ALLOCATED]


def structured_run(svc, name: str, requests: list) -> dict:
    """Send every request at once over a connection with structured replies; every reply's chunks by
    cookie, read until each request's last chunk (flag DONE) or its simple reply."""
    c = Raw(svc.socket_path).flags()
    c.option(N.OPT_STRUCTURED_REPLY)
    assert c.reply()[1] == N.REP_ACK
    assert c.go(name) == SIZE
    c.send(pack(requests))
    replies: dict[int, list] = {}
    left = set(range(len(requests)))
    while left:
        magic = struct.unpack(">I", c.recv(4))[0]
        if magic == N.SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">IQ", c.recv(12))
            assert requests[cookie][0] != N.CMD_READ or err, "a read's data came in a simple reply"
            replies[cookie] = [("simple", err)]
            left.discard(cookie)
            continue
        assert magic == N.STRUCTURED_REPLY_MAGIC
        flags, kind, cookie, length = struct.unpack(">HHQI", c.recv(16))
        replies.setdefault(cookie, []).append((flags, kind, c.recv(length)))
        if flags & N.REPLY_FLAG_DONE:
            left.discard(cookie)
    c.close()
    return replies


def reads_served(svc, name: str = "native") -> int:
    return svc.server.exports[name].native.reads_served


def c_takes(request, structured: bool = False) -> bool:
    """Whether C serves this read of the fixture's disk (its pages cached): a read of 1 byte to MAX_READ,
    flags none (or DF on a structured connection), in at most two blocks; with structured replies, one of
    HOLE_CHUNKS_FROM or more only if those blocks were allocated from the start (else it may be sent as hole
    chunks)."""
    cmd, flags, off, length, _ = request
    spans = range(off // MiB, (off + length - 1) // MiB + 1)
    return (cmd == N.CMD_READ and 0 < length <= MAX_READ and off + length <= SIZE and len(spans) <= 2
            and flags in ((0, N.CMD_FLAG_DF) if structured else (0,))
            and (not structured or length < N.HOLE_CHUNKS_FROM or flags & N.CMD_FLAG_DF
                 or all(b in ALLOCATED for b in spans)))


def mixed_reads(rnd: random.Random) -> list:
    """Reads C serves and reads it leaves to Python, between writes to the same places."""
    blob = rnd.randbytes(256 * KiB)
    out = []
    for a in ALLOCATED:
        out += [read(a * MiB + 4096 * rnd.randrange(256), 4096), read(a * MiB + rnd.randrange(MiB - 700), 700)]
    out += [
        read(2 * MiB - 1000, 3000),                     # across two allocated blocks: two pieces
        read(1 * MiB, MAX_READ),                        # the longest C takes
        read(5 * MiB - 5, MAX_READ),                    # the longest, across two blocks (4 and 5)
        read(5 * MiB, MAX_READ + 1),                    # one byte longer: Python
        read(6 * MiB + 1, 1),                           # one byte
        read(3 * MiB, 4096),                            # a hole: zeros, from C
        read(3 * MiB - 2048, 4096),                     # half data, half hole
        read(3 * MiB - 64 * KiB, MAX_READ),             # the same, long: with structured replies, hole chunks
        read(9 * MiB - 100, 200 * KiB),                 # into two holes
        write(7 * MiB + 10, blob[:5000]),               # a write, then reads of what it wrote
        read(7 * MiB, 8192),
        write(3 * MiB + 4096, blob[:4096]),             # a hole filled (Python allocates), then read
        read(3 * MiB, 12288),
        read(SIZE - 4096, 4096),                        # the last block
        read(SIZE - 4096, 8192),                        # past the end: Python's error
        read(12 * MiB, 0),                              # empty
        (N.CMD_READ, N.CMD_FLAG_FUA, 8 * MiB, 4096, b""),    # FUA on a read: Python
    ]
    out += [read(rnd.choice(ALLOCATED) * MiB + rnd.randrange(MiB - MAX_READ), MAX_READ) for _ in range(7)]
    return out


def test_simple_replies_to_reads_are_the_same_both_ways(pair):
    """Seven 128 KiB reads in a row also overrun one call's reply room: C is called again for the rest."""
    svc, _, _ = pair
    requests = mixed_reads(random.Random(3))
    before = reads_served(svc)
    native = run(svc, "native", requests)
    assert native == run(svc, "python", requests)
    # every read C takes was served in C (a block filled during the run may add more): none fell to Python
    assert reads_served(svc) - before >= sum(map(c_takes, requests)) >= 2 * len(ALLOCATED) + 13
    expected = random.Random(1).randbytes(MiB)          # block 1 as the fixture wrote it
    assert native[2 * len(ALLOCATED) + 1] == (0, 2 * len(ALLOCATED) + 1, expected[:MAX_READ])


def test_structured_replies_to_reads_are_the_same_both_ways(pair):
    """With structured replies C answers a read with one OFFSET_DATA chunk, as Python does for a read of
    data; DF (one chunk) is met by it."""
    svc, _, _ = pair
    rnd = random.Random(4)
    requests = mixed_reads(rnd)
    requests += [(N.CMD_READ, N.CMD_FLAG_DF, a * MiB + 4096 * rnd.randrange(200), 64 * KiB, b"") for a in ALLOCATED]
    before = reads_served(svc)
    native = structured_run(svc, "native", requests)
    assert native == structured_run(svc, "python", requests)
    assert reads_served(svc) - before >= sum(c_takes(r, True) for r in requests) >= 3 * len(ALLOCATED) + 12
    for cookie, (cmd, _, off, length, _) in enumerate(requests):
        if cmd == N.CMD_READ and length and off + length <= SIZE and off // MiB in ALLOCATED \
                and (off + length - 1) // MiB in ALLOCATED and length <= MAX_READ:
            ((flags, kind, payload),) = native[cookie]
            assert (flags, kind, struct.unpack(">Q", payload[:8])[0], len(payload)) == \
                (N.REPLY_FLAG_DONE, N.REPLY_TYPE_OFFSET_DATA, off, 8 + length)


def test_one_export_answers_each_connection_in_its_own_reply_form(pair):
    """Connections with and without structured replies, one after the other and side by side on one
    export: each gets its own form (C is told the form per call)."""
    svc, _, _ = pair
    rnd = random.Random(5)
    requests = [read(a * MiB + 4096 * rnd.randrange(255), 8192) for a in ALLOCATED]
    expected_simple, expected_structured = run(svc, "python", requests), structured_run(svc, "python", requests)
    for _ in range(2):
        assert run(svc, "native", requests) == expected_simple
        assert structured_run(svc, "native", requests) == expected_structured
    plain = Raw(svc.socket_path).flags()
    assert plain.go("native") == SIZE
    assert structured_run(svc, "native", requests) == expected_structured    # while a simple one is open
    plain.send(struct.pack(">IHHQQI", N.REQUEST_MAGIC, 0, N.CMD_READ, 0, *requests[0][2:4]))
    assert plain.simple_reply(8192) == expected_simple[0]
    plain.close()


def _cold(path) -> None:
    drop_cache(path)
    if _cached(path):
        pytest.skip("the page cache kept the file's pages (they could not be dropped here)")


def test_reads_of_pages_not_cached_go_to_the_read_pool(pair):
    """A read whose pages are not in the page cache does not wait on the loop: C queues it on the server's
    pool of C threads, and its reply, taken from the pool, is right."""
    svc, _, disks = pair
    _cold(disks["native"].path)
    native_io = svc.server.exports["native"].native
    before, queued_before = reads_served(svc), native_io.reads_queued
    requests = [read(a * MiB + 64 * KiB, 4096) for a in ALLOCATED]
    native = any_order_run(svc, "native", requests)
    assert native_io.reads_queued - queued_before == len(requests)        # every one went to the pool
    assert reads_served(svc) - before == len(requests)
    assert native == any_order_run(svc, "python", requests)
    expected = {i: (0, random.Random(a).randbytes(MiB)[64 * KiB:68 * KiB]) for i, a in enumerate(ALLOCATED)}
    assert native == expected
    assert svc.server.off_loop == 0 and svc.server.read_pool.pending == 0


def test_without_the_read_pool_reads_of_pages_not_cached_are_left_to_python(pair, monkeypatch):
    """REPLICATOR_NATIVE_READ_POOL=0 (A/B runs): C leaves such reads to Python, which reads them on its own
    worker threads."""
    monkeypatch.setattr(N, "NATIVE_READ_POOL", False)
    svc, _, disks = pair
    _cold(disks["native"].path)
    before = reads_served(svc)
    requests = [read(a * MiB + 64 * KiB, 4096) for a in ALLOCATED]
    native = any_order_run(svc, "native", requests)
    assert reads_served(svc) == before and svc.server.read_pool is None
    expected = {i: (0, random.Random(a).randbytes(MiB)[64 * KiB:68 * KiB]) for i, a in enumerate(ALLOCATED)}
    assert native == expected


def any_order_run(svc, name: str, requests: list) -> dict:
    """Send every request at once (simple replies); each reply by cookie, in whatever order they come (reads
    served off the loop come back when they are done)."""
    c = Raw(svc.socket_path).flags()
    assert c.go(name) == SIZE
    c.send(pack(requests))
    replies = {}
    for _ in requests:
        magic, err, cookie = struct.unpack(">IIQ", c.recv(16))
        assert magic == N.SIMPLE_REPLY_MAGIC and cookie not in replies
        cmd, _, _, length, _ = requests[cookie]
        replies[cookie] = (err, c.recv(length) if cmd == N.CMD_READ and not err and length else b"")
    c.close()
    return replies


def _cached(path: str) -> bool:
    """Whether any page of the file is in the page cache: mincore over a mapping, which reads nothing (a
    RWF_NOWAIT probe would start reading what it reports missing)."""
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = os.path.getsize(path)
    vec = (ctypes.c_ubyte * (-(-size // mmap.PAGESIZE)))()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        try:
            assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return any(v & 1 for v in vec)


# ---------------------------------------------------------------------------------------------- C alone
def _file_disk(tmp_path, blocks: int, present: set[int], states: dict[int, int] | None = None):
    """A file whose block b (of 1 MiB, the smallest VHDX block) lies at (1 + b) MiB, and a BAT saying which
    are present; the others in the state `states` gives (default: not present, which reads as zeros)."""
    content = random.Random(blocks).randbytes((1 + blocks) * MiB)
    path = tmp_path / "f"
    path.write_bytes(content)
    bat = np.zeros(blocks + blocks // 4 + 1, dtype=np.uint64)
    for b in range(blocks):
        index = b + b // 4                              # chunk ratio 4: a bitmap entry after every 4
        bat[index] = (((1 + b) * MiB) | 6) if b in present else (states or {}).get(b, 0)
    return path, content, bat, MiB


def test_fuzzed_read_requests_reply_exactly_with_the_file_s_bytes(tmp_path):
    """Random requests, partly broken, cut anywhere: C serves a prefix of them; each served read's reply is
    the header the protocol wants and the bytes the block map points at (zeros for a block in any state but
    fully or partly present), nothing else is served (a partly present block, state 7, nor a long structured read with
    zeros in it), and a stop for want of reply room is only that."""
    blocks, present, sparse_from = 14, {0, 1, 4, 5, 6, 9}, 64 * KiB
    # 8: fully present at file offset 0, which is refused; 7: partly present (a differencing disk's only)
    states = {2: 0, 3: 3, 7: 7, 8: 6, 10: 1, 11: 2, 12: 4, 13: 5}
    path, content, bat, block = _file_disk(tmp_path, blocks, present, states)
    size = blocks * block
    fd = os.open(path, os.O_RDONLY)
    try:
        if not _cached(str(path)):
            pytest.skip("the page cache does not hold a file just written")
        w = kernels.NbdExport()
        w.bind_disk(fd, size, bat, block, 4, 1 << 20, sparse_from)
        zero_states = (0, 1, 2, 3, 4, 5)
        rnd = random.Random(7)
        for trial in range(400):
            structured = rnd.random() < 0.5
            w.modes(False, True, structured)
            stream, model = b"", []
            for i in range(rnd.randrange(1, 12)):
                flags = rnd.choice([0, 0, 0, 0, N.CMD_FLAG_DF, N.CMD_FLAG_FUA, 0x80])
                cmd = rnd.choice([N.CMD_READ] * 8 + [N.CMD_FLUSH, 0x100])
                off = rnd.choice([rnd.randrange(size), rnd.randrange(blocks) * block - rnd.randrange(MAX_READ),
                                  size - rnd.randrange(1, 5000), size + rnd.randrange(3), (1 << 64) - 1 - i])
                off = max(0, off)
                length = rnd.choice([rnd.randrange(1, 5000), rnd.randrange(1, MAX_READ), MAX_READ, MAX_READ + 1,
                                     0, 2 * block + 1, (1 << 32) - 1])
                magic = N.REQUEST_MAGIC if rnd.random() > 0.03 else 0x12345678
                stream += struct.pack(">IHHQQI", magic, flags, cmd, trial * 100 + i, off, length)
                model.append((magic, flags, cmd, trial * 100 + i, off, length))
            cut = rnd.choice([len(stream), rnd.randrange(len(stream) + 1)])
            end, served, written, _, _, replies, err = w.serve(stream[:cut], 0, 0, 0)
            assert written == 0 and err == 0
            expected, pos, count = b"", 0, 0
            for magic, flags, cmd, cookie, off, length in model:
                if pos + 28 > cut:
                    break
                spans = range(off // block, (off + length - 1) // block + 1)
                zeros = any(states.get(b) in zero_states for b in spans)
                ok = (magic == N.REQUEST_MAGIC and cmd == N.CMD_READ and 0 < length <= MAX_READ
                      and off + length <= size and flags in ((0, N.CMD_FLAG_DF) if structured else (0,))
                      and all(b in present or states[b] in zero_states for b in spans) and len(spans) <= 2
                      and not (structured and zeros and length >= sparse_from and not flags & N.CMD_FLAG_DF))
                if not ok:
                    break
                # blocks lie in order: the file's bytes, or zeros
                data = b"".join(content[MiB + max(off, b * block):MiB + min(off + length, (b + 1) * block)]
                                if b in present else bytes(min(off + length, (b + 1) * block) - max(off, b * block))
                                for b in spans)
                head = (struct.pack(">IHHQIQ", N.STRUCTURED_REPLY_MAGIC, N.REPLY_FLAG_DONE,
                                    N.REPLY_TYPE_OFFSET_DATA, cookie, 8 + length, off) if structured
                        else struct.pack(">IIQ", N.SIMPLE_REPLY_MAGIC, 0, cookie))
                if len(expected) + len(head) + length > REPLIES:
                    assert w.full, trial
                    break
                expected += head + data
                pos += 28
                count += 1
            assert (end, served, replies) == (pos, count, expected), trial
    finally:
        os.close(fd)


def test_reads_are_not_served_when_the_export_turns_them_off(tmp_path):
    """modes(reads=False): every read is left to Python (REPLICATOR_NATIVE_READS=0 sets it)."""
    path, _, bat, block = _file_disk(tmp_path, 8, set(range(8)))
    fd = os.open(path, os.O_RDONLY)
    try:
        w = kernels.NbdExport()
        w.bind_disk(fd, 8 * block, bat, block, 4, 1 << 20)
        request = struct.pack(">IHHQQI", N.REQUEST_MAGIC, 0, N.CMD_READ, 1, 0, 4096)
        w.modes(False, False, False)
        assert w.serve(request, 0, 0, 0)[:2] == (0, 0)
        w.modes(False, True, False)
        if not _cached(str(path)):
            pytest.skip("the page cache does not hold a file just written")
        assert w.serve(request, 0, 0, 0)[:2] == (28, 1)
    finally:
        os.close(fd)


def test_a_disk_closed_under_the_export_is_never_read_or_written_in_c(tmp_path):
    """C holds the file descriptor it was bound to: once the disk's file is closed (that number may then
    name another file) C serves nothing, and Python's path reports the closed disk its own way. (A disk
    opened again has a new block map, which the same check refuses.) With reads off, no read is served."""
    from replicator.tracking.native_io import NativeIO

    from .helpers import make_vhdx, tracked
    t = tracked(make_vhdx(tmp_path / "d.vhdx", 4 * MiB, fill=[(0, b"x" * MiB)]))
    t.disk.prepare_for_writes()
    native = NativeIO.for_disk(t)
    assert t.disk.read(0, 4096) == b"x" * 4096          # its page now cached
    request = struct.pack(">IHHQQI", N.REQUEST_MAGIC, 0, N.CMD_READ, 1, 0, 4096)
    assert native.serve(request, 0, False)[:2] == (28, 1)
    assert NativeIO.for_disk(t, reads=False).serve(request, 0, False) == (0, 0, b"", False)   # reads off
    t.disk.io.close()                                   # the number is free for the next file opened
    assert native.serve(request, 0, False) == (0, 0, b"", False)


def test_a_file_that_refuses_nowait_reads_turns_native_reads_off_for_good(tmp_path):
    """A memory file refuses RWF_NOWAIT here (as some file systems do): the read goes to Python, and C
    tries no more reads, even of a file that would take them (tracking/reads.py does the same)."""
    path, _, bat, block = _file_disk(tmp_path, 8, set(range(8)))
    if not _cached(str(path)):
        pytest.skip("the page cache does not hold a file just written")
    request = struct.pack(">IHHQQI", N.REQUEST_MAGIC, 0, N.CMD_READ, 1, 0, 4096)
    memfd, fd = os.memfd_create("nowait"), os.open(path, os.O_RDONLY)
    try:
        os.ftruncate(memfd, 9 * MiB)
        try:
            os.preadv(memfd, [bytearray(1)], MiB, os.RWF_NOWAIT)
            pytest.skip("this kernel's memory files take RWF_NOWAIT")
        except OSError as e:
            assert e.errno in (errno.EOPNOTSUPP, errno.EINVAL)
        w = kernels.NbdExport()
        w.modes(False, True, False)
        w.bind_disk(fd, 8 * block, bat, block, 4, 1 << 20)
        assert w.serve(request, 0, 0, 0)[:2] == (28, 1)      # the real file: served
        w.bind_disk(memfd, 8 * block, bat, block, 4, 1 << 20)
        assert w.serve(request, 0, 0, 0)[:2] == (0, 0)        # refused
        w.bind_disk(fd, 8 * block, bat, block, 4, 1 << 20)
        assert w.serve(request, 0, 0, 0)[:2] == (0, 0)        # and no more reads tried
    finally:
        os.close(memfd)
        os.close(fd)

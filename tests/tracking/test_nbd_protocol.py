"""The export as real clients drive it: structured replies, block status (base:allocation), DF, FUA,
flush, trim, write-zeroes (NO_HOLE, FAST_ZERO), cache, and several connections to one export.

Clients none of us wrote (nbdinfo, qemu-img, qemu-io, nbdcopy, libnbd from the system python3) check the
behaviour; a raw socket checks the wire format where a client would hide it."""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import struct
import subprocess
import textwrap
import time

import pytest

from replicator.tracking import nbd as N
from replicator.vhdx import VhdxDisk

from ..externals import run
from .helpers import (KiB, MiB, SYSTEM_PYTHON, make_vhdx, nbdinfo_json, qemu_io, read_vhdx, serving, start_serve,
                      stop_serve, tracked, wait_until)
from .test_nbd_malformed import Raw

SIZE = 16 * MiB                      # 16 blocks of 1 MiB
DATA = [(5 * MiB, b"\x11" * MiB), (9 * MiB + 4096, b"\x22" * 4096), (SIZE - 512, b"\x33" * 512)]
HOLE = N.STATE_HOLE | N.STATE_ZERO


@pytest.fixture
def served(tmp_path):
    """A 16 MiB VHDX (1 MiB blocks) with data in blocks 5, 9 and 15 only, tracking, on a Unix socket."""
    path = make_vhdx(tmp_path / "disk.vhdx", SIZE, fill=DATA)
    t = tracked(path)
    with serving({"disk": t}, tmp_path / "nbd.sock") as svc:
        yield svc, t, path


def nbd_map(uri: str) -> list[tuple[int, int, int]]:
    """(offset, length, base:allocation flags) from nbdinfo --map."""
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(run("nbdinfo", "--map", "--json", uri).stdout)]


def blocks(*spans) -> list[tuple[int, int, int]]:
    """The expected map from (first MiB block, last MiB block + 1, flags) spans."""
    return [(a * MiB, (b - a) * MiB, f) for a, b, f in spans]


def libnbd(script: str) -> dict:
    """Run a libnbd script under the system python3 (where Debian's python3-libnbd lives); it prints JSON."""
    p = subprocess.run([SYSTEM_PYTHON, "-c", "import json, nbd\n" + textwrap.dedent(script)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


# ------------------------------------------------------------------ negotiation and block status
def test_nbdinfo_sees_structured_replies_and_every_capability(served):
    svc, _, _ = served
    info = nbdinfo_json(svc.uri("disk"))
    assert info["structured"] is True
    (exp,) = info["exports"]
    assert exp["contexts"] == ["base:allocation"]
    for cap in ("can_cache", "can_df", "can_fast_zero", "can_flush", "can_fua", "can_multi_conn", "can_trim",
                "can_zero"):
        assert exp[cap] is True, cap


def test_nbdinfo_map_and_qemu_img_map_report_allocation(served):
    svc, _, _ = served
    uri = svc.uri("disk")
    assert nbd_map(uri) == blocks((0, 5, HOLE), (5, 6, 0), (6, 9, HOLE), (9, 10, 0), (10, 15, HOLE), (15, 16, 0))
    qmap = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", uri).stdout)
    got = [(e["start"], e["length"], e["data"], e["zero"]) for e in qmap]
    assert got == [(0, 5 * MiB, False, True), (5 * MiB, MiB, True, False), (6 * MiB, 3 * MiB, False, True),
                   (9 * MiB, MiB, True, False), (10 * MiB, 5 * MiB, False, True), (15 * MiB, MiB, True, False)]


def test_writes_zeroes_and_discards_change_the_map(served):
    """qemu-io: a write allocates; write -z -u (may unmap) and discard free whole blocks; write -z (qemu
    sends NO_HOLE) leaves the range allocated, even over a hole; every range reads back as it should."""
    svc, t, path = served
    uri = svc.uri("disk")
    qemu_io(uri, "write -P 0x44 1M 64k", "write -z -u 5M 1M", "discard 9M 1M", "write -z 12M 1M",
            "write -z 15M 1M", "flush", cache="writeback")
    assert nbd_map(uri) == blocks((0, 1, HOLE), (1, 2, 0), (2, 12, HOLE), (12, 13, 0), (13, 15, HOLE),
                                  (15, 16, 0))
    qemu_io(uri, "read -P 0x44 1M 64k", "read -P 0 1088k 960k", "read -P 0 5M 1M", "read -P 0 9M 1M",
            "read -P 0 12M 1M", "read -P 0 15M 1M")
    svc.stop()
    img = read_vhdx(path)                               # and the file says the same
    assert img[MiB:MiB + 64 * KiB] == b"\x44" * 64 * KiB
    assert img[5 * MiB:6 * MiB] == img[9 * MiB:10 * MiB] == img[15 * MiB:] == bytes(MiB)


def test_block_status_req_one_and_ranges(served):
    """libnbd's block_status, with and without REQ_ONE, at offsets inside extents."""
    svc, _, _ = served
    out = libnbd(f"""
        h = nbd.NBD()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_uri({svc.uri("disk")!r})
        res = {{}}
        def collect(key):
            def cb(metacontext, offset, entries, err):
                res[key] = [metacontext, offset, list(entries)]
                return 0
            return cb
        h.block_status(4 * 1048576 + 512, 3 * 1048576, collect("all"))            # (count, offset)
        h.block_status(4 * 1048576 + 512, 3 * 1048576, collect("one"), nbd.CMD_FLAG_REQ_ONE)
        h.block_status(5 * 1048576 + 1024, 512, collect("one_data"), nbd.CMD_FLAG_REQ_ONE)
        h.block_status(4096, 5 * 1048576 + 4096, collect("small"))
        print(json.dumps(res))
    """)
    assert out["all"] == ["base:allocation", 3 * MiB, [2 * MiB, HOLE, MiB, 0, MiB + 512, HOLE]]
    assert out["one"] == ["base:allocation", 3 * MiB, [2 * MiB, HOLE]]
    assert out["one_data"] == ["base:allocation", 512, [5 * MiB - 512, HOLE]]
    assert out["small"] == ["base:allocation", 5 * MiB + 4096, [4096, 0]]


# ------------------------------------------------------------------ copies
def test_nbdcopy_with_four_connections_equals_qemu_img_convert(served, tmp_path):
    svc, _, path = served
    uri = svc.uri("disk")
    qemu_io(uri, "write -P 0x5a 2M 3M", "write -P 0x6b 13M 100k")
    stats = svc.server.stats
    before, asked = stats["connections"], stats["block_status"]
    out = tmp_path / "copy.raw"
    run("nbdcopy", "--threads", "4", "--connections", "4", "--requests", "8", uri, str(out))   # threads cap connections
    assert stats["connections"] - before >= 4, "nbdcopy did not open several connections"
    assert stats["block_status"] > asked, "nbdcopy did not ask for extents"
    assert os.stat(out).st_blocks * 512 <= 8 * MiB                     # and the copy is sparse
    svc.stop()
    ref = tmp_path / "ref.raw"
    run("qemu-img", "convert", "-f", "vhdx", "-O", "raw", path, str(ref))
    assert out.read_bytes() == ref.read_bytes()
    assert out.read_bytes()[2 * MiB:5 * MiB] == b"\x5a" * 3 * MiB


def test_qemu_img_convert_through_nbd_keeps_holes(served, tmp_path):
    svc, _, path = served
    out = tmp_path / "via-nbd.qcow2"
    asked = svc.server.stats["block_status"]
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", svc.uri("disk"), str(out))
    assert svc.server.stats["block_status"] > asked, "qemu-img did not ask for extents"
    qmap = json.loads(run("qemu-img", "map", "--output=json", "-f", "qcow2", str(out)).stdout)
    assert sum(e["length"] for e in qmap if e["data"]) <= 3 * MiB       # within blocks 5, 9 and 15
    svc.stop()
    assert run("qemu-img", "compare", "-f", "vhdx", "-F", "qcow2", path, str(out), check=False).returncode == 0


# ------------------------------------------------------------------ several connections, FUA, flush
def test_flush_on_one_connection_covers_writes_acknowledged_on_another(tmp_path):
    """CAN_MULTI_CONN: every connection is served by one loop on one disk object, so a FLUSH on connection
    B makes a write acknowledged on connection A durable. kill -9 of the server right after shows it:
    the flushed write and a FUA write survive; a write after the flush, never flushed, does not (the VHDX
    keeps a new block's BAT entry in memory until a flush), so the check is not vacuous."""
    path = make_vhdx(tmp_path / "disk.vhdx", SIZE)
    t = tracked(path)
    t.close()
    sock = tmp_path / "nbd.sock"
    serve = start_serve([path], sock)
    try:
        uri = f"nbd+unix:///disk.vhdx?socket={sock}"
        out = libnbd(f"""
            a, b = nbd.NBD(), nbd.NBD()
            a.connect_uri({uri!r})
            b.connect_uri({uri!r})
            assert a.can_multi_conn()
            b.pwrite(b"\\x63" * 65536, 6 * 1048576, nbd.CMD_FLAG_FUA)
            a.pwrite(b"\\x61" * 65536, 2 * 1048576)            # acknowledged on A
            b.flush()                                          # flushed on B
            a.pwrite(b"\\x62" * 65536, 4 * 1048576)            # never flushed (the handles close, no DISC)
            print(json.dumps({{"ok": True}}))
        """)
        assert out == {"ok": True}
        serve.send_signal(signal.SIGKILL)
        serve.wait(10)
    finally:
        stop_serve(serve, signal.SIGKILL)
    with VhdxDisk.open(path, read_only=False) as d:          # read-write: replays the VHDX log
        assert d.read(2 * MiB, 64 * KiB) == b"\x61" * 64 * KiB, "a write flushed on another connection was lost"
        assert d.read(6 * MiB, 64 * KiB) == b"\x63" * 64 * KiB, "a FUA write was lost"
        assert d.read(4 * MiB, 64 * KiB) == bytes(64 * KiB), "control: an unflushed write survived kill -9"


def test_multi_conn_writes_are_visible_on_every_connection(served):
    svc, _, _ = served
    out = libnbd(f"""
        hs = [nbd.NBD() for _ in range(4)]
        for h in hs:
            h.connect_uri({svc.uri("disk")!r})
        seen = []
        for i, h in enumerate(hs):
            h.pwrite(bytes([0x70 + i]) * 4096, i * 1048576)
        for h in hs:
            seen.append([h.pread(1, i * 1048576)[0] for i in range(4)])
        for h in hs:
            h.shutdown()
        print(json.dumps(seen))
    """)
    assert out == [[0x70, 0x71, 0x72, 0x73]] * 4


# ------------------------------------------------------------------ cache and zeroing flags (libnbd)
def test_cache_and_fast_zero(served):
    svc, t, _ = served
    out = libnbd(f"""
        h = nbd.NBD()
        h.connect_uri({svc.uri("disk")!r})
        res = {{"can_cache": h.can_cache(), "can_fast_zero": h.can_fast_zero()}}
        h.cache(2 * 1048576, 4 * 1048576)                     # data and holes
        try:
            h.cache(1048576, 16 * 1048576)
            res["past_end"] = "ok"
        except nbd.Error as e:
            res["past_end"] = e.errnum
        h.pwrite(b"\\x55" * 1048576, 3 * 1048576)
        try:                                                  # NO_HOLE | FAST_ZERO: provisioning is slow
            h.zero(1048576, 3 * 1048576, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
            res["fast_no_hole"] = "ok"
        except nbd.Error as e:
            res["fast_no_hole"] = e.errnum
        res["after_refusal"] = h.pread(4, 3 * 1048576).hex()
        h.zero(1048576, 3 * 1048576, nbd.CMD_FLAG_FAST_ZERO)  # may unmap: fast
        res["after_zero"] = h.pread(4, 3 * 1048576).hex()
        h.shutdown()
        print(json.dumps(res))
    """)
    assert out["can_cache"] and out["can_fast_zero"]
    assert out["past_end"] == errno.EINVAL
    assert out["fast_no_hole"] == errno.ENOTSUP
    assert out["after_refusal"] == "55555555", "a refused fast zero must not change the disk"
    assert out["after_zero"] == "00000000"
    assert nbd_map(svc.uri("disk"))[:2] == [(0, 5 * MiB, HOLE), (5 * MiB, MiB, 0)]


# ------------------------------------------------------------------ the wire, by hand
def structured(svc, name: str = "disk", contexts=("base:allocation",)) -> Raw:
    c = Raw(svc.socket_path).flags()
    c.option(N.OPT_STRUCTURED_REPLY)
    assert c.reply() == (N.OPT_STRUCTURED_REPLY, N.REP_ACK, b"")
    if contexts is not None:
        c.option(N.OPT_SET_META_CONTEXT, meta_request(name, contexts))
        replies = c.replies_until_final_meta()
        assert replies[-1][:2] == (N.OPT_SET_META_CONTEXT, N.REP_ACK), replies
    raw = name.encode()
    c.option(N.OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
    replies = c.replies_until_final()
    assert replies[-1][:2] == (N.OPT_GO, N.REP_ACK), replies
    return c


def meta_request(name: str, queries) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def _until_final_meta(self):
    out = []
    while True:
        out.append(self.reply())
        if out[-1][1] != N.REP_META_CONTEXT:
            return out


Raw.replies_until_final_meta = _until_final_meta


def chunks(c: Raw, cookie: int) -> list[tuple[int, int, bytes]]:
    """(flags, type, payload) of every structured chunk of one reply, up to the DONE flag."""
    out = []
    while True:
        magic, flags, kind, got, length = struct.unpack(">IHHQI", c.recv(20))
        assert magic == N.STRUCTURED_REPLY_MAGIC and got == cookie
        out.append((flags, kind, c.recv(length)))
        if flags & N.REPLY_FLAG_DONE:
            return out


def test_structured_read_sends_holes_unless_df(served):
    svc, _, _ = served
    c = structured(svc)
    off, length = 4 * MiB + 512 * KiB, 2 * MiB                 # half a hole, block 5 (data), half a hole
    c.request(N.CMD_READ, off, length, handle=1)
    got = chunks(c, 1)
    kinds = [(k, struct.unpack(">Q", p[:8])[0]) for _, k, p in got]
    assert kinds == [(N.REPLY_TYPE_OFFSET_HOLE, off), (N.REPLY_TYPE_OFFSET_DATA, 5 * MiB),
                     (N.REPLY_TYPE_OFFSET_HOLE, 6 * MiB)]
    assert struct.unpack(">QI", got[0][2]) == (off, 512 * KiB)
    assert got[1][2][8:] == b"\x11" * MiB
    assert [f for f, _, _ in got] == [0, 0, N.REPLY_FLAG_DONE]
    c.request(N.CMD_READ, off, length, handle=2, flags=N.CMD_FLAG_DF)      # one chunk, zeros in it
    (only,) = chunks(c, 2)
    assert only[:2] == (N.REPLY_FLAG_DONE, N.REPLY_TYPE_OFFSET_DATA)
    assert only[2] == struct.pack(">Q", off) + bytes(512 * KiB) + b"\x11" * MiB + bytes(512 * KiB)
    c.request(N.CMD_READ, SIZE - 4096, 8192, handle=3)                     # past the end: an error chunk
    ((flags, kind, payload),) = chunks(c, 3)
    assert (flags, kind) == (N.REPLY_FLAG_DONE, N.REPLY_TYPE_ERROR)
    err, mlen = struct.unpack(">IH", payload[:6])
    assert err == errno.EINVAL and b"beyond the end" in payload[6:6 + mlen]
    c.request(N.CMD_READ, 9 * MiB, 8192, handle=4)                         # short reads: one data chunk
    ((flags, kind, payload),) = chunks(c, 4)
    assert kind == N.REPLY_TYPE_OFFSET_DATA and payload[8:] == bytes(4096) + b"\x22" * 4096
    c.request(N.CMD_WRITE, 0, 512, b"\x01" * 512, handle=5)                # writes: a simple reply is fine
    assert c.simple_reply() == (0, 5, b"")
    c.close()


def test_block_status_wire_format_and_errors(served):
    svc, _, _ = served
    c = structured(svc)
    c.request(N.CMD_BLOCK_STATUS, 0, 7 * MiB, handle=1)
    ((flags, kind, payload),) = chunks(c, 1)
    assert (flags, kind) == (N.REPLY_FLAG_DONE, N.REPLY_TYPE_BLOCK_STATUS)
    ctx, *desc = struct.unpack(f">{len(payload) // 4}I", payload)
    assert ctx == N.ALLOCATION_ID and desc == [5 * MiB, HOLE, MiB, 0, MiB, HOLE]
    for i, (off, length, flags_) in enumerate([(SIZE - 512, 1024, 0), (0, 0, 0), (0, MiB, N.CMD_FLAG_NO_HOLE)]):
        c.request(N.CMD_BLOCK_STATUS, off, length, handle=10 + i, flags=flags_)
        ((_, kind, payload),) = chunks(c, 10 + i)
        assert kind == N.REPLY_TYPE_ERROR and struct.unpack(">I", payload[:4])[0] == errno.EINVAL
    c.close()


def test_meta_context_negotiation(tmp_path):
    a = tracked(make_vhdx(tmp_path / "a.vhdx", 4 * MiB))
    b = tracked(make_vhdx(tmp_path / "b.vhdx", 4 * MiB))
    with serving({"a": a, "b": b}, tmp_path / "nbd.sock") as svc:
        c = Raw(svc.socket_path).flags()
        c.option(N.OPT_SET_META_CONTEXT, meta_request("a", ["base:allocation"]))    # before STRUCTURED_REPLY
        assert c.reply()[:2] == (N.OPT_SET_META_CONTEXT, N.REP_ERR_INVALID)
        c.option(N.OPT_STRUCTURED_REPLY, b"x")
        assert c.reply()[:2] == (N.OPT_STRUCTURED_REPLY, N.REP_ERR_INVALID)
        c.option(N.OPT_STRUCTURED_REPLY)
        assert c.reply()[:2] == (N.OPT_STRUCTURED_REPLY, N.REP_ACK)
        for queries in ([], ["base:"], ["base:allocation", "qemu:dirty-bitmap:x"]):
            c.option(N.OPT_LIST_META_CONTEXT, meta_request("a", queries))
            assert c.replies_until_final_meta() == [
                (N.OPT_LIST_META_CONTEXT, N.REP_META_CONTEXT, b"\0\0\0\0base:allocation"),
                (N.OPT_LIST_META_CONTEXT, N.REP_ACK, b"")]
        c.option(N.OPT_LIST_META_CONTEXT, meta_request("a", ["x-other:thing"]))
        assert c.replies_until_final_meta() == [(N.OPT_LIST_META_CONTEXT, N.REP_ACK, b"")]
        c.option(N.OPT_SET_META_CONTEXT, meta_request("nosuch", ["base:allocation"]))
        assert c.reply()[:2] == (N.OPT_SET_META_CONTEXT, N.REP_ERR_UNKNOWN)
        for bad in (b"\0\0\0\1a\0\0\0\2\0\0\0\4base", b"\0\0\0\1a\xff\xff\xff\xff", b"\0\0\0\1", b"\0\0\0\x09ab"):
            c.option(N.OPT_SET_META_CONTEXT, bad)
            assert c.reply()[:2] == (N.OPT_SET_META_CONTEXT, N.REP_ERR_INVALID), bad
        c.option(N.OPT_SET_META_CONTEXT, meta_request("a", ["base:"]))       # "base:" selects nothing
        assert c.replies_until_final_meta() == [(N.OPT_SET_META_CONTEXT, N.REP_ACK, b"")]
        c.option(N.OPT_SET_META_CONTEXT, meta_request("a", ["base:allocation"]))
        assert c.replies_until_final_meta() == [
            (N.OPT_SET_META_CONTEXT, N.REP_META_CONTEXT, struct.pack(">I", N.ALLOCATION_ID) + b"base:allocation"),
            (N.OPT_SET_META_CONTEXT, N.REP_ACK, b"")]
        assert c.go("b") == 4 * MiB                   # contexts were set for "a": none for "b"
        c.request(N.CMD_BLOCK_STATUS, 0, MiB, handle=1)
        ((_, kind, payload),) = chunks(c, 1)
        assert kind == N.REPLY_TYPE_ERROR and struct.unpack(">I", payload[:4])[0] == errno.EINVAL
        c.close()
        # without structured replies: DF is not offered, and a DF read is refused with a simple reply
        c = Raw(svc.socket_path).flags()
        c.option(N.OPT_GO, struct.pack(">I", 1) + b"a" + struct.pack(">H", 0))
        ((_, _, info),) = [r for r in c.replies_until_final() if r[1] == N.REP_INFO]
        assert not struct.unpack(">HQH", info)[2] & N.T_SEND_DF
        c.request(N.CMD_READ, 0, 4096, handle=2, flags=N.CMD_FLAG_DF)
        assert c.simple_reply() == (errno.EINVAL, 2, b"")
        c.close()


def test_cache_rejects_unknown_flags_and_keeps_data(served):
    svc, t, _ = served
    c = structured(svc, contexts=None)
    c.request(N.CMD_CACHE, 0, SIZE, handle=1)
    assert c.simple_reply() == (0, 1, b"")
    c.request(N.CMD_CACHE, 0, MiB, handle=2, flags=N.CMD_FLAG_NO_HOLE)
    ((_, kind, payload),) = chunks(c, 2)
    assert kind == N.REPLY_TYPE_ERROR and struct.unpack(">I", payload[:4])[0] == errno.EINVAL
    c.close()
    assert t.read(5 * MiB, MiB) == b"\x11" * MiB


def test_pipelined_requests_answered_in_order_across_segment_boundaries(served):
    """Many requests in one send, split at awkward places: every reply, in order, with the right data."""
    svc, t, _ = served
    c = Raw(svc.socket_path).flags()
    assert c.go() == SIZE
    stream = b""
    for i in range(200):
        if i % 3 == 0:
            stream += struct.pack(">IHHQQI", N.REQUEST_MAGIC, 0, N.CMD_WRITE, i, i * 8192, 4096 + i) + bytes([i]) * (4096 + i)
        else:
            stream += struct.pack(">IHHQQI", N.REQUEST_MAGIC, 0, N.CMD_READ, i, 5 * MiB + i * 512, 512)
    for k in range(0, len(stream), 1237):                    # odd pieces: headers and payloads get split
        c.s.sendall(stream[k:k + 1237])
        time.sleep(0.0005 if k % 7 == 0 else 0)
    for i in range(200):
        err, cookie, data = c.simple_reply(0 if i % 3 == 0 else 512)
        assert (err, cookie) == (0, i)
        if i % 3:
            assert data == b"\x11" * 512
    c.close()
    for i in range(0, 200, 3):
        assert t.read(i * 8192, 4096 + i) == bytes([i]) * (4096 + i)

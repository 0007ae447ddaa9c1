"""Raw-socket clients that break the NBD protocol. Each gets the protocol's error reply (and its session
goes on) or a clean disconnect of that client alone; afterwards a well-behaved client (qemu-io, nbdinfo)
is served normally and the disk and its log hold exactly what well-behaved clients wrote."""
from __future__ import annotations

import errno
import socket
import struct
import time

import pytest

from replicator.tracking import nbd as N

from .helpers import KiB, MiB, log_ranges, make_vhdx, merge, nbdinfo_json, qemu_io, serving, tracked, wait_until

SIZE = 8 * MiB
GOOD = (1 * MiB, 64 * KiB)           # the range the well-behaved client writes after each abuse
FILL = b"\xee" * MiB                 # [6 MiB, 7 MiB) holds this before tracking; abusers aim at it


@pytest.fixture
def env(tmp_path):
    path = make_vhdx(tmp_path / "disk.vhdx", SIZE, fill=[(6 * MiB, FILL), (SIZE - MiB, FILL)])
    t = tracked(path)
    with serving({"disk": t}, tmp_path / "nbd.sock") as svc:
        yield Env(svc, t)


class Env:
    def __init__(self, svc, t):
        self.svc, self.t = svc, t

    def connect(self) -> "Raw":
        return Raw(self.svc.socket_path)

    def idle(self) -> None:
        """Every abusive connection has been dealt with by the server."""
        wait_until(lambda: not self.svc.server.clients, what="the server to drop the connections")

    def assert_healthy(self, extra_ranges=()) -> None:
        """A real client is served normally; the disk and the log hold only well-behaved writes."""
        self.idle()
        uri = self.svc.uri("disk")
        assert nbdinfo_json(uri)["exports"][0]["export-size"] == SIZE
        qemu_io(uri, f"write -P 0x42 {GOOD[0]} {GOOD[1]}", f"read -P 0x42 {GOOD[0]} {GOOD[1]}",
                f"read -P 0xee {6 * MiB} {MiB}", f"read -P 0xee {SIZE - MiB} {MiB}", f"read -P 0 0 {MiB}")
        assert not self.t.resync_required, self.t.reason
        sealed = self.svc.cut()[0]
        assert sealed is not None
        want = merge([(GOOD[0], GOOD[0] + GOOD[1]), *extra_ranges])
        assert merge(log_ranges([sealed.path], SIZE)) == want


class Raw:
    """A hand-driven NBD client on a Unix socket."""

    def __init__(self, path: str):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(10)
        self.s.connect(path)
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt_magic) == (N.NBDMAGIC, N.IHAVEOPT)
        assert flags & N.FLAG_FIXED_NEWSTYLE

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"server closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def closed_by_server(self) -> bool:
        """True when the server closes the connection (EOF or reset) without sending anything more."""
        try:
            return self.s.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.s.close()

    # ---- handshake
    def flags(self, f: int = N.FLAG_FIXED_NEWSTYLE | N.FLAG_NO_ZEROES) -> "Raw":
        self.send(struct.pack(">I", f))
        return self

    def option(self, opt: int, data: bytes = b"", magic: int = N.IHAVEOPT) -> None:
        self.send(struct.pack(">QII", magic, opt, len(data)) + data)

    def reply(self) -> tuple[int, int, bytes]:
        magic, opt, kind, length = struct.unpack(">QIII", self.recv(20))
        assert magic == N.REPLY_MAGIC_OPT
        return opt, kind, self.recv(length)

    def replies_until_final(self) -> list[tuple[int, int, bytes]]:
        out = []
        while True:
            out.append(self.reply())
            if out[-1][1] != N.REP_INFO and out[-1][1] != N.REP_SERVER:
                return out

    def go(self, name: str = "disk") -> int:
        raw = name.encode()
        self.option(N.OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        replies = self.replies_until_final()
        assert replies[-1][:2] == (N.OPT_GO, N.REP_ACK), replies
        (info,) = [d for _, k, d in replies if k == N.REP_INFO and d[:2] == b"\0\0"]
        return struct.unpack(">HQH", info)[1]

    # ---- transmission
    def request(self, cmd: int, offset: int, length: int, payload: bytes = b"", handle: int = 7, flags: int = 0,
                magic: int = N.REQUEST_MAGIC) -> None:
        self.send(struct.pack(">IHHQQI", magic, flags, cmd, handle, offset, length) + payload)

    def simple_reply(self, read_len: int = 0) -> tuple[int, int, bytes]:
        magic, err, handle = struct.unpack(">IIQ", self.recv(16))
        assert magic == N.SIMPLE_REPLY_MAGIC
        return err, handle, (self.recv(read_len) if err == 0 and read_len else b"")


def opened(env) -> Raw:
    c = env.connect().flags()
    assert c.go() == SIZE
    return c


# ------------------------------------------------------------------ handshake
def test_bad_option_magic_disconnects(env):
    c = env.connect().flags()
    c.option(N.OPT_LIST, magic=0x1122334455667788)
    assert c.closed_by_server()
    c.close()
    env.assert_healthy()
    assert env.svc.server.stats["protocol_errors"] >= 1


def test_garbage_instead_of_handshake_disconnects(env):
    c = env.connect()
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)       # not NBD at all
    assert c.closed_by_server()
    c.close()
    env.assert_healthy()


def test_unknown_client_flags_disconnect(env):
    c = env.connect().flags(N.FLAG_FIXED_NEWSTYLE | 0x80)
    assert c.closed_by_server()
    c.close()
    env.assert_healthy()


def test_unknown_option_gets_unsup_and_session_continues(env):
    c = env.connect().flags()
    for opt in (42, N.OPT_STARTTLS, 4, 11, 0x7FFFFFFF):           # 4 = PEEK_EXPORT, 11 = EXTENDED_HEADERS
        c.option(opt, b"some data")
        assert c.reply() == (opt, N.REP_ERR_UNSUP, b"option not supported")
    c.option(N.OPT_LIST)
    replies = c.replies_until_final()
    assert [k for _, k, _ in replies] == [N.REP_SERVER, N.REP_ACK]
    assert c.go() == SIZE
    c.request(N.CMD_READ, 6 * MiB, 4096, handle=99)
    assert c.simple_reply(4096) == (0, 99, FILL[:4096])
    c.close()
    env.assert_healthy()


def test_info_for_unknown_export_then_known(env):
    c = env.connect().flags()
    c.option(N.OPT_INFO, struct.pack(">I", 5) + b"nosuc" + struct.pack(">H", 0))
    opt, kind, msg = c.reply()
    assert (opt, kind) == (N.OPT_INFO, N.REP_ERR_UNKNOWN)
    c.option(N.OPT_GO, struct.pack(">I", 6) + b"nosuch" + struct.pack(">H", 0))
    assert c.reply()[:2] == (N.OPT_GO, N.REP_ERR_UNKNOWN)
    # malformed INFO: name length beyond the option, request count not matching: ERR_INVALID, goes on
    c.option(N.OPT_INFO, struct.pack(">I", 100) + b"disk" + struct.pack(">H", 0))
    assert c.reply()[:2] == (N.OPT_INFO, N.REP_ERR_INVALID)
    c.option(N.OPT_INFO, struct.pack(">I", 4) + b"disk" + struct.pack(">H", 3) + b"\0\3")
    assert c.reply()[:2] == (N.OPT_INFO, N.REP_ERR_INVALID)
    c.option(N.OPT_INFO, b"\0\0")
    assert c.reply()[:2] == (N.OPT_INFO, N.REP_ERR_INVALID)
    c.option(N.OPT_LIST, b"junk")
    assert c.reply()[:2] == (N.OPT_LIST, N.REP_ERR_INVALID)
    # INFO on the real name: the export's size and flags, then ACK; the session is still in options
    c.option(N.OPT_INFO, struct.pack(">I", 4) + b"disk" + struct.pack(">HH", 1, N.INFO_BLOCK_SIZE))
    replies = c.replies_until_final()
    assert replies[-1][:2] == (N.OPT_INFO, N.REP_ACK)
    infos = {struct.unpack(">H", d[:2])[0]: d for _, k, d in replies if k == N.REP_INFO}
    assert struct.unpack(">HQH", infos[N.INFO_EXPORT])[1] == SIZE
    assert struct.unpack(">HIII", infos[N.INFO_BLOCK_SIZE])[1:] == (1, 4096, 32 * MiB)
    assert c.go() == SIZE
    c.close()
    env.assert_healthy()


def test_export_name_for_unknown_export_disconnects(env):
    c = env.connect().flags()
    c.option(N.OPT_EXPORT_NAME, b"nosuch")
    assert c.closed_by_server()
    c.close()
    env.assert_healthy()


def test_truncated_option_then_close(env):
    c = env.connect().flags()
    c.send(struct.pack(">QII", N.IHAVEOPT, N.OPT_GO, 100) + b"\0\0\0\4di")     # 10 of 100 bytes
    c.s.shutdown(socket.SHUT_WR)
    assert c.closed_by_server()
    c.close()
    c = env.connect().flags()
    c.send(struct.pack(">QI", N.IHAVEOPT, N.OPT_GO))                              # half an option header
    c.close()
    env.assert_healthy()


def test_oversized_option_disconnects(env):
    c = env.connect().flags()
    c.send(struct.pack(">QII", N.IHAVEOPT, N.OPT_INFO, 0xFFFFFFF0))               # a 4 GiB option
    assert c.closed_by_server()
    c.close()
    c = env.connect().flags()
    c.option(99, bytes(N.MAX_OPTION + 1))
    assert c.closed_by_server()
    c.close()
    env.assert_healthy()


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_old_style_export_name(env, no_zeroes):
    """NBD_OPT_EXPORT_NAME: size and flags, then 124 zero bytes unless the client set NO_ZEROES."""
    c = env.connect().flags(N.FLAG_FIXED_NEWSTYLE | (N.FLAG_NO_ZEROES if no_zeroes else 0))
    c.option(N.OPT_EXPORT_NAME, b"disk")
    size, flags = struct.unpack(">QH", c.recv(10))
    assert size == SIZE and flags & N.T_SEND_FUA and not flags & N.T_READ_ONLY
    if not no_zeroes:
        assert c.recv(124) == bytes(124)
    c.request(N.CMD_READ, SIZE - 512, 512, handle=1)
    assert c.simple_reply(512) == (0, 1, FILL[:512])
    c.close()
    env.assert_healthy()


def test_abort_option(env):
    c = env.connect().flags()
    c.option(N.OPT_ABORT)
    assert c.reply()[:2] == (N.OPT_ABORT, N.REP_ACK)
    assert c.closed_by_server()
    c.close()
    env.assert_healthy()


# ------------------------------------------------------------------ transmission
@pytest.mark.parametrize("cmd", [N.CMD_READ, N.CMD_WRITE, N.CMD_TRIM, N.CMD_WRITE_ZEROES, N.CMD_CACHE])
def test_requests_beyond_the_end_get_einval(env, cmd):
    """EINVAL, or ENOSPC for the commands that write data (the spec's SHOULD, as qemu-nbd does)."""
    c = opened(env)
    want = errno.ENOSPC if cmd in (N.CMD_WRITE, N.CMD_WRITE_ZEROES) else errno.EINVAL
    cases = [(SIZE - 512, 1024), (SIZE, 1), (SIZE + MiB, 512), (2**63, 512), (2**64 - 512, 1024),
             (SIZE - MiB, MiB + 1)]
    for i, (off, length) in enumerate(cases):
        payload = bytes([i + 1]) * length if cmd == N.CMD_WRITE else b""
        c.request(cmd, off, length, payload, handle=1000 + i, flags=N.CMD_FLAG_FUA if i % 2 else 0)
        assert c.simple_reply() == (want, 1000 + i, b"")
    # the session goes on, and a request that ends exactly at the end is fine
    c.request(N.CMD_READ, SIZE - 4096, 4096, handle=5)
    assert c.simple_reply(4096) == (0, 5, FILL[:4096])
    c.request(N.CMD_DISC, 0, 0)
    assert c.closed_by_server()
    c.close()
    env.assert_healthy()


def test_read_larger_than_max_payload_gets_einval(tmp_path):
    path = make_vhdx(tmp_path / "big.vhdx", 64 * MiB)
    t = tracked(path)
    with serving({"big": t}, tmp_path / "nbd.sock") as svc:
        c = Raw(svc.socket_path).flags()
        assert c.go("big") == 64 * MiB
        c.request(N.CMD_READ, 0, N.MAX_PAYLOAD + 1, handle=3)
        assert c.simple_reply() == (errno.EINVAL, 3, b"")
        c.request(N.CMD_READ, 0, N.MAX_PAYLOAD, handle=4)
        err, handle, data = c.simple_reply(N.MAX_PAYLOAD)
        assert (err, handle, len(data)) == (0, 4, N.MAX_PAYLOAD)
        c.close()


def test_oversized_write_disconnects(env):
    c = opened(env)
    c.request(N.CMD_WRITE, 6 * MiB, N.MAX_PAYLOAD + 1, b"\x99" * 4096)   # the rest never comes
    assert c.closed_by_server()
    c.close()
    env.assert_healthy()
    assert env.svc.server.stats["protocol_errors"] >= 1


def test_unknown_command_gets_einval(env):
    c = opened(env)
    # RESIZE (not offered), unknown ones, and BLOCK_STATUS without a selected metadata context
    for i, cmd in enumerate((8, 9, 99, 0xFFFF, N.CMD_BLOCK_STATUS)):
        c.request(cmd, 6 * MiB, 4096, handle=200 + i)
        assert c.simple_reply() == (errno.EINVAL, 200 + i, b"")
    c.request(N.CMD_READ, 6 * MiB, 512, handle=9)
    assert c.simple_reply(512) == (0, 9, FILL[:512])
    c.close()
    env.assert_healthy()


def test_bad_request_magic_disconnects(env):
    c = opened(env)
    c.request(N.CMD_WRITE, 6 * MiB, 512, b"\x99" * 512, magic=0x12345678)
    assert c.closed_by_server()
    c.close()
    env.assert_healthy()


def test_client_vanishes_mid_header(env):
    c = opened(env)
    c.send(struct.pack(">IHHQ", N.REQUEST_MAGIC, 0, N.CMD_WRITE, 1))          # 16 of 28 bytes
    c.close()
    env.assert_healthy()


def test_client_vanishes_mid_write_payload(env):
    c = opened(env)
    c.request(N.CMD_WRITE, 6 * MiB, 64 * KiB, b"\x99" * (32 * KiB))           # half the payload
    c.close()
    c = opened(env)                                                           # and after a full write
    c.request(N.CMD_WRITE, 3 * MiB, 4096, b"\x33" * 4096, handle=11)
    assert c.simple_reply() == (0, 11, b"")
    c.request(N.CMD_WRITE, 6 * MiB, MiB, b"\x99" * 1000)
    c.close()
    env.assert_healthy(extra_ranges=[(3 * MiB, 3 * MiB + 4096)])
    assert env.t.read(3 * MiB, 4096) == b"\x33" * 4096


def test_client_vanishes_with_replies_unread(env):
    """A client that pipelines reads and goes away without reading the replies."""
    c = opened(env)
    for i in range(64):
        c.request(N.CMD_READ, 0, MiB, handle=i)
    c.close()
    env.assert_healthy()


def test_many_abusers_then_real_clients(env):
    for k in range(20):
        c = env.connect()
        if k % 3 == 0:
            c.close()                                        # gone right after the greeting
        elif k % 3 == 1:
            c.flags()
            c.option(N.OPT_GO, b"\xff" * 3)                  # too short: ERR_INVALID, then gone
            assert c.reply()[:2] == (N.OPT_GO, N.REP_ERR_INVALID)
            c.close()
        else:
            assert c.flags().go() == SIZE
            c.request(N.CMD_WRITE, 6 * MiB, 512, b"\x99" * 100)
            c.close()
    env.assert_healthy()


def test_unread_replies_pause_the_connection(env):
    """A client that sends many reads and does not read the replies: the server stops serving it once its
    reply buffer is full (bounded memory), serves others meanwhile, and carries on in order once the client
    reads."""
    c = opened(env)
    n = 120
    c.send(b"".join(struct.pack(">IHHQQI", N.REQUEST_MAGIC, 0, N.CMD_READ, i, 6 * MiB, MiB) for i in range(n)))
    before = env.svc.server.stats["requests"]
    time.sleep(0.5)
    served = env.svc.server.stats["requests"]
    time.sleep(0.5)
    assert env.svc.server.stats["requests"] == served, "the server kept serving a client that does not read"
    assert served - before < 24, f"{served - before} MiB of replies queued for a client that reads nothing"
    # another client is served while this one is paused
    assert nbdinfo_json(env.svc.uri("disk"))["exports"][0]["export-size"] == SIZE
    for i in range(n):
        assert c.simple_reply(MiB) == (0, i, FILL)
    c.close()
    env.assert_healthy()


def test_invalid_flags_keep_the_stream_in_step(env):
    """A write with a flag that is not valid for it is refused, and its payload is still consumed."""
    c = opened(env)
    c.request(N.CMD_WRITE, 6 * MiB, 4096, b"\x99" * 4096, handle=1, flags=N.CMD_FLAG_DF)
    assert c.simple_reply() == (errno.EINVAL, 1, b"")
    c.request(N.CMD_WRITE, 6 * MiB, 4096, b"\x99" * 4096, handle=2, flags=0x8000)
    assert c.simple_reply() == (errno.EINVAL, 2, b"")
    c.request(N.CMD_WRITE_ZEROES, 6 * MiB, 4096, handle=3, flags=N.CMD_FLAG_REQ_ONE)
    assert c.simple_reply() == (errno.EINVAL, 3, b"")
    c.request(N.CMD_FLUSH, 0, 0, handle=4, flags=N.CMD_FLAG_FUA)          # FUA is accepted everywhere
    assert c.simple_reply() == (0, 4, b"")
    c.request(N.CMD_READ, 6 * MiB, 4096, handle=5)
    assert c.simple_reply(4096) == (0, 5, FILL[:4096])
    c.close()
    env.assert_healthy()


def test_hostile_structured_negotiation(env):
    """Oversized or inconsistent metadata-context options and block status requests: ERR_INVALID or EINVAL
    error chunks, and the session goes on."""
    c = env.connect().flags()
    c.option(N.OPT_STRUCTURED_REPLY)
    assert c.reply()[:2] == (N.OPT_STRUCTURED_REPLY, N.REP_ACK)
    for bad in (struct.pack(">I", 0xFFFFFFFF) + b"disk", struct.pack(">I", 4) + b"disk" + struct.pack(">I", 1 << 30),
                struct.pack(">I", 4) + b"disk" + struct.pack(">II", 1, 0xFFFFFF00) + b"base:allocation"):
        c.option(N.OPT_LIST_META_CONTEXT, bad)
        assert c.reply()[:2] == (N.OPT_LIST_META_CONTEXT, N.REP_ERR_INVALID)
    q = b"base:allocation"
    c.option(N.OPT_SET_META_CONTEXT, struct.pack(">I", 4) + b"disk" + struct.pack(">II", 1, len(q)) + q)
    assert c.reply()[1] == N.REP_META_CONTEXT and c.reply()[1] == N.REP_ACK
    assert c.go() == SIZE
    for i, (off, length) in enumerate([(0, 0xFFFFFFFF), (2**64 - 1, 1), (SIZE, 512)]):
        c.request(N.CMD_BLOCK_STATUS, off, length, handle=10 + i)
        magic, flags, kind, handle, n = struct.unpack(">IHHQI", c.recv(20))
        payload = c.recv(n)
        assert (magic, flags, kind, handle) == (N.STRUCTURED_REPLY_MAGIC, N.REPLY_FLAG_DONE, N.REPLY_TYPE_ERROR,
                                                10 + i)
        assert struct.unpack(">I", payload[:4])[0] == errno.EINVAL
    c.request(N.CMD_BLOCK_STATUS, 0, SIZE, handle=20)
    magic, flags, kind, handle, n = struct.unpack(">IHHQI", c.recv(20))
    assert (kind, handle) == (N.REPLY_TYPE_BLOCK_STATUS, 20)
    ctx, *desc = struct.unpack(f">{n // 4}I", c.recv(n))
    assert sum(desc[0::2]) == SIZE and ctx == N.ALLOCATION_ID
    c.close()
    env.assert_healthy()

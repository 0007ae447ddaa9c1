"""An NBD server (fixed-newstyle handshake, simple replies) on asyncio, serving tracked disks.

Protocol: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md. Options: EXPORT_NAME,
ABORT, LIST, INFO, GO (anything else gets NBD_REP_ERR_UNSUP). Commands: READ, WRITE, DISC, FLUSH, TRIM,
WRITE_ZEROES, with FUA. Requests are handled in order per connection, and disk I/O runs on the loop, so
every request is atomic with respect to the others and to log cuts. A malformed request gets the
protocol's error reply or, when the stream can no longer be trusted, a clean disconnect of that client.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import struct

from ..errors import DiskIOError, OutOfRange, ReadOnlyError, ReplicatorError

log = logging.getLogger("replicator.nbd")

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC_OPT = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID, REP_ERR_UNKNOWN, REP_ERR_TOO_BIG = (
    0x80000001, 0x80000002, 0x80000003, 0x80000006, 0x80000009)
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

T_HAS_FLAGS, T_READ_ONLY, T_SEND_FLUSH, T_SEND_FUA = 1, 2, 4, 8
T_SEND_TRIM, T_SEND_WRITE_ZEROES, T_CAN_MULTI_CONN = 32, 64, 256
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
CMD_FLAG_FUA = 1

MAX_OPTION = 64 << 10
MAX_PAYLOAD = 32 << 20
_REQ = struct.Struct(">IHHQQI")
_OPT = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_SIMPLE = struct.Struct(">IIQ")


class Disconnect(Exception):
    """The client broke the protocol badly enough that the stream cannot continue."""


class Export:
    def __init__(self, name: str, disk, read_only: bool = False, description: str = ""):
        self.name, self.disk, self.read_only, self.description = name, disk, read_only, description

    @property
    def flags(self) -> int:
        f = T_HAS_FLAGS | T_SEND_FLUSH | T_SEND_FUA | T_SEND_TRIM | T_SEND_WRITE_ZEROES | T_CAN_MULTI_CONN
        return f | (T_READ_ONLY if self.read_only else 0)


def errno_for(e: Exception) -> int:
    if isinstance(e, OutOfRange):
        return errno.EINVAL
    if isinstance(e, ReadOnlyError):
        return errno.EPERM
    if isinstance(e, DiskIOError) and "disk full" in e.message:
        return errno.ENOSPC
    return errno.EIO


class NbdServer:
    def __init__(self, exports: list[Export]):
        self.exports = {e.name: e for e in exports}
        self.default = exports[0] if len(exports) == 1 else None
        self.clients: set[asyncio.Task] = set()
        self.server: asyncio.AbstractServer | None = None
        self.stats = {"connections": 0, "protocol_errors": 0, "requests": 0}

    async def start_unix(self, path: str) -> None:
        self.server = await asyncio.start_unix_server(self._client, path=path)

    async def start_tcp(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._client, host=host, port=port, reuse_address=True)
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self.clients):
            t.cancel()
        await asyncio.gather(*self.clients, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()

    # ------------------------------------------------------------------ connection
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.clients.add(task)
        self.stats["connections"] += 1
        try:
            export = await self._handshake(reader, writer)
            if export is not None:
                await self._transmission(export, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass                                   # the client went away: only its connection ends
        except Disconnect as e:
            self.stats["protocol_errors"] += 1
            log.warning("disconnecting NBD client: %s", e)
        except asyncio.CancelledError:
            pass
        finally:
            self.clients.discard(task)
            writer.close()

    async def _handshake(self, reader, writer) -> Export | None:
        writer.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        await writer.drain()
        client_flags = struct.unpack(">I", await reader.readexactly(4))[0]
        if client_flags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
            raise Disconnect(f"unknown client flags 0x{client_flags:x}")
        no_zeroes = bool(client_flags & FLAG_NO_ZEROES)
        while True:
            magic, opt, length = _OPT.unpack(await reader.readexactly(_OPT.size))
            if magic != IHAVEOPT:
                raise Disconnect(f"bad option magic 0x{magic:x}")
            if length > MAX_OPTION:
                raise Disconnect(f"option {opt} of {length} bytes is too large")
            data = await reader.readexactly(length)
            if opt == OPT_EXPORT_NAME:
                export = self._lookup(data.decode("utf-8", "replace"))
                if export is None:
                    raise Disconnect("NBD_OPT_EXPORT_NAME for an unknown export")
                writer.write(struct.pack(">QH", export.disk.size, export.flags) + (b"" if no_zeroes else bytes(124)))
                await writer.drain()
                return export
            if opt == OPT_ABORT:
                self._reply(writer, opt, REP_ACK)
                await writer.drain()
                return None
            if opt == OPT_LIST:
                self._list(writer, data)
            elif opt in (OPT_INFO, OPT_GO):
                export = self._info(writer, opt, data)
                if export is not None and opt == OPT_GO:
                    await writer.drain()
                    return export
            else:
                self._reply(writer, opt, REP_ERR_UNSUP, b"option not supported")
            await writer.drain()

    def _lookup(self, name: str) -> Export | None:
        return self.exports.get(name) or (self.default if name == "" else None)

    def _reply(self, writer, opt: int, kind: int, data: bytes = b"") -> None:
        writer.write(_OPT_REPLY.pack(REPLY_MAGIC_OPT, opt, kind, len(data)) + data)

    def _list(self, writer, data: bytes) -> None:
        if data:
            self._reply(writer, OPT_LIST, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
            return
        for name in self.exports:
            raw = name.encode()
            self._reply(writer, OPT_LIST, REP_SERVER, struct.pack(">I", len(raw)) + raw)
        self._reply(writer, OPT_LIST, REP_ACK)

    def _info(self, writer, opt: int, data: bytes) -> Export | None:
        if len(data) < 6:
            self._reply(writer, opt, REP_ERR_INVALID, b"option too short")
            return None
        nlen = struct.unpack_from(">I", data)[0]
        if 4 + nlen + 2 > len(data):
            self._reply(writer, opt, REP_ERR_INVALID, b"name length beyond the option")
            return None
        name = data[4:4 + nlen].decode("utf-8", "replace")
        n = struct.unpack_from(">H", data, 4 + nlen)[0]
        if len(data) != 4 + nlen + 2 + 2 * n:
            self._reply(writer, opt, REP_ERR_INVALID, b"information request count does not match the length")
            return None
        wanted = struct.unpack_from(f">{n}H", data, 4 + nlen + 2)
        export = self._lookup(name)
        if export is None:
            self._reply(writer, opt, REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
            return None
        self._reply(writer, opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, export.disk.size, export.flags))
        if INFO_BLOCK_SIZE in wanted:
            self._reply(writer, opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, MAX_PAYLOAD))
        if INFO_NAME in wanted:
            self._reply(writer, opt, REP_INFO, struct.pack(">H", INFO_NAME) + export.name.encode())
        if INFO_DESCRIPTION in wanted and export.description:
            self._reply(writer, opt, REP_INFO, struct.pack(">H", INFO_DESCRIPTION) + export.description.encode())
        self._reply(writer, opt, REP_ACK)
        return export

    # ------------------------------------------------------------------ transmission
    async def _transmission(self, export: Export, reader, writer) -> None:
        disk = export.disk
        while True:
            magic, flags, cmd, handle, offset, length = _REQ.unpack(await reader.readexactly(_REQ.size))
            if magic != REQUEST_MAGIC:
                raise Disconnect(f"bad request magic 0x{magic:x}")
            self.stats["requests"] += 1
            payload = None
            if cmd == CMD_WRITE:
                if length > MAX_PAYLOAD:
                    raise Disconnect(f"write of {length} bytes exceeds the {MAX_PAYLOAD}-byte maximum")
                payload = await reader.readexactly(length)
            if cmd == CMD_DISC:
                disk.flush()
                return
            err, data = self._execute(export, cmd, flags, offset, length, payload)
            writer.write(_SIMPLE.pack(SIMPLE_REPLY_MAGIC, err, handle))
            if data is not None:
                writer.write(data)
            await writer.drain()

    def _execute(self, export: Export, cmd: int, flags: int, offset: int, length: int, payload):
        disk = export.disk
        fua = bool(flags & CMD_FLAG_FUA)
        if cmd in (CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
            if offset + length > disk.size:
                return errno.EINVAL, None
            if cmd == CMD_READ and length > MAX_PAYLOAD:
                return errno.EINVAL, None
            if cmd != CMD_READ and export.read_only:
                return errno.EPERM, None
        try:
            if cmd == CMD_READ:
                return 0, disk.read(offset, length)
            if cmd == CMD_WRITE:
                disk.write(offset, payload, fua=fua)
            elif cmd == CMD_FLUSH:
                disk.flush()
            elif cmd == CMD_TRIM:
                disk.trim(offset, length, fua=fua)
            elif cmd == CMD_WRITE_ZEROES:
                disk.write_zeroes(offset, length, fua=fua)
            else:
                return errno.EINVAL, None
        except ReplicatorError as e:
            log.error("NBD command %d at %d+%d failed: %s", cmd, offset, length, e.message)
            return errno_for(e), None
        return 0, None

"""A small synchronous NBD client: how the control plane reads a live disk without touching its file.

replicatord never opens a protected disk for writing: the export process owns it (and its image lock).
Initial replication, resync digests and seed export read the disk with the export's help: the export
says where each range lives (its BAT), the data of fully present blocks is read from the file in this
process (read-only, no lock, like `qemu-img -U`), and anything else through the export as any NBD client
would. Such a read is fuzzy while the guest writes; the log begun before it makes the copy whole.
Fixed-newstyle handshake with NBD_OPT_GO; simple replies only (reads and flushes, nothing else).
Protocol: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
"""
from __future__ import annotations

import os
import socket
import struct
import threading

from ..disk.base import BlockDevice, Extent, ExtentKind, pread_exact, small_folios
from ..errors import DiskIOError

NBDMAGIC, IHAVEOPT, OPT_REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
REQUEST_MAGIC, SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
OPT_GO, REP_ACK, REP_INFO, INFO_EXPORT = 7, 1, 3, 0
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2
MAX_READ = 32 << 20


class NbdClient:
    """One connection to an export on a Unix socket; thread-safe (requests are serialized)."""

    def __init__(self, socket_path: str, export: str = "", timeout: float = 60.0):
        self.socket_path, self.export = socket_path, export
        self._lock = threading.Lock()
        self._handle = 0
        try:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(socket_path)
            self.size, self.flags = self._handshake()
        except OSError as e:
            self.close()
            raise DiskIOError(f"NBD export {export!r} at {socket_path}: {e.strerror or e}") from None

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if not k:
                raise DiskIOError(f"NBD export {self.export!r} at {self.socket_path}: the server closed the connection")
            got += k
        return bytes(buf)

    def _handshake(self) -> tuple[int, int]:
        magic, opt_magic, _flags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise DiskIOError(f"{self.socket_path}: not a fixed-newstyle NBD server")
        self.sock.sendall(struct.pack(">I", 3))              # FIXED_NEWSTYLE | NO_ZEROES
        name = self.export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        size = flags = None
        while True:
            magic, _opt, kind, length = struct.unpack(">QIII", self._recv(20))
            body = self._recv(length)
            if magic != OPT_REPLY_MAGIC:
                raise DiskIOError(f"{self.socket_path}: bad NBD option reply")
            if kind == REP_INFO and len(body) >= 12 and struct.unpack_from(">H", body)[0] == INFO_EXPORT:
                size, flags = struct.unpack_from(">QH", body, 2)
            elif kind == REP_ACK:
                break
            elif kind & 0x80000000:
                raise DiskIOError(f"NBD export {self.export!r} refused: {body.decode('utf-8', 'replace')}")
        if size is None:
            raise DiskIOError(f"{self.socket_path}: the server did not say the export's size")
        return size, flags

    def pread_into(self, offset: int, buf: memoryview) -> None:
        with self._lock:
            pos = 0
            while pos < len(buf):
                n = min(MAX_READ, len(buf) - pos)
                self._handle += 1
                self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, self._handle, offset + pos, n))
                magic, err, handle = struct.unpack(">IIQ", self._recv(16))
                if magic != SIMPLE_REPLY_MAGIC or handle != self._handle:
                    raise DiskIOError(f"{self.socket_path}: unexpected NBD reply")
                if err:
                    raise DiskIOError(f"NBD read of {n} bytes at {offset + pos} failed with errno {err}")
                view, got = buf[pos:pos + n], 0
                while got < n:
                    k = self.sock.recv_into(view[got:])
                    if not k:
                        raise DiskIOError(f"{self.socket_path}: the server closed the connection mid-read")
                    got += k
                pos += n

    def pwrite(self, offset: int, data: bytes) -> None:
        """A write, as a guest's (tests and tools; replicatord never writes a protected disk)."""
        with self._lock:
            self._handle += 1
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, self._handle, offset, len(data)))
            self.sock.sendall(data)
            magic, err, handle = struct.unpack(">IIQ", self._recv(16))
            if magic != SIMPLE_REPLY_MAGIC or handle != self._handle or err:
                raise DiskIOError(f"NBD write of {len(data)} bytes at {offset} failed (errno {err})")

    def close(self) -> None:
        sock = getattr(self, "sock", None)
        if sock is None:
            return
        try:
            sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        sock.close()
        self.sock = None


class NbdDisk(BlockDevice):
    """A live disk read by the control plane: the BlockDevice the encoders and digest scans take.
    Extents come from the export process (its BAT), given as a callable. With `mapper` (the export's map
    of where each range lives) and the image's `path`, data in fully present blocks is read from the file
    right here, on the caller's thread: a disk read held up by a busy device then delays this reader, never
    a guest request on the export's loop. Anything else (zeros aside) is read through the export."""

    format_name = "nbd"

    def __init__(self, socket_path: str, export: str, *, extents=None, virtual_disk_id=None,
                 logical_sector_size: int = 512, path: str = "", mapper=None, size: int | None = None):
        self.socket_path, self.export = socket_path, export
        self._client = None if size is not None else NbdClient(socket_path, export)
        self.size = size if size is not None else self._client.size
        self.read_only = True
        self.path = path or f"nbd+unix:///{export}?socket={socket_path}"
        self.virtual_disk_id = virtual_disk_id
        self.logical_sector_size = logical_sector_size
        self._extent_source = extents
        self._mapper = mapper
        self._fd = -1
        if mapper is not None and path:
            try:
                self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                small_folios(self._fd)      # a copy's reads must not leave the guest's disk in large folios
            except OSError as e:
                self.close()
                raise DiskIOError(f"{path}: cannot open for reading: {e.strerror}") from None

    @property
    def client(self) -> NbdClient:
        """The connection to the export, opened on first use (a reader of fully present blocks may never
        need one)."""
        if self._client is None:
            self._client = NbdClient(self.socket_path, self.export)
        return self._client

    def _readinto(self, offset: int, buf: memoryview) -> None:
        if self._fd < 0:
            self.client.pread_into(offset, buf)
            return
        for voff, n, kind, foff in self._mapper(offset, len(buf)):
            view = buf[voff - offset:voff - offset + n]
            if kind == "file":
                got = pread_exact(self._fd, view, foff)
                if got < n:                  # a block cut short by truncation reads as zeros past the end
                    view[got:] = bytes(n - got)
            elif kind == "zero":
                view[:] = bytes(n)
            else:
                self.client.pread_into(voff, view)

    def _extents(self, offset: int, length: int):
        if self._extent_source is None:
            yield Extent(offset, length, ExtentKind.DATA)
            return
        end = offset + length
        for start, n, kind in self._extent_source(offset, length):
            lo, hi = max(start, offset), min(start + n, end)
            if lo < hi:
                yield Extent(lo, hi - lo, ExtentKind(kind))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

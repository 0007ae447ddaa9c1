"""The export's native request path (native/nbdserve.c), wrapped for replicator.tracking.native_io.

Only native: its pure fallback is the export's ordinary request path (tracking/nbd.py), which serves
every request, and the same ones the same way. One call serves the plain NBD writes and the warm reads at
the front of a buffer of requests: for a write the disk write, the log's staging and the reply; for a read
the copy from the page cache into its reply.
"""
from __future__ import annotations

MAX_READ = 128 << 10      # the longest read served in C (a guest's are 4-128 KiB; longer ones go to Python)
REPLIES = 2 * MAX_READ + (4 << 10)      # reply bytes one call may produce: two of the longest reads, or
                                        # 16,640 simple replies


def make_nbd_export_class(ffi, lib):
    """The NbdExport class over this cffi module."""

    class NbdExport:
        """One disk's request state for rk_nbd_serve: the buffers it reads and fills are bound here
        and kept exported (so never resized or freed under C) until bound again."""

        def __init__(self):
            self._w = ffi.new("rk_nbd_export *")
            self._replies = ffi.new("char[]", REPLIES)
            self._w.replies, self._w.replies_cap = self._replies, REPLIES
            self._w.writes = 1
            self._held: dict[str, object] = {}

        def _hold(self, name: str, obj, ctype: str):
            handle = ffi.from_buffer(ctype, obj, require_writable=ctype == "char[]")
            self._held[name] = handle
            return handle

        def bind_disk(self, fd: int, disk_size: int, bat, block_size: int, chunk_ratio: int, max_len: int) -> None:
            """bat: the BAT as a uint64 array (MS-VHDX 2.5); only writes of at most max_len bytes and reads of
            at most MAX_READ are served."""
            w = self._w
            w.fd, w.disk_size, w.block_size, w.chunk_ratio, w.max_len = fd, disk_size, block_size, chunk_ratio, max_len
            w.max_read = MAX_READ
            w.bat, w.bat_len = self._hold("bat", bat, "uint64_t[]"), len(bat)

        def modes(self, writes: bool, reads: bool, structured: bool) -> None:
            """Which requests the next calls serve (writes on, reads off at first), and the reply form of
            reads (the connection's: structured replies negotiated or not)."""
            w = self._w
            w.writes, w.reads, w.structured = int(writes), int(reads), int(structured)

        @property
        def full(self) -> bool:
            """The last call stopped for want of reply room: call again."""
            return bool(self._w.full)

        @property
        def reads_served(self) -> int:
            """How many of the last call's requests served were reads."""
            return self._w.reads_served

        def bind_regions(self, marked, region_size: int) -> None:
            """marked: a byte per region, nonzero where a write needs no marking first."""
            w = self._w
            w.marked, w.n_regions, w.region_size = self._hold("marked", marked, "uint8_t[]"), len(marked), region_size

        def bind_log(self, data, entries, entries_cap: int) -> None:
            """The log's staging buffers (fixed size); None: writes are not logged."""
            w = self._w
            if data is None:
                w.log_buf, w.log_cap, w.entries, w.entries_cap = ffi.NULL, 0, ffi.NULL, 0
                self._held.pop("log", None)
                self._held.pop("entries", None)
                return
            w.log_buf, w.log_cap = self._hold("log", data, "char[]"), len(data)
            w.entries, w.entries_cap = self._hold("entries", entries, "char[]"), entries_cap

        def serve(self, data, pos: int, log_len: int, entries_n: int):
            """(position of the first request not served, requests served, the bytes written, log_len,
            entries_n, the replies, errno of a write that failed or 0)."""
            w = self._w
            w.log_len, w.entries_n, w.replies_len = log_len, entries_n, 0
            if type(data) is bytes:
                end = lib.rk_nbd_serve(w, data, len(data), pos)
            else:
                with ffi.from_buffer(data) as p:
                    end = lib.rk_nbd_serve(w, p, len(p), pos)
            served = w.served
            if not served:
                return end, 0, 0, log_len, entries_n, b"", w.err
            return end, served, w.bytes, w.log_len, w.entries_n, ffi.buffer(self._replies, w.replies_len)[:], w.err

    return NbdExport

"""The export's native request path (native/nbdserve.c, native/readpool.c), wrapped for
replicator.tracking.native_io and tracking/nbd.py.

Only native: its pure fallback is the export's ordinary request path (tracking/nbd.py), which serves
every request, and the same ones the same way. One call serves the plain NBD writes and the reads at the
front of a buffer of requests: for a write the disk write, the log's staging and the reply; for a read the
copy from the page cache into its reply, or, for pages not cached, a job on a ReadPool whose reply the loop
takes when a thread has read it.
"""
from __future__ import annotations

MAX_READ = 128 << 10      # the longest read served in C (a guest's are 4-128 KiB; longer ones go to Python)
REPLIES = 2 * MAX_READ + (4 << 10)      # reply bytes one call may produce: two of the longest reads, or
                                        # 16,640 simple replies
TAKE_MAX = 256                          # finished reads one ReadPool.take() moves


def make_read_pool_class(ffi, lib):
    """The ReadPool class over this cffi module."""

    class ReadPool:
        """Threads of C that read for NbdExport.serve what the page cache does not hold. The loop watches
        `fd` (readable: finished reads wait) and calls take(); close() waits for every queued read."""

        def __init__(self, threads: int):
            p = lib.rk_read_pool_new(threads)
            if p == ffi.NULL:
                raise OSError("cannot start the export's read threads")
            self._p = p
            self.fd = lib.rk_read_pool_eventfd(p)
            self._done = ffi.new("rk_read_done[]", TAKE_MAX)
            self._out = ffi.new("char[]", REPLIES)

        @property
        def pending(self) -> int:
            """Finished reads not taken yet (a hint: a thread may add one at any moment)."""
            return lib.rk_read_pool_pending(self._p) if self._p is not None else 0

        def take(self) -> list[tuple[int, int, int, int, memoryview]]:
            """Finished reads, as (token, cookie, errno or 0, bytes counted when queued, reply): at most
            TAKE_MAX, and as many replies as fit in REPLIES bytes; call again while `pending`."""
            done = self._done
            n = lib.rk_read_pool_take(self._p, done, TAKE_MAX, self._out, REPLIES)
            if not n:
                return []
            last = done[n - 1]
            data = memoryview(ffi.buffer(self._out, last.off + last.len)[:])
            return [(d.token, d.cookie, d.err, d.size, data[d.off:d.off + d.len]) for d in done[0:n]]

        def submit(self, token: int, fd: int, where: list[int], first: int, head: bytes, length: int) -> int:
            """Queue one read directly (tests), or with no pieces (`where` empty, length 0) an fsync of fd:
            0 or an errno. Either way `head` is the reply's start (with the cookie at 8..15)."""
            return lib.rk_read_pool_submit(self._p, token, fd, ffi.new("uint64_t[2]", where + [0] * (2 - len(where))),
                                           len(where), first, head, len(head), length)

        def sync(self, token: int, fd: int, reply: bytes) -> int:
            """Queue an fsync of fd whose completion carries `reply` (a FLUSH's simple reply): 0 or an errno."""
            return self.submit(token, fd, [], 0, reply, 0)

        def close(self) -> None:
            if self._p is not None:
                lib.rk_read_pool_free(self._p)
                self._p = None

    return ReadPool


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

        def bind_disk(self, fd: int, disk_size: int, bat, block_size: int, chunk_ratio: int, max_len: int,
                      sparse_from: int = 0) -> None:
            """bat: the BAT as a uint64 array (MS-VHDX 2.5) of a disk without a parent; only writes of at most
            max_len bytes and reads of at most MAX_READ are served, and structured reads of sparse_from bytes or
            more only where they hold no zeros (the caller sends those as hole chunks)."""
            w = self._w
            w.fd, w.disk_size, w.block_size, w.chunk_ratio, w.max_len = fd, disk_size, block_size, chunk_ratio, max_len
            w.max_read, w.sparse_from = MAX_READ, sparse_from
            w.bat, w.bat_len = self._hold("bat", bat, "uint64_t[]"), len(bat)

        def bind_pool(self, pool) -> None:
            """Where reads of pages not cached go from now on (None: they are left to the caller)."""
            self._w.pool = pool._p if pool is not None else ffi.NULL
            self._held["pool"] = pool

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

        @property
        def queued(self) -> tuple[int, int]:
            """The reads the last call queued on the pool, and their replies' bytes."""
            return self._w.queued, self._w.queued_bytes

        def serve(self, data, pos: int, log_len: int, entries_n: int, token: int = 0, room: int = 0,
                  room_bytes: int = 0):
            """(position of the first request not served, requests served, the bytes written, log_len,
            entries_n, the replies, errno of a write that failed or 0). Reads of pages not cached go to the
            bound pool with `token`, while fewer than `room` of them and `room_bytes` of replies are queued."""
            w = self._w
            w.log_len, w.entries_n, w.replies_len = log_len, entries_n, 0
            w.token, w.queue_max, w.queue_bytes_max = token, max(0, room), max(0, room_bytes)
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

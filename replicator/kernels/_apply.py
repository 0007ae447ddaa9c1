"""The native apply of a delta stream's data frames (native/apply.c), wrapped for replicator.delta.

Only native: its pure fallback is the ordinary decode-and-write loop of replicator.delta.apply, which
gives the same bytes in the same places. One call takes a batch of frames and runs without the GIL on
one thread per lane, so a stream's decompression, verification and O_DIRECT writes use both cores.
"""
from __future__ import annotations

import errno as _errno
import os
from dataclasses import dataclass

RAW, ZSTD = 1, 2          # rk_apply_frame.kind; the same numbers as delta.format.FrameKind

_WHY = {
    1: "ZSTD payload does not decompress",
    2: "ZSTD payload expands beyond the declared {length} bytes",
    3: "ZSTD payload gives {produced} bytes, not the declared {length}",
    4: "XXH3-128 of the plain data does not match",
    6: "the write plan does not fit the frame",
    7: "out of memory",
    8: "an earlier batch failed",
}
WRITE_FAILED = 5
STREAM_FAULTS = (1, 2, 3, 4)
NO_MEMORY = 7


@dataclass(frozen=True)
class ApplyFrame:
    kind: int                 # RAW or ZSTD
    lane: int                 # ZSTD: the lane whose zstd stream the payload continues
    payload: bytes
    length: int               # plain bytes
    digest: bytes             # XXH3-128 of the plain bytes, canonical
    segments: list            # (file_offset, offset in the plain bytes, length)


class ApplyFailure(Exception):
    """A frame of the batch failed: `index` in the batch, `message` what was wrong; `errno` for writes."""

    def __init__(self, index: int, code: int, message: str, errno: int = 0):
        super().__init__(message)
        self.index, self.code, self.message, self.errno = index, code, message, errno

    @property
    def is_write(self) -> bool:
        return self.code == WRITE_FAILED

    @property
    def is_stream(self) -> bool:
        """The stream's fault (its payload or digest), not the caller's plan, memory or an earlier failure."""
        return self.code in STREAM_FAULTS


def make_applier_class(ffi, lib):
    class FrameApplier:
        """Decompresses, verifies and writes batches of data frames; keeps each lane's zstd stream
        between batches. After a failure every later batch is refused. One thread at a time: the lanes'
        zstd contexts are its state."""

        def __init__(self, lanes: int, block_size: int, max_window: int):
            handle = lib.rk_applier_new(lanes, block_size, max_window)
            if handle == ffi.NULL:
                raise MemoryError("zstd decompression contexts")
            self._handle = ffi.gc(handle, lib.rk_applier_free)
            self.block_size = block_size

        def apply(self, frames: list[ApplyFrame], fd: int, direct_fd: int = -1, threads: int = 2,
                  writers: int = 4) -> None:
            """`threads` decoders, `writers` writes in flight (0: the decoders write). Raises ApplyFailure
            for the failed frame earliest in the batch."""
            n = len(frames)
            if not n:
                return
            cframes = ffi.new("rk_apply_frame[]", n)
            nsegs = sum(len(f.segments) for f in frames)
            csegs = ffi.new("rk_apply_seg[]", max(nsegs, 1))
            keep, k = [], 0
            for i, f in enumerate(frames):
                c = cframes[i]
                p = ffi.from_buffer(f.payload)
                keep.append(p)
                c.payload, c.payload_len, c.length = p, len(f.payload), f.length
                c.digest = f.digest
                c.kind, c.lane, c.nsegs = f.kind, max(f.lane, 0), len(f.segments)
                for file_offset, frame_offset, length in f.segments:
                    s = csegs[k]
                    s.file_offset, s.frame_offset, s.length = file_offset, frame_offset, length
                    k += 1
            status = ffi.new("rk_apply_status *")
            code = lib.rk_apply_frames(self._handle, cframes, n, csegs, nsegs, fd, direct_fd, threads, writers,
                                       status)
            del keep
            if code:
                i = int(status.frame)
                f = frames[max(i, 0)]
                if code == WRITE_FAILED:
                    e = int(status.err)
                    what = "disk full" if e in (_errno.ENOSPC, _errno.EDQUOT) else os.strerror(e)
                    raise ApplyFailure(i, code, f"pwrite: {what}", e)
                why = _WHY.get(code, f"native apply failed (code {code})").format(length=f.length, produced=int(status.produced))
                if code == 1:
                    why += f": zstd decompress error: {ffi.string(lib.rk_zstd_error_name(status.zstd_error)).decode()}"
                raise ApplyFailure(i, code, why)

    return FrameApplier


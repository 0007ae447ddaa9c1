"""Applying a delta stream to a disk, frame by frame in stream order; checking one without the GIL.

Two ways, the same bytes in the same places:
- the native apply (kernels.FrameApplier), for a disk that can plan its writes (a VHDX on a plain
  file): Python reads the stream and checks its structure, the disk plans where each frame goes, and
  the native kernel decompresses, verifies and writes batches of frames without the GIL, one thread
  per zstd lane (O_DIRECT where the disk's file allows it);
- the Python loop, for every other disk and when the native module is absent: the decoder verifies
  each frame on a second thread, the disk writes it.
"""
from __future__ import annotations

import bisect
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

from .. import kernels
from ..errors import DiskIOError, ReplicatorError, UsageError
from ..pipeline import ahead
from .decoder import DeltaDecoder
from .format import MAX_BLOCK, MAX_WINDOW, DeltaFormatError, StreamHeader, Trailer

BATCH_BYTES = 32 << 20       # plain bytes per native call: bounds the payloads held, amortizes the threads
# the native apply's writes in flight: a virtual disk takes writes ~3x faster at depth 4 than at 1, but the
# writer threads cost CPU too (pinning pages, submitting): on 2 cores, where the decoders want both, an
# apply of a real 1 GiB cycle took 1.20 s with 2 writers and 1.27 s with 4 (medians of 5, alternated)
WRITE_DEPTH = max(2, min(4, os.cpu_count() or 2))
READ_AHEAD = 16              # frames the reading thread keeps ready while a batch runs
VERIFY_BYTES = 8 << 20       # plain bytes per native check of a stream that is still arriving
PARALLEL_FROM = 1 << 20      # a smaller batch (frames that overlap end one) runs on the calling thread: starting
                             # threads for it cost 15x the Python loop's time on a stream of 4 KiB rewrites


@dataclass
class ApplyStats:
    header: StreamHeader
    trailer: Trailer | None = None
    frames: int = 0
    written_bytes: int = 0
    zeroed_bytes: int = 0
    native: bool = False


def apply_stream(source, disk, *, max_block: int = MAX_BLOCK, path: str | None = None,
                 threads: int | None = None) -> ApplyStats:
    """Decode and write each verified frame to `disk` (a BlockDevice) in stream order. Not atomic: on a
    bad stream frames before the fault are applied (with the native apply, frames of the same batch
    after it may be too); verify first when that matters."""
    fds = _native_fds(disk)
    dec = DeltaDecoder(source, max_block=max_block, path=path, inflate=fds is None)
    if disk.size != dec.header.disk_size:
        raise UsageError(f"{disk.path or disk.format_name}: disk of {disk.size} bytes, but the delta stream is "
                         f"for a disk of {dec.header.disk_size} bytes")
    stats = ApplyStats(dec.header, native=fds is not None)
    if fds is None:
        for f in ahead(dec, name="delta decode"):
            _count(stats, f)
            if f.data is None:
                disk.write_zeroes(f.offset, f.length)
            else:
                disk.write(f.offset, f.data)
    else:
        _NativeApply(dec, disk, stats, *fds, threads or kernels.default_threads()).run()
    stats.trailer = dec.trailer
    return stats


def checking_decoder(source, *, max_block: int = MAX_BLOCK, path: str | None = None) -> DeltaDecoder:
    """A decoder to iterate with verified(): its payloads are checked by the native kernel when there is
    one, else by the decoder itself."""
    return DeltaDecoder(source, max_block=max_block, path=path, inflate=kernels.FrameApplier is None)


def verified(dec: DeltaDecoder, threads: int | None = None) -> Iterator:
    """dec's frames, each only after its plain bytes are verified (XXH3-128), as a decoder that inflates
    gives them, but with no plain bytes (.data is None) when the native kernel checked them: it
    decompresses without the GIL, one thread per lane, batches of VERIFY_BYTES at a time."""
    if dec.inflate:
        yield from dec
        return
    applier = kernels.FrameApplier(dec.header.zstd_lanes, dec.header.block_size, MAX_WINDOW)
    threads = threads or kernels.default_threads()
    held, batch, where, plain, index = [], [], [], 0, 0
    frames = iter(dec)
    while True:
        try:
            f = next(frames, None)
        except ReplicatorError:
            _check(applier, batch, where, dec.path, -1, -1, threads, 0)   # a fault read earlier comes first
            raise
        if f is not None:
            index += 1
            held.append(f)
            if f.payload is not None:
                batch.append(kernels.ApplyFrame(int(f.kind), f.lane, f.payload, f.length, f.digest, []))
                where.append((index, f.position))
                plain += f.length
        if f is None or plain >= VERIFY_BYTES:
            _check(applier, batch, where, dec.path, -1, -1, threads, 0)
            yield from held
            if f is None:
                return
            held, batch, where, plain = [], [], [], 0


def _check(applier, batch, where, path, fd, direct_fd, threads, writers, image: str = "") -> None:
    """One native call; its failure as the one-line error the Python loop would raise."""
    try:
        applier.apply(batch, fd, direct_fd, threads, writers)
    except kernels.ApplyFailure as e:
        if e.is_write:
            raise DiskIOError(f"{image}: {e.message}") from None
        if e.code == kernels.NO_MEMORY:
            raise MemoryError(f"native apply: {e.message}") from None
        if not e.is_stream:                 # our own plan or an earlier failure: not the sender's fault
            raise RuntimeError(f"native apply: {e.message}") from None
        index, pos = where[e.index]
        raise DeltaFormatError(f"delta frame {index}", pos, e.message, path) from None


def _native_fds(disk) -> tuple[int, int] | None:
    """(fd, O_DIRECT fd or -1) when the native apply can write this disk, else None."""
    if kernels.FrameApplier is None:
        return None
    fds = getattr(disk, "planned_write_fds", None)
    return fds() if fds is not None else None


def _count(stats: ApplyStats, f) -> None:
    stats.frames += 1
    if f.data is None and f.payload is None:
        stats.zeroed_bytes += f.length
    else:
        stats.written_bytes += f.length


class _NativeApply:
    """Batches of data frames that do not overlap, each planned by the disk and handed to the kernel.

    One batch runs in the kernel (on a runner thread, without the GIL) while this thread reads and plans
    the next: planning in series with the kernel left a third of a 1 GiB apply's wall time with a core
    idle. Batches still run one after another, in stream order, so a later batch's writes land after an
    earlier one's. Metadata is committed (end_planned_writes) only when no planned write is outstanding,
    so it never describes data that is not written yet."""

    def __init__(self, dec: DeltaDecoder, disk, stats: ApplyStats, fd: int, direct_fd: int, threads: int):
        self.dec, self.disk, self.stats = dec, disk, stats
        self.fd, self.direct_fd, self.threads = fd, direct_fd, threads
        self.applier = kernels.FrameApplier(dec.header.zstd_lanes, dec.header.block_size, MAX_WINDOW)
        self.batch: list = []          # kernels.ApplyFrame
        self.where: list = []          # (frame index, payload position) of each
        self.starts: list = []         # sorted (start, end) of the batch's ranges: overlap check
        self.plain = 0
        self.runner: ThreadPoolExecutor | None = None
        self.running = None            # the Future of the batch in the kernel, if any
        self.failed = False            # a batch failed: nothing more is written, no metadata committed

    def run(self) -> None:
        try:
            try:
                self._frames()
            except BaseException as e:
                self._wait()           # a batch still in the kernel is earlier in the stream: its fault first
                if isinstance(e, ReplicatorError) and not self.failed:
                    self.settle()      # a fault the reader met: the frames before it are applied, as the Python
                raise                  # loop applies them, and a fault among them is the one it would meet first
        finally:
            if self.runner is not None:
                self.runner.shutdown(wait=True)

    def _frames(self) -> None:
        index = 0
        for f in ahead(self.dec, READ_AHEAD, name="delta read"):
            index += 1
            _count(self.stats, f)
            if f.payload is None:      # ZERO or TRIM: written in order, between batches
                self.settle()
                self.disk.write_zeroes(f.offset, f.length)
                continue
            if not self.disk.planned_room():
                self.settle()
            elif self._overlaps(f.offset, f.length) or self.plain + f.length > BATCH_BYTES:
                self.submit()
            segments = self.disk.plan_write(f.offset, f.length)
            self.batch.append(kernels.ApplyFrame(int(f.kind), f.lane, f.payload, f.length, f.digest, segments))
            self.where.append((index, f.position))
            bisect.insort(self.starts, (f.offset, f.offset + f.length))
            self.plain += f.length
        self.settle()

    def _overlaps(self, start: int, length: int) -> bool:
        i = bisect.bisect_left(self.starts, (start, start))
        end = start + length
        return (i < len(self.starts) and self.starts[i][0] < end) or (i > 0 and self.starts[i - 1][1] > start)

    def submit(self) -> None:
        """Hand the batch built so far to the kernel, after the one running there (whose fault, if any, is
        raised here first). A small batch runs on this thread: a thread's hand-over would cost more."""
        self._wait()
        if not self.batch:
            return
        batch, where, plain = self.batch, self.where, self.plain
        self.batch, self.where, self.starts, self.plain = [], [], [], 0
        args = (self.applier, batch, where, self.dec.path, self.fd, self.direct_fd)
        if plain < PARALLEL_FROM:
            self._kernel(*args, 1, 0)
            return
        if self.runner is None:
            self.runner = ThreadPoolExecutor(1, thread_name_prefix="native apply")
        self.running = self.runner.submit(self._kernel, *args, self.threads, WRITE_DEPTH)

    def _kernel(self, *args) -> None:
        try:
            _check(*args, self.disk.path)
        except BaseException:
            self.failed = True
            raise

    def settle(self) -> None:
        """Every planned frame written, then their metadata committed when due. A failed batch raises
        before the commit: its metadata stays dirty."""
        self.submit()
        self._wait()
        self.disk.end_planned_writes()

    def _wait(self) -> None:
        running, self.running = self.running, None
        if running is not None:
            running.result()        # a fault ends the apply: run() then submits nothing more

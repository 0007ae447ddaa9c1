"""Resync: make a target disk read like a source by comparing per-block digests and copying what differs.

Three stages, so that a transport can later put the network between them (Hyper-V Replica runs the
primary and the replica on different hosts):

    digests  each side yields a stream of `Window`s (the XXH3-128 digests of consecutive blocks, plus the
             bytes when that side was read locally), either from reading its disk or from a trusted
             manifest; blocks inside ZERO extents take the zero digest without being read;
    compare  the target side matches the two streams window by window and names the differing blocks;
    copy     the differing blocks are taken from the source and written to the target.

Locally the source window's bytes are still in memory when it is compared, so differing blocks are
written straight from them; a source whose digests came from a manifest is read again only for the
differing blocks. Progress is checkpointed after the target is flushed, so a cancelled or killed run
resumes at the last completed window.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .. import kernels
from ..pipeline import ahead_in
from ..disk.base import BlockDevice, ExtentKind
from ..errors import DiskIOError, ResyncCancelled, SourceChanged, UsageError
from . import manifest as M

DEFAULT_BLOCK_SIZE = 64 << 10
WINDOW_BYTES = 8 << 20          # one read and one kernel call per window: large enough to stream
RING = 3                        # buffers per read-ahead thread
CHECKPOINT_SECONDS = 2.0


# ------------------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class Grid:
    """Fixed-size blocks over a disk, grouped into windows (the unit of reading, comparing, checkpointing)."""

    block_size: int
    disk_size: int

    @property
    def n_blocks(self) -> int:
        return M.block_count(self.disk_size, self.block_size)

    @property
    def window_blocks(self) -> int:
        return max(1, WINDOW_BYTES // self.block_size)

    @property
    def n_windows(self) -> int:
        return -(-self.n_blocks // self.window_blocks)

    def window(self, index: int) -> tuple[int, int, int, int]:
        """(first block, block count, byte offset, byte length) of window `index`."""
        first = index * self.window_blocks
        count = min(self.window_blocks, self.n_blocks - first)
        offset = first * self.block_size
        return first, count, offset, min(count * self.block_size, self.disk_size - offset)

    def zero_digests(self, first: int, count: int) -> np.ndarray:
        """Digests of blocks [first, first+count) if they read as zeros (the last block may be short)."""
        out = np.repeat(_zero_digest(self.block_size)[None, :], count, axis=0)
        tail = self.disk_size % self.block_size
        if count and tail and first + count == self.n_blocks:
            out[-1] = _zero_digest(tail)
        return out


_ZERO_CACHE: dict[int, np.ndarray] = {}


def _zero_digest(length: int) -> np.ndarray:
    if length not in _ZERO_CACHE:
        _ZERO_CACHE[length] = kernels.xxh3_128_blocks(bytes(length), length)[0].copy()
    return _ZERO_CACHE[length]


@dataclass
class Window:
    first_block: int
    digests: np.ndarray                 # (count, 2) uint64
    data: memoryview | None = None      # the window's bytes, valid in blocks that are not zero-digest
    bytes_read: int = 0


# --------------------------------------------------------------------------------------------- digests
def _data_runs(disk: BlockDevice, grid: Grid, offset: int, length: int) -> list[tuple[int, int]]:
    """Window-relative block runs [a, b) touching a DATA extent; the other blocks read as zeros."""
    bs, runs = grid.block_size, []
    for ext in disk.extents(offset, length):
        if ext.kind is not ExtentKind.DATA:
            continue
        a, b = (ext.offset - offset) // bs, -(-(ext.end - offset) // bs)
        if runs and a <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(b, runs[-1][1]))
        else:
            runs.append((a, b))
    return runs


def digest_window(disk: BlockDevice, grid: Grid, index: int, buf: bytearray, lock=None) -> Window:
    """Read the data blocks of one window into buf and digest them; zero-extent blocks are not read.
    `lock` serialises the disk with a writer in another thread (drivers are not thread-safe)."""
    first, count, offset, length = grid.window(index)
    digests = grid.zero_digests(first, count)
    view, bs = memoryview(buf)[:length], grid.block_size
    with lock or contextlib.nullcontext():
        runs = _data_runs(disk, grid, offset, length)
        spans = [(a, b, a * bs, min(b * bs, length)) for a, b in runs]
        for _, _, lo, hi in spans:
            disk.readinto(offset + lo, view[lo:hi])
    for a, b, lo, hi in spans:
        digests[a:b] = kernels.xxh3_128_blocks(view[lo:hi], bs, threads=1)
    return Window(first, digests, view, sum(hi - lo for _, _, lo, hi in spans))


def read_windows(disk: BlockDevice, grid: Grid, start: int = 0, ring: int = RING, lock=None) -> Iterator[Window]:
    """Digest windows start.. in a read-ahead thread (reads and hashing release the GIL, so two sides
    stream on two cores). Each Window's data is valid until the next one is requested."""
    return ahead_in(lambda index, buf: digest_window(disk, grid, index, buf, lock), range(start, grid.n_windows),
                    [bytearray(grid.window_blocks * grid.block_size) for _ in range(ring)],
                    name=f"digest {disk.path or disk.format_name}")


def manifest_windows(digests: np.ndarray, grid: Grid, start: int = 0) -> Iterator[Window]:
    """The same stream as read_windows, from digests known without reading (a trusted manifest)."""
    for index in range(start, grid.n_windows):
        first, count, _, _ = grid.window(index)
        yield Window(first, digests[first:first + count])


# --------------------------------------------------------------------------------------------- compare
def differing_blocks(src: Window, dst: Window) -> np.ndarray:
    """Window-relative indices of the blocks whose digests differ."""
    if src.first_block != dst.first_block or src.digests.shape != dst.digests.shape:
        raise ValueError(f"digest streams out of step at blocks {src.first_block} / {dst.first_block}")
    return np.flatnonzero((src.digests != dst.digests).any(axis=1))


def runs_of(indices: np.ndarray) -> list[tuple[int, int]]:
    """Sorted indices -> [start, stop) runs of consecutive values."""
    if len(indices) == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [len(indices)]))
    return [(int(indices[a]), int(indices[b - 1]) + 1) for a, b in zip(starts, stops)]


@dataclass
class ChangeSet:
    """Coalesced byte extents (offset, length) of changed blocks, in disk order: what a change log's
    coalesced extents would say, at block granularity."""

    block_size: int
    disk_size: int
    extents: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def from_mask(cls, changed: np.ndarray, block_size: int, disk_size: int) -> "ChangeSet":
        cs = cls(block_size, disk_size)
        for a, b in runs_of(np.flatnonzero(changed)):
            cs.add_blocks(a, b)
        return cs

    def add_blocks(self, a: int, b: int) -> None:
        """Append blocks [a, b) (at or after the last extent), merging with it when adjacent."""
        off, end = a * self.block_size, min(b * self.block_size, self.disk_size)
        if self.extents and self.extents[-1][0] + self.extents[-1][1] == off:
            last = self.extents.pop()
            off = last[0]
        self.extents.append((off, end - off))

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self.extents)

    def block_indices(self) -> np.ndarray:
        bs = self.block_size
        parts = [np.arange(o // bs, -(-(o + n) // bs)) for o, n in self.extents]
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def to_json(self) -> dict:
        return {"block_size": self.block_size, "disk_size": self.disk_size, "blocks": int(len(self.block_indices())),
                "bytes": self.bytes, "extents": [{"offset": o, "length": n} for o, n in self.extents]}


# ------------------------------------------------------------------------------------------------ copy
class BlockCopier:
    """Writes the differing blocks of a source window to the target: zero blocks as write_zeroes (stays
    sparse), data from the window's bytes, or read again from the source when its digests came from a
    manifest (then re-hashed, so the target's recorded digests are those of what was really written)."""

    def __init__(self, source: BlockDevice, target: BlockDevice, grid: Grid, dry_run: bool, lock=None):
        self.source, self.target, self.grid, self.dry_run = source, target, grid, dry_run
        self.lock = lock or threading.Lock()        # shared with the thread reading the target ahead
        self.copied = self.zeroed = self.reread = 0
        self.source_moved = False
        self._scratch = bytearray(0 if dry_run else grid.window_blocks * grid.block_size)

    def apply(self, win: Window, runs: list[tuple[int, int]], written: np.ndarray) -> None:
        """Copy runs (window-relative) and store the digests of what the target now holds in `written`."""
        zero = (win.digests == self.grid.zero_digests(win.first_block, len(win.digests))).all(axis=1)
        for a, b in runs:
            for c, d in runs_of(np.arange(a, b)[zero[a:b]]):
                self._zeros(win.first_block, c, d)
            for c, d in runs_of(np.arange(a, b)[~zero[a:b]]):
                self._data(win, c, d, written)

    def _span(self, first: int, a: int, b: int) -> tuple[int, int, int, int]:
        bs = self.grid.block_size
        base = first * bs
        lo, hi = a * bs, min(b * bs, self.grid.disk_size - base)
        return base, lo, hi, hi - lo

    def _zeros(self, first: int, a: int, b: int) -> None:
        base, lo, _, n = self._span(first, a, b)
        if not self.dry_run:
            with self.lock:
                self.target.write_zeroes(base + lo, n)
        self.zeroed += n

    def _data(self, win: Window, a: int, b: int, written: np.ndarray) -> None:
        base, lo, hi, n = self._span(win.first_block, a, b)
        if self.dry_run:
            self.copied += n
            return
        if win.data is not None:
            data = win.data[lo:hi]
        else:
            data = memoryview(self._scratch)[lo:hi]
            self.source.readinto(base + lo, data)
            self.reread += n
            actual = kernels.xxh3_128_blocks(data, self.grid.block_size, threads=1)
            if not np.array_equal(actual, win.digests[a:b]):
                self.source_moved = True
                written[win.first_block + a:win.first_block + b] = actual
        with self.lock:
            self.target.write(base + lo, data)
        self.copied += n


# ---------------------------------------------------------------------------------------------- resync
@dataclass
class ResyncStats:
    block_size: int
    disk_size: int
    blocks_compared: int = 0
    blocks_differing: int = 0
    source_bytes_read: int = 0
    target_bytes_read: int = 0
    bytes_copied: int = 0           # data written to the target
    bytes_zeroed: int = 0           # ranges made to read as zeros (no data moved)
    source_from_manifest: bool = False
    target_from_manifest: bool = False
    resumed_blocks: int = 0         # blocks a checkpoint let this run skip
    seconds: float = 0.0
    dry_run: bool = False
    changes: ChangeSet | None = None
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "changes"}
        out["changes"] = self.changes.to_json() if self.changes else None
        return out


@dataclass
class ResyncPaths:
    """Where manifests and the checkpoint live; None turns each off."""

    source_manifest: str | None = None
    target_manifest: str | None = None
    checkpoint: str | None = None


def cancel_check(cancel) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    return cancel.is_set if hasattr(cancel, "is_set") else cancel


class _Run:
    """One resync: the state shared by the window loop, the checkpoint and the final manifests."""

    def __init__(self, source, target, grid: Grid, paths: ResyncPaths, dry_run: bool, every: float):
        self.source, self.target, self.grid, self.paths, self.dry_run, self.every = (
            source, target, grid, paths, dry_run, every)
        self.t0 = time.perf_counter()
        self.stats = st = ResyncStats(grid.block_size, grid.disk_size, dry_run=dry_run)
        self.src_id, self.dst_id = M.disk_identity(source), M.disk_identity(target)
        bs, size = grid.block_size, grid.disk_size
        self.src_known = M.trusted_digests(paths.source_manifest, self.src_id, bs, size, "source", st.warnings)
        self.dst_known = M.trusted_digests(paths.target_manifest, self.dst_id, bs, size, "target", st.warnings)
        st.source_from_manifest, st.target_from_manifest = self.src_known is not None, self.dst_known is not None
        self.digests = np.empty((grid.n_blocks, 2), np.uint64)     # the source's, as compared
        self.written = np.empty((grid.n_blocks, 2), np.uint64)     # what the target holds afterwards
        self.start, self.ckpt = 0, None
        resume = None if dry_run else M.load_resume(paths.checkpoint, bs, size, grid.window_blocks, self.src_id,
                                                     self.dst_id, st.warnings)
        if resume is not None:
            done = st.resumed_blocks = len(resume.digests)
            self.digests[:done] = self.written[:done] = resume.digests
            self.start = -(-done // grid.window_blocks)
        if not dry_run and paths.checkpoint and self.src_id.trusted:
            self.ckpt = M.CheckpointWriter(paths.checkpoint, bs, size, self.src_id, self.dst_id, resume)
        elif not dry_run and paths.checkpoint:
            st.warnings.append("the source's changes cannot be detected (not a file or VHDX): no checkpoint")
        self.copier = BlockCopier(source, target, grid, dry_run)
        st.changes = ChangeSet(grid.block_size, grid.disk_size)
        self.target_manifest_dropped = False

    def _stream(self, disk, known) -> Iterator[Window]:
        if known is not None:
            return manifest_windows(known, self.grid, self.start)
        lock = self.copier.lock if disk is self.target else None
        return read_windows(disk, self.grid, self.start, lock=lock)

    def loop(self, cancel, progress) -> None:
        stopped, last_sync = cancel_check(cancel), time.monotonic()
        src, dst = self._stream(self.source, self.src_known), self._stream(self.target, self.dst_known)
        try:
            for sw, tw in zip(src, dst):
                if stopped():
                    self.sync()
                    self.stats.seconds = time.perf_counter() - self.t0
                    raise ResyncCancelled(self._cancel_message(sw.first_block), sw.first_block, self.stats)
                self._window(sw, tw)
                if time.monotonic() - last_sync >= self.every:
                    self.sync()
                    last_sync = time.monotonic()
                if progress:
                    progress(self.stats)
        finally:
            src.close()
            dst.close()

    def _cancel_message(self, done: int) -> str:
        where = f"; run it again to resume from block {done}" if self.ckpt else ""
        return f"resync cancelled after {done} of {self.grid.n_blocks} blocks{where}"

    def _window(self, sw: Window, tw: Window) -> None:
        st, first, k = self.stats, sw.first_block, len(sw.digests)
        rel = differing_blocks(sw, tw)
        runs = runs_of(rel)
        self.digests[first:first + k] = self.written[first:first + k] = sw.digests
        if runs and not self.dry_run:
            self._drop_target_manifest()
        self.copier.apply(sw, runs, self.written)
        for a, b in runs:
            st.changes.add_blocks(first + a, first + b)
        st.blocks_compared += k
        st.blocks_differing += len(rel)
        st.source_bytes_read += sw.bytes_read
        st.target_bytes_read += tw.bytes_read
        st.source_bytes_read += self.copier.reread
        self.copier.reread = 0
        st.bytes_copied, st.bytes_zeroed = self.copier.copied, self.copier.zeroed
        if self.ckpt:
            self.ckpt.add(first, sw.digests)

    def _drop_target_manifest(self) -> None:
        """The target is about to change: its old manifest must not outlive that, even if we are killed."""
        if self.target_manifest_dropped or not self.paths.target_manifest:
            return
        self.target_manifest_dropped = True
        try:
            os.unlink(self.paths.target_manifest)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise DiskIOError(f"{self.paths.target_manifest}: cannot remove the stale manifest: {e}") from None

    def sync(self) -> None:
        """Target data durable first, then the checkpoint that claims it."""
        if not self.dry_run:
            with self.copier.lock:
                self.target.flush()
        if self.ckpt:
            self.ckpt.sync()

    def finish(self) -> None:
        self.sync()
        moved = self.copier.source_moved or (self.src_id.trusted and
                                             M.disk_identity(self.source, settle=False) != self.src_id)
        if not self.dry_run:
            if self.src_known is None and not moved:
                self._save(self.paths.source_manifest, self.src_id, self.digests, "source")
            if self.dst_known is None or self.copier.copied or self.copier.zeroed:
                self._save(self.paths.target_manifest, M.disk_identity(self.target), self.written, "target")
        self.close(remove=True)
        self.stats.seconds = time.perf_counter() - self.t0
        if moved:
            raise SourceChanged(f"{self.source.path}: the source was written during the resync; the target "
                                "matches what was read, run resync again to catch up")

    def _save(self, path: str | None, identity: M.Identity, digests: np.ndarray, role: str) -> None:
        if path is None or not identity.trusted:
            return
        try:
            M.save_manifest(path, M.Manifest(self.grid.block_size, self.grid.disk_size, identity, digests,
                                             time.time_ns()))
        except DiskIOError as e:
            self.stats.warnings.append(f"{role} manifest not saved: {e.message}")

    def close(self, remove: bool = False) -> None:
        if self.ckpt:
            self.ckpt.close(remove=remove)


def resync(source: BlockDevice, target: BlockDevice, *, block_size: int = DEFAULT_BLOCK_SIZE,
           paths: ResyncPaths | None = None, dry_run: bool = False, cancel=None,
           progress: Callable[[ResyncStats], None] | None = None,
           checkpoint_seconds: float = CHECKPOINT_SECONDS) -> ResyncStats:
    """Make target read like source, writing only the blocks whose digests differ.

    cancel: a threading.Event or a callable, checked between windows; raises ResyncCancelled after
    making the completed windows durable and checkpointed. Raises SourceChanged (after finishing) when
    the source was written during the run.
    """
    try:
        M.check_block_size(block_size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if source.size != target.size:
        raise UsageError(f"{target.path}: target is {target.size} bytes, the source {source.size}; resync "
                         "needs disks of the same virtual size")
    run = _Run(source, target, Grid(block_size, source.size), paths or ResyncPaths(), dry_run,
               checkpoint_seconds)
    try:
        run.loop(cancel, progress)
        run.finish()
    finally:
        run.close()         # keeps the checkpoint unless finish() removed it
    return run.stats

"""Reads, writes, zeroing and extents of an open VHDX (MS-VHDX §2.4–2.5).

Payload data goes straight to its block; metadata (BAT pages, sector bitmap pages, new bitmap blocks)
collects in memory and is committed through the log as one entry: data flushed first, then the log entry,
then the in-place update. A commit happens on flush()/close() and before a batch could outgrow one entry,
so every entry is self-consistent and a crash reopens to the previous or the next committed state.
"""
from __future__ import annotations

import numpy as np

from ..disk.base import Extent, ExtentKind, FileSync
from ..errors import UsageError
from . import structures as S
from .bat import OFFSET_MASK, BitmapState, PayloadState, make_entry
from .log import SECTOR, DataUpdate, ZeroUpdate, apply_updates

PAGE_ENTRIES = SECTOR // 8
MAX_UPDATES_PER_OP = 24      # one block piece dirties at most 2 BAT pages, 16 bitmap pages and 1 zeroing


def _round_up(x: int, align: int) -> int:
    return -(-x // align) * align


class VhdxIOMixin:
    # ------------------------------------------------------------------ state
    def _init_write_state(self) -> None:
        self._dirty_bat_pages: set[int] = set()
        self._dirty_bitmap_pages: dict[int, bytearray] = {}
        self._zero_updates: list[ZeroUpdate] = []
        self._bitmap_cache: dict[int, bytearray] = {}
        self._new_blocks_unsynced = False
        self._log_writer = None
        self._alloc_end = _round_up(self.file_size, S.MiB)
        self._spool = None                   # background_commits()

    @property
    def _fixed(self) -> bool:
        g = self.geometry
        return g.leave_block_allocated and not g.has_parent

    def _entry(self, block: int) -> tuple[int, int]:
        e = int(self.bat[self.layout.payload_index(block)])
        return e & 7, e & OFFSET_MASK

    def _set_entry(self, index: int, state: int, offset: int) -> None:
        self.bat[index] = make_entry(state, offset)
        self._dirty_bat_pages.add(index // PAGE_ENTRIES)

    # ------------------------------------------------------------------ read
    def _readinto(self, offset: int, buf: memoryview) -> None:
        bs = self.geometry.block_size
        pos = 0
        while pos < len(buf):
            vo = offset + pos
            n = min(bs - vo % bs, len(buf) - pos)
            self._read_piece(vo // bs, vo % bs, buf[pos:pos + n])
            pos += n

    def _read_piece(self, block: int, inblock: int, out: memoryview) -> None:
        state, foff = self._entry(block)
        if state == PayloadState.FULLY_PRESENT:
            self._read_file(out, foff + inblock)
        elif state == PayloadState.PARTIALLY_PRESENT:
            self._read_partial(block, inblock, foff, out)
        elif state == PayloadState.NOT_PRESENT and self.parent is not None:
            self._read_parent(block * self.geometry.block_size + inblock, out)
        else:
            out[:] = bytes(len(out))

    def map_range(self, offset: int, length: int) -> list[tuple[int, int, str, int]]:
        """Where [offset, offset+length) lives, for a reader in another process: (virtual offset, length,
        kind, file offset) with kind "file" (read this file at the offset), "zero", or "other" (partly
        present, or in a parent: read it through the disk's owner). A payload block never moves while the
        file is open (trimmed blocks' space is not reused), so an answer stays good for a fuzzy copy."""
        bs, out, pos, end = self.geometry.block_size, [], offset, offset + length
        while pos < end:
            inblock = pos % bs
            n = min(bs - inblock, end - pos)
            state, foff = self._entry(pos // bs)
            if state == PayloadState.FULLY_PRESENT:
                kind, at = "file", foff + inblock
            elif state == PayloadState.PARTIALLY_PRESENT or (state == PayloadState.NOT_PRESENT and self.parent):
                kind, at = "other", 0
            else:
                kind, at = "zero", 0
            last = out[-1] if out else None
            if last and last[2] == kind and (kind != "file" or last[3] + last[1] == at):
                out[-1] = (last[0], last[1] + n, kind, last[3])
            else:
                out.append((pos, n, kind, at))
            pos += n
        return out

    def _read_file(self, out: memoryview, file_offset: int) -> None:
        n = self.io.readinto(out, file_offset)
        if n < len(out):          # a block cut short by truncation reads as zeros past the end
            out[n:] = bytes(len(out) - n)

    def _read_parent(self, voffset: int, out: memoryview) -> None:
        inside = max(0, min(len(out), self.parent.size - voffset))
        if inside:
            self.parent.readinto(voffset, out[:inside])
        if inside < len(out):
            out[inside:] = bytes(len(out) - inside)

    def _read_partial(self, block: int, inblock: int, foff: int, out: memoryview) -> None:
        """Runs of sectors present here come from this file, the others from the parent."""
        lss = self.logical_sector_size
        vstart = block * self.geometry.block_size + inblock
        first, last = vstart // lss, (vstart + len(out) - 1) // lss
        bits = self._bitmap_bits(first, last + 1)
        change = np.flatnonzero(np.diff(bits.astype(np.int8))) + 1
        edges = [0, *change.tolist(), len(bits)]
        for a, b in zip(edges, edges[1:]):
            lo = max(vstart, (first + a) * lss) - vstart
            hi = min(vstart + len(out), (first + b) * lss) - vstart
            if bits[a]:
                self._read_file(out[lo:hi], foff + inblock + lo)
            else:
                self._read_parent(vstart + lo, out[lo:hi])

    # ------------------------------------------------------------------ sector bitmap
    def _bitmap_location(self, sector: int) -> tuple[int, int]:
        """(file offset of the 4 KiB bitmap page, bit index inside it) for a virtual sector."""
        chunk, bit = divmod(sector, S.SECTORS_PER_BITMAP_BLOCK)
        e = int(self.bat[self.layout.bitmap_index(chunk)])
        if e & 7 != BitmapState.PRESENT:
            return -1, bit % (SECTOR * 8)
        return (e & OFFSET_MASK) + bit // (SECTOR * 8) * SECTOR, bit % (SECTOR * 8)

    def _bitmap_page(self, page_offset: int) -> bytearray:
        page = self._dirty_bitmap_pages.get(page_offset) or self._bitmap_cache.get(page_offset)
        if page is None:
            page = bytearray(self.io.pread(SECTOR, page_offset).ljust(SECTOR, b"\0"))
            if len(self._bitmap_cache) > 4096 and (self._spool is None or self._spool.idle):
                self._bitmap_cache.clear()   # (not while a taken page may not be in the file yet)
            self._bitmap_cache[page_offset] = page
        return page

    def _bitmap_bits(self, start: int, stop: int) -> np.ndarray:
        out = np.zeros(stop - start, dtype=bool)
        pos = start
        while pos < stop:
            page_off, bit = self._bitmap_location(pos)
            n = min(stop - pos, SECTOR * 8 - bit)
            if page_off >= 0:
                page = np.frombuffer(self._bitmap_page(page_off), dtype=np.uint8)
                out[pos - start:pos - start + n] = np.unpackbits(page, bitorder="little")[bit:bit + n]
            pos += n
        return out

    def _set_bitmap_bits(self, start: int, stop: int) -> None:
        pos = start
        while pos < stop:
            self._ensure_bitmap_block(pos // S.SECTORS_PER_BITMAP_BLOCK)
            page_off, bit = self._bitmap_location(pos)
            n = min(stop - pos, SECTOR * 8 - bit)
            page = self._dirty_bitmap_pages.get(page_off)
            if page is None:
                page = bytearray(self._bitmap_page(page_off))
                self._dirty_bitmap_pages[page_off] = page
                self._bitmap_cache[page_off] = page
            bits = np.unpackbits(np.frombuffer(page, dtype=np.uint8), bitorder="little")
            bits[bit:bit + n] = 1
            page[:] = np.packbits(bits, bitorder="little").tobytes()
            pos += n

    def _ensure_bitmap_block(self, chunk: int) -> None:
        index = self.layout.bitmap_index(chunk)
        if int(self.bat[index]) & 7 == BitmapState.PRESENT:
            return
        off = self._allocate(S.MiB)
        self._zero_updates.append(ZeroUpdate(off, S.MiB))
        self._set_entry(index, BitmapState.PRESENT, off)

    # ------------------------------------------------------------------ write
    def allocation_needed(self, ranges) -> int:
        """Bytes of new file space that writing these (offset, length) ranges may allocate: payload blocks
        not present yet, and a sector bitmap block per chunk of a differencing disk. An upper bound, for
        checking free space before a long write starts."""
        bs = self.geometry.block_size
        blocks: set[int] = set()
        for off, n in ranges:
            if n > 0:
                blocks.update(range(off // bs, -(-(off + n) // bs)))
        present = (PayloadState.FULLY_PRESENT, PayloadState.PARTIALLY_PRESENT)
        new = [b for b in blocks if self._entry(b)[0] not in present]
        need = len(new) * _round_up(bs, S.MiB)
        if self.parent is not None and new:
            per_chunk = S.SECTORS_PER_BITMAP_BLOCK * self.logical_sector_size // bs
            need += len({b // per_chunk for b in new}) * S.MiB
        return need

    def _write(self, offset: int, data: memoryview) -> None:
        lss = self.logical_sector_size
        if self.parent is not None and (offset % lss or len(data) % lss):
            offset, data = self._widen_to_sectors(offset, data)
        self._begin_modification(user_visible=True)
        for block, inblock, pos, n in self._block_pieces(offset, len(data)):
            self._write_piece(block, inblock, data[pos:pos + n])

    def _block_pieces(self, offset: int, length: int):
        """(block, offset in the block, offset in the range, length) of each block the range touches."""
        bs = self.geometry.block_size
        pos = 0
        while pos < length:
            vo = offset + pos
            n = min(bs - vo % bs, length - pos)
            yield vo // bs, vo % bs, pos, n
            pos += n

    def _widen_to_sectors(self, offset: int, data: memoryview):
        """A differencing disk tracks whole sectors, so merge a partial sector with what it reads now."""
        lss = self.logical_sector_size
        start, end = offset // lss * lss, _round_up(offset + len(data), lss)
        buf = bytearray(end - start)
        self._readinto(start, memoryview(buf)[:lss])
        self._readinto(end - lss, memoryview(buf)[len(buf) - lss:])
        buf[offset - start:offset - start + len(data)] = data
        return start, memoryview(buf)

    def _write_piece(self, block: int, inblock: int, data: memoryview) -> None:
        self.io.pwrite(data, self._place_piece(block, inblock, len(data)))
        self._maybe_commit()

    def _place_piece(self, block: int, inblock: int, n: int) -> int:
        """Where a write of n bytes at `inblock` of `block` goes in the file, its block allocated and its
        sectors marked present first; the metadata is left dirty for the caller's _maybe_commit."""
        state, foff = self._entry(block)
        bs = self.geometry.block_size
        if state not in (PayloadState.FULLY_PRESENT, PayloadState.PARTIALLY_PRESENT):
            whole = inblock == 0 and n == bs
            from_parent = self.parent is not None and state == PayloadState.NOT_PRESENT and not whole
            foff = self._allocate(bs)
            self._new_blocks_unsynced = True
            state = PayloadState.PARTIALLY_PRESENT if from_parent else PayloadState.FULLY_PRESENT
            if from_parent:
                self._ensure_bitmap_block(block * bs // self.logical_sector_size // S.SECTORS_PER_BITMAP_BLOCK)
            self._set_entry(self.layout.payload_index(block), state, foff)
        if state == PayloadState.PARTIALLY_PRESENT:
            lss = self.logical_sector_size
            vstart = block * bs + inblock
            self._set_bitmap_bits(vstart // lss, (vstart + n) // lss)
        return foff + inblock

    # ------------------------------------------------------------------ planned writes
    def plan_write(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """For a caller that writes the bytes itself (the native apply): allocate what write(offset, data
        of `length`) would and return where its bytes go, as (file offset, offset in data, length). The
        caller writes them all, then calls end_planned_writes(), so metadata is committed only after the
        data it describes, as _write_commit's order requires. Only where planned_write_fds() allows."""
        self._check_writable()
        self._check_range(offset, length)
        if self.parent is not None:
            raise UsageError(f"{self.path}: a differencing disk's writes are not planned (write() instead)")
        self._begin_modification(user_visible=True)
        return [(self._place_piece(block, inblock, n), pos, n)
                for block, inblock, pos, n in self._block_pieces(offset, length)]

    def planned_write_fds(self) -> tuple[int, int] | None:
        """(fd, O_DIRECT fd or -1) a planned writer may write the file through; None when it may not: a
        read-only or differencing disk, or a file behind anything but the plain FileIO classes (a log
        replay's overlay, the crash harness), whose writes must go through it."""
        from .fileio import DirectWriteIO, FileIO
        if self.read_only or self.parent is not None or type(self.io) not in (FileIO, DirectWriteIO):
            return None
        return self.io.fd, getattr(self.io, "direct_fd", -1)

    def planned_room(self) -> bool:
        """Whether more writes may be planned before end_planned_writes() must commit."""
        if self._log_writer is None:
            self._log_writer = self._new_log_writer()
        return self._dirty_count() <= (self._log_writer.max_updates() - MAX_UPDATES_PER_OP) // 2

    def end_planned_writes(self) -> None:
        """The planned writes are done: commit their metadata when it is due. Due at planned_room()'s
        threshold, not only at _maybe_commit's, or every later frame would make a batch of its own."""
        if self.planned_room():
            self._maybe_commit()
        else:
            self.commit_soon()

    def _allocate(self, length: int) -> int:
        """New space at the 1 MiB-aligned end of the file; extension reads as zeros."""
        off = self._alloc_end
        self._alloc_end = off + _round_up(length, S.MiB)
        self.io.truncate(self._alloc_end)
        return off

    # ------------------------------------------------------------------ zeroing
    def _write_zeroes(self, offset: int, length: int) -> None:
        lss = self.logical_sector_size
        if self.parent is not None and (offset % lss or length % lss):
            return self._write(offset, memoryview(bytes(length)))
        self._begin_modification(user_visible=True)
        bs = self.geometry.block_size
        pos = offset
        while pos < offset + length:
            n = min(bs - pos % bs, offset + length - pos)
            self._zero_piece(pos // bs, pos % bs, n)
            pos += n

    def _zero_piece(self, block: int, inblock: int, length: int) -> None:
        state, foff = self._entry(block)
        if inblock == 0 and length == self.geometry.block_size and not self._fixed:
            if state != PayloadState.ZERO:     # the block's space is left unused; the file never shrinks
                self._set_entry(self.layout.payload_index(block), PayloadState.ZERO, 0)
                self._maybe_commit()
            return
        present = state in (PayloadState.FULLY_PRESENT, PayloadState.PARTIALLY_PRESENT)
        inherits = self.parent is not None and state == PayloadState.NOT_PRESENT
        if present or inherits:
            zeros = bytes(min(length, 4 * S.MiB))
            for at in range(0, length, len(zeros)):
                n = min(len(zeros), length - at)
                self._write_piece(block, inblock + at, memoryview(zeros)[:n])

    # ------------------------------------------------------------------ extents
    def _extents(self, offset: int, length: int):
        bs = self.geometry.block_size
        pos, end = offset, offset + length
        while pos < end:
            block = pos // bs
            n = min(bs - pos % bs, end - pos)
            state, _ = self._entry(block)
            if state in (PayloadState.FULLY_PRESENT, PayloadState.PARTIALLY_PRESENT):
                yield Extent(pos, n, ExtentKind.DATA)
            elif state == PayloadState.NOT_PRESENT and self.parent is not None:
                yield from self._parent_extents(pos, n)
            else:
                yield Extent(pos, n, ExtentKind.ZERO)
            pos += n

    def _parent_extents(self, pos: int, n: int):
        inside = max(0, min(n, self.parent.size - pos))
        if inside:
            yield from self.parent.extents(pos, inside)
        if inside < n:
            yield Extent(pos + inside, n - inside, ExtentKind.ZERO)

    # ------------------------------------------------------------------ commit
    def _dirty_count(self) -> int:
        return len(self._dirty_bat_pages) + len(self._dirty_bitmap_pages) + len(self._zero_updates)

    def _maybe_commit(self) -> None:
        if self._log_writer is None:
            self._log_writer = self._new_log_writer()
        room = self._log_writer.max_updates() - MAX_UPDATES_PER_OP
        if self._spool is None:
            if self._dirty_count() > room:
                self._commit()
        elif self._dirty_count() > room // 2:       # early, so that the writer rarely waits for one
            if not self._spool.idle and self._dirty_count() <= room:
                return                               # one is being written; room for more meanwhile
            self.commit_soon()

    def background_commits(self) -> None:
        """Metadata commits (their fsyncs) on a thread of their own from now on (disk.spool): for the
        export, whose loop they held 5-9 ms at a time under load. flush() and close() wait for them."""
        from ..disk.spool import Spool
        if self._spool is None and not self.read_only:
            self._spool = Spool(self.path, "metadata commit failed", 1)

    def commit_soon(self, bounded: bool = True) -> None:
        """The metadata changed so far committed: on the commit thread if there is one (not waited
        for: wait_commits()), else now. bounded: wait first while another commit is queued (so that
        commits do not pile up); flush_begin() does not, it never waits."""
        if self._spool is None:
            if self._dirty_count():
                self._commit()
            return
        self._spool.check()              # after a failed commit nothing more is taken: it stays dirty
        taken = self._take_commit()
        if taken is not None:
            self._clear_dirty()
            self._spool.put(lambda: self._write_commit(*taken), 1 if bounded else 0)

    def wait_commits(self) -> None:
        """Until the commits handed to the commit thread are durable (raises the first failure)."""
        if self._spool is not None:
            self._spool.wait()

    def flush(self) -> None:
        if self.read_only:
            return
        self.wait_commits()
        if self._dirty_count():
            self._commit()
        else:
            self.io.fsync()

    def flush_begin(self):
        """With background commits: the metadata changed so far handed to the commit thread here; the half
        returned waits for that thread's commits (each makes the data before it durable first) and then
        makes the data durable itself, for writes into blocks allocated before."""
        if self.read_only or self._spool is None:
            return None
        self.commit_soon(bounded=False)
        spool, io = self._spool, self.io
        if spool.idle:                  # no commit to wait for (only this thread queues them): an fsync
            return FileSync(io.fd, io.fsync)

        def rest() -> None:
            spool.wait()
            io.fsync()
        return rest

    def _commit(self) -> None:
        taken = self._take_commit()
        if taken is not None:
            self._write_commit(*taken)
            self._clear_dirty()              # only now: a failed commit is tried again by the next flush

    def _take_commit(self):
        """The metadata updates so far, as one commit to write (cheap: the I/O path's half). The file's
        size is taken here too: later allocations are not this commit's, nor made durable by its flush."""
        if not self._dirty_count():
            return None
        if self._log_writer is None:
            self._log_writer = self._new_log_writer()
        updates = list(self._zero_updates)
        updates += [DataUpdate(off, bytes(page)) for off, page in sorted(self._dirty_bitmap_pages.items())]
        updates += [DataUpdate(self.bat_offset + p * SECTOR, self._bat_page(p)) for p in sorted(self._dirty_bat_pages)]
        return updates, self._new_blocks_unsynced, self.io.size(), self._alloc_end

    def _clear_dirty(self) -> None:
        self._dirty_bat_pages.clear()
        self._dirty_bitmap_pages.clear()
        self._zero_updates.clear()
        self._new_blocks_unsynced = False

    def _write_commit(self, updates, new_blocks: bool, size: int, alloc_end: int) -> None:
        """Data first, then one log entry, then the same bytes in place (§2.3). One at a time: on the
        commit thread, or with it idle. `size`: the file's size when the commit was taken, which the
        data flush makes durable (a later extension is not: it must not be the FlushedFileOffset)."""
        writer = self._log_writer
        if new_blocks:
            self.io.fsync()
        writer.write(updates, flushed_file_offset=size // S.MiB * S.MiB,
                     last_file_offset=_round_up(max(size, alloc_end), S.MiB))
        self.io.fsync()
        if self.header.log_guid != writer.log_guid:
            self._write_header(log_guid=writer.log_guid)
        apply_updates(self.io, updates)
        self.io.fsync()

    def _bat_page(self, page: int) -> bytes:
        raw = self.bat[page * PAGE_ENTRIES:(page + 1) * PAGE_ENTRIES].astype("<u8").tobytes()
        if len(raw) < SECTOR:      # the last page may extend past the entries: keep what the file holds
            tail = self.io.pread(SECTOR - len(raw), self.bat_offset + page * SECTOR + len(raw))
            raw += tail.ljust(SECTOR - len(raw), b"\0")
        return raw

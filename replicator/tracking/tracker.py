"""Change tracking for one VHDX: every acknowledged write is in the disk, in the active HRL, and inside a
durable dirty region; cuts seal the active log and chain the next one.

On open the tracker looks for Hyper-V Replica's resynchronization triggers (a log not closed cleanly, a
broken chain, a DataWriteGuid that changed while nobody tracked, a log that outgrew its share of the disk)
and, when one fires, moves to RESYNC_REQUIRED with the reason recorded. In that state writes are still
tracked in the dirty bitmap, so a resync knows which regions to compare; nothing is ever lost silently.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass

import numpy as np

from ..disk.copy import copy_range_sparse
from ..durable import output_path
from ..errors import DiskIOError, ReplicatorError
from ..hrl import HrlReader, HrlWriter
from ..hrl.reader import LogNotSealed
from ..vhdx import VhdxDisk
from .memlogs import OWNER, MemoryLogs
from .state import (DEFAULT_REGION_SIZE, SPARE_LOG, SealedLogRecord, Sidecar, SidecarState, TrackingState,
                    current_boot_id, pack_regions, unpack_regions)

_log = logging.getLogger("replicator.export")
RECYCLE_MAX = 2 << 30          # the most of it kept (disk space held for it while no log uses it)

ZERO_UUID = "00000000-0000-0000-0000-000000000000"


@dataclass
class PendingCut:
    """A cut between its pointer switch (on the I/O path) and its durable record (see TrackedDisk.cut)."""
    log: HrlWriter
    name: str
    regions: np.ndarray
    data_write_guid: uuid.UUID
    header: object = None
    error: str | None = None


@dataclass(frozen=True)
class SealedLog:
    path: str
    unique_id: uuid.UUID
    previous_unique_id: uuid.UUID
    data_bytes: int


class TrackedDisk:
    """A VHDX opened read-write with change tracking. Not thread-safe: one caller (the export's loop)."""

    def __init__(self, path: str, *, region_size: int = DEFAULT_REGION_SIZE, max_log_share: float = 0.5,
                 log_thread: bool = False, memory: MemoryLogs | None = None):
        """log_thread: each log's file work on a thread of its own (the export: see HrlWriter).
        memory: new logs are written to memory while the host's budget allows (tracking/memlogs.py)."""
        self.path = path
        self.log_thread = log_thread
        self.memory = memory
        self.log_in_memory = False
        self.max_log_share = max_log_share
        self.sidecar = Sidecar(path)
        self.deferring = False   # the export process: slow file work goes to run_deferred() (see _later)
        self._deferred: list = []
        self._closed_logs: list = []    # logs given up (resync required) whose writer may still be finishing
        self.unsynced = 0        # bytes written since the last writeback() (tracking/writeback.py)
        self.last_write = float("-inf")   # time.monotonic() of the guest's last write, zeroing or trim (pacing)
        self.disk = VhdxDisk.open(path, read_only=False)
        self.size = self.disk.size
        try:
            self._open_state(region_size)
        except BaseException:
            self.disk.close()
            raise

    # ------------------------------------------------------------------ open
    def _open_state(self, region_size: int) -> None:
        sc = self.sidecar
        host_crashed = False
        boot = current_boot_id()
        memory_dir = self._memory_dir()      # before the chain check, which reads the logs
        if sc.exists():
            self.state = sc.load()
            self.state.memory_dir = memory_dir
            host_crashed = (not self.state.clean and self.state.boot_id is not None and boot is not None
                            and self.state.boot_id != boot)
            reason = ("the host went down while the disk was in use: its dirty regions may not all have "
                      "reached the disk" if host_crashed else self._find_trigger())
        else:
            sc.create_dirs()
            self.state = SidecarState(region_size=region_size, disk_size=self.size)
            reason = "no tracking state yet: initial replication required"
        self.n_regions = -(-self.size // self.state.region_size)
        self.dirty = self.sidecar.load_bitmap(self.n_regions)
        self.cycle = np.zeros(self.n_regions, dtype=bool)
        self._marked = bytearray(self.n_regions)     # cycle bits whose dirty bit is written (cheap to test)
        if reason:
            if host_crashed or (self.state.state != TrackingState.RESYNC_REQUIRED.value
                                and not self._bitmap_trustworthy(reason)):
                self.dirty[:] = True           # changes we never saw: every region must be compared
            self._require_resync(reason, persist=False)
        self.state.clean = False
        self.state.boot_id = boot
        self.state.memory_dir = memory_dir
        self.sidecar.rewrite_bitmap(self.dirty)      # durable, as is the state, before the first write
        self._start_log()

    def _memory_dir(self) -> str | None:
        """This disk's folder in the host's private memory folder, or None. Never the one state.json
        recorded: a clean stop leaves no log in memory, and after an unclean one the disk resyncs anyway;
        a folder it names may by now be anyone's (a reboot empties the tmpfs)."""
        if self.memory is None:
            return None
        try:
            return self.memory.dir_for(self.sidecar.dir)
        except OSError as e:
            _log.warning("%s: logs stay on disk: %s", self.path, e)
            self.memory = None
            return None

    @staticmethod
    def _bitmap_trustworthy(reason: str) -> bool:
        """After a crash or a lost log the bitmap still covers every write we acknowledged; after an
        untracked change or on first use it covers nothing."""
        return not (reason.startswith("no tracking") or "changed while not tracked" in reason)

    def _find_trigger(self) -> str | None:
        st = self.state
        if st.state == TrackingState.RESYNC_REQUIRED.value:
            return st.reason
        if st.state == TrackingState.RESYNCHRONIZING.value and not st.clean:
            return "a resynchronization was interrupted before it completed"
        if st.disk_size != self.size:
            return f"disk size changed from {st.disk_size} to {self.size} while not tracked"
        if not st.clean:
            return f"log {st.active_log} was not closed cleanly (the tracker stopped without a clean shutdown)"
        if st.data_write_guid != str(self.disk.data_write_guid):
            return (f"disk changed while not tracked: DataWriteGuid is {self.disk.data_write_guid}, the last log "
                    f"recorded {st.data_write_guid}")
        return self._check_chain()

    def _check_chain(self) -> str | None:
        previous = None
        for rec in self.state.sealed_logs:
            path = self.log_path(rec.name)
            try:
                with HrlReader(path, self.size) as r:
                    uid, prev = str(r.header.unique_id), str(r.header.previous_unique_id)
                    guid = str(r.header.vhd2_data_write_guid)
            except LogNotSealed:
                return f"log {rec.name} was not closed cleanly"
            except (ReplicatorError, OSError) as e:
                return f"broken chain: log {rec.name} is unusable ({e})"
            if uid != rec.unique_id or (previous is not None and prev != previous):
                return f"broken chain: log {rec.name} does not follow its predecessor"
            previous = uid
        last = self.state.sealed_logs[-1] if self.state.sealed_logs else None
        if last is not None and guid != self.state.data_write_guid:
            return (f"disk changed while not tracked: DataWriteGuid {self.state.data_write_guid} differs from "
                    f"the last log's Vhd2DataWriteGuid {guid}")
        return None

    # ------------------------------------------------------------------ logs
    @property
    def resync_required(self) -> bool:
        return self.state.state == TrackingState.RESYNC_REQUIRED.value

    @property
    def reason(self) -> str | None:
        return self.state.reason

    def _start_log(self, save: bool = True) -> None:
        self.log: HrlWriter | None = None
        if self.resync_required:
            self.state.active_log = None
        else:
            self.state.log_sequence += 1
            name = f"{self.state.log_sequence:08d}.hrl"
            # in memory while the host's logs there take less than its budget (memory.used: measured
            # off this path); such a log is not written over a spare (that would hold memory for nothing)
            self.log_in_memory = self.memory is not None and self.memory.room > 0
            where = self.state.memory_dir if self.log_in_memory else self.sidecar.logs_dir
            try:
                on_disk = os.path.join(self.sidecar.logs_dir, name)
                self.log = HrlWriter(os.path.join(where, name),
                                     previous_unique_id=uuid.UUID(self.state.last_unique_id),
                                     vhd2_data_write_guid=self.disk.data_write_guid,
                                     recycle=None if self.log_in_memory else self.sidecar.spare_path,
                                     background=self.log_thread, overflow=on_disk if self.log_in_memory else None)
                self.state.active_log = name
            except ReplicatorError as e:
                self._require_resync(f"log write failed: {e.message}", persist=False)
        if save:
            self._save_state()

    def log_path(self, name: str) -> str:
        return self.sidecar.log_path(name, self.state.memory_dir)

    def spill_log(self) -> None:
        """The host's logs in memory outgrew its budget: the active log goes on on disk (without waiting:
        HrlWriter.spill_to)."""
        if self.log is not None and self.log_in_memory and not self.log.spilling:
            try:
                self.log.spill_to(os.path.join(self.sidecar.logs_dir, self.state.active_log))
            except ReplicatorError:
                pass                 # the log failed already: its next append or commit says so

    # ------------------------------------------------------------------ slow file work
    def _later(self, work) -> None:
        """File work that may wait on the volume's journal -- a state save, a bitmap rewrite that clears
        bits, an unlink, an fdatasync -- done now, or, in the export process (`deferring`), queued in
        order for run_deferred() on a worker thread, so that the guest's requests never wait for it."""
        if self.deferring:
            self._deferred.append(work)
        else:
            work()

    def run_deferred(self) -> None:
        """Any thread: the queued file work, in order (the export runs it before answering a control
        request, which are serialized; a failure stops the queue and is raised)."""
        while self._deferred:
            self._deferred.pop(0)()

    def _save_state(self) -> None:
        """While the export runs, the state is written without fsync: a crash always ends in a resync of
        the durable dirty regions (the state is not clean), so its durability buys nothing."""
        if self.deferring:
            snap = self.sidecar.snapshot(self.state)
            self._deferred.append(lambda: self.sidecar.write(snap, durable=False))
        else:
            self.sidecar.save(self.state)

    def _require_resync(self, reason: str, persist: bool = True) -> None:
        """Enter RESYNC_REQUIRED; the first reason is kept, it is the one that explains the others."""
        if not self.resync_required:
            self.state.state, self.state.reason = TrackingState.RESYNC_REQUIRED.value, reason
        if getattr(self, "log", None) is not None:
            self._give_up_log()
        if persist:
            self._save_state()

    def _give_up_log(self) -> None:
        """The active log will not be sealed: its queued writes are dropped, and its file is recycled only
        once its writer has let go of it (begin_resync)."""
        self.log.close(discard=True)
        self._closed_logs.append(self.log)
        self.log = None

    def replica_diverged(self, reason: str) -> None:
        """The replica changed behind our back: our bitmap says nothing about what differs, so every
        region is compared by the resync that follows."""
        self.dirty[:] = True
        bits = self.dirty.copy()
        self._later(lambda: self.sidecar.rewrite_bitmap(bits))
        self._require_resync(reason)

    # ------------------------------------------------------------------ I/O
    def read(self, offset: int, length: int) -> bytes:
        return self.disk.read(offset, length)

    def readinto(self, offset: int, buf) -> None:
        self.disk.readinto(offset, buf)

    def extents(self, offset: int = 0, length: int | None = None):
        """DATA and ZERO ranges of the disk (NBD block status, sparse copies)."""
        return self.disk.extents(offset, self.size - offset if length is None else length)

    def _mark(self, offset: int, length: int) -> None:
        """Mark the regions a write touches before the write itself, in the bitmap's page cache: that copy
        survives any crash of ours, and after a crash of the host the bitmap is not trusted (see state.py).
        A device flush here stalled the guest 5-48 ms at each first write to a region while replication
        kept the device busy."""
        rs = self.state.region_size
        lo, hi = offset // rs, (offset + length - 1) // rs + 1
        if hi == lo + 1 and self._marked[lo]:       # the common case: a region already marked this cycle
            return
        self.cycle[lo:hi] = True
        fresh = np.flatnonzero(~self.dirty[lo:hi]) + lo
        if len(fresh):
            self.dirty[fresh] = True
            self.sidecar.persist_bitmap(self.dirty, fresh, durable=False)
        self._marked[lo:hi] = b"\x01" * (hi - lo)

    def _new_cycle(self) -> None:
        self.cycle[:] = False
        self._marked = bytearray(self.n_regions)

    def write(self, offset: int, data, fua: bool = False) -> None:
        if not len(data):
            return
        self._mark(offset, len(data))
        self.disk.write(offset, data)
        self.unsynced += len(data)
        self.last_write = time.monotonic()
        self._log(lambda log: log.append(offset, data))
        if fua:
            self.flush()

    def written_natively(self, nbytes: int, log_len: int, entries_n: int) -> None:
        """The export's native write path (native_io.py) wrote `nbytes` into marked regions and staged
        them in the active log, whose buffers it filled to log_len bytes and entries_n entries."""
        self.unsynced += nbytes
        self.last_write = time.monotonic()
        self._log(lambda log: log.staged(log_len, entries_n))

    def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        if not length:
            return
        self._mark(offset, length)
        self.disk.write_zeroes(offset, length)
        self.last_write = time.monotonic()
        self._log(lambda log: log.append_zeroes(offset, length))
        if fua:
            self.flush()

    trim = write_zeroes     # replicator disks read trimmed ranges as zeros, so the log says exactly that

    def _log(self, record) -> None:
        if self.log is None:
            return
        try:
            record(self.log)
        except ReplicatorError as e:
            self._require_resync(f"log write failed: {e.message}")
            return
        if self.log.data_bytes > self.max_log_share * self.size:
            self._require_resync(f"log {self.state.active_log} grew past {self.max_log_share:.0%} of the disk")

    def flush(self) -> None:
        self.disk.flush()
        self._commit_log()

    def flush_begin(self):
        """flush() in two halves (BlockDevice.flush_begin): the disk's first half and the log's entries
        written out here; the disk's second half returned, or None where the disk has none."""
        rest = self.disk.flush_begin()
        if rest is not None:
            self._commit_log()
        return rest

    def _commit_log(self) -> None:
        if self.log is not None:
            # The log is trusted only once sealed: after a crash an unsealed log makes the disk resync its
            # dirty regions (their bits are durable before any write), so an fsync of the log on every
            # guest flush would buy nothing; its entries are written out (not synced) here.
            try:
                self.log.commit()
            except ReplicatorError as e:
                self._require_resync(f"log write failed: {e.message}")

    # ------------------------------------------------------------------ cuts
    def cut(self) -> SealedLog | None:
        """Seal the active log (the replica ships it) and chain a new one. None when resync is required.

        Three phases, so that the export process keeps the guest's requests flowing through the fsyncs:
        cut_begin() on the I/O path is a pointer switch; cut_sync() on any thread makes the disk's data and
        the sealed log durable; cut_record() back on the I/O path commits the metadata of blocks allocated
        before the cut (rarely any) and records the log; then the state is saved (on any thread). A crash
        anywhere in between leaves the log unsealed or unrecorded: the next open requires a resync."""
        pending = self.cut_begin()
        if pending is None:
            return None
        self.cut_sync(pending)
        sealed = self.cut_record(pending)
        self.sidecar.save(self.state)
        return sealed

    def cut_begin(self) -> PendingCut | None:
        if self.log is None:
            return None
        old = self.log
        pending = PendingCut(old, self.state.active_log, self.cycle.copy(), self.disk.data_write_guid)
        self.state.last_unique_id = str(old.unique_id)
        self._new_cycle()
        self._start_log(save=False)
        return pending

    def sync_data(self) -> None:
        """Any thread: the disk's written data durable (fdatasync: no journal commit for an overwrite),
        and the metadata commits handed to the disk's commit thread."""
        self.disk.wait_commits()
        try:
            os.fdatasync(self.disk.io.fd)
        except OSError as e:
            raise DiskIOError(f"{self.path}: cannot flush the disk: {e.strerror}") from None

    def writeback(self) -> None:
        """Any thread: push the disk's and the active log's written data to the device (no metadata
        commit), when the export's pacing says so (tracking/writeback.py): dirty pages never pile up to where
        the kernel throttles the guest's writes, and a cut's fsync has less to do. A log closed meanwhile is
        simply skipped."""
        self.unsynced = 0
        log = self.log
        for fd in (self.disk.io.fd, log.fd if log is not None else -1):
            if fd >= 0:
                try:
                    os.fdatasync(fd)
                except OSError:
                    pass

    def cut_sync(self, pending: PendingCut, durable: bool = True) -> None:
        """Any thread: the disk's data up to the cut, then the sealed log, made durable (fsync is safe
        beside the I/O path's writes; the old log is no longer touched by it).

        durable=False (the export process) seals without any fsync: while the tracker runs, a crash
        always ends in a resync of the durable dirty regions (the state is not clean), so a sealed log's
        durability buys nothing, and each fsync forces a journal commit that stalls the guest's writes
        on ext4 (measured: 120-180 ms at every cut). What a crash must not lose is ordered in
        acknowledge() instead: the disk's data is made durable before any dirty bit is cleared."""
        try:
            if durable:
                self.disk.io.fsync()
            pending.header = pending.log.seal(pending.data_write_guid, durable=durable)
        except ReplicatorError as e:
            pending.error = e.message
        except OSError as e:
            pending.error = e.strerror or str(e)

    def cut_record(self, pending: PendingCut) -> SealedLog | None:
        if pending.error is not None:
            pending.log.close()
            self._require_resync(f"log write failed: {pending.error}", persist=False)
            return None
        try:
            self.disk.commit_soon()       # blocks allocated before the cut: their BAT entries, before the
        except ReplicatorError as e:      # log's bits are cleared (sync_data waits for it)
            self._require_resync(f"disk flush failed: {e.message}", persist=False)
            return None
        header, log = pending.header, pending.log
        if log.spill_error:
            _log.warning("%s: log %s stayed in memory: %s", self.path, pending.name, log.spill_error)
        self.state.sealed_logs.append(SealedLogRecord(pending.name, str(header.unique_id),
                                                      str(header.previous_unique_id), pack_regions(pending.regions),
                                                      log.data_bytes))
        self.state.data_write_guid = str(pending.data_write_guid)
        return SealedLog(log.path, header.unique_id,
                         header.previous_unique_id, log.data_bytes)

    def _record_sealed(self, name: str, header, data_bytes: int) -> None:
        self.state.sealed_logs.append(SealedLogRecord(name, str(header.unique_id), str(header.previous_unique_id),
                                                      pack_regions(self.cycle), data_bytes))
        self.state.last_unique_id = str(header.unique_id)
        self.state.data_write_guid = str(self.disk.data_write_guid)

    def acknowledge(self, unique_id: uuid.UUID) -> None:
        """The replica holds this log (and every earlier one) durably: forget them and their regions.
        On disk, dirty bits are cleared only once the disk's data is durable (a crash must not lose a write
        the replica has while its region reads clean). Unlinking a large log takes the volume's journal
        for 100 ms or more: like the rest of the file work, the export process does it off the I/O path."""
        names = [r.unique_id for r in self.state.sealed_logs]
        if str(unique_id) not in names:
            raise ReplicatorError(f"{self.path}: log {unique_id} is not pending")
        keep = self.state.sealed_logs[names.index(str(unique_id)) + 1:]
        acked = self.state.sealed_logs[:len(self.state.sealed_logs) - len(keep)]
        self._recycle_later([self.log_path(rec.name) for rec in acked])
        self.state.sealed_logs = keep
        self._save_state()
        if self.state.state == TrackingState.TRACKING.value:   # otherwise the bitmap also holds changes no log has
            recent = np.zeros(self.n_regions, dtype=bool)
            for rec in acked:
                recent |= unpack_regions(rec.regions, self.n_regions)
            self._rebuild_dirty(recent)

    def _rebuild_dirty(self, recent=None) -> None:
        """The dirty bits: the active cycle's and pending logs' regions, and (hysteresis) those of the logs
        acknowledged just now, cleared only at the next acknowledgement if not written again. A region the
        guest writes every cycle so keeps its bit: its next first write needs no fdatasync of the bitmap on
        the I/O path. The bitmap stays a superset of what may differ from the replica."""
        bits = self.cycle.copy()
        for rec in self.state.sealed_logs:
            bits |= unpack_regions(rec.regions, self.n_regions)
        if recent is not None:
            bits |= recent
        self.dirty = bits
        def clear_bits():                         # one job: bits never go when the data's flush failed
            self.sync_data()
            self.sidecar.rewrite_bitmap(bits)
        self._later(clear_bits)

    def begin_resync(self) -> list[tuple[int, int]]:
        """Start bringing the replica level: returns the extents to compare or copy, and starts a fresh
        chain of logs now, so writes made during the resync ship after it. The dirty bitmap is kept until
        end_resync(): a resync cut short (crash, lost connection) leaves RESYNC_REQUIRED with the same regions."""
        extents = self.dirty_extents()
        if self.log is not None:
            self._give_up_log()
        self.state.sealed_logs = []
        self.state.state = TrackingState.RESYNCHRONIZING.value
        self.state.last_unique_id = ZERO_UUID
        self._new_cycle()
        self._start_log()
        # sealed logs, or left open by a crash (anything else an operator put there is not ours)
        older = sorted(os.path.join(d, n) for d in self._log_dirs() for n in os.listdir(d)
                       if n.endswith(".hrl") and n not in (self.state.active_log, SPARE_LOG))
        closed, self._closed_logs = self._closed_logs, []
        self._recycle_later(older, closed)
        return extents

    def _log_dirs(self) -> list[str]:
        dirs = [self.sidecar.logs_dir]
        if self.state.memory_dir is not None and os.path.isdir(self.state.memory_dir):
            dirs.append(self.state.memory_dir)
        return dirs

    def _recycle_later(self, paths: list[str], closed=()) -> None:
        """recycle_logs, off the I/O path, once the logs' writers are done with the files: the `closed`
        ones have let go of theirs, and the active one has taken the spare or found none (replacing the
        spare between its open and its rename gave the new log the old log's file under its name: a
        shipped log then read as never sealed, seen in the guest impact bench)."""
        active, spare = self.log, self.sidecar.spare_path

        def recycle():
            for w in closed:
                w.join()
            if active is not None:
                active.wait_open()
            on_disk = [p for p in paths if os.path.dirname(p) == self.sidecar.logs_dir]
            recycle_logs(on_disk, spare)
            remove_files([p for p in paths if p not in on_disk])   # memory is not kept for a spare
        self._later(recycle)

    def end_resync(self) -> None:
        """The replica now holds everything up to the start of the resync: normal tracking resumes."""
        if self.state.state != TrackingState.RESYNCHRONIZING.value:
            raise ReplicatorError(f"{self.path}: no resynchronization is in progress")
        self.state.state, self.state.reason = TrackingState.TRACKING.value, None
        self._rebuild_dirty()
        self._save_state()

    def resync_done(self) -> None:
        """A resync made the replica equal to this disk as of now (begin and end at once)."""
        self.begin_resync()
        self.end_resync()

    def dirty_extents(self) -> list[tuple[int, int]]:
        """(offset, length) of every region a resync must compare."""
        rs, out = self.state.region_size, []
        idx = np.flatnonzero(self.dirty)
        if not len(idx):
            return out
        breaks = np.flatnonzero(np.diff(idx) != 1)
        for a, b in zip(np.concatenate(([0], breaks + 1)), np.concatenate((breaks, [len(idx) - 1]))):
            start = int(idx[a]) * rs
            out.append((start, min(self.size, (int(idx[b]) + 1) * rs) - start))
        return out

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """Clean stop: the active log is sealed and kept pending, the state marked clean."""
        if self.disk is None:
            return
        try:
            self.deferring = False
            self.run_deferred()
            if self.log is not None:
                self.disk.flush()
                try:
                    header = self.log.seal(self.disk.data_write_guid)
                except ReplicatorError as e:
                    self._require_resync(f"log write failed: {e.message}", persist=False)
                else:
                    self._record_sealed(self.state.active_log, header, self.log.data_bytes)
                self.log = None
            self.disk.close()
            self.state.data_write_guid = str(self.disk.data_write_guid)
            self.state.active_log = None
            self._logs_to_disk()
            self.state.clean = True
            self.sidecar.sync_bitmap()                 # a clean state vouches for the bitmap, after a reboot too
            self.sidecar.save(self.state)
        finally:
            self.sidecar.close()
            self.disk = None

    def _logs_to_disk(self) -> None:
        """Clean stop: the pending logs held in memory are copied to logs/ (and made durable), so that a
        clean state's chain outlives a reboot; the disk's memory directory goes."""
        mem = self.state.memory_dir
        if mem is None or not os.path.isdir(mem):
            return
        for rec in self.state.sealed_logs:
            src = os.path.join(mem, rec.name)
            if os.path.exists(src):
                copy_durably(src, os.path.join(self.sidecar.logs_dir, rec.name))
                os.unlink(src)
        remove_files(os.path.join(mem, n) for n in os.listdir(mem) if n.endswith(".hrl") or n == OWNER)
        try:
            os.rmdir(mem)
        except OSError:
            pass
        self.state.memory_dir = None


def copy_durably(src: str, dst: str) -> None:
    """src to dst, fsynced, published by rename (output_path); holes stay holes."""
    try:
        with output_path(dst, replace=True) as tmp, open(src, "rb") as fi, open(tmp, "wb") as fo:
            size, at = os.fstat(fi.fileno()).st_size, 0
            while at < size and (got := copy_range_sparse(fi.fileno(), fo.fileno(), at, min(4 << 20, size - at))):
                at += got
            fo.truncate(size)
    except OSError as e:
        raise DiskIOError(f"{dst}: cannot keep the log: {e.strerror}") from None


def recycle_logs(paths, spare: str) -> None:
    """Shipped logs go, the newest kept as the spare the next log is written over (hrl.writer.take_spare),
    cut to at most RECYCLE_MAX bytes."""
    if not paths:
        return
    keep = paths[-1]
    try:
        if os.path.getsize(keep) > RECYCLE_MAX:
            os.truncate(keep, RECYCLE_MAX)
        os.replace(keep, spare)
        keep = None
    except OSError:                 # gone already, or something that is not a file sits at the spare's name
        pass
    remove_files(paths[:-1] + ([keep] if keep else []))


def remove_files(paths) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except (FileNotFoundError, IsADirectoryError):     # gone, or not a log (made by hand): left alone
            pass


class TrackingGroup:
    """The disks of one protected machine: a cut covers all of them at one instant."""

    def __init__(self, disks: list[TrackedDisk]):
        self.disks = disks

    def cut(self) -> list[SealedLog | None]:
        # Callers run this between requests on the export's event loop, so no write is in flight.
        return [d.cut() for d in self.disks]

    async def cut_async(self) -> list[SealedLog | None]:
        """The same cut with the guest's requests flowing through its fsyncs: only the pointer switch (one
        instant across the disks) runs on the loop; the caller serializes it with other state changes."""
        import asyncio
        pending = [d.cut_begin() for d in self.disks]
        live = [(d, p) for d, p in zip(self.disks, pending) if p is not None]
        await asyncio.to_thread(lambda: [d.cut_sync(p, durable=False) for d, p in live])
        sealed = [None if p is None else d.cut_record(p) for d, p in zip(self.disks, pending)]
        for d in self.disks:
            d._save_state()                 # queued: the export runs the file work off the loop
        return sealed

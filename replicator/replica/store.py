"""The replica store: incoming cycles are spooled, verified, and applied crash-safely; recovery points are
kept as undo logs (Hyper-V Replica since 2012 R2: the replica disk is always the latest point).

Layout under ROOT/disks/DISK_ID/:
  state.json        generation, recovery points, retention, the apply journal, counters (atomic replace)
  chain/            the replica images: base.vhdx, then one differencing child per test failover taken
                    (replication always writes the top of the chain; a test failover freezes it)
  spool/ID.delta    an upload in progress or awaiting apply (append-only; durable length = resume point)
  undo/G.hrl        undo log from point G back to the previous kept point
  tests/            test-failover disks (differencing children of a frozen image)

Applying generation G: (1) verify the spooled stream completely; (2) journal "undo" and capture the old
contents of every range G touches into undo/G.hrl; (3) journal "apply" and write G; (4) record the point
and clear the journal. On open, a journal in phase "undo" restarts the cycle, one in phase "apply"
re-applies it from the spool (writes are absolute, so repeating them is harmless). A cycle is never
visible half-applied, and a failure while applying rolls the disk back with the undo log.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import shutil
import stat
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

from .. import delta
from ..disk.base import ExtentKind, pwrite_all
from ..durable import fsync_dir, write_json_atomic
from ..errors import DiskIOError, ImageLocked, ReplicatorError, SequenceError, UsageError
from ..vhdx import VhdxDisk, create_vhdx
from ..vhdx.fileio import DirectWriteIO, FileIO
from . import undo
from .forward import ChangeJournal
from .precheck import PENDING_SUFFIX, Precheck, Prechecked
from .retention import keep_points

log = logging.getLogger("replicator.replica")


COMMITTED_KEPT = 64
CUTS_KEPT = 400
MAX_MACHINE_DISKS = 256
SPENT_SPOOL = "spent.bin"         # the last applied spool, reused by the next upload (open_upload)
PREFLIGHT_MARGIN = 1 << 20       # file-system slack (the VHDX log and BAT are preallocated)


@dataclass
class RecoveryPoint:
    generation: int
    time: float
    consistency: str = "crash"
    undo: str | None = None        # undo log that leads from this point to the previous kept one


@dataclass
class DiskState:
    disk_id: str
    name: str
    size: int
    block_size: int
    generation: int = 0
    additional_points: int = 0
    points: list[RecoveryPoint] = field(default_factory=list)
    chain: list[str] = field(default_factory=lambda: ["base.vhdx"])
    journal: dict | None = None
    tests: list[str] = field(default_factory=list)
    counters: dict = field(default_factory=dict)
    committed: list[list] = field(default_factory=list)   # recent [stream id, generation]: commits are idempotent
    adopted: bool = False          # the base image came from an existing disk: a checksum resync levels it
    machine: str = ""              # the protected machine the primary says this disk belongs to ("" = unknown)
    cuts: list[list] = field(default_factory=list)        # [machine point, generation]: one cut across the machine
    prepared: int | None = None    # the primary's final generation before a planned failover (zero loss)
    failover: dict | None = None   # failed over on this site: cycles from the former primary are refused
    epoch: int | None = None       # the machine's fencing epoch as this replica knows it (None: never told)
    machine_disks: int = 0         # disks in the machine at its last checkpoint (>1: see _machine_cut_points)


class StaleEpoch(SequenceError):
    """A request carries an older fencing epoch than the disk knows: its primary was failed over."""

    def __init__(self, message: str, known: int, failed_over: bool):
        super().__init__(message)
        self.known, self.failed_over = known, failed_over


class ReplicaStore:
    def __init__(self, root: str):
        """Opening a store writes nothing: ROOT/disks is made with the first disk (a read-only command, or
        a mistyped --root, creates no folder)."""
        self.root = os.path.abspath(root)
        self.base = os.path.join(self.root, "disks")
        self._disks: dict[str, ReplicaDisk] = {}

    def disk(self, disk_id: uuid.UUID | str) -> "ReplicaDisk":
        key = str(disk_id)
        if key in self._disks and not self._disks[key].current():
            del self._disks[key]             # another process (a seed import, `points`) changed it: reload
        if key not in self._disks:
            path = os.path.join(self.base, key)
            if not os.path.exists(os.path.join(path, "state.json")):
                raise UsageError(f"replica store {self.root} holds no disk {key}")
            self._disks[key] = ReplicaDisk(path)
        return self._disks[key]

    def ensure_disk(self, disk_id: uuid.UUID | str, size: int, *, name: str = "", block_size: int = 2 << 20,
                    logical_sector_size: int = 512, machine: str = "") -> "ReplicaDisk":
        """The replica of a disk, created empty on first use. `machine` (when the primary sends it) groups
        the disks of one protected machine for failover; a disk failed over here takes no more cycles."""
        key = str(uuid.UUID(str(disk_id)))
        if not os.path.exists(os.path.join(self.base, key, "state.json")):
            with self._creating(key):
                if not os.path.exists(os.path.join(self.base, key, "state.json")):    # not made meanwhile
                    self._create(key, lambda image: create_vhdx(image, size, block_size=block_size,
                                                                logical_sector_size=logical_sector_size).close(),
                                 DiskState(key, name, size, block_size))
        d = self.disk(key)
        if d.state.failover:
            raise SequenceError(f"disk {d.state.name or key} of machine {d.state.machine or '(unknown)'} was failed "
                                f"over on the replica site: it takes no more cycles from the former primary "
                                "(reverse replication runs the other way)")
        if d.state.size != size:
            raise SequenceError(f"replica of {key} is {d.state.size} bytes, the primary disk {size}")
        if machine and d.state.machine != machine:
            d.state.machine = machine
            d._save()
        return d

    def adopt(self, disk_id: uuid.UUID | str, existing: str, *, name: str = "", block_size: int = 2 << 20,
              machine: str = ""):
        """Use a disk already on this host (a restored backup, an old replica) as the replica's starting
        point: it is copied into the store, and the primary's first cycle sends only the blocks that differ."""
        from ..disk.copy import copy_disk
        from ..disk.probe import open_disk
        key = str(uuid.UUID(str(disk_id)))
        with self._creating(key), open_disk(existing) as src:
            if os.path.exists(os.path.join(self.base, key, "state.json")) and self.disk(key).generation > 0:
                raise SequenceError(f"the replica of {key} already holds generation {self.disk(key).generation}")

            def build(image):
                with create_vhdx(image, src.size, block_size=block_size,
                                 logical_sector_size=src.logical_sector_size) as dst:
                    copy_disk(src, dst)
            self._create(key, build, DiskState(key, name, src.size, block_size, adopted=True, machine=machine))
        return self.disk(key)

    @contextlib.contextmanager
    def _creating(self, key: str):
        """Hold the right to create disk `key` in this store, across processes (a seed import beside the
        server, two imports at once): another creator of the same id is refused in one line, naming it. The
        lock (flock on disks/.new-KEY.lock) goes with the process, so a creator killed half-way leaves
        nothing that blocks the next; its half-made .new-KEY is removed by the next creation."""
        os.makedirs(self.base, exist_ok=True)
        path = os.path.join(self.base, f".new-{key}.lock")
        try:
            fd = _try_lock(path)
            for _ in range(20):         # a sweeper (sweep_leftovers) holds it for a moment only
                if fd is not None:
                    break
                time.sleep(0.05)
                fd = _try_lock(path)
        except _NotALock as e:
            raise ImageLocked(str(e)) from None
        if fd is None:
            try:
                with open(path, "rb") as f:
                    holder = f.read(32).decode(errors="replace").strip() or "unknown"
            except OSError:
                holder = "unknown"
            raise ImageLocked(f"disk {key} is being created in {self.root} by another process (pid {holder}): "
                              "try again once it has finished") from None
        try:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)     # who holds it, for a waiter's message
            except OSError as e:
                raise self._cannot_create(key, e) from None
            self.sweep_leftovers()
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):    # (removed by hand meanwhile: the disk is made)
                os.unlink(path)                # under the lock: a waiter that opened it sees another inode
            os.close(fd)

    def sweep_leftovers(self) -> list[str]:
        """Remove what creations and removals a crash stopped half-way left (.new-KEY, .deleting-KEY), unless
        a live process is still creating that disk. A half-made disk and its lock file are removed while
        holding that lock, so a creator starting meanwhile waits instead of losing its lock or its files."""
        removed = []
        names = os.listdir(self.base) if os.path.isdir(self.base) else []
        for name in names:
            path = os.path.join(self.base, name)
            if name.startswith(".deleting-"):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(name)
            elif name.startswith(".new-") and not name.endswith(".lock") and name + ".lock" in names:
                continue                        # swept with its lock below
            elif name.startswith(".new-"):
                lock = path if name.endswith(".lock") else path + ".lock"
                try:
                    fd = _try_lock(lock)
                except _NotALock:
                    continue                    # not ours to remove: a creation of that disk says so
                if fd is None:
                    continue                    # a live creator
                try:
                    half = lock[:-len(".lock")]
                    if os.path.lexists(half):
                        _remove_entry(half)
                        removed.append(os.path.basename(half))
                    os.unlink(lock)
                    if name.endswith(".lock"):
                        removed.append(name)
                finally:
                    os.close(fd)
        return removed

    def _create(self, key: str, build, state: DiskState) -> None:
        """A disk's folder made whole beside the others (.new-KEY, under _creating) and renamed into place: a
        failure (full volume, bad size) leaves nothing behind, and the id is never seen half-made."""
        base = self.base
        tmp = os.path.join(base, f".new-{key}")
        _remove_entry(tmp)                         # a creator of this id killed half-way (we hold its lock)
        try:
            for sub in ("chain", "spool", "undo", "tests"):
                os.makedirs(os.path.join(tmp, sub))
            build(os.path.join(tmp, "chain", "base.vhdx"))
            _save(os.path.join(tmp, "state.json"), state)
            path = os.path.join(base, key)
            if os.path.lexists(path):          # a folder without state.json: an older build's leftover
                _remove_entry(path)
            os.rename(tmp, path)
            fsync_dir(base)
        except (OSError, DiskIOError) as e:
            _remove_entry(tmp)
            raise self._cannot_create(key, e) from None
        except BaseException:
            _remove_entry(tmp)
            raise
        self._disks.pop(key, None)

    def _cannot_create(self, key: str, e: OSError | DiskIOError) -> DiskIOError:
        """One line naming the store and the disk (not the half-made file, which is gone by then)."""
        if isinstance(e, OSError):
            what = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror
        else:
            what = "disk full" if "disk full" in e.message else e.message
        return DiskIOError(f"replica store {self.root}: cannot create the replica of disk {key}: {what}")

    def retire(self, disk_id: uuid.UUID | str) -> str | None:
        """Move a replica out of the way (to ROOT/retired/), kept for a look rather than deleted: after a
        failback it is superseded by the failed-over disk, which becomes the replica's new base."""
        key = str(disk_id)
        path = os.path.join(self.base, key)
        if not os.path.exists(path):
            return None
        out = os.path.join(self.root, "retired", f"{key}-{int(time.time() * 1000)}")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        os.rename(path, out)
        fsync_dir(os.path.dirname(path))
        self._disks.pop(key, None)
        return out

    def remove(self, disk_id: uuid.UUID | str) -> bool:
        """Delete a replica with its recovery points (protection removed); refused while it is failed over
        or a test failover uses it. False when the store holds no such disk."""
        key = str(disk_id)
        path = os.path.join(self.base, key)
        if not os.path.exists(os.path.join(path, "state.json")):
            return False
        d = self.disk(key)
        if d.state.failover or d.state.tests:
            raise SequenceError(f"the replica of {key} is failed over or under a test failover: finish that "
                                "before deleting it")
        doomed = os.path.join(self.base, f".deleting-{key}")
        os.rename(path, doomed)                  # gone at once for every reader; the files follow
        fsync_dir(os.path.dirname(path))
        shutil.rmtree(doomed, ignore_errors=True)     # what is left is swept (sweep_leftovers)
        self._disks.pop(key, None)
        return True

    def disk_ids(self) -> list[str]:
        base = self.base
        names = os.listdir(base) if os.path.isdir(base) else []
        return sorted(d for d in names if not d.startswith(".") and os.path.exists(os.path.join(base, d, "state.json")))


class Upload:
    """An append-only spool file; its durable length is what a resuming sender continues from.

    A new upload writes over the last applied spool in place and cuts the old bytes past its end when it
    closes, as the primary's outbox does: cutting first would free the file's cached pages, and the
    upload would then copy into freshly allocated ones (on a VM whose free memory goes back to the host,
    writing 424 MB that way cost 0.38-0.66 CPU s against 0.06 s in place). Until that cut the file is
    marked (STALE_MARK, an extended attribute): an upload cut short by a crash has no known end, so the
    next open of it starts it over from byte 0. Where extended attributes are not supported the old
    bytes are cut at once, as before."""

    def __init__(self, path: str, recycle: str | None = None):
        """recycle: a spent spool file to reuse for a new upload (see ReplicaDisk.open_upload)."""
        self.path = path
        fresh = recycle is not None and not os.path.exists(path) and os.path.exists(recycle)
        stale = fresh and _mark_stale(recycle)
        if fresh:
            os.replace(recycle, path)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        if stale and not _marked_stale(self.fd):      # a commit put another file at `recycle` meanwhile
            stale = False
        self.stale = stale
        if fresh and not stale:
            os.ftruncate(self.fd, 0)
        elif not fresh and _marked_stale(self.fd):     # a recycled upload a crash cut short: its end is unknown
            os.ftruncate(self.fd, 0)
            self.stale = True
        self.size = 0 if self.stale else os.fstat(self.fd).st_size
        self.durable = self.size

    def write(self, offset: int, data) -> None:
        if offset != self.size:
            raise SequenceError(f"{self.path}: upload continues at {self.size}, not at {offset}")
        try:
            pwrite_all(self.fd, data, offset)          # a short write (disk nearly full) must not pass unseen
        except OSError as e:
            raise DiskIOError(f"{self.path}: spool write failed: {e.strerror}") from None
        self.size += len(data)

    def sync(self) -> int:
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise DiskIOError(f"{self.path}: spool flush failed: {e.strerror}") from None
        self.durable = self.size
        return self.durable

    def prefix_digest(self, length: int | None = None) -> bytes:
        from ..kernels import digest_prefix
        return digest_prefix(lambda pos, n: os.pread(self.fd, n, pos), self.durable if length is None else length)

    def close(self) -> None:
        """Close the spool, cutting a recycled one to the upload's length first. DiskIOError when that
        cut fails: the spool stays marked, so its next open starts the upload over."""
        if self.fd < 0:
            return
        failed = None
        try:
            if self.stale:                  # cut the old bytes past the upload, durably, then unmark
                if os.fstat(self.fd).st_size > self.size:
                    os.ftruncate(self.fd, self.size)
                os.fsync(self.fd)
                os.removexattr(self.fd, STALE_MARK)
                self.stale = False
        except OSError as e:
            failed = e.strerror
        finally:
            os.close(self.fd)
            self.fd = -1
        if failed is not None:
            raise DiskIOError(f"{self.path}: could not cut the recycled spool to its upload's {self.size} "
                              f"bytes ({failed}): the upload starts over")


STALE_MARK = "user.replicator.stale"       # on a recycled spool whose old bytes are not cut yet (Upload)


def _mark_stale(path: str) -> bool:
    """Mark a spool file about to be written over in place; False where extended attributes are not
    supported (the caller then cuts it at once)."""
    try:
        os.setxattr(path, STALE_MARK, b"1")
        return True
    except OSError:
        return False


def _marked_stale(file) -> bool:
    """Whether a spool (path or descriptor) is marked; a missing file is not."""
    try:
        os.getxattr(file, STALE_MARK)
        return True
    except OSError:
        return False


class ReplicaDisk:
    """One replica disk. Several processes may open it at once (the replica server, `points export`, a
    seed import, replicatord's replica site): each holds a shared flock on DISK/alive.lock while it has
    the disk open, and only an opener that finds nobody else there tidies up what an earlier process left
    (precheck files, dead uploads). Every change of the disk's state runs under an exclusive flock on
    DISK/apply.lock and starts from the state file as it is then: a cycle being applied holds it
    throughout, so a journal found under it was interrupted and is finished, and a second process never
    runs or rolls back the cycle a first one is applying -- it waits for it."""

    def __init__(self, path: str):
        self.path = path
        self.state_path = os.path.join(path, "state.json")
        self.state = _load(self.state_path)
        self._stamp = _stamp(self.state_path)
        self.prechecked: dict[str, Prechecked] = {}    # uploads verified as they arrived (precheck.py)
        self._held = threading.local()
        self._alive = -1
        alone = self._open_alive()
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(self.exclusive(wait=False))   # never wait here: opens happen on event loops
            except BlockingIOError:
                return                    # a cycle is being applied by another open: nothing is interrupted
            if alone:                     # else another open has uploads and prechecks in flight: not ours
                for name in os.listdir(os.path.join(path, "undo")):
                    if name.endswith(PENDING_SUFFIX):    # left by a precheck of an earlier process
                        os.unlink(os.path.join(path, "undo", name))
            if self.state.journal:        # nobody runs it (a running cycle holds apply.lock): interrupted
                try:
                    self._recover()
                except DiskIOError as e:  # e.g. still no space: the state names the last good point; settle()
                    log.warning("%s: the interrupted cycle could not be finished yet: %s", path, e.message)
            if alone:
                self.sweep_spools()

    def _open_alive(self) -> bool:
        """Hold DISK/alive.lock shared; True when no other open of the disk existed (exclusive first)."""
        try:
            self._alive = os.open(os.path.join(self.path, "alive.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                  0o644)
        except OSError:                   # a read-only store: nothing here will be written anyway
            return False
        try:
            fcntl.flock(self._alive, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:
            alone = False
        fcntl.flock(self._alive, fcntl.LOCK_SH)
        return alone

    def close(self) -> None:
        if self._alive >= 0:
            os.close(self._alive)
            self._alive = -1

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError):
            pass

    @contextlib.contextmanager
    def exclusive(self, wait: bool = True):
        """The disk's state to change, alone among processes (and this object's threads), from the state
        file as it is now. Re-entrant within a thread. wait=False: BlockingIOError when another holds it."""
        if getattr(self._held, "depth", 0):
            self._held.depth += 1
            try:
                yield
            finally:
                self._held.depth -= 1
            return
        try:
            fd = os.open(os.path.join(self.path, "apply.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            fd = -1                       # read-only: nothing will be changed
        try:
            if fd >= 0:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            self._held.depth = 1
            if not self.current():        # another process changed it since we read it
                self.state = _load(self.state_path)
                self._stamp = _stamp(self.state_path)
            yield
        finally:
            self._held.depth = 0
            if fd >= 0:
                os.close(fd)

    # ------------------------------------------------------------------ views
    @property
    def generation(self) -> int:
        return self.state.generation

    @property
    def points(self) -> list[RecoveryPoint]:
        return list(self.state.points)

    @property
    def image_path(self) -> str:
        return os.path.join(self.path, "chain", self.state.chain[-1])

    def open_image(self, read_only: bool = True, direct: bool = False) -> VhdxDisk:
        """direct: large writes bypass the page cache (the apply; see vhdx.fileio.DirectWriteIO)."""
        return VhdxDisk.open(self.image_path, read_only=read_only, io_factory=DirectWriteIO if direct else FileIO)

    def count(self, what: str) -> None:
        with self.exclusive():
            self.state.counters[what] = self.state.counters.get(what, 0) + 1
            self._save()

    # ------------------------------------------------------------------ uploads
    def spool_path(self, stream_id: str) -> str:
        if not stream_id or any(c not in "0123456789abcdefABCDEF-" for c in stream_id) or len(stream_id) > 64:
            raise UsageError(f"invalid stream id {stream_id!r}")
        return os.path.join(self.path, "spool", f"{stream_id}.delta")

    def upload_length(self, stream_id: str) -> int | None:
        """The bytes an upload holds, as a resuming sender may continue from them (None: no such upload).
        A spool still marked stale holds none (Upload: its next open starts it over)."""
        path = self.spool_path(stream_id)
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            return None
        return 0 if _marked_stale(path) else size

    def open_upload(self, stream_id: str) -> Upload:
        """A new upload takes over the last applied spool file and writes over its cached pages in place
        (see Upload), where a new file would allocate cold ones (the largest cost of spooling on a VM whose
        free memory goes back to the host; databases recycle log segments for the same reason)."""
        return Upload(self.spool_path(stream_id), recycle=os.path.join(self.path, "spool", SPENT_SPOOL))

    def precheck(self, stream_id: str, upload: Upload) -> Precheck | None:
        """Start checking an upload that begins at byte 0 while it arrives (see precheck.py); hand the
        spool's growth to .grew() and call .finish() when the request ends, then keep() the result."""
        if upload.size:
            return None
        self.forget_precheck(stream_id)
        return Precheck(self, stream_id, upload.path)

    def keep_precheck(self, result: Prechecked | None) -> None:
        if result is not None:
            self.forget_precheck(result.stream_id)
            self.prechecked[result.stream_id] = result

    def forget_precheck(self, stream_id: str) -> None:
        old = self.prechecked.pop(stream_id, None)
        if old is not None:
            old.discard()

    def abort(self, stream_id: str) -> None:
        self.forget_precheck(stream_id)
        path = self.spool_path(stream_id)
        if os.path.exists(path):
            os.unlink(path)

    # ------------------------------------------------------------------ apply
    def commit(self, stream_id: str, epoch: int | None = None) -> RecoveryPoint:
        """Verify the spooled stream, then apply it crash-safely and record the recovery point. `epoch`: the
        sender's fencing epoch, checked again here, under the disk's lock (a failover may have come between
        the request's first check and now)."""
        with self.exclusive():
            self.check_epoch(epoch)
            spool = self.spool_path(stream_id)
            self.settle()
            for sid, generation in self.state.committed:
                if sid == stream_id:          # the sender lost our answer and asks again: same point, applied once
                    self.abort(stream_id)
                    return self.state.points[self._point_index(generation)] if any(
                        p.generation == generation for p in self.state.points) else RecoveryPoint(generation, 0.0)
            if self.state.failover:           # uploaded before the failover (a standalone primary has no epoch)
                raise SequenceError(f"disk {self.state.name or self.state.disk_id} of machine "
                                    f"{self.state.machine or '(unknown)'} was failed over on the replica site: "
                                    "it takes no more cycles from the former primary")
            if _marked_stale(spool):          # its upload never closed: the spool may end in an older stream
                raise SequenceError(f"upload {stream_id} was not finished (its spool still holds bytes of an "
                                    "earlier stream): upload it again")
            pre = self._usable_precheck(stream_id, spool)
            try:
                if pre is not None:                 # verified and undo captured while it arrived
                    ranges, header = pre.ranges, pre.header
                else:
                    with open(spool, "rb") as f:    # one pass verifies every frame and lists what it will touch
                        dec = delta.checking_decoder(f)
                        ranges = [(fr.offset, fr.length) for fr in delta.verified(dec)]
                        header = dec.header
                self._check_header(header)
            except ReplicatorError:
                self.count("rejected_streams")
                self.abort(stream_id)
                raise
            except FileNotFoundError:
                raise UsageError(f"no upload {stream_id} to commit") from None
            keep_undo = self._needs_undo()
            self._preflight(stream_id, ranges, undo_bytes=keep_undo and pre is None)
            forward = ChangeJournal(self.path)
            if forward.enabled:                 # an extended leg forwards this disk: what changes is noted first
                forward.record(header.generation, ranges)
            self.state.journal = {"stream": stream_id, "phase": "undo" if keep_undo else "apply", "undo": keep_undo,
                                  "generation": header.generation, "time": header.created,
                                  "consistency": header.consistency}
            self._save()
            return self._run_journal(ranges, pre.undo_path if pre is not None else None)

    def _needs_undo(self) -> bool:
        """Undo logs exist to reach earlier points. With none kept (additional_points = 0), a cycle is made
        atomic by redo alone: the spool stays until the apply is complete, an apply that stopped is finished
        before anything reads the disk (settle), and the space it needs is checked before it starts."""
        return self.state.additional_points > 0 or self.state.machine_disks > 1

    def _preflight(self, stream_id: str, ranges, undo_bytes: bool = False) -> None:
        """Refuse, before writing anything, an apply the replica's volume has no room for: the new blocks,
        and (undo_bytes) the undo log still to be captured (at most the bytes the stream touches)."""
        with self.open_image() as img:
            need = img.allocation_needed(ranges)
            if undo_bytes:                  # the undo log holds the data the ranges cover (zeros cost nothing)
                need += PREFLIGHT_MARGIN + sum(e.length for off, n in undo._union(ranges)
                                               for e in img.extents(off, n) if e.kind is not ExtentKind.ZERO)
        if not need:
            return
        st = os.statvfs(self.path)
        free = st.f_bavail * st.f_frsize
        if need + PREFLIGHT_MARGIN > free:
            self.count("rejected_disk_full")
            self.abort(stream_id)
            raise DiskIOError(f"{self.image_path}: disk full: applying stream {stream_id} may need {need} bytes "
                              f"of new blocks, {free} bytes are free; the replica stays at generation "
                              f"{self.state.generation}")

    def settle(self) -> None:
        """Finish an apply that stopped on an error (see _needs_undo) before the disk is used."""
        with self.exclusive():
            if self.state.journal:
                self._recover()

    def _usable_precheck(self, stream_id: str, spool: str) -> Prechecked | None:
        """The precheck of this upload if everything it relied on still holds (see precheck.py)."""
        pre = self.prechecked.pop(stream_id, None)
        if pre is None:
            return None
        try:
            same = os.path.getsize(spool) == pre.size
        except FileNotFoundError:
            same = False
        if (same and pre.generation == self.state.generation and self.state.journal is None
                and pre.image == self.image_path and (pre.undo_path is not None) == self._needs_undo()):
            return pre
        pre.discard()
        return None

    def header_problem(self, header) -> str | None:
        """Why a stream header cannot apply to this replica as it stands (None: it can). Every field that
        names the replica is compared, so nothing that disagrees with it is ever journaled."""
        st = self.state
        if str(header.disk_id) != st.disk_id:
            return f"stream is for disk {header.disk_id}, this replica is {st.disk_id}"
        if header.disk_size != st.size:
            return (f"stream is for a disk of {header.disk_size} bytes, the replica of {st.disk_id} holds "
                    f"{st.size} bytes")
        if header.base_generation != st.generation:
            return (f"stream applies on generation {header.base_generation}, the replica holds "
                    f"{st.generation} (a cycle is missing or was already applied)")
        if header.generation <= st.generation:
            return f"stream generation {header.generation} is not newer than {st.generation}"
        return None

    def _check_header(self, header) -> None:
        problem = self.header_problem(header)
        if problem:
            raise SequenceError(problem)

    def sweep_spools(self, empty: bool = True) -> list[str]:
        """Remove the spooled uploads that can no longer be used: those whose header can never apply (for
        an earlier generation, another disk or size) and, with `empty`, empty ones (not at a commit: an
        upload may just have opened its file). A partial spool that still applies on the replica's
        generation is kept for its sender to resume. Returns the stream ids removed."""
        spool_dir = os.path.join(self.path, "spool")
        journaled = (self.state.journal or {}).get("stream")
        removed = []
        for name in sorted(os.listdir(spool_dir)):
            if not name.endswith(".delta") or name[:-len(".delta")] == journaled:
                continue
            path = os.path.join(spool_dir, name)
            try:                          # a marked spool is an upload still arriving (or starting over)
                size = 0 if _marked_stale(path) else os.path.getsize(path)
                if (size == 0 and not empty) or (size and self._spool_usable(path)):
                    continue
                os.unlink(path)
            except FileNotFoundError:
                continue
            self.forget_precheck(name[:-len(".delta")])
            removed.append(name[:-len(".delta")])
        return removed

    def _spool_usable(self, path: str) -> bool:
        fmt = delta.format
        with open(path, "rb") as f:
            head = f.read(fmt.PREFIX.size + fmt.MAX_HEADER_BODY + 4)
        try:
            header, _ = fmt.read_header(io.BytesIO(head).read, path)
        except ReplicatorError:                 # usable only while its header is still arriving intact
            if len(head) < fmt.PREFIX.size:
                return fmt.MAGIC.startswith(head[:len(fmt.MAGIC)])
            magic, version, _, length = fmt.PREFIX.unpack_from(head)
            return (magic == fmt.MAGIC and version == fmt.VERSION and length <= fmt.MAX_HEADER_BODY
                    and len(head) < fmt.PREFIX.size + length + 4)
        return self.header_problem(header) is None

    def _run_journal(self, ranges=None, captured: str | None = None) -> RecoveryPoint:
        j = self.state.journal
        spool = self.spool_path(j["stream"])
        undo_path = self._journal_undo_path()
        if j["phase"] == "undo":
            if os.path.exists(undo_path):
                os.unlink(undo_path)
            if captured is not None:            # sealed (fsync'd) by the precheck: only its name changes
                os.replace(captured, undo_path)
                fsync_dir(os.path.dirname(undo_path))
            else:
                if ranges is None:              # after a restart: list the ranges again
                    with open(spool, "rb") as f:
                        ranges = [(fr.offset, fr.length) for fr in delta.DeltaDecoder(f)]
                with self.open_image() as disk:
                    undo.capture(disk, ranges, undo_path)
            j["phase"] = "apply"
            self._save()
        try:
            with open(spool, "rb") as f, self.open_image(read_only=False, direct=True) as disk:
                delta.apply_stream(f, disk)
        except ReplicatorError:
            if undo_path is not None:
                self._roll_back(undo_path)
            else:                               # redo only: the journal and the spool stay for settle()
                self.count("failed_applies")
            raise
        point = RecoveryPoint(j["generation"], j["time"], j["consistency"],
                              os.path.basename(undo_path) if undo_path else None)
        self.state.generation = j["generation"]
        self.state.points.append(point)
        self.state.committed = (self.state.committed + [[j["stream"], j["generation"]]])[-COMMITTED_KEPT:]
        self.state.journal = None
        self._save()
        os.replace(spool, os.path.join(self.path, "spool", SPENT_SPOOL))
        self._retain()
        self.sweep_spools(empty=False)      # uploads made for an earlier generation can never apply now
        return point

    def _roll_back(self, undo_path: str) -> None:
        with self.open_image(read_only=False) as disk:
            undo.apply_undo(undo_path, disk)
        os.unlink(undo_path)
        self.abort(self.state.journal["stream"])
        self.state.journal = None
        self.state.counters["failed_applies"] = self.state.counters.get("failed_applies", 0) + 1
        self._save()

    def _recover(self) -> None:
        """Finish (or restart) a cycle interrupted by a crash before anything else sees the disk."""
        if not os.path.exists(self.spool_path(self.state.journal["stream"])):
            self.state.journal = None       # the spool vanished before apply began: nothing was written
            self._save()
            return
        problem = self._journaled_problem()
        if problem:                         # journaled by an older build: apply_stream refused it unwritten
            log.warning("%s: dropping journaled stream %s: %s", self.path, self.state.journal["stream"], problem)
            stream = self.state.journal["stream"]
            self.state.journal = None
            self.state.counters["rejected_streams"] = self.state.counters.get("rejected_streams", 0) + 1
            self._save()
            self.abort(stream)
            return
        self._run_journal()

    def _journaled_problem(self) -> str | None:
        j = self.state.journal
        try:
            with open(self.spool_path(j["stream"]), "rb") as f:
                header, _ = delta.format.read_header(f.read)
        except ReplicatorError as e:
            return e.message
        if str(header.disk_id) != self.state.disk_id or header.disk_size != self.state.size:
            return f"it is for disk {header.disk_id} of {header.disk_size} bytes"
        return None

    # ------------------------------------------------------------------ recovery points
    def set_retention(self, additional_points: int) -> None:
        with self.exclusive():
            _check_retention(additional_points)
            self.state.additional_points = additional_points
            self._save()
            self._retain()

    def _retain(self) -> None:
        """Keep the points retention.keep_points names (the latest, hourly, application-consistent)."""
        pts = self.state.points
        keep = self._rule_points() | self._machine_cut_points()
        for i in sorted(set(range(len(pts))) - keep, reverse=True):
            self._drop_point(i)

    def held_for_siblings(self) -> set[int]:
        """Generations kept only by _machine_cut_points, not by the retention rule: a machine's listing shows
        such a point only while it is the newest cut all disks hold (replica_site.ReplicatedMachine)."""
        return {self.state.points[i].generation for i in self._machine_cut_points() - self._rule_points()}

    def _rule_points(self) -> set[int]:
        return set(keep_points([(p.time, p.consistency) for p in self.state.points], self.state.additional_points))

    def _machine_cut_points(self) -> set[int]:
        """A disk of a machine with several disks keeps the points of its two newest cuts besides what the
        retention rule keeps: its disks commit and checkpoint one after another, so while this disk is at a
        newer cut, a sibling may still be at the one before, and a failover then (the primary lost between
        two of its disks) needs that earlier cut on every disk -- even with no additional points kept."""
        if self.state.machine_disks <= 1 or not self.state.cuts:
            return set()
        newest = sorted(self.state.cuts, key=lambda c: c[0])[-2:]
        generations = {g for _, g in newest}
        return {i for i, p in enumerate(self.state.points) if p.generation in generations}

    def _drop_point(self, i: int) -> None:
        """Remove point i (never the latest). pts[k].undo leads from point k to point k-1, so the next newer
        point's undo log absorbs point i's; the oldest point needs none."""
        pts, undo_dir = self.state.points, os.path.join(self.path, "undo")
        dropped, newer = pts[i], pts[i + 1]
        stale = [name for name in (dropped.undo, newer.undo) if name]
        if i == 0:
            newer.undo = None
        elif newer.undo and dropped.undo:
            merged = f"{newer.generation}-to-{pts[i - 1].generation}.hrl"
            undo.merge(os.path.join(undo_dir, newer.undo), os.path.join(undo_dir, dropped.undo),
                       os.path.join(undo_dir, merged))
            newer.undo = merged
        del pts[i]
        self._save()                       # the state names the new log before the old ones disappear
        for name in stale:
            path = os.path.join(undo_dir, name)
            if name != newer.undo and os.path.exists(path):
                os.unlink(path)

    def _point_index(self, generation: int) -> int:
        for i, p in enumerate(self.state.points):
            if p.generation == generation:
                return i
        raise UsageError(f"no recovery point at generation {generation} (have "
                         f"{[p.generation for p in self.state.points]})")

    def _rewind(self, disk, generation: int) -> None:
        """Apply undo logs from the latest point back to `generation` onto `disk`."""
        i = self._point_index(generation)
        for p in reversed(self.state.points[i + 1:]):
            undo.apply_undo(os.path.join(self.path, "undo", p.undo), disk)

    def materialize(self, generation: int, out_path: str) -> str:
        """A standalone VHDX of a recovery point (failover). It keeps the primary disk's VirtualDiskId: it is
        the same virtual disk, and reverse replication finds its old copy on the former primary by it."""
        from ..disk.copy import copy_disk
        half_applied = self._settled_or_undo()
        self._point_index(generation)          # a point it does not hold is refused before anything is copied
        with self.open_image() as src, create_vhdx(out_path, src.size, block_size=self.state.block_size,
                                                   logical_sector_size=src.logical_sector_size,
                                                   virtual_disk_id=uuid.UUID(self.state.disk_id)) as dst:
            copy_disk(src, dst)
            if half_applied is not None:       # the copy, not the image, is taken back to the last good point
                undo.apply_undo(half_applied, dst)
            self._rewind(dst, generation)
        return out_path

    def _settled_or_undo(self) -> str | None:
        """Settle the disk for reading (see settle). When even that cannot write (a full volume: the apply
        stopped and its rollback too), the image holds a cycle half-written over the last good point, and
        the journaled cycle's undo log -- sealed before the apply began -- is returned: applied to a copy, it
        gives that point back, so a failover needs no space on the replica's volume. None: the image is
        the last good point."""
        try:
            self.settle()
            return None
        except (DiskIOError, OSError) as e:
            j = self.state.journal
            if not j or j["phase"] == "undo":
                return None                     # the image was not written (or is rolled back already)
            path = self._journal_undo_path()
            if path is not None and os.path.exists(path):
                log.warning("%s: reading the last good point through the undo log of the unfinished cycle %s: %s",
                            self.path, j["generation"], getattr(e, "message", e))
                return path
            if path is not None:
                return None                     # removed only once the rollback was complete
            raise DiskIOError(f"{self.image_path}: the cycle to generation {j['generation']} stopped half-applied "
                              f"and cannot be finished ({getattr(e, 'message', None) or e.strerror}); with no "
                              "additional recovery points kept there is no undo log to read the last point "
                              "through: free space on the replica's volume") from None

    def _journal_undo_path(self) -> str | None:
        """The undo log of the journaled cycle (None when no points are kept: redo only)."""
        j = self.state.journal
        return os.path.join(self.path, "undo", f"{j['generation']}.hrl") if j.get("undo", True) else None

    def test_failover(self, generation: int, out: str | None = None) -> str:
        """A differencing disk showing the point, over a frozen replica image: no copy, and replication
        carries on into a new top of the chain. `out` puts it elsewhere (a test-failover folder) than tests/."""
        with self.exclusive():
            self._point_index(generation)
            frozen = self.image_path
            n = len(self.state.chain)
            live = f"live-{n}.vhdx"
            create_vhdx(os.path.join(self.path, "chain", live), 0, parent=frozen,
                        block_size=self.state.block_size).close()
            test = os.path.abspath(out) if out else os.path.join(self.path, "tests", f"test-{generation}-{n}.vhdx")
            with create_vhdx(test, 0, parent=frozen, block_size=self.state.block_size) as child:
                self._rewind(child, generation)
            self.state.chain.append(live)
            self.state.tests.append(test if out else os.path.basename(test))
            self._save()
            return test

    def cleanup_test_failover(self, path: str) -> None:
        with self.exclusive():
            name = os.path.abspath(path) if os.path.abspath(path) in self.state.tests else os.path.basename(path)
            if name not in self.state.tests:
                raise UsageError(f"{path} is not a test failover of this replica")
            full = name if os.path.isabs(name) else os.path.join(self.path, "tests", name)
            if os.path.exists(full):
                os.unlink(full)
            self.state.tests.remove(name)
            self._save()

    # ------------------------------------------------------------------ the primary's word, failover
    def record_checkpoint(self, generation: int, point: int, prepared: bool = False,
                          additional_points: int | None = None, disks: int | None = None) -> None:
        """The primary ended its machine cycle `point` (one cut across the machine's disks) at `generation`
        of this disk; `prepared`: that was its final cycle before a planned failover, so failing over at the
        latest point loses nothing; `additional_points`: the protection's hourly points to keep; `disks`: how
        many disks the machine has (several: _machine_cut_points)."""
        with self.exclusive():
            # everything is checked before anything changes: a refused checkpoint must not drop points
            if disks is not None and not 1 <= disks <= MAX_MACHINE_DISKS:
                raise UsageError(f"a machine has 1 to {MAX_MACHINE_DISKS} disks, not {disks}")
            if additional_points is not None:
                _check_retention(additional_points)
            if generation != self.state.generation:
                raise SequenceError(f"checkpoint names generation {generation} of disk {self.state.disk_id}, the "
                                    f"replica holds {self.state.generation}")
            if disks is not None:
                self.state.machine_disks = disks
            if additional_points is not None and additional_points != self.state.additional_points:
                self.set_retention(additional_points)
            held = {p.generation for p in self.state.points}
            cuts = [c for c in self.state.cuts if c[0] != point and c[1] in held]
            self.state.cuts = (cuts + [[point, generation]] if generation in held else cuts)[-CUTS_KEPT:]
            self.state.prepared = generation if prepared else None
            self._save()
            self._retain()                 # the cut before the newest two is no longer anyone's machine point

    def set_failover(self, info: dict | None) -> None:
        """Mark (or, with None, unmark) this replica as failed over on its site. Failing over raises the
        fencing epoch by one by itself (kept in the info as `epoch`), so the former primary's requests are
        refused even when no controller told anyone; failing over again (another point) keeps it, and
        unmarking (a cancelled failover) never lowers it: epochs only go up (docs/management-plane.md)."""
        with self.exclusive():
            if info is not None:
                if not self.state.failover:
                    self.state.epoch = (self.state.epoch or 0) + 1
                info = {**info, "epoch": self.state.epoch}
            self.state.failover = info
            self._save()

    def check_epoch(self, epoch: int | None) -> None:
        """Fencing: a request's epoch older than the one this disk knows is refused (StaleEpoch); a newer
        one becomes the known one (the controller failed the machine over, and maybe back); None (a primary
        without a controller) is not checked. Call it holding the disk's lock when it may raise the epoch."""
        if epoch is None:
            return
        with self.exclusive():
            known = self.state.epoch
            if known is not None and epoch < known:
                fo = self.state.failover or {}
                failed_over = fo.get("epoch") == known
                machine = self.state.machine or "(unknown)"
                why = (f"the replica site failed machine {machine} over at epoch {known}" if failed_over else
                       f"this replica knows epoch {known} for machine {machine} (a newer primary took it over)")
                self.count("rejected_fenced")
                raise StaleEpoch(f"fenced: {why}; the request's epoch is {epoch}", known, failed_over)
            if known is None or epoch > known:
                self.state.epoch = epoch
                self._save()

    def _save(self) -> None:
        _save(self.state_path, self.state)
        self._stamp = _stamp(self.state_path)

    def current(self) -> bool:
        """Whether the state file is still the one this object last read or wrote (every save replaces
        the file, so another process's save shows as a new inode)."""
        try:
            return _stamp(self.state_path) == self._stamp
        except FileNotFoundError:
            return False


def _check_retention(additional_points: int) -> None:
    if not 0 <= additional_points <= 24:
        raise UsageError("additional recovery points must be between 0 and 24")


def _remove_entry(path: str) -> None:
    """Remove a leftover at `path`: a folder with what it holds, anything else (a symlink too) by its name
    only, never following it."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class _NotALock(Exception):
    """Something other than a regular file sits at a creation lock's name (planted or made by hand)."""


def _try_lock(path: str) -> int | None:
    """An fd holding the creation lock at `path` (created if missing), or None when a live process holds
    it. The file must still be the one at `path` once locked: a holder unlinks it before it lets go. A
    symlink or a FIFO there is removed by its name (never followed or opened); a directory is an
    operator's, not ours: _NotALock."""
    while True:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            mode = stat.S_IFREG
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            _remove_entry(path)         # a symlink or a FIFO planted there: its name goes, nothing it names
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            raise _NotALock(f"{path} cannot be a creation lock ({e.strerror}): remove it by hand") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            continue                    # replaced by something else meanwhile: look again
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:         # its holder finished and removed it while we waited
            same = False
        if same:
            return fd
        os.close(fd)


def _save(path: str, state: DiskState) -> None:
    write_json_atomic(path, asdict(state))


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


def _load(path: str) -> DiskState:
    with open(path) as f:
        raw = json.load(f)
    raw["points"] = [RecoveryPoint(**p) for p in raw.get("points", [])]
    return DiskState(**raw)



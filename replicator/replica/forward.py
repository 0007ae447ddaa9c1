"""What a replica forwards to an extended replica (a third site, as Hyper-V Replica's extended replication).

The replica role already holds every cycle of a machine as a verified, consistent cut. To forward them:

- **Change journal.** Each replica disk with an extended leg has `forward/changes.jsonl`: before a cycle's
  apply begins, the ranges it will write are appended as one fsync'd JSON line `{"g": GENERATION, "r":
  [[offset, length], ...]}`. A cycle that is retried or rolled back only leaves a superset behind, never
  less, so nothing the replica applied can be missed. Lines are dropped once the third site has what they
  cover.
- **Merged reads.** An extended cycle sends the union of the ranges noted since the generation it last
  forwarded, read from the replica image: several primary cycles become one stream, last write wins, and
  the disk is never read whole. The image is read without any lock and without delaying a primary's
  commit; a commit that began or ended meanwhile changes the state file (every save replaces it), so the
  read is checked against the state before and after and done again if it raced.

Both are plain synchronous code; daemon/extended.py runs them on worker threads.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from dataclasses import dataclass

from .. import delta
from ..delta.sources import encode_disk, encode_extents
from ..durable import fsync_dir, write_json_atomic
from ..errors import DiskIOError, ReplicatorError, UsageError
from ..vhdx import VhdxDisk

FORWARD_DIR = "forward"
CHANGES = "changes.jsonl"


def coalesce(ranges) -> list[tuple[int, int]]:
    """Sorted, merged (offset, length) ranges: overlapping and touching ranges become one."""
    out: list[list[int]] = []
    for off, n in sorted((int(o), int(n)) for o, n in ranges if n > 0):
        if out and off <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], off + n - out[-1][0])
        else:
            out.append([off, n])
    return [(o, n) for o, n in out]


class ChangeJournal:
    """The ranges each applied generation of one replica disk wrote, for its extended leg.

    Entries are `{"g": LOW, "h": HIGH, "r": ranges}` (h omitted when equal to g): the ranges generations
    LOW..HIGH wrote. A journal past COMPACT_AT bytes is folded into one entry covering all its generations,
    which can only make a later read a superset. The commit path appends and the leg trims from different
    threads or processes: both hold an flock on forward/lock, so a trim never loses an append."""

    COMPACT_AT = 4 << 20

    def __init__(self, disk_path: str):
        self.dir = os.path.join(disk_path, FORWARD_DIR)
        self.path = os.path.join(self.dir, CHANGES)

    @property
    def enabled(self) -> bool:
        """Noted only for disks with an extended leg (the folder is made when the leg starts)."""
        return os.path.isdir(self.dir)

    def enable(self) -> str:
        """Note changes from now on; returns the journal's id. The id names one unbroken run of noting: a
        disk folder made again (removed and protected anew, adopted) has none or another, so a leg that
        forwarded from an earlier run knows its record no longer describes the disk. A commit that looked
        for the folder just before it appeared is waited for (it holds the disk's apply.lock throughout):
        once this returns, every cycle applied after is noted."""
        if not self.enabled:
            tmp = f"{self.dir}.new-{uuid.uuid4()}"
            os.makedirs(tmp)
            _write_id(os.path.join(tmp, "id"))
            try:
                os.rename(tmp, self.dir)          # the folder appears with its id, never without
            except OSError:                       # another enabler was first
                _remove_tree(tmp)
            fsync_dir(os.path.dirname(self.dir))
        if self.ident is None:                    # made by an earlier build: give it an id now
            with self._locked():
                if self.ident is None:
                    _write_id(os.path.join(self.dir, "id"))
        fence_commits(os.path.dirname(self.dir))
        return self.ident

    @property
    def ident(self) -> str | None:
        try:
            with open(os.path.join(self.dir, "id")) as f:
                return f.read().strip() or None
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def _locked(self):
        fd = os.open(os.path.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def record(self, generation: int, ranges) -> None:
        """Note the ranges generation `generation` writes; durable before the apply that writes them."""
        line = _line(generation, generation, coalesce(ranges))
        with self._locked():
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":     # a line torn by a crash ends here
                    line = b"\n" + line
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            if size + len(line) > self.COMPACT_AT:
                self._rewrite(self._entries(), compact=True)

    def entries(self) -> list[tuple[int, int, list]]:
        """(low generation, high generation, ranges) in the order noted."""
        with self._locked():
            return self._entries()

    def _entries(self) -> list[tuple[int, int, list]]:
        """A torn line (a crash while appending, before the apply it announces began) is skipped."""
        try:
            with open(self.path, "rb") as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            return []
        out = []
        for raw in lines:
            if not raw.strip():
                continue
            try:
                e = json.loads(raw)
                g = int(e["g"])
                out.append((g, int(e.get("h", g)), [(int(o), int(n)) for o, n in e["r"]]))
            except (ValueError, KeyError, TypeError):
                continue
        return out

    def changes(self, after: int, upto: int | None = None) -> list[tuple[int, int]]:
        """The merged ranges of generations after `after` up to and including `upto` (a superset where a
        compacted entry straddles them); None: every one noted, also of cycles not applied (yet, or ever:
        rolled back after writing part of them)."""
        return coalesce(r for lo, hi, rs in self.entries() if hi > after and (upto is None or lo <= upto) for r in rs)

    def trim(self, upto: int) -> None:
        """Forget what only generations up to `upto` wrote (the third site holds them)."""
        with self._locked():
            self._rewrite([e for e in self._entries() if e[1] > upto])

    def _rewrite(self, entries, compact: bool = False) -> None:
        if compact and entries:
            entries = [(min(e[0] for e in entries), max(e[1] for e in entries),
                        coalesce(r for e in entries for r in e[2]))]
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            for lo, hi, rs in entries:
                f.write(_line(lo, hi, rs))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def _write_id(path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(uuid.uuid4()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def _remove_tree(path: str) -> None:
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


def fence_commits(disk_path: str) -> None:
    """Wait for a commit running on the replica disk now (it holds DISK/apply.lock from its look at the
    change journal to its end). Blocking: call it from a worker thread."""
    try:
        fd = os.open(os.path.join(disk_path, "apply.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return                                # a read-only store: nothing commits there
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    finally:
        os.close(fd)


def _line(lo: int, hi: int, ranges) -> bytes:
    body = {"g": int(lo), "r": [list(r) for r in ranges]}
    if hi != lo:
        body["h"] = int(hi)
    return (json.dumps(body, separators=(",", ":")) + "\n").encode()


class RacedCommit(ReplicatorError):
    """A commit began or ended on the replica while an extended cycle read it; the read is done again."""

    exit_code = 13


@dataclass(frozen=True)
class Snapshot:
    """What a replica disk's state file said when a read began."""
    stamp: tuple[int, int]
    generation: int
    image: str
    size: int
    block_size: int
    disk_id: str
    time: float = 0.0                  # the recovery point at `generation`: when its data is from
    consistency: str = "crash"


def _read_state(disk_path: str) -> tuple[tuple[int, int], dict]:
    state_path = os.path.join(disk_path, "state.json")
    with open(state_path) as f:
        st = os.fstat(f.fileno())
        return (st.st_ino, st.st_mtime_ns), json.load(f)


def snapshot(disk_path: str) -> Snapshot:
    """The replica disk's settled state, read from its state file without taking it over (the replica
    server owns the disk; nothing here writes it). Refused while a cycle is journaled there."""
    stamp, raw = _read_state(disk_path)
    if raw.get("journal"):
        raise RacedCommit(f"{disk_path}: a cycle is being applied")
    generation = int(raw.get("generation", 0))
    point = next((p for p in raw.get("points", []) if p.get("generation") == generation), {})
    return Snapshot(stamp, generation, os.path.join(disk_path, "chain", raw.get("chain", ["base.vhdx"])[-1]),
                    int(raw["size"]), int(raw["block_size"]), raw["disk_id"], float(point.get("time", 0.0)),
                    point.get("consistency", "crash"))


def snapshot_settled(disk_path: str, attempts: int = 200, pause: float = 0.05) -> Snapshot:
    """snapshot(), waiting out a cycle being applied (each takes moments)."""
    for _ in range(attempts - 1):
        try:
            return snapshot(disk_path)
        except RacedCommit:
            time.sleep(pause)
    return snapshot(disk_path)


def still(disk_path: str, snap: Snapshot) -> bool:
    """Whether no commit began or ended since `snap`: the same state file (every save replaces it), at
    the same generation, with no journal (the generation guards a file name reused within one tick of
    the file system's clock)."""
    try:
        stamp, raw = _read_state(disk_path)
    except (OSError, ValueError):
        return False
    return stamp == snap.stamp and int(raw.get("generation", 0)) == snap.generation and not raw.get("journal")


def encode_forward(disk_path: str, snap: Snapshot, ranges, header: delta.StreamHeader, sink, *,
                   compress: bool = True, full: bool = False, fuzzy: bool = False, zeros: bool = False,
                   progress=None):
    """Encode the ranges (or, with `full`, every allocated extent: the extended leg's initial copy) of the
    replica image as it stands at `snap` into `sink`. Raises RacedCommit when the replica changed meanwhile:
    a consistent stream is then worthless and the caller starts again; a fuzzy `full` copy is still whole
    and is levelled by the ranges noted since `snap` (fuzzy=True: only a read that failed raises); `zeros`:
    a full copy onto a disk that holds data sends the unallocated extents as zeros too."""
    if header.disk_size != snap.size:
        raise UsageError(f"stream header names {header.disk_size} bytes, the replica holds {snap.size}")
    try:
        with VhdxDisk.open(snap.image, read_only=True) as disk:
            if full:
                stats = encode_disk(disk, header, sink, zero_extents=zeros, compress=compress, progress=progress)
            else:
                stats = encode_extents(disk, ranges, header, sink, compress=compress, progress=progress)
    except (DiskIOError, OSError) as e:
        if not still(disk_path, snap):          # read through a commit that rewrote the image
            raise RacedCommit(f"{disk_path}: a cycle was applied while the extended cycle read it") from None
        raise
    if not fuzzy and not still(disk_path, snap):
        raise RacedCommit(f"{disk_path}: a cycle was applied while the extended cycle read it")
    return stats


def new_stream_id() -> str:
    return str(uuid.uuid4())


def write_leg_state(path: str, state: dict) -> None:
    write_json_atomic(path, state)


class SeedSource:
    """A replica disk as `seed export` reads a primary's tracker: the extended leg's offline initial copy.
    Read while the replica may change (a fuzzy copy, labelled inconsistent); the change journal, enabled
    before, holds every range written meanwhile, so the leg's first cycle after the import levels it."""

    blocking = True                     # seed/export.py: volumes of a copy read from a live disk

    class _State:
        state = "resynchronizing"

    def __init__(self, disk_path: str):
        self.snap = snapshot_settled(disk_path)
        self.disk = VhdxDisk.open(self.snap.image, read_only=True)
        self.disk.virtual_disk_id = uuid.UUID(self.snap.disk_id)    # the primary's disk id, not the image's
        self.size = self.snap.size
        self.state, self.reason = self._State(), None

    def begin_resync(self) -> None:
        """The cut is the snapshot taken at open."""

    def end_resync(self) -> None:
        self.disk.close()

    def close(self) -> None:
        self.disk.close()

"""One replication cycle of one disk, primary side: resync if required, cut, ship every sealed log.

Each sealed log becomes one delta stream in the outbox (DISK.rpl/outbox/STREAM.delta), is sent resumably,
committed, and only then acknowledged to the tracker, which forgets the log. A crash anywhere leaves either
the log pending (it is sent again; the target's commit is idempotent by stream id) or acknowledged.

A log's stream is encoded on a worker thread while the target already reads it (targets/outbox.py): the
sealed log never changes, so the export keeps serving the VM meanwhile.

Resync and initial streams read the live disk. When the disk belongs to an export process (replicatord:
the tracker is a `RemoteTrackedDisk`, `blocking`), they read it through the export while the guest goes
on writing: a fuzzy copy, labelled "inconsistent", made whole by the log begun at the resync's start and
shipped right after it (the way DRBD resyncs and Hyper-V holds a log during initial replication), so the
replica has a consistent point only at that log's cut. When the tracker lives in this process (the
`replicate` command), they are encoded on the export's loop, between NBD requests, consistent at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from .. import delta
from ..delta.format import read_header
from ..errors import ReplicatorError, SequenceError
from ..hrl import HrlReader
from ..targets import ReplicaTarget
from ..targets.outbox import OutboxStream
from ..disk.base import ExtentKind
from ..tracking import TrackedDisk
from .pacing import COPY_RATE_WHEN_BUSY, CopyPacer

STREAM_BLOCK = 1 << 20
SEGMENT = 512 << 20         # disk bytes per stream of a copy read from a running export (scratch space bound)
RESYNC_BLOCK = 64 << 10
SPENT = "spent.bin"         # the last sent stream's file, written over by the next (OutboxStream.recycle)
ZSTD_LANES = 2              # compression threads per stream (delta.encoder); the replica decodes any number


@dataclass
class CycleResult:
    kind: str = "delta"              # "initial", "resync" or "delta"
    streams: int = 0
    bytes_sent: int = 0              # on the wire (stream bytes actually uploaded, after resume)
    stream_bytes: int = 0            # encoded size of the streams
    plain_bytes: int = 0             # changed bytes the streams carry
    generation: int = 0
    seconds: float = 0.0
    points: list = field(default_factory=list)
    paced_seconds: float = 0.0       # a copy and its log held back while the guest wrote (replication.pacing)

    def then(self, later: "CycleResult") -> "CycleResult":
        """This cycle followed by `later` (a copy, then the log that makes it whole): one result of the
        first's kind, ending where the later one ends."""
        return CycleResult(self.kind, self.streams + later.streams, self.bytes_sent + later.bytes_sent,
                           self.stream_bytes + later.stream_bytes, self.plain_bytes + later.plain_bytes,
                           later.generation, self.seconds + later.seconds, self.points + later.points,
                           self.paced_seconds + later.paced_seconds)


class DiskReplicator:
    def __init__(self, tracker: TrackedDisk, target: ReplicaTarget, *, compress: bool = True, name: str = "",
                 copy_rate: int | None = COPY_RATE_WHEN_BUSY):
        """copy_rate: bytes per second a copy read from a running export goes at while its guest writes
        (replication.pacing); None or 0: as fast as it can."""
        self.tracker, self.target, self.compress, self.copy_rate = tracker, target, compress, copy_rate
        self.name = name or os.path.basename(tracker.path)
        self.disk_id = getattr(tracker, "virtual_disk_id", None) or tracker.disk.virtual_disk_id
        self.outbox = os.path.join(tracker.sidecar.dir, "outbox")
        os.makedirs(self.outbox, exist_ok=True)
        self.progress = None     # progress(done, total): changed bytes of the current stream encoded so far
        self.blocking = getattr(tracker, "blocking", False)    # an export process owns the disk (remote.py)
        self.sweep_outbox()

    def sweep_outbox(self) -> list[str]:
        """Remove the streams no cycle can use any more (a copy or resync cut short by a failure or a kill:
        the next one reads the disk again under new stream ids); keep the streams of pending logs, which
        are resent byte for byte, and the recycled file. Returns the names removed."""
        keep = {f"{uuid.UUID(r.unique_id).hex}.delta" for r in self.tracker.state.sealed_logs} | {SPENT}
        gone = []
        for name in os.listdir(self.outbox):
            if name not in keep:
                try:
                    os.unlink(os.path.join(self.outbox, name))
                    gone.append(name)
                except OSError:
                    pass
        return gone

    async def _tracker(self, method: str, *args):
        """A tracker call: on a worker thread when it waits on the export process, else right here (the
        caller runs on the export's own loop)."""
        fn = getattr(self.tracker, method)
        return await asyncio.to_thread(fn, *args) if self.blocking else fn(*args)

    async def run_cycle(self, consistency: str = "crash", cut: bool = True, after_copy: bool = False) -> CycleResult:
        """after_copy: the machine has no consistent point since its copy: the logs to ship were written
        during it (they make it whole), and go at the copy's pace (replication.pacing). The pace is per disk."""
        start = time.monotonic()
        result = CycleResult()
        info = await self.target.ensure_disk(self.disk_id, self.tracker.size, self.name)
        generation = info.generation
        if self.blocking:
            await asyncio.to_thread(self.tracker.refresh_state)
        if generation:
            await self._check_diverged(generation, info.committed)
        resyncing = self.tracker.resync_required or self.tracker.state.state == "resynchronizing"
        if generation == 0 and not resyncing:
            raise SequenceError(f"the replica of {self.name} has no initial copy: import the offline seed "
                                "(replicator seed import) or resynchronize before replicating")
        # a copy read from a running export, and the log written meanwhile, give way to a writing guest
        pace = CopyPacer(self.copy_rate, self.tracker.guest_quiet) \
            if (resyncing or after_copy) and self.blocking and self.copy_rate else None
        if resyncing:
            result.kind = "initial" if generation == 0 else "resync"
            generation = await self._resync(generation, consistency, result, pace)
        if cut:
            self.tracker.cut()
        for rec in list(self.tracker.state.sealed_logs):
            generation = await self._ship_log(rec, generation, consistency, info.committed, result, pace)
        if pace is not None:
            result.paced_seconds = pace.slept
        result.generation = generation
        result.seconds = time.monotonic() - start
        return result

    def _header(self, generation: int, kind: str, consistency: str, source_logs) -> delta.StreamHeader:
        return delta.StreamHeader(disk_id=self.disk_id, disk_size=self.tracker.size, block_size=STREAM_BLOCK,
                                  generation=generation + 1, base_generation=generation, consistency=consistency,
                                  source_logs=list(source_logs), created=time.time(), kind=kind, extra={},
                                  zstd_lanes=ZSTD_LANES)

    async def _resync(self, generation: int, consistency: str, result: CycleResult, pace=None) -> int:
        """Send every region that may differ (all of it on first use), then resume normal tracking."""
        extents = await self._tracker("begin_resync")
        kind = "full" if result.kind == "initial" else "resync"
        theirs = await self.target.digests(self.disk_id, RESYNC_BLOCK)
        if theirs is not None:               # checksum resync: only blocks that differ travel
            if self.blocking:
                extents = await asyncio.to_thread(self._differing, theirs, extents)
            else:
                extents = self._differing(theirs, extents)   # on the loop: the export must not write meanwhile
            kind = result.kind = "resync"
        if self.blocking:
            generation = await self._resync_segments(generation, kind, extents, result, pace)
        else:
            stream_id = uuid.uuid4().hex
            path = os.path.join(self.outbox, f"{stream_id}.delta")
            header = self._header(generation, kind, consistency, [])
            with open(path, "wb") as sink:
                disk = self.tracker.disk
                if kind == "full":           # the new replica reads as zeros: only allocated data travels
                    stats = delta.encode_disk(disk, header, sink, compress=self.compress, progress=self.progress)
                else:
                    stats = delta.encode_extents(disk, extents, header, sink, compress=self.compress,
                                                 progress=self.progress)
            generation = (await self._send(stream_id, path, result, stats)).generation
        await self._tracker("end_resync")
        return generation

    async def _resync_segments(self, generation: int, kind: str, extents, result: CycleResult, pace) -> int:
        """The copy read through the export while the guest writes ("inconsistent": the log after it makes
        it whole), in streams of at most SEGMENT bytes of the disk each, sent as they are encoded and
        committed one by one: the primary's scratch space is one segment's stream (the outbox file is
        recycled), never the disk, and a copy cut short resumes with a checksum resync of what is missing
        instead of starting over."""
        if kind == "full":                   # the new replica reads as zeros: only allocated data travels
            extents = [(e.offset, e.length) for e in await asyncio.to_thread(self.tracker.extents)
                       if e.kind is ExtentKind.DATA]
        segments = split_ranges(extents, SEGMENT)
        total, done = sum(n for _, n in extents), 0
        for i, ranges in enumerate(segments):
            # only the first stream of an initial copy may claim "full" (a target may zero the disk for it)
            header = self._header(generation, kind if i == 0 else "resync", "inconsistent", [])
            stream_id = uuid.uuid4().hex
            path = os.path.join(self.outbox, f"{stream_id}.delta")
            progress = None if self.progress is None else (
                lambda d, _t, base=done: self.progress(base + d, total))

            def encode(sink, ranges=ranges, header=header, progress=progress):
                return delta.encode_extents(self.tracker.disk, ranges, header, sink, compress=self.compress,
                                            progress=progress, pace=pace)
            try:
                generation = (await self._send_while_encoding(stream_id, path, encode, result)).generation
            except BaseException:
                with contextlib.suppress(OSError):      # never resent: the next copy reads the disk again
                    os.unlink(path)
                raise
            done += sum(n for _, n in ranges)
        return generation

    async def _ship_log(self, rec, generation, consistency, committed, result, pace=None) -> int:
        stream_id = uuid.UUID(rec.unique_id).hex
        if stream_id in committed:            # applied before, but our acknowledgement was lost
            await self._tracker("acknowledge", uuid.UUID(rec.unique_id))
            return generation
        path = os.path.join(self.outbox, f"{stream_id}.delta")
        if self._complete(path):              # a stream from an interrupted run is resent byte for byte
            point = await self._send(stream_id, path, result, None)
        else:
            log_path = self.tracker.sidecar.log_path(rec.name, self.tracker.state.memory_dir)
            header = self._header(generation, "delta", consistency, [uuid.UUID(rec.unique_id)])

            def encode(sink):
                with HrlReader(log_path, self.tracker.size) as reader:
                    return delta.encode_log(reader, header, sink, compress=self.compress, progress=self.progress,
                                            pace=pace)
            point = await self._send_while_encoding(stream_id, path, encode, result)
        await self._tracker("acknowledge", uuid.UUID(rec.unique_id))
        return point.generation

    async def _send_while_encoding(self, stream_id: str, path: str, encode, result: CycleResult):
        """Encode on a worker thread into the outbox while the target reads the stream as it grows. A failed
        send still lets the encoder finish, so the next cycle resends the complete stream from the outbox."""
        stream = OutboxStream(path, recycle=os.path.join(self.outbox, SPENT))

        def run():
            with stream.writer() as sink:
                return encode(sink)
        encoding = asyncio.ensure_future(asyncio.to_thread(run))
        sending = asyncio.ensure_future(self.target.send(self.disk_id, stream_id, stream))
        try:
            await asyncio.wait({encoding, sending}, return_when=asyncio.FIRST_EXCEPTION)
            if encoding.done() and encoding.exception() is not None:
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
                raise encoding.exception()
            try:
                sent = await sending
            finally:
                stats = await encoding
        except BaseException:
            if not sending.done():
                sending.cancel()
            raise
        return await self._commit(stream_id, path, result, sent, stats)

    def _differing(self, theirs, dirty) -> list[tuple[int, int]]:
        """Blocks inside the dirty extents whose digest differs from the replica's."""
        from ..resync.scan import digest_disk
        ours, _ = digest_disk(self.tracker.disk, RESYNC_BLOCK)
        differ = np.any(ours != theirs, axis=1) if len(ours) == len(theirs) else np.ones(len(ours), bool)
        inside = np.zeros(len(ours), bool)
        for off, n in dirty:
            inside[off // RESYNC_BLOCK:-(-(off + n) // RESYNC_BLOCK)] = True
        out: list[tuple[int, int]] = []
        for b in np.flatnonzero(differ & inside):
            start = int(b) * RESYNC_BLOCK
            n = min(RESYNC_BLOCK, self.tracker.size - start)
            if out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((start, n))
        return out

    @staticmethod
    def _complete(path: str) -> bool:
        if not os.path.exists(path):
            return False
        try:
            with open(path, "rb") as f:
                delta.verify_stream(f)
            return True
        except ReplicatorError:
            os.unlink(path)
            return False

    async def _check_diverged(self, generation: int, committed) -> None:
        """A pending stream built on a generation the replica no longer holds can never apply: something
        else moved the replica (another disk with this VirtualDiskId, a restore). What it holds is then
        unknown, so the stream goes and every block is compared in a checksum resync."""
        for rec in self.tracker.state.sealed_logs:
            stream_id = uuid.UUID(rec.unique_id).hex
            if stream_id in committed:
                continue
            path = os.path.join(self.outbox, f"{stream_id}.delta")
            try:                              # its header says where it applies (_ship_log checks the rest)
                with open(path, "rb") as f:
                    header, _ = read_header(f.read, path)
            except (OSError, ReplicatorError):
                return                        # none, or unreadable: _ship_log encodes it again
            if header.base_generation != generation:
                os.unlink(path)
                await self._tracker("replica_diverged",
                                    f"the replica moved to generation {generation} without this disk's stream "
                                    f"on generation {header.base_generation}: another writer changed it")
            return

    async def _send(self, stream_id: str, path: str, result: CycleResult, stats):
        sent = await self.target.send(self.disk_id, stream_id, path)
        return await self._commit(stream_id, path, result, sent, stats)

    async def _commit(self, stream_id: str, path: str, result: CycleResult, sent: int, stats):
        result.bytes_sent += sent
        point = await self.target.commit(self.disk_id, stream_id)
        result.streams += 1
        result.stream_bytes += os.path.getsize(path)
        if stats is not None:
            result.plain_bytes += getattr(stats, "plain_bytes", 0)
        result.points.append(point)
        OutboxStream.recycle(path, os.path.join(self.outbox, SPENT))
        return point


def split_ranges(ranges, limit: int) -> list[list[tuple[int, int]]]:
    """(offset, length) ranges in groups of at most `limit` bytes (a range is cut where a group fills);
    always at least one group, so an empty copy still makes one (empty) stream."""
    groups, cur, room = [], [], limit
    for off, n in ranges:
        while n:
            take = min(n, room)
            cur.append((off, take))
            off, n, room = off + take, n - take, room - take
            if room == 0:
                groups.append(cur)
                cur, room = [], limit
    if cur or not groups:
        groups.append(cur)
    return groups

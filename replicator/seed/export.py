"""`replicator seed export`: the initial copy of a machine's disks onto removable media.

Tracking starts at the cut (begin_resync): writes made during and after the export go into the logs that
replication ships once the seed is imported. The export reads the disk after the cut, so a block may
already hold a newer write; the logs rewrite it in order, and the replica converges to the primary.
A clean interruption (Ctrl-C, SIGTERM) leaves the tracker resynchronizing and the manifest listing the
finished volumes: running the export again continues with the next volume.
"""
from __future__ import annotations

import os
import threading
import time
import uuid

from .. import delta
from ..disk.base import ExtentKind
from ..delta.encoder import ZERO_RUN_MIN
from ..delta.format import FRAME, TRAILER, zstd_bound
from ..durable import output_file
from ..errors import ResyncCancelled, UsageError
from ..kernels import Xxh3Hasher
from ..tracking import TrackedDisk
from . import media

CHUNK = 1 << 20


class _VolumeSink:
    """A volume file that hashes what it writes."""

    def __init__(self, f):
        self.f = f
        self.hasher = Xxh3Hasher()
        self.size = 0

    def write(self, data) -> None:
        self.f.write(data)
        self.hasher.update(data)
        self.size += len(data)


def _frames_bound(n: int) -> int:
    """The most bytes the encoder writes for `n` bytes of data it was given: their payload at worst (zstd's
    bound, above RAW's n), and a frame header for every piece the zero-run split can cut them into."""
    if n <= 0:
        return 0
    pieces = 2 * (-(-n // ZERO_RUN_MIN)) + 2
    return zstd_bound(n) + pieces * (FRAME.size + 64)


def volume_reserve(held: int) -> int:
    """Room a volume must still have before one more chunk is read into it: what the encoder holds (`held`
    bytes not yet written as frames), the chunk itself, and the trailer."""
    return _frames_bound(held) + _frames_bound(CHUNK) + TRAILER.size


MIN_VOLUME = 4 * CHUNK


def export_machine(machine: str, disks: dict[str, TrackedDisk], out_dir: str, *, volume_size: int,
                   compress: bool = True, cancel: threading.Event | None = None, progress=None) -> media.SeedManifest:
    """Export (or continue exporting) every disk; returns the manifest."""
    if volume_size < MIN_VOLUME:
        raise UsageError(f"volume size {volume_size} bytes is too small: a volume holds at least "
                         f"{MIN_VOLUME >> 20} MiB")
    machine_dir = os.path.join(out_dir, machine)
    os.makedirs(machine_dir, exist_ok=True)
    if os.path.exists(media.manifest_path(machine_dir)):         # continue an interrupted export
        manifest = media.load(machine_dir)
        if manifest.machine != machine:
            raise UsageError(f"{machine_dir} holds a seed of machine {manifest.machine}")
    else:
        manifest = media.SeedManifest(machine, volume_size=volume_size, compress=compress)
    for name, tracker in disks.items():
        _export_disk(manifest, machine_dir, name, tracker, cancel, progress)
    return manifest


def _export_disk(manifest, machine_dir, name, tracker: TrackedDisk, cancel, progress) -> None:
    disk_id = str(tracker.disk.virtual_disk_id)
    entry = manifest.disk(disk_id)
    if entry is None:
        tracker.begin_resync()                     # the cut: tracking of later writes starts here
        entry = media.SeedDisk(disk_id, name, tracker.size, tracker.disk.logical_sector_size, time.time())
        manifest.disks.append(entry)
        media.save(machine_dir, manifest)
    elif entry.complete:
        return
    elif tracker.state.state != "resynchronizing":
        raise UsageError(f"disk {name} is no longer at the seed's cut ({tracker.reason or tracker.state.state}): "
                         "start a new export in an empty folder")
    os.makedirs(os.path.join(machine_dir, disk_id), exist_ok=True)
    pos = entry.volumes[-1].end if entry.volumes else 0
    while pos < tracker.size:
        if cancel is not None and cancel.is_set():
            raise ResyncCancelled(f"seed export of {name} stopped at {pos} bytes; run it again to continue")
        pos = _write_volume(manifest, machine_dir, entry, tracker, pos)
        media.save(machine_dir, manifest)
        if progress:
            progress(name, pos, tracker.size)
    entry.complete = True
    media.save(machine_dir, manifest)
    tracker.end_resync()


def _write_volume(manifest, machine_dir, entry, tracker, start: int) -> int:
    """One self-contained stream from `start` until the volume is nearly full; returns where it ended."""
    k = len(entry.volumes)
    rel = os.path.join(entry.disk_id, f"{k + 1:04d}.delta")
    stream_id = uuid.uuid4().hex
    # read through a running export (replicatord), the volumes are a fuzzy copy: whole with the log after it
    fuzzy = getattr(tracker, "blocking", False)
    header = delta.StreamHeader(disk_id=uuid.UUID(entry.disk_id), disk_size=entry.size, block_size=CHUNK,
                                generation=k + 1, base_generation=k,
                                consistency="inconsistent" if fuzzy else "crash", source_logs=[],
                                created=entry.created, kind="full", extra={"seed": manifest.machine,
                                                                           "volume": k + 1})
    with output_file(os.path.join(machine_dir, rel), replace=True) as f:   # a half volume is never left
        sink = _VolumeSink(f)
        with delta.DeltaEncoder(header, sink, compress=manifest.compress) as enc:
            end = _fill_volume(enc, sink, tracker, start, manifest.volume_size)
            enc.finish()
    entry.volumes.append(media.Volume(rel, stream_id, k + 1, start, end, sink.size, sink.hasher.hexdigest()))
    return end


def _fill_volume(enc, sink: _VolumeSink, tracker, start: int, volume_size: int) -> int:
    """Data from `start` while the volume can still take a whole chunk with room for what the encoder holds
    and the trailer: a volume never exceeds volume_size. Returns the end of the range it covers, where the
    next volume starts: the end of the disk when it took everything that was left (zeros need nothing)."""
    added = 0
    buf = bytearray(CHUNK)
    for ext in tracker.disk.extents(start, tracker.size - start):
        if ext.kind is ExtentKind.ZERO:            # the new replica reads as zeros already
            continue
        for at in range(ext.offset, ext.end, CHUNK):
            held = added - enc.stats.plain_bytes - enc.stats.zeroed_bytes
            if added and sink.size + volume_reserve(held) > volume_size:
                return at
            n = min(CHUNK, ext.end - at)
            view = memoryview(buf)[:n]
            tracker.disk.readinto(at, view)
            enc.add_data(at, view)
            added += n
    return tracker.size

"""`replicator seed import`: verify every volume, then build the replica disks from them.

Nothing reaches the replica until every volume of the seed has verified (present, complete, its digest,
and its delta stream). Volumes go through the ordinary target interface (upload + commit), so an import
that stops half-way continues where it stopped, and a seed older than the replica is refused.
"""
from __future__ import annotations

import os
import uuid

from .. import delta
from ..errors import FormatError, ReplicatorError, SequenceError, UsageError
from ..kernels import Xxh3Hasher
from ..targets import ReplicaTarget
from . import media


def verify_seed(machine_dir: str) -> media.SeedManifest:
    """Every volume present, of its recorded size and digest, and a valid stream; problems all named."""
    manifest = media.load(machine_dir)
    problems = []
    for disk in manifest.disks:
        if not disk.complete:
            problems.append(f"disk {disk.name} ({disk.disk_id}): the export did not finish")
        for k, vol in enumerate(disk.volumes):
            problem = _check_volume(os.path.join(machine_dir, vol.file), vol, disk, k)
            if problem:
                problems.append(f"volume {vol.file}: {problem}")
    if problems:
        raise FormatError("seed", None, "; ".join(problems), machine_dir)
    return manifest


def _check_volume(path: str, vol: media.Volume, disk: media.SeedDisk, k: int) -> str | None:
    if not os.path.exists(path):
        return "missing"
    size = os.path.getsize(path)
    if size != vol.bytes:
        return f"{'truncated' if size < vol.bytes else 'longer than recorded'}: {size} of {vol.bytes} bytes"
    h = Xxh3Hasher()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    if h.hexdigest() != vol.xxh3:
        return "corrupted: its digest does not match the manifest"
    try:
        with open(path, "rb") as f:
            header, _ = delta.verify_stream(f)
    except ReplicatorError as e:
        return f"invalid stream: {e.message}"
    return _header_problem(header, vol, disk, k)


def _header_problem(header, vol: media.Volume, disk: media.SeedDisk, k: int) -> str | None:
    """Every field of volume k's stream header against the manifest's disk: a replica built from the seed
    must never journal a stream that names another disk, size or place in the chain."""
    if str(header.disk_id) != str(disk.disk_id):
        return f"stream is for disk {header.disk_id}, the manifest's disk is {disk.disk_id}"
    if header.disk_size != disk.size:
        return f"stream is for a disk of {header.disk_size} bytes, the manifest's disk has {disk.size}"
    if header.generation != vol.generation:
        return f"stream generation {header.generation} differs from the manifest's {vol.generation}"
    if header.generation != k + 1 or header.base_generation != k:
        return (f"stream takes generation {header.base_generation} to {header.generation}: volume {k + 1} of "
                f"the seed must take {k} to {k + 1}")
    return None


async def import_seed(machine_dir: str, target: ReplicaTarget, *, machine: str | None = None,
                      progress=None) -> media.SeedManifest:
    manifest = verify_seed(machine_dir)
    if machine is not None and manifest.machine != machine:
        raise UsageError(f"the seed is of machine {manifest.machine}, not {machine}")
    for disk in manifest.disks:
        disk_id = uuid.UUID(disk.disk_id)
        info = await target.ensure_disk(disk_id, disk.size, disk.name)
        done = [v for v in disk.volumes if v.generation <= info.generation]
        if any(v.stream_id not in info.committed for v in done[-1:]) or info.generation > len(disk.volumes):
            raise SequenceError(f"the replica of {disk.name} already holds generation {info.generation}, "
                                "which did not come from this seed: the seed is older than the replica")
        for vol in disk.volumes[len(done):]:
            await target.send(disk_id, vol.stream_id, os.path.join(machine_dir, vol.file))
            await target.commit(disk_id, vol.stream_id)
            if progress:
                progress(disk.name, vol.end, disk.size)
    return manifest

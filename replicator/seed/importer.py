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
        for vol in disk.volumes:
            problem = _check_volume(os.path.join(machine_dir, vol.file), vol)
            if problem:
                problems.append(f"volume {vol.file}: {problem}")
    if problems:
        raise FormatError("seed", None, "; ".join(problems), machine_dir)
    return manifest


def _check_volume(path: str, vol: media.Volume) -> str | None:
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
    if header.generation != vol.generation:
        return f"stream generation {header.generation} differs from the manifest's {vol.generation}"
    return None


async def import_seed(machine_dir: str, target: ReplicaTarget, *, machine: str | None = None,
                      progress=None, claim=None) -> media.SeedManifest:
    """claim(disk ids): called once the seed verified, before anything reaches the replica (the owner of the
    disks recorded first, so no other primary can take them meanwhile)."""
    manifest = verify_seed(machine_dir)
    if machine is not None and manifest.machine != machine:
        raise UsageError(f"the seed is of machine {manifest.machine}, not {machine}")
    if claim is not None:
        claim([uuid.UUID(disk.disk_id) for disk in manifest.disks])
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

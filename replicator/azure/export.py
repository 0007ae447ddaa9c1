"""A machine point out of Azure: each disk's snapshot written as a fixed VHD file (the blob as it is: the
disk's sectors and the VHD footer), decrypted with the customer's key when the replica is encrypted. Only
the blob's valid page ranges are read; the rest of the file stays sparse (reads as zeros)."""
from __future__ import annotations

import asyncio
import os

from ..disk.base import pwrite_all
from ..durable import output_path
from ..errors import UsageError
from .meta import blob_size, disk_area
from .points import MachinePoint, pick
from .reader import read_ranges


async def export_point(target, machine: str, point: int | None, out_dir: str) -> tuple[MachinePoint, list[str]]:
    """Write every disk of the machine at `point` (default: the latest) as OUT_DIR/NAME.vhd."""
    if not os.path.isdir(out_dir):
        raise UsageError(f"{out_dir}: no such folder")
    mp = await pick(target, machine, point)
    target.check_keys(mp)                        # a wrong or missing key is refused before any file exists
    paths = []
    for part in sorted(mp.disks.values(), key=lambda d: d.name or d.disk_id):
        path = os.path.join(out_dir, f"{part.name or part.disk_id}.vhd")
        blob = target.container.get_blob_client(target.blob_name(part.disk_id), snapshot=part.snapshot)
        cipher = target.cipher_for(part.disk_id, part.key_id)
        with output_path(path) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, blob_size(part.size))
                async for offset, data in read_ranges(target, blob, blob_size(part.size), disk_area(part.size),
                                                      cipher):
                    await asyncio.to_thread(pwrite_all, fd, data, offset)
                os.fsync(fd)
            finally:
                os.close(fd)
        paths.append(path)
    return mp, paths

"""Creating fixed, dynamic and differencing VHDX files.

Layout: header section, 1 MiB log, 1 MiB metadata region, BAT, then payload blocks, each 1 MiB aligned
(§2.1). The file is built under a temporary name and renamed into place, so a crash during creation
never leaves a half-made disk at the requested path.
"""
from __future__ import annotations

import os
import uuid

import numpy as np

from ..errors import DiskIOError, UsageError
from . import structures as S
from .bat import PayloadState, make_entry
from .fileio import FileIO

CREATOR = "replicator 0.1"
DEFAULT_BLOCK_SIZE = 32 * S.MiB


def _round_up(x: int, align: int) -> int:
    return -(-x // align) * align


def _check_params(size: int, block_size: int, lss: int, pss: int) -> None:
    if block_size < S.MiB or block_size > 256 * S.MiB or block_size & (block_size - 1):
        raise UsageError(f"block size {block_size} must be a power of two from 1 MiB to 256 MiB")
    if lss not in (512, 4096) or pss not in (512, 4096):
        raise UsageError("logical and physical sector sizes must be 512 or 4096")
    if size <= 0 or size > S.MAX_DISK_SIZE or size % lss:
        raise UsageError(f"virtual size {size} must be positive, at most 64 TiB, and a multiple of {lss}")


def _metadata_region(size: int, block_size: int, lss: int, pss: int, fixed: bool, locator,
                     disk_id: uuid.UUID | None = None) -> bytes:
    disk_id = disk_id or uuid.uuid4()
    items = [
        (S.FILE_PARAMETERS, S.FileParameters(block_size, fixed, locator is not None).pack(), False),
        (S.VIRTUAL_DISK_SIZE, size.to_bytes(8, "little"), True),
        (S.VIRTUAL_DISK_ID, disk_id.bytes_le, True),
        (S.LOGICAL_SECTOR_SIZE, lss.to_bytes(4, "little"), True),
        (S.PHYSICAL_SECTOR_SIZE, pss.to_bytes(4, "little"), True),
    ]
    if locator is not None:
        items.append((S.PARENT_LOCATOR, locator.pack(), False))
    region = bytearray(S.MiB)
    entries, at = [], S.METADATA_TABLE_SIZE
    for guid, raw, virtual in items:
        region[at:at + len(raw)] = raw
        entries.append(S.MetadataEntry(guid, at, len(raw), False, virtual, True))
        at += _round_up(len(raw), 8)
    region[:S.METADATA_TABLE_SIZE] = S.pack_metadata_table(entries)
    return bytes(region)


def create_vhdx(path: str, size: int, *, block_size: int = DEFAULT_BLOCK_SIZE, logical_sector_size: int = 512,
                physical_sector_size: int = 4096, fixed: bool = False, parent: str | None = None,
                log_size: int = S.MiB, virtual_disk_id: uuid.UUID | None = None):
    """Create a VHDX and return it opened read-write. With `parent`, a differencing disk over it.
    `virtual_disk_id` keeps a disk's identity (page 83 data) when it is recreated, e.g. by a failover."""
    from .image import VhdxDisk
    from .parent import make_locator

    locator = None
    if parent is not None:
        with VhdxDisk.open(parent, read_only=True, _chain_lock=True) as p:    # refused before anything exists
            size, logical_sector_size = p.size, p.logical_sector_size
            locator = make_locator(path, parent, p.header.data_write_guid)
        fixed = False
    _check_params(size, block_size, logical_sector_size, physical_sector_size)
    if log_size < S.MiB or log_size % S.MiB:
        raise UsageError("log size must be a positive multiple of 1 MiB")
    if os.path.exists(path):
        raise UsageError(f"{path} already exists")

    n_payload, _, _, n_entries = S.bat_geometry(size, block_size, logical_sector_size, parent is not None)
    log_off = S.HEADER_SECTION_SIZE
    md_off = log_off + log_size
    bat_off = md_off + S.MiB
    bat_len = _round_up(n_entries * 8, S.MiB)
    data_off = bat_off + bat_len
    bat = np.zeros(n_entries, dtype="<u8")
    end = data_off
    if fixed:
        blocks = np.arange(n_payload, dtype=np.int64)
        idx = blocks + blocks // S.chunk_ratio(block_size, logical_sector_size)
        bat[idx] = [make_entry(PayloadState.FULLY_PRESENT, data_off + b * block_size) for b in range(n_payload)]
        end = data_off + n_payload * block_size

    tmp = f"{path}.creating-{os.getpid()}"
    io = FileIO(tmp, writable=True, create=True)
    try:
        io.pwrite(S.pack_file_identifier(CREATOR), 0)
        guid_seq = [uuid.uuid4() for _ in range(2)]
        for slot, off in enumerate(S.HEADER_OFFSETS):
            h = S.Header(slot, guid_seq[0], guid_seq[1], S.ZERO_GUID, 0, 1, log_size, log_off)
            io.pwrite(h.pack(), off)
        regions = [S.RegionEntry(S.BAT_GUID, bat_off, bat_len, True),
                   S.RegionEntry(S.METADATA_GUID, md_off, S.MiB, True)]
        table = S.pack_region_table(regions)
        for off in S.REGION_TABLE_OFFSETS:
            io.pwrite(table, off)
        io.pwrite(_metadata_region(size, block_size, logical_sector_size, physical_sector_size, fixed, locator,
                                   virtual_disk_id), md_off)
        io.pwrite(bat.tobytes(), bat_off)
        io.truncate(end)
        io.fsync()
    except BaseException:
        io.close()
        os.unlink(tmp)
        raise
    io.close()
    try:
        os.rename(tmp, path)
    except OSError as e:
        os.unlink(tmp)
        raise DiskIOError(f"{path}: cannot create: {e.strerror}") from None
    return VhdxDisk.open(path, read_only=False)

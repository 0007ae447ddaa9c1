"""`replicator vhdx check`: every inconsistency in a VHDX, each with its structure and offset.

Open already refuses what would make reads wrong; check adds what open may tolerate: a damaged second
copy of a header or region table, nonzero reserved bits, a pending log, and the same for every parent.
"""
from __future__ import annotations

import numpy as np

from ..errors import LogReplayRequired, ReplicatorError
from . import structures as S
from .bat import RESERVED_MASK
from .fileio import FileIO
from .image import VhdxDisk


def check_vhdx(path: str) -> list[str]:
    """Problems found, as messages; an empty list means the file is consistent."""
    problems = _check_copies(path)
    try:
        disk = VhdxDisk.open(path, read_only=True)
    except LogReplayRequired as e:
        return problems + [e.message]
    except ReplicatorError as e:
        return problems + [e.message]
    with disk:
        problems += _check_open(disk)
        chain = disk.parent
        while chain is not None:
            problems += [f"parent: {p}" for p in _check_copies(chain.path) + _check_open(chain)]
            chain = chain.parent
    return problems


def _check_copies(path: str) -> list[str]:
    """Both header and region table copies should be valid; the region tables should agree."""
    out = []
    io = FileIO(path, writable=False)
    try:
        headers = []
        for off in S.HEADER_OFFSETS:
            try:
                headers.append(S.parse_header(io.pread(S.HEADER_SIZE, off), off, path))
            except ReplicatorError as e:
                out.append(e.message)
        tables = []
        for off in S.REGION_TABLE_OFFSETS:
            try:
                tables.append(S.parse_region_table(io.pread(S.REGION_TABLE_SIZE, off), off, path))
            except ReplicatorError as e:
                out.append(e.message)
        if len(tables) == 2 and sorted(tables[0], key=str) != sorted(tables[1], key=str):
            out.append(f"{path}: region table 2 at offset {S.REGION_TABLE_OFFSETS[1]} differs from region table 1")
        if len(headers) == 2 and headers[0].sequence_number == headers[1].sequence_number \
                and headers[0] != headers[1]:
            out.append(f"{path}: headers 1 and 2 have the same SequenceNumber but different contents")
    finally:
        io.close()
    return out


def _check_open(disk: VhdxDisk) -> list[str]:
    out = []
    reserved = np.flatnonzero(disk.bat & np.uint64(RESERVED_MASK))
    for i in reserved[:10]:
        out.append(f"{disk.path}: BAT entry {int(i)} at offset {disk.bat_offset + 8 * int(i)}: reserved bits are "
                   "not zero")
    if len(reserved) > 10:
        out.append(f"{disk.path}: {len(reserved) - 10} more BAT entries with reserved bits set")
    for e in disk.metadata_entries:
        if e.is_user or e.item_id not in S.KNOWN_METADATA:
            continue
        if e.is_required is False:
            out.append(f"{disk.path}: metadata item {e.item_id}: IsRequired is not set on a required item")
    return out

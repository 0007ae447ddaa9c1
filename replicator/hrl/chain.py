"""Log chains: verify UniqueId/PreviousUniqueId links and every checksum first, then apply.

Nothing is written to the target until the whole chain has verified, so a corrupt or broken chain never
leaves a partially applied disk behind.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import FormatError
from .reader import HrlReader


class ChainError(FormatError):
    """Logs that do not follow each other: a missing link, a repeated log, or the wrong start."""


@dataclass
class ApplyStats:
    logs: int = 0
    writes: int = 0
    log_data_bytes: int = 0
    applied_bytes: int = 0     # after coalescing: what actually reached the disk


def open_chain(paths: list[str], disk_size: int | None = None, verify_data: bool = True) -> list[HrlReader]:
    readers: list[HrlReader] = []
    try:
        for path in paths:
            r = HrlReader(path, disk_size)
            readers.append(r)
            if len(readers) > 1:
                prev = readers[-2].header.unique_id
                if r.header.previous_unique_id != prev:
                    raise ChainError("HRL header", 76, f"PreviousUniqueId {r.header.previous_unique_id} does not "
                                     f"link to the preceding log {readers[-2].path} ({prev}): a log is missing",
                                     path)
            if verify_data:
                r.verify_data()
    except BaseException:
        for r in readers:
            r.close()
        raise
    return readers


def apply_chain(disk, paths: list[str]) -> ApplyStats:
    """Apply logs in order to `disk` (any BlockDevice), coalescing each log's writes."""
    readers = open_chain(paths, disk.size)
    stats = ApplyStats()
    try:
        for r in readers:
            stats.logs += 1
            stats.writes += len(r.writes)
            stats.log_data_bytes += sum(w.length for w in r.writes)
            for ext in r.extents():
                pos = 0
                while pos < ext.length:
                    n = min(4 << 20, ext.length - pos)
                    disk.write(ext.offset + pos, r.read_raw(ext.data_location + pos, n))
                    pos += n
                stats.applied_bytes += ext.length
        disk.flush()
    finally:
        for r in readers:
            r.close()
    return stats

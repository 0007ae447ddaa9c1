"""What the block device under a folder read and wrote over a timed step (/proc/diskstats).

The guest's writes go to the page cache; what reaches the device meanwhile (the kernel's writeback, the
export's, the replica's) competes with the guest's own I/O on a host with one disk. A phase's figures mean
more with it beside them (docs/performance.md: the export's log pushing the host's dirty pages over the
export's writeback threshold).
"""
from __future__ import annotations

import os

SECTOR = 512                # /proc/diskstats counts 512-byte sectors whatever the device's own size


def device_of(path: str) -> str | None:
    """The name in /proc/diskstats of the whole disk holding `path` (vda for /dev/vda1), or None."""
    st = os.stat(path)
    try:
        sys_path = os.path.realpath(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    except OSError:
        return None
    if not os.path.exists(sys_path):
        return None
    if os.path.exists(os.path.join(sys_path, "partition")):
        sys_path = os.path.dirname(sys_path)
    return os.path.basename(sys_path)


def sample(device: str | None) -> tuple[int, int] | None:
    """(bytes read, bytes written) by the device since boot; None when it is not known."""
    if device is None:
        return None
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 9 and fields[2] == device:
                return int(fields[5]) * SECTOR, int(fields[9]) * SECTOR
    return None


def moved(before, after) -> dict:
    """MiB read and written between two samples (empty when either is unknown)."""
    if before is None or after is None:
        return {}
    return {"device_read_mib": round((after[0] - before[0]) / (1 << 20)),
            "device_written_mib": round((after[1] - before[1]) / (1 << 20))}

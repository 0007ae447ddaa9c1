"""When the export writes the guest's data back itself instead of leaving it to the kernel.

Linux writes a file's dirty pages back on its own: from its flusher threads, once they are older than
vm.dirty_expire_centisecs (30 s), or sooner once the host's dirty pages pass the background threshold
(vm.dirty_background_bytes, or vm.dirty_background_ratio of the memory that can be dirtied). Past the
midpoint between that threshold and vm.dirty_ratio's, it throttles every writer, the guest's first. qemu-nbd
and QEMU with cache=writeback leave it at that.

The export used to write back in 32 MiB steps all the time, so that throttling never came near. Measured
on the 2-core test host (docs/performance.md), that doubled the p99.9 of a guest's 4 KiB writes: 0.45-0.54 ms
against 0.20-0.21 ms without it, and qemu-nbd's 0.19-0.22 ms on the same image. So it now writes back in
steps only while the host's dirty pages near the background threshold (PRESSURE of it, well before
throttling) or while a copy reads the disk (see due), and at once when the guest has been quiet for a
second (nothing to disturb then, and less for a cut's fsync to do)."""
from __future__ import annotations

STEP = 32 << 20            # under pressure: a disk's written bytes that make it due
PRESSURE = 0.5             # the host's dirty pages, as a share of the background threshold, that count as pressure
QUIET = 1.0                # seconds without a guest write after which a disk's written data goes back at once


def background_threshold(meminfo: dict[str, int], background_bytes: int, background_ratio: int) -> int:
    """Bytes of dirty page cache at which the kernel starts writing back in the background (as
    mm/page-writeback.c reckons it, near enough: the ratio applies to free and file-backed memory)."""
    if background_bytes > 0:
        return background_bytes
    dirtyable = meminfo.get("MemFree", 0) + meminfo.get("Active(file)", 0) + meminfo.get("Inactive(file)", 0)
    return max(1, dirtyable * background_ratio // 100)


def pressure(meminfo: dict[str, int], background_bytes: int, background_ratio: int) -> float:
    """The host's dirty and in-flight page cache as a share of the background threshold."""
    dirty = meminfo.get("Dirty", 0) + meminfo.get("Writeback", 0)
    return dirty / background_threshold(meminfo, background_bytes, background_ratio)


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as bytes per field."""
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def memory_limited(cgroup: str, root: str = "/sys/fs/cgroup") -> bool:
    """Whether the process whose /proc/PID/cgroup is `cgroup` sits in a cgroup v2 hierarchy with a memory
    limit on its group or a parent's (systemd's MemoryMax=). The kernel then throttles writers at that
    group's own dirty thresholds, which the host's figures do not show."""
    path = next((line[3:].strip() for line in cgroup.splitlines() if line.startswith("0::")), None)
    if path is None:
        return False                    # cgroup v1 only: its memory controller does not throttle writers
    return limit_above(root, path, "memory.max", lambda text: text.strip() != "max")


def limit_above(root: str, path: str, name: str, limited) -> bool:
    """Whether the group `path` under `root`, or a parent of it, has a file `name` whose text `limited`
    says is a limit (a group without the file, or that cannot be read, sets none)."""
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    for depth in range(len(parts), 0, -1):
        try:
            with open("/".join([root, *parts[:depth], name])) as f:
                if limited(f.read()):
                    return True
        except (OSError, ValueError):
            continue                    # no memory controller there (or no such group): nothing set
    return False


def host_pressure() -> float:
    """pressure() of this host now; 1.0 (write back in steps, as the export always did) when /proc cannot
    tell, or when the export is in a memory-limited cgroup (see memory_limited)."""
    try:
        with open("/proc/self/cgroup") as f:
            if memory_limited(f.read()):
                return 1.0
        with open("/proc/meminfo") as f:
            meminfo = parse_meminfo(f.read())
        with open("/proc/sys/vm/dirty_background_bytes") as f:
            background_bytes = int(f.read())
        with open("/proc/sys/vm/dirty_background_ratio") as f:
            background_ratio = int(f.read())
    except (OSError, ValueError):
        return 1.0
    if "Dirty" not in meminfo or "MemFree" not in meminfo:
        return 1.0
    return pressure(meminfo, background_bytes, background_ratio)


def due(unsynced: int, quiet: float, host: float, copying: bool = False) -> bool:
    """Whether a disk with `unsynced` bytes written since its last writeback goes back now, the guest having
    been quiet for `quiet` seconds and the host at `host` pressure. While a copy or a resync reads the disk
    (`copying`) it goes back in steps whatever the pressure: left to the kernel, the guest's worst completion
    during an initial copy reached 60-141 ms in two runs, against 5-49 ms in 19 of 20 runs before
    (docs/performance.md). Why is not known: that copy read every block from the file itself, not through
    the export."""
    return bool(unsynced) and (quiet >= QUIET or (unsynced >= STEP and (copying or host >= PRESSURE)))

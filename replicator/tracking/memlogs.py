"""The active Hyper-V Replica Log in memory, up to a budget per host.

Why: the export appends every guest write to the active log. Measured (docs/performance.md, 2026-12-07),
a guest writing 4 KiB blocks at 54 MiB/s filled its log with 1.6 GB in 30 s. In the page cache that took the
host's dirty pages past the kernel's background threshold within the phase, and 2.3 GB reached the device
in bursts while the guest wrote. qemu-nbd writes nothing of the kind. With the logs on tmpfs nothing
reached the device, and the guest's p99.9 went from 1.3-1.9x qemu-nbd's to 1.15-1.24x.

A log only has to last until its cycle is acknowledged, and memory costs nothing in exactness here: the
export never fsyncs a log (TrackedDisk.cut_sync), and a crash of the host ends in a resync whatever the logs
held. So a new log is written to memory (tmpfs, one directory per disk under ROOT) while the logs there
take less than the budget. When they take more, every export on the host moves its active memory log to
disk while it goes on writing it (HrlWriter.spill_to), and new logs start on disk. A clean stop moves
the sealed logs still pending to disk, so that they outlive a reboot (TrackedDisk.close).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import stat

ROOT = "/dev/shm"            # tmpfs on every Linux host systemd or an init script sets up
SHARE_OF_MEMORY = 8          # the budget by default: this share of the host's memory ...
SHARE_OF_TMPFS = 2           # ... and at most this share of what the tmpfs has free
OWNER = "owner"              # in a disk's folder: the real path of the sidecar it belongs to (sweep)


def limited_v1(cgroup: str, root: str = "/sys/fs/cgroup/memory") -> bool:
    """Whether the process whose /proc/PID/cgroup is `cgroup` has a cgroup v1 memory limit (its group's or a
    parent's memory.limit_in_bytes below the kernel's "unlimited")."""
    path = next((line.split(":", 2)[2].strip() for line in cgroup.splitlines()
                 if line.count(":") >= 2 and "memory" in line.split(":", 2)[1].split(",")), None)
    if path is None:
        return False
    from .writeback import limit_above
    return limit_above(root, path, "memory.limit_in_bytes", lambda text: int(text) < 1 << 62)


def auto_budget(root: str = ROOT) -> int:
    """The host's default budget for logs in memory (0: no tmpfs to put them on, or a memory-limited cgroup,
    v2 or v1, whose limit tmpfs pages count against and which would kill the export rather than swap them)."""
    from .writeback import memory_limited
    try:
        with open("/proc/self/cgroup") as f:
            cgroup = f.read()
        if memory_limited(cgroup) or limited_v1(cgroup):
            return 0
        with open("/proc/meminfo") as f:
            total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
        fs = os.statvfs(root)
    except (OSError, StopIteration, ValueError):
        return 0
    return min(total // SHARE_OF_MEMORY, fs.f_bavail * fs.f_frsize // SHARE_OF_TMPFS)


class MemoryLogs:
    """The host's logs in memory: where a disk's go, and what they all take."""

    def __init__(self, budget: int, root: str = ROOT):
        self.budget = budget
        self.dir = os.path.join(root, f"replicator-logs-{os.getuid()}")
        self.used = 0                # bytes, as of the last measure()

    @classmethod
    def open(cls, budget: int, root: str = ROOT) -> "MemoryLogs":
        """The host's directory, made private to this user; ValueError when it cannot be (a name another
        user took in the shared tmpfs, a symlink: the logs then stay on disk)."""
        logs = cls(budget, root)
        try:
            os.mkdir(logs.dir, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise ValueError(f"cannot create {logs.dir}: {e.strerror}") from None
        st = os.lstat(logs.dir)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise ValueError(f"{logs.dir} is not a directory private to this user")
        logs.sweep()
        logs.measure()
        return logs

    def dir_for(self, sidecar_dir: str) -> str:
        """A disk's own directory (named after its sidecar's real path: one per disk, found again by the
        export that opens the disk next)."""
        real = os.path.realpath(sidecar_dir)
        path = os.path.join(self.dir, hashlib.sha256(real.encode()).hexdigest()[:24])
        os.makedirs(path, mode=0o700, exist_ok=True)
        owner = os.path.join(path, OWNER)
        if not os.path.exists(owner):
            with open(owner + ".tmp", "w") as f:
                f.write(real)
            os.replace(owner + ".tmp", owner)
        return path

    def sweep(self) -> list[str]:
        """Remove the folders of disks that are gone (an export killed, then its disk deleted or moved:
        nobody would open it again to clean up). A folder without its owner file yet is being made: kept.
        Returns the folders removed."""
        gone = []
        try:
            folders = [d.path for d in os.scandir(self.dir) if d.is_dir(follow_symlinks=False)]
        except OSError:
            return gone
        for folder in folders:
            try:
                with open(os.path.join(folder, OWNER)) as f:
                    sidecar = f.read()
            except OSError:
                continue
            if os.path.isdir(sidecar):
                continue
            for entry in os.scandir(folder):
                if entry.name.endswith(".hrl") or entry.name == OWNER:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
            with contextlib.suppress(OSError):
                os.rmdir(folder)
                gone.append(folder)
        return gone

    def measure(self) -> int:
        """What the logs of every disk on the host take now (bytes allocated); a few stat calls on tmpfs."""
        used = 0
        try:
            disks = list(os.scandir(self.dir))
        except OSError:
            disks = []
        for d in disks:
            try:
                for f in os.scandir(d.path):
                    used += f.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                continue             # gone meanwhile
        self.used = used
        return used

    @property
    def room(self) -> int:
        return self.budget - self.used


_configured: int | None = None       # replicatord's memory_logs for the exports it starts (None: theirs)


def configure(budget: int | None) -> None:
    """replicatord's setting (daemon.memory_logs), for the exports it starts from now on."""
    global _configured
    _configured = budget


def configured() -> int | None:
    return _configured


def parse_setting(text: str) -> int | None:
    """memory_logs as an operator writes it: "auto" (None: the export reckons it), "none" (0: logs on disk
    only) or a size ("2G"); ValueError for anything else."""
    from ..units import size
    choice = text.strip().lower()
    if choice == "auto":
        return None
    if choice in ("none", "off", "0"):
        return 0
    return size(text)


def parse_budget(text: str) -> int:
    """The export's --memory-logs, in bytes."""
    budget = parse_setting(text)
    return auto_budget() if budget is None else budget

"""Image locks: the same open-file-description byte-range locks QEMU's file driver takes on an image.

QEMU describes what each user of an image does with four permissions (bit 0 consistent read, 1 write,
2 write unchanged, 3 resize) and marks them in the file with shared read locks on single bytes: byte
100 + bit for each permission it holds, byte 200 + bit for each permission it will not let others hold.
Before it uses an image it checks that nobody else has locked 200 + bit for a permission it wants, nor
100 + bit for a permission it will not share. Locks are OFD locks (F_OFD_SETLK): they belong to the open
file description, so they conflict even between two opens in one process, and they vanish when the last
descriptor of the description is closed, including when the process is killed.

Replicator takes the locks QEMU takes for a format driver's image file:
- a writer holds consistent read, write and resize and shares only consistent read and write-unchanged
  (bytes 100, 101, 103, 201, 203), so qemu-io, qemu-img without -U, qemu-nbd, a VM and a second replicator
  writer are all refused while it runs, and it is refused while any of them writes the image;
- a reader through a differencing chain (the parents of a disk opened read-write) holds consistent read
  and does not share write or resize (bytes 100, 201, 203), as QEMU does for backing files: nothing may
  write a parent somebody reads through.
Plain read-only opens take no lock (QEMU's force-share, `-U`), so inspecting a live disk keeps working.

OFD locks record no pid, so the holder is found by looking for the same file in /proc/*/fd, preferring
the descriptions whose /proc/PID/fdinfo lists locks on the conflicting byte.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import random
import time
from dataclasses import dataclass

from ..errors import ImageLocked

CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE = 1, 2, 4, 8
ALL = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE
PERM_NAMES = {CONSISTENT_READ: "consistent read", WRITE: "write", WRITE_UNCHANGED: "write unchanged",
              RESIZE: "resize"}
PERM_BASE, SHARED_BASE = 100, 200
N_PERMS = 4

# (permissions held, permissions shared with others)
WRITER = (CONSISTENT_READ | WRITE | RESIZE, CONSISTENT_READ | WRITE_UNCHANGED)
READER = (CONSISTENT_READ, ALL & ~(WRITE | RESIZE))

_SETLK = getattr(fcntl, "F_OFD_SETLK", None)
_GETLK = getattr(fcntl, "F_OFD_GETLK", None)
# where the file system cannot lock (some FUSE and network file systems) the image is used unlocked,
# as QEMU's locking=auto does
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_ATTEMPTS = 4


class _Flock(ctypes.Structure):
    """struct flock (Linux, 64-bit off_t); l_pid must be 0 for the OFD commands."""
    _fields_ = [("l_type", ctypes.c_short), ("l_whence", ctypes.c_short), ("l_start", ctypes.c_int64),
                ("l_len", ctypes.c_int64), ("l_pid", ctypes.c_int)]


def _fcntl(fd: int, cmd: int, kind: int, start: int, length: int = 1) -> _Flock:
    req = _Flock(kind, os.SEEK_SET, start, length, 0)
    return _Flock.from_buffer_copy(fcntl.fcntl(fd, cmd, bytes(req)))


def _bits(mask: int):
    return [(i, 1 << i) for i in range(N_PERMS) if mask & (1 << i)]


def lock_image(fd: int, path: str, write: bool) -> None:
    """Take QEMU's locks for a writer (write=True) or a reader that refuses writers (write=False) on `fd`,
    or raise ImageLocked naming the holder. The locks last until the descriptor's description is closed.

    Two processes opening at the same instant can each see the other's half-taken locks; both then step
    back and try again after a random pause (QEMU itself does not retry), so one of them gets the image
    and a holder that is really there is still refused within a tenth of a second."""
    if _SETLK is None:
        return
    for attempt in range(_ATTEMPTS):
        conflict = _try_lock(fd, *(WRITER if write else READER))
        if conflict is None:
            return
        if attempt + 1 < _ATTEMPTS:
            time.sleep(random.uniform(0.005, 0.03))
    byte, words = conflict
    raise ImageLocked(_message(fd, path, write, byte, words))


def _try_lock(fd: int, perm: int, shared: int) -> tuple[int, str] | None:
    """Lock our bytes, then look for others' (so two racing openers cannot both pass). None when the
    image is ours; else the conflicting byte and QEMU's words for it, with our locks dropped again."""
    wanted = [PERM_BASE + i for i, _ in _bits(perm)] + [SHARED_BASE + i for i, _ in _bits(ALL & ~shared)]
    try:
        for byte in wanted:
            try:
                _fcntl(fd, _SETLK, fcntl.F_RDLCK, byte)
            except OSError as e:
                if e.errno in _NO_LOCKS:
                    unlock_image(fd)
                    return None
                if e.errno in (errno.EAGAIN, errno.EACCES):   # someone holds a write lock on the byte
                    unlock_image(fd)
                    return byte, f"failed to lock byte {byte}"
                raise
        for i, bit in _bits(perm):
            if _conflicts(fd, SHARED_BASE + i):
                unlock_image(fd)
                return SHARED_BASE + i, f'failed to get "{PERM_NAMES[bit]}" lock'
        for i, bit in _bits(ALL & ~shared):
            if _conflicts(fd, PERM_BASE + i):
                unlock_image(fd)
                return PERM_BASE + i, f'failed to get shared "{PERM_NAMES[bit]}" lock'
    except BaseException:
        unlock_image(fd)
        raise
    return None


def unlock_image(fd: int) -> None:
    """Drop every image lock this description holds (closing it does the same)."""
    if _SETLK is None:
        return
    try:
        _fcntl(fd, _SETLK, fcntl.F_UNLCK, PERM_BASE, SHARED_BASE + N_PERMS - PERM_BASE)
    except OSError:
        pass


def _conflicts(fd: int, byte: int) -> bool:
    """Does another open file description hold a lock on `byte`? (Our own locks never conflict.)"""
    got = _fcntl(fd, _GETLK, fcntl.F_WRLCK, byte)
    return got.l_type != fcntl.F_UNLCK


# ---------------------------------------------------------------------------------------- the holder
@dataclass(frozen=True)
class Holder:
    pid: int
    fd: int
    command: str
    locked: frozenset      # lock bytes (100..203) its description holds, as far as fdinfo tells


def find_holders(fd: int) -> list[Holder]:
    """Other open descriptions of the file behind `fd`, in every process this user may inspect."""
    st = os.fstat(fd)
    me = os.getpid()
    found = []
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    for pid in pids:
        base = f"/proc/{pid}"
        try:
            fds = os.listdir(f"{base}/fd")
        except OSError:
            continue
        for name in fds:
            if pid == me and int(name) == fd:
                continue
            try:
                s = os.stat(f"{base}/fd/{name}")
            except OSError:
                continue
            if (s.st_dev, s.st_ino) != (st.st_dev, st.st_ino):
                continue
            found.append(Holder(pid, int(name), _command(pid), _locked_bytes(pid, name)))
    return found


def _locked_bytes(pid: int, fd: str) -> frozenset:
    """Bytes in 100..203 locked by this description, from the `lock:` lines of /proc/PID/fdinfo/FD."""
    out = set()
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            lines = f.read().splitlines()
    except OSError:
        return frozenset()
    ours = [PERM_BASE + i for i in range(N_PERMS)] + [SHARED_BASE + i for i in range(N_PERMS)]
    for line in lines:
        if "OFDLCK" not in line and "POSIX" not in line:
            continue
        parts = line.split()
        try:
            start = int(parts[-2])
            end = ours[-1] if parts[-1] == "EOF" else int(parts[-1])
        except (ValueError, IndexError):
            continue
        out.update(b for b in ours if start <= b <= end)
    return frozenset(out)


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        cmd = ""
    if not cmd:
        try:
            with open(f"/proc/{pid}/comm") as f:
                cmd = f.read().strip()
        except OSError:
            cmd = "?"
    return cmd if len(cmd) <= 100 else cmd[:97] + "..."


def _role(locked: frozenset) -> str:
    if PERM_BASE + 1 in locked or PERM_BASE + 3 in locked:
        return "has it open for writing"
    if SHARED_BASE + 1 in locked:
        return "has it open and lets nobody write it"
    return "has it open"


def describe_holder(fd: int, byte: int) -> str:
    """'pid 123 (qemu-io -f vhdx d.vhdx) has it open for writing', or the best that can be said."""
    holders = find_holders(fd)
    with_byte = [h for h in holders if byte in h.locked]
    with_locks = [h for h in holders if h.locked]
    pick = with_byte or with_locks or holders
    if not pick:
        what = "writes it" if byte < SHARED_BASE else "lets nobody write it"
        return f"another process {what} (it has just closed it, or /proc does not show it to this user)"
    h = pick[0]
    who = f"this process (pid {h.pid})" if h.pid == os.getpid() else f"pid {h.pid} ({h.command})"
    role = _role(h.locked) if h.locked else ("writes it" if byte < SHARED_BASE else "has it open")
    others = len({x.pid for x in pick} - {h.pid})
    more = f" (and {others} other process{'es' if others > 1 else ''})" if others else ""
    return f"{who} {role}{more}"


def _message(fd: int, path: str, write: bool, byte: int, qemu_words: str) -> str:
    want = "for writing" if write else "as the parent of a disk opened for writing"
    return f"{path}: image is locked: {describe_holder(fd, byte)}; refusing to open it {want} ({qemu_words})"

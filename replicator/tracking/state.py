"""The tracking sidecar (our own format, the job RCT does for Hyper-V; see docs/formats.md).

Next to DISK lives DISK.rpl/ with:
- state.json   tracking state, the reason resynchronization is required, the chain of sealed logs not yet
               acknowledged by the replica (each with the regions it touched), the disk's DataWriteGuid at
               the last clean stop; replaced atomically (temp file, fsync, rename, fsync of the directory).
- dirty.bitmap one bit per tracking region: every region written since the oldest unacknowledged log.
               A bit reaches the page cache *before* the first write to its region, and is made durable
               off the I/O path; so after a crash of our processes the bitmap (the kernel's copy) is a
               superset of every change the replica may lack. After a crash of the host (state unclean,
               written under another boot_id) it is not trusted: every region is compared.
- logs/        the active and sealed .hrl files (those written to memory live in state.memory_dir instead,
               under the same names: Sidecar.log_path).
"""
from __future__ import annotations

import base64
import enum
import json
import os
import threading
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

from ..durable import write_json_atomic
from ..errors import DiskIOError, FormatError

STATE_VERSION = 1
SPARE_LOG = "spare.hrl"        # in logs/: a shipped log's file, kept for the next log to be written over
DEFAULT_REGION_SIZE = 2 << 20


class TrackingState(str, enum.Enum):
    TRACKING = "tracking"
    RESYNC_REQUIRED = "resync_required"
    RESYNCHRONIZING = "resynchronizing"


@dataclass
class SealedLogRecord:
    name: str
    unique_id: str
    previous_unique_id: str
    regions: str                 # zlib+base64 of the packed region bitmap of this log's writes
    data_bytes: int


@dataclass
class SidecarState:
    version: int = STATE_VERSION
    state: str = TrackingState.TRACKING.value
    reason: str | None = None
    region_size: int = DEFAULT_REGION_SIZE
    disk_size: int = 0
    clean: bool = False
    data_write_guid: str | None = None
    active_log: str | None = None
    last_unique_id: str = "00000000-0000-0000-0000-000000000000"
    log_sequence: int = 0
    sealed_logs: list[SealedLogRecord] = field(default_factory=list)
    boot_id: str | None = None   # the kernel boot the tracker last opened the disk in (None: before 2026-12)
    memory_dir: str | None = None    # where logs written to memory live (tracking/memlogs.py); None: none


def pack_regions(bits: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.packbits(bits, bitorder="little").tobytes())).decode()


def unpack_regions(text: str, n: int) -> np.ndarray:
    raw = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8)
    return np.unpackbits(raw, bitorder="little")[:n].astype(bool)


class Sidecar:
    def __init__(self, disk_path: str):
        self.dir = disk_path + ".rpl"
        self.logs_dir = os.path.join(self.dir, "logs")
        self.state_path = os.path.join(self.dir, "state.json")
        self.bitmap_path = os.path.join(self.dir, "dirty.bitmap")
        self.spare_path = os.path.join(self.logs_dir, SPARE_LOG)
        self._bitmap_fd = -1
        self._taken = self._written = 0
        self._save_lock = threading.Lock()
        self._bitmap_lock = threading.Lock()     # the I/O path sets bits while a worker may rewrite them

    def exists(self) -> bool:
        return os.path.exists(self.state_path)

    def create_dirs(self) -> None:
        os.makedirs(self.logs_dir, exist_ok=True)

    def log_path(self, name: str, memory_dir: str | None = None) -> str:
        """Where log `name` is: in memory_dir while it is there (a log moves to disk at most once, and the
        disk's copy is complete before the memory's goes: HrlWriter.spill_to), else in logs/."""
        if memory_dir is not None:
            path = os.path.join(memory_dir, name)
            if os.path.exists(path):
                return path
        return os.path.join(self.logs_dir, name)

    def load(self) -> SidecarState:
        try:
            with open(self.state_path, "rb") as f:
                raw = json.loads(f.read())
            logs = [SealedLogRecord(**r) for r in raw.pop("sealed_logs", [])]
            state = SidecarState(**raw, sealed_logs=logs)
        except (OSError, ValueError, TypeError) as e:
            raise FormatError("tracking state", 0, f"unreadable: {e}", self.state_path) from None
        if state.version != STATE_VERSION:
            raise FormatError("tracking state", 0, f"version {state.version} is not {STATE_VERSION}",
                              self.state_path)
        return state

    def save(self, state: SidecarState) -> None:
        self.write(self.snapshot(state))

    def snapshot(self, state: SidecarState) -> tuple[int, dict]:
        """The state as it is now, numbered: taken where the state changes (the I/O path), written by
        write() on any thread; an older snapshot never replaces a newer one."""
        self._taken += 1
        return self._taken, asdict(state)

    def write(self, snap: tuple[int, dict], durable: bool = True) -> None:
        number, data = snap
        with self._save_lock:
            if number <= self._written:
                return
            try:
                write_json_atomic(self.state_path, data, durable=durable)
            except OSError as e:
                raise DiskIOError(f"{self.state_path}: cannot save tracking state: {e.strerror}") from None
            self._written = number

    # ---- dirty bitmap: one byte per 8 regions, rewritten in place
    def load_bitmap(self, n_regions: int) -> np.ndarray:
        try:
            with open(self.bitmap_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return np.zeros(n_regions, dtype=bool)
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[:n_regions]
        return np.concatenate((bits, np.zeros(n_regions - len(bits), dtype=np.uint8))).astype(bool)

    def persist_bitmap(self, bits: np.ndarray, regions: np.ndarray, durable: bool = True) -> None:
        """Write the given regions' bits (only the bytes holding them), and with durable=True make them
        durable. The bits are packed under the lock, so a rewrite on a worker thread and the I/O path's
        marking never undo each other."""
        with self._bitmap_lock:
            if self._bitmap_fd < 0:
                self._bitmap_fd = os.open(self.bitmap_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                                          0o644)
            packed = np.packbits(bits, bitorder="little").tobytes()
            lo, hi = int(regions.min()) // 8, int(regions.max()) // 8 + 1
            try:
                os.pwrite(self._bitmap_fd, packed[lo:hi], lo)
            except OSError as e:
                raise DiskIOError(f"{self.bitmap_path}: cannot persist dirty regions: {e.strerror}") from None
            if durable:
                self._sync_locked()

    def sync_bitmap(self) -> None:
        """Make every bit written so far durable."""
        with self._bitmap_lock:
            self._sync_locked()

    def _sync_locked(self) -> None:
        if self._bitmap_fd >= 0:
            try:
                os.fdatasync(self._bitmap_fd)
            except OSError as e:
                raise DiskIOError(f"{self.bitmap_path}: cannot persist dirty regions: {e.strerror}") from None

    def rewrite_bitmap(self, bits: np.ndarray) -> None:
        self.persist_bitmap(bits, np.array([0, max(0, len(bits) - 1)]))

    def close(self) -> None:
        if self._bitmap_fd >= 0:
            os.close(self._bitmap_fd)
            self._bitmap_fd = -1


def current_boot_id() -> str | None:
    """This kernel boot's identity: a state left unclean under another one means the host went down."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:                                    # pragma: no cover - not Linux
        return None

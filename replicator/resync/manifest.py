"""Digest manifests and resync checkpoints: what a disk looked like, block by block, and when.

A manifest lets a later resync or scan skip reading a disk that has not changed since: it stores the
per-block XXH3-128 digests together with the disk's *identity*, a value that changes whenever the disk's
contents may have changed (a VHDX's DataWriteGuid; for other image files size, mtime and ctime).

Manifest file (little-endian; 128-byte header, then the digest array):

    0    8  magic b"RPLDIGST"
    8    2  version (1)
    10   2  algorithm (1 = XXH3-128, seed 0, of each block; the last block may be short)
    12   4  header size (128)
    16   4  block size (power of two, 512 B .. 256 MiB)
    20   4  reserved, 0
    24   8  disk size in bytes
    32   8  block count = ceil(disk size / block size)
    40  56  identity: kind u32 (0 none, 1 VHDX, 2 file), reserved u32, disk key [16] (which disk),
            version key [32] (which contents)
    96   8  wall-clock ns when the identity was taken (informational)
    104 16  XXH3-128 of the digest array
    120  4  reserved, 0
    124  4  CRC-32C of bytes 0..124
    128  block count x 16: (low64, high64) per block

Checkpoint file (append-only, so a kill leaves a valid prefix): a 160-byte header (bytes 0..40 as above
with magic b"RPLRSCKP", source identity at 40, target identity at 96, CRC-32C of 0..156 at 156), then
records of first block u64, count u32, CRC-32C u32 (of the 12 bytes before it with this field zero,
and the digests), count x 16 digest bytes. Records run contiguously from block 0; loading keeps the valid
prefix and drops a torn or damaged tail.
"""
from __future__ import annotations

import contextlib
import os
import stat
import struct
import time
import uuid
from dataclasses import dataclass

import numpy as np

from .. import kernels
from ..errors import DiskIOError, FormatError

MANIFEST_MAGIC = b"RPLDIGST"
CHECKPOINT_MAGIC = b"RPLRSCKP"
VERSION = 1
ALGO_XXH3_128 = 1
MANIFEST_HEADER = 128
CHECKPOINT_HEADER = 160
DIGEST_SIZE = 16
MIN_BLOCK, MAX_BLOCK = 512, 256 << 20

_COMMON = struct.Struct("<8sHHIIIQQ")          # magic .. block count: 40 bytes
_IDENTITY = struct.Struct("<II16s32s")          # 56 bytes
_RECORD = struct.Struct("<QII")

KIND_NONE, KIND_VHDX, KIND_FILE = 0, 1, 2
# A write landing in the same timestamp tick as the identity was taken would leave mtime unchanged, so an
# identity is only taken once the file's timestamps are older than one tick (as git handles "racy" files).
FINE_TICK_NS = 50_000_000
COARSE_TICK_NS = 3_000_000_000    # file systems with whole-second (FAT: 2 s) timestamps


@dataclass(frozen=True)
class Identity:
    """Which disk (disk_key) holding which contents (version_key); kind 0 means "cannot tell"."""

    kind: int = KIND_NONE
    disk_key: bytes = bytes(16)
    version_key: bytes = bytes(32)

    @property
    def trusted(self) -> bool:
        return self.kind != KIND_NONE

    def unchanged_since(self, other: "Identity | None") -> bool:
        """True only when both identities are trustworthy and equal."""
        return other is not None and self.trusted and self == other

    def same_disk(self, other: "Identity | None") -> bool:
        return other is not None and self.trusted and (self.kind, self.disk_key) == (other.kind, other.disk_key)

    def pack(self) -> bytes:
        return _IDENTITY.pack(self.kind, 0, self.disk_key, self.version_key)

    @classmethod
    def unpack(cls, raw: bytes) -> "Identity":
        kind, _, disk_key, version_key = _IDENTITY.unpack(raw)
        return cls(kind, disk_key, version_key)


def disk_identity(disk, settle: bool = True) -> Identity:
    """The identity of an open disk: VHDX DataWriteGuid, else the image file's stat, else none.

    settle=True waits (at most a few ms, seconds on coarse-timestamp file systems) until the file's
    timestamps are older than one tick, so that any later write is guaranteed to change them.
    """
    guid = getattr(disk, "data_write_guid", None)
    if isinstance(guid, uuid.UUID):
        vdid = getattr(disk, "virtual_disk_id", None)
        key = vdid.bytes_le if isinstance(vdid, uuid.UUID) else bytes(16)
        return Identity(KIND_VHDX, key, guid.bytes_le + bytes(16))
    target = _stat_target(disk)
    if target is None:
        return Identity()
    st = _stat(target)
    if st is None or not stat.S_ISREG(st.st_mode):
        return Identity()       # block devices and the like: writes leave no trace in stat
    if settle:
        st = _settle(target, st)
    return _file_identity(st) if st is not None else Identity()


def _stat_target(disk):
    for holder in (disk, getattr(disk, "io", None)):
        fd = getattr(holder, "fd", None)
        if isinstance(fd, int) and fd >= 0:
            return fd
    path = getattr(disk, "path", "")
    return path or None


def _stat(target):
    try:
        return os.stat(target)
    except OSError:
        return None


def _tick(st) -> int:
    whole = st.st_mtime_ns % 1_000_000_000 == 0 and st.st_ctime_ns % 1_000_000_000 == 0
    return COARSE_TICK_NS if whole else FINE_TICK_NS


def _settle(target, st):
    for _ in range(4):
        tick = _tick(st)
        age = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns)
        if age >= tick or age <= -tick:     # old enough, or in the future (any write moves it to "now")
            return st
        time.sleep((tick - age) / 1e9)
        again = _stat(target)
        if again is None or _file_identity(again) == _file_identity(st):
            return again
        st = again                          # still being written: try again
    return None


def _file_identity(st) -> Identity:
    disk_key = struct.pack("<QQ", st.st_dev & (2**64 - 1), st.st_ino & (2**64 - 1))
    version_key = struct.pack("<QqqQ", st.st_size, st.st_mtime_ns, st.st_ctime_ns, 0)
    return Identity(KIND_FILE, disk_key, version_key)


def block_count(disk_size: int, block_size: int) -> int:
    return -(-disk_size // block_size)


def check_block_size(block_size: int) -> None:
    if not (MIN_BLOCK <= block_size <= MAX_BLOCK) or block_size & (block_size - 1):
        raise ValueError(f"block size {block_size} is not a power of two between {MIN_BLOCK} and {MAX_BLOCK}")


# ---------------------------------------------------------------------------------------------- manifest
@dataclass
class Manifest:
    block_size: int
    disk_size: int
    identity: Identity
    digests: np.ndarray            # (block count, 2) uint64
    made_ns: int = 0

    def matches(self, block_size: int, disk_size: int) -> bool:
        return (self.block_size, self.disk_size) == (block_size, disk_size)


def _digest_bytes(digests: np.ndarray) -> bytes:
    return np.ascontiguousarray(digests, dtype="<u8").tobytes()


def pack_manifest(m: Manifest) -> bytes:
    body = _digest_bytes(m.digests)
    n = block_count(m.disk_size, m.block_size)
    if len(body) != n * DIGEST_SIZE:
        raise ValueError(f"{len(body) // DIGEST_SIZE} digests for a disk of {n} blocks")
    head = _COMMON.pack(MANIFEST_MAGIC, VERSION, ALGO_XXH3_128, MANIFEST_HEADER, m.block_size, 0, m.disk_size, n)
    head += m.identity.pack() + struct.pack("<q", m.made_ns) + kernels.xxh3_128(body) + bytes(4)
    return head + struct.pack("<I", kernels.crc32c(head)) + body


def save_manifest(path: str, m: Manifest) -> None:
    """Write atomically: a crash leaves either the old manifest or the new one, never a mix."""
    atomic_write(path, pack_manifest(m))


def load_manifest(path: str) -> Manifest:
    """Read and validate a manifest; FormatError names the offset of the first thing that is wrong."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DiskIOError(f"{path}: cannot read the digest manifest: {e.strerror or e}") from None
    common = _check_common(raw, MANIFEST_MAGIC, MANIFEST_HEADER, "digest manifest header", path)
    block_size, disk_size, n = common
    want = MANIFEST_HEADER + n * DIGEST_SIZE
    if len(raw) != want:
        raise FormatError("digest manifest", min(len(raw), want), f"file is {len(raw)} bytes, a manifest of "
                          f"{n} blocks is {want}", path)
    body = memoryview(raw)[MANIFEST_HEADER:]
    if kernels.xxh3_128(body) != raw[104:120]:
        raise FormatError("digest manifest", MANIFEST_HEADER, "digest array does not match its checksum "
                          "(stored at offset 104)", path)
    digests = np.frombuffer(body, dtype="<u8").reshape(n, 2).astype(np.uint64)
    (made_ns,) = struct.unpack_from("<q", raw, 96)
    return Manifest(block_size, disk_size, Identity.unpack(raw[40:96]), digests, made_ns)


def _check_common(raw: bytes, magic: bytes, header_size: int, what: str, path: str) -> tuple[int, int, int]:
    """Validate the shared header prefix and the header CRC; returns (block size, disk size, blocks)."""
    if len(raw) < header_size:
        raise FormatError(what, 0, f"file is {len(raw)} bytes, shorter than the {header_size}-byte header", path)
    got_magic, version, algo, hsize, block_size, _, disk_size, n = _COMMON.unpack_from(raw, 0)
    if got_magic != magic:
        raise FormatError(what, 0, f"magic is {got_magic!r}, expected {magic!r}", path)
    crc_at = header_size - 4
    (crc,) = struct.unpack_from("<I", raw, crc_at)
    if crc != kernels.crc32c(memoryview(raw)[:crc_at]):
        raise FormatError(what, crc_at, "header CRC-32C does not match", path)
    problems = [(8, version != VERSION, f"version {version} (this build reads {VERSION})"),
                (10, algo != ALGO_XXH3_128, f"unknown digest algorithm {algo}"),
                (12, hsize != header_size, f"header size {hsize}, expected {header_size}"),
                (16, not _valid_block(block_size), f"block size {block_size} is not a power of two in "
                                                    f"[{MIN_BLOCK}, {MAX_BLOCK}]"),
                (32, _valid_block(block_size) and n != block_count(disk_size, block_size),
                 f"block count {n} does not cover the {disk_size}-byte disk")]
    for off, bad, problem in problems:
        if bad:
            raise FormatError(what, off, problem, path)
    return block_size, disk_size, n


def _valid_block(block_size: int) -> bool:
    return MIN_BLOCK <= block_size <= MAX_BLOCK and not block_size & (block_size - 1)


def atomic_write(path: str, data: bytes) -> None:
    """temp file in the same directory + fsync + rename + fsync of the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(directory)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise DiskIOError(f"{path}: cannot write: {e.strerror or e}") from None


def _write_all(fd: int, data) -> None:
    mv = memoryview(data)
    while mv:
        mv = mv[os.write(fd, mv):]


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -------------------------------------------------------------------------------------------- checkpoint
@dataclass
class CheckpointState:
    block_size: int
    disk_size: int
    source: Identity
    target: Identity
    digests: np.ndarray            # source digests of blocks [0, len(digests)), all copied and durable
    valid_bytes: int = CHECKPOINT_HEADER   # file length up to the end of the last valid record


def load_checkpoint(path: str) -> CheckpointState:
    """Header must be intact (FormatError otherwise); records are kept up to the first bad one."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DiskIOError(f"{path}: cannot read the resync checkpoint: {e.strerror or e}") from None
    block_size, disk_size, n = _check_common(raw, CHECKPOINT_MAGIC, CHECKPOINT_HEADER, "resync checkpoint header",
                                             path)
    parts, pos, done = [], CHECKPOINT_HEADER, 0
    while pos + _RECORD.size <= len(raw):
        first, count, crc = _RECORD.unpack_from(raw, pos)
        end = pos + _RECORD.size + count * DIGEST_SIZE
        if first != done or count == 0 or done + count > n or end > len(raw):
            break
        if crc != _record_crc(first, count, memoryview(raw)[pos + _RECORD.size:end]):
            break
        parts.append(np.frombuffer(raw, dtype="<u8", count=count * 2, offset=pos + _RECORD.size))
        done, pos = done + count, end
    digests = np.concatenate(parts).reshape(-1, 2).astype(np.uint64) if parts else np.empty((0, 2), np.uint64)
    return CheckpointState(block_size, disk_size, Identity.unpack(raw[40:96]), Identity.unpack(raw[96:152]),
                           digests, pos)


def _record_crc(first: int, count: int, body) -> int:
    return kernels.crc32c(body, kernels.crc32c(_RECORD.pack(first, count, 0)))


class CheckpointWriter:
    """Appends records of completed blocks; `sync` makes them durable (call it after the target's flush)."""

    def __init__(self, path: str, block_size: int, disk_size: int, source: Identity, target: Identity,
                 resume: CheckpointState | None = None):
        self.path = path
        self.pending: list[bytes] = []
        try:
            if resume is not None:
                self.fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
                os.ftruncate(self.fd, resume.valid_bytes)       # drop a torn tail before appending
                os.lseek(self.fd, 0, os.SEEK_END)
                return
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
            head = _COMMON.pack(CHECKPOINT_MAGIC, VERSION, ALGO_XXH3_128, CHECKPOINT_HEADER, block_size, 0,
                                disk_size, block_count(disk_size, block_size))
            head += source.pack() + target.pack() + bytes(4)
            _write_all(self.fd, head + struct.pack("<I", kernels.crc32c(head)))
            os.fsync(self.fd)
            fsync_dir(os.path.dirname(os.path.abspath(path)))
        except OSError as e:
            raise DiskIOError(f"{path}: cannot write the resync checkpoint: {e.strerror or e}") from None

    def add(self, first_block: int, digests: np.ndarray) -> None:
        body = _digest_bytes(digests)
        count = len(body) // DIGEST_SIZE
        if count:
            self.pending.append(_RECORD.pack(first_block, count, _record_crc(first_block, count, body)) + body)

    def sync(self) -> None:
        if not self.pending:
            return
        data, self.pending = b"".join(self.pending), []
        try:
            _write_all(self.fd, data)
            os.fdatasync(self.fd)
        except OSError as e:
            raise DiskIOError(f"{self.path}: cannot write the resync checkpoint: {e.strerror or e}") from None

    def close(self, remove: bool = False) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


# ------------------------------------------------------------------------------------------------ trust
def trusted_digests(path: str | None, identity: Identity, block_size: int, disk_size: int, role: str,
                    warnings: list[str]) -> np.ndarray | None:
    """A manifest's digests if it describes this disk, unchanged, at this block size; else None.
    A damaged manifest is reported in `warnings` and never trusted (the caller reads the disk)."""
    if path is None or not os.path.exists(path):
        return None
    try:
        m = load_manifest(path)
    except (FormatError, DiskIOError) as e:
        warnings.append(f"{role} manifest ignored, reading the disk instead: {e.message}")
        return None
    if m.matches(block_size, disk_size) and identity.unchanged_since(m.identity):
        return m.digests
    return None


def load_resume(path: str | None, block_size: int, disk_size: int, window_blocks: int, source: Identity,
                target: Identity, warnings: list[str]) -> CheckpointState | None:
    """A checkpoint is used only if the source is unchanged since it was started and the target is the
    same disk (which the resync owns while it runs), at the same block size."""
    if path is None or not os.path.exists(path):
        return None
    try:
        state = load_checkpoint(path)
    except (FormatError, DiskIOError) as e:
        warnings.append(f"checkpoint ignored, starting over: {e.message}")
        return None
    if ((state.block_size, state.disk_size) != (block_size, disk_size)
            or not source.unchanged_since(state.source) or not target.same_disk(state.target)):
        warnings.append("checkpoint is for another disk, block size or source contents; starting over")
        return None
    done = len(state.digests)
    if done % window_blocks and done != block_count(disk_size, block_size):
        warnings.append("checkpoint does not end on a window boundary; starting over")
        return None
    return state


def manifest_path_for(disk_path: str, manifest_dir: str | None = None) -> str:
    """Where a disk's manifest lives: next to it (DISK.digests), or in manifest_dir under a name made
    unique by the disk's absolute path."""
    if manifest_dir is None:
        return f"{disk_path}.digests"
    real = os.path.realpath(disk_path).encode()
    return os.path.join(manifest_dir, f"{os.path.basename(disk_path)}.{kernels.xxh3_128(real).hex()[:16]}.digests")


def checkpoint_path_for(target_manifest: str) -> str:
    """A resync's checkpoint belongs to its target (only one resync may write a target at a time)."""
    return f"{target_manifest[:-len('.digests')] if target_manifest.endswith('.digests') else target_manifest}" \
           ".resync-checkpoint"

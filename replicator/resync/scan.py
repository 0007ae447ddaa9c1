"""Scan source: the change set of a disk written by something that kept no change log.

The disk is digested and compared with its last manifest; the blocks whose digests differ are what a
change log started when the manifest was made would have recorded (at block granularity, and without
writes that left the bytes as they were). The new digests become the manifest for the next scan.
A disk whose identity is unchanged since the manifest is not read at all.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from ..disk.base import BlockDevice
from ..errors import UsageError
from . import manifest as M
from .engine import DEFAULT_BLOCK_SIZE, ChangeSet, Grid, ResyncCancelled, cancel_check, read_windows


@dataclass
class ScanResult:
    changes: ChangeSet
    manifest_path: str
    baseline: bool = False          # no earlier manifest: changes are the blocks that do not read as zeros
    read_skipped: bool = False      # the disk is unchanged since the manifest: nothing was read
    changed_during_scan: bool = False   # written while being read; the next scan will look again
    bytes_read: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "changes"}
        out.update(self.changes.to_json())
        return out


def digest_disk(disk: BlockDevice, block_size: int = DEFAULT_BLOCK_SIZE, cancel=None) -> tuple[np.ndarray, int]:
    """(digests of every block, bytes read) for a whole disk."""
    grid = Grid(block_size, disk.size)
    out, read, stopped = np.empty((grid.n_blocks, 2), np.uint64), 0, cancel_check(cancel)
    for w in read_windows(disk, grid):
        if stopped():
            raise ResyncCancelled(f"{disk.path}: digesting cancelled", w.first_block)
        out[w.first_block:w.first_block + len(w.digests)] = w.digests
        read += w.bytes_read
    return out, read


def changed_mask(old: np.ndarray | None, new: np.ndarray, grid: Grid) -> np.ndarray:
    """Blocks whose digests differ; blocks past the old end (or all, without a baseline) count as
    changed unless they read as zeros."""
    mask = (new != grid.zero_digests(0, len(new))).any(axis=1)
    if old is not None:
        n = min(len(old), len(new))
        mask[:n] = (old[:n] != new[:n]).any(axis=1)
    return mask


def _load_baseline(path: str, block_size: int | None) -> M.Manifest | None:
    """The last manifest; a damaged one is an error (FormatError), never silently replaced."""
    if not os.path.exists(path):
        return None
    old = M.load_manifest(path)
    if block_size is not None and block_size != old.block_size:
        raise UsageError(f"{path}: the manifest has {old.block_size}-byte blocks, not {block_size}; "
                         "scan with its block size or remove it to start a new baseline")
    return old


def scan(disk: BlockDevice, manifest_path: str, *, block_size: int | None = None, save: bool = True,
         cancel=None) -> ScanResult:
    """Change set of `disk` since the manifest at manifest_path; saves the new manifest unless save=False."""
    t0 = time.perf_counter()
    old = _load_baseline(manifest_path, block_size)
    bs = old.block_size if old is not None else block_size or DEFAULT_BLOCK_SIZE
    try:
        M.check_block_size(bs)
    except ValueError as e:
        raise UsageError(str(e)) from None
    grid = Grid(bs, disk.size)
    identity = M.disk_identity(disk)
    if old is not None and old.disk_size == disk.size and identity.unchanged_since(old.identity):
        return ScanResult(ChangeSet(bs, disk.size), manifest_path, read_skipped=True,
                          seconds=time.perf_counter() - t0)
    digests, read = digest_disk(disk, bs, cancel)
    changes = ChangeSet.from_mask(changed_mask(old.digests if old else None, digests, grid), bs, disk.size)
    moved = identity.trusted and M.disk_identity(disk, settle=False) != identity
    if save:    # with the identity from before the read: if it moved, the next scan reads again
        M.save_manifest(manifest_path, M.Manifest(bs, disk.size, identity, digests, time.time_ns()))
    return ScanResult(changes, manifest_path, baseline=old is None, changed_during_scan=moved, bytes_read=read,
                      seconds=time.perf_counter() - t0)

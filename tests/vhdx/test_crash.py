"""Crash safety: stop metadata updates at every single write or flush; the file must reopen to a committed
state (before, between or after the two commits), never to anything else."""
from __future__ import annotations

import itertools
import os
import shutil

import pytest

from replicator.vhdx import VhdxDisk, create_vhdx
from replicator.vhdx.check import check_vhdx

from .crashio import CountingIO, SimulatedCrash, crashing_io

MiB = 1 << 20
SIZE = 24 * MiB


def _baseline(path, parent=None):
    """A disk with some allocated blocks, closed cleanly; returns its contents."""
    if parent:
        disk = create_vhdx(path, 0, parent=parent, block_size=MiB)
    else:
        disk = create_vhdx(path, SIZE, block_size=MiB)
    with disk:
        disk.write(0, b"\x11" * (2 * MiB))
        disk.write(5 * MiB + 4096, b"\x22" * 8192)
        return disk.read(0, disk.size)


def _phase1(disk: VhdxDisk) -> None:
    """Metadata-only changes: new blocks (and sector bitmaps on a child), a trim, then flush."""
    disk.write(9 * MiB + 512, b"\x33" * 3000)
    disk.write(12 * MiB, b"\x44" * (2 * MiB + 4096))
    disk.write_zeroes(0, MiB)
    disk.flush()


def _phase2(disk: VhdxDisk) -> None:
    """A second commit in the same session: the log already carries this session's LogGuid."""
    disk.write(17 * MiB + 4096, b"\x55" * 5000)
    disk.write_zeroes(MiB, MiB)
    disk.flush()


def _operation(disk: VhdxDisk) -> None:
    _phase1(disk)
    _phase2(disk)


def _states_after(path_copy) -> tuple[bytes, bytes]:
    with VhdxDisk.open(path_copy, read_only=False) as d:
        _phase1(d)
        mid = d.read(0, d.size)
        _phase2(d)
        return mid, d.read(0, d.size)


def _count_writes(path) -> int:
    CountingIO.writes = 0
    with VhdxDisk.open(path, read_only=False, io_factory=CountingIO) as d:
        _operation(d)
    return CountingIO.writes


@pytest.mark.parametrize("mode", ["torn", "lose-unsynced"])
@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
def test_crash_at_every_write_reopens_old_or_new(tmp_path, mode, kind):
    parent = None
    if kind == "differencing":
        parent = str(tmp_path / "parent.vhdx")
        with create_vhdx(parent, SIZE, block_size=MiB) as p:
            p.write(0, bytes(range(256)) * (SIZE // 256))
    base = str(tmp_path / "base.vhdx")
    old = _baseline(base, parent)
    shutil.copy(base, tmp_path / "new.vhdx")
    mid, new = _states_after(str(tmp_path / "new.vhdx"))
    assert len({old, mid, new}) == 3
    shutil.copy(base, tmp_path / "count.vhdx")
    n_writes = _count_writes(str(tmp_path / "count.vhdx"))
    assert n_writes > 5
    names = {old: "old", mid: "mid", new: "new"}
    seen = {"old": 0, "mid": 0, "new": 0}
    seeds = range(6) if mode == "lose-unsynced" else range(1)
    for k, seed in itertools.product(range(1, n_writes + 1), seeds):
        work = str(tmp_path / f"work-{k}-{seed}.vhdx")
        shutil.copy(base, work)
        with pytest.raises(SimulatedCrash):
            d = VhdxDisk.open(work, read_only=False, io_factory=crashing_io(k, mode, seed=seed))
            try:
                _operation(d)
                d.close()
            finally:
                d.io.close()
        with VhdxDisk.open(work, read_only=False) as d:      # replays the log if it must
            got = d.read(0, d.size)
        assert got in names, f"crash at I/O {k}/{n_writes} ({mode}, seed {seed}) left no committed state"
        seen[names[got]] += 1
        problems = [p for p in check_vhdx(work) if "header" not in p]
        assert problems == [], f"crash at I/O {k}: {problems}"
        os.unlink(work)
    assert all(seen.values()), seen

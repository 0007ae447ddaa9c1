"""Metadata commits on their own thread (VhdxDisk.background_commits, the export's disks): the image reads
and checks the same as one committed in place, the writing thread does no fsync of its own between
flushes, a flush makes everything before it durable across a kill -9, and a crash leaves every block
either its old or its new bytes."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from replicator.vhdx import VhdxDisk, create_vhdx
from replicator.vhdx.check import check_vhdx
from replicator.vhdx.fileio import FileIO

MiB = 1 << 20
GiB = 1 << 30
SIZE = 64 * GiB                     # sparse: 65,536 blocks of 1 MiB, 128+ BAT pages
STRIDE = 512 * MiB + 3 * MiB        # each write a new block, most in a BAT page of their own


def piece(k: int, n: int = 4096) -> bytes:
    return hashlib.shake_128(k.to_bytes(8, "little")).digest(n)


def writes(count: int, seed: int = 0):
    return [((k * STRIDE + (k % 7) * 8192) % SIZE, piece(seed * 100000 + k, 4096 * (1 + k % 5)))
            for k in range(count)]


def fill(path, ws, background: bool) -> None:
    with create_vhdx(str(path), SIZE, block_size=MiB) as d:
        if background:
            d.background_commits()
        for off, data in ws:
            d.write(off, data)


def test_background_commits_give_the_image_an_in_place_commit_gives(tmp_path):
    ws = writes(400)
    fill(tmp_path / "a.vhdx", ws, background=False)
    fill(tmp_path / "b.vhdx", ws, background=True)
    for p in ("a.vhdx", "b.vhdx"):
        assert check_vhdx(str(tmp_path / p)) == []
    with VhdxDisk.open(str(tmp_path / "a.vhdx")) as a, VhdxDisk.open(str(tmp_path / "b.vhdx")) as b:
        assert (a.bat == b.bat).all()
        for off, data in ws:
            assert b.read(off, len(data)) == data == a.read(off, len(data))
    out = subprocess.run(["qemu-img", "check", "-f", "vhdx", str(tmp_path / "b.vhdx")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("background", [False, True])
def test_the_writer_does_no_fsync_between_flushes(tmp_path, monkeypatch, background):
    """With background commits every commit's fsyncs run on the commit thread; without, on the writer."""
    seen: list[str] = []
    real = FileIO.fsync

    def fsync(self):
        seen.append(threading.current_thread().name)
        return real(self)
    monkeypatch.setattr(FileIO, "fsync", fsync)
    with create_vhdx(str(tmp_path / "d.vhdx"), SIZE, block_size=MiB) as d:
        d.prepare_for_writes()                                  # as the export does: the header's GUIDs now
        if background:
            d.background_commits()
        seen.clear()
        for off, data in writes(400):
            d.write(off, data)
        d.wait_commits()
        on_writer = [t for t in seen if t == threading.current_thread().name]
        if background:
            assert on_writer == [] and len(seen) >= 6            # two commits or more, three fsyncs each
        else:
            assert len(on_writer) >= 6
        d.flush()


CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from vhdx.test_background_commits import writes
    from replicator.vhdx import create_vhdx
    d = create_vhdx({path!r}, {size}, block_size=1 << 20)
    d.background_commits()
    for off, data in writes(300, seed=1):
        d.write(off, data)
    d.flush()
    print("flushed", flush=True)
    for off, data in writes(300, seed=2):
        d.write(off + 65536, data)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_flush_is_durable_across_kill9_and_later_writes_are_old_or_new(tmp_path):
    path = str(tmp_path / "k.vhdx")
    code = CHILD.format(tests=os.path.dirname(os.path.dirname(__file__)), path=path, size=SIZE)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL and p.stdout.strip() == "flushed", p.stderr
    with VhdxDisk.open(path, read_only=False) as d:           # replays the log the kill left
        for off, data in writes(300, seed=1):
            assert d.read(off, len(data)) == data
        for off, data in writes(300, seed=2):
            got = d.read(off + 65536, len(data))
            assert got in (data, bytes(len(data))), f"block at {off + 65536} holds neither its old nor its new bytes"
    assert check_vhdx(path) == []


def test_a_failed_commit_in_place_is_tried_again_by_the_next_flush(tmp_path, monkeypatch):
    """Without a commit thread (replica apply, `replicate`, seeds): an fsync failing inside a commit
    leaves the metadata dirty, so the next flush commits it and the blocks are there after reopening."""
    from replicator.errors import DiskIOError
    path = str(tmp_path / "f.vhdx")
    real, failures = FileIO.fsync, [1]

    def fsync(self):
        if failures:
            failures.pop()
            raise DiskIOError(f"{self.path}: fsync: Input/output error")
        return real(self)
    ws = writes(40)
    with create_vhdx(path, SIZE, block_size=MiB) as d:
        d.prepare_for_writes()
        for off, data in ws:
            d.write(off, data)
        monkeypatch.setattr(FileIO, "fsync", fsync)
        with pytest.raises(DiskIOError, match="Input/output error"):
            d.flush()
        d.flush()
    with VhdxDisk.open(path) as d:
        for off, data in ws:
            assert d.read(off, len(data)) == data
    assert check_vhdx(path) == []


def test_after_a_failed_background_commit_nothing_more_is_taken(tmp_path, monkeypatch):
    """The commit thread's failure is raised by the next write that would hand it a commit and by every
    flush; what was dirty since stays dirty (never cleared on the way to a refusal)."""
    from replicator.errors import DiskIOError
    path = str(tmp_path / "g.vhdx")
    real = FileIO.fsync

    def fsync(self):
        if threading.current_thread().name == "spool":
            raise DiskIOError(f"{self.path}: fsync: Input/output error")
        return real(self)
    monkeypatch.setattr(FileIO, "fsync", fsync)
    d = create_vhdx(path, SIZE, block_size=MiB)
    try:
        d.prepare_for_writes()
        d.background_commits()
        with pytest.raises(DiskIOError, match="Input/output error"):
            for off, data in writes(2000):
                d.write(off, data)
            d.wait_commits()
        # metadata dirtied once the failure is known (if the last write's commit took everything, as when the
        # commit thread lags on a busy machine, nothing is dirty yet): a write to a block not used so far
        used = {off // MiB for off, _ in writes(2000)}
        fresh = next(b for b in range(SIZE // MiB) if b not in used) * MiB
        try:
            d.write(fresh, piece(99))   # below a commit's threshold it is taken, at it refused like the others
        except DiskIOError:
            pass
        dirty = d._dirty_count()
        with pytest.raises(DiskIOError, match="Input/output error"):
            d.commit_soon()
        assert d._dirty_count() == dirty > 0
        with pytest.raises(DiskIOError, match="Input/output error"):
            d.flush()
    finally:
        monkeypatch.setattr(FileIO, "fsync", real)
        with pytest.raises(DiskIOError):
            d.close()

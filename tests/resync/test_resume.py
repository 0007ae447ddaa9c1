"""Cancel (or kill) a resync in the middle, run it again: it resumes where it stopped, same result."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from replicator.resync import ResyncCancelled, ResyncPaths, load_manifest, resync

from .diskutil import Counting, contents, create, differing_blocks, fill, reference_digests, reopen, small_windows

BS, WINDOW = 4096, 4
SIZE = 64 * BS + 1536


def _pair(tmp_path, fmt_s, fmt_t, seed=3):
    rng = np.random.default_rng(seed)
    s, t = tmp_path / f"src.{fmt_s}", tmp_path / f"dst.{fmt_t}"
    with create(s, fmt_s, SIZE) as a, create(t, fmt_t, SIZE) as b:
        blob = rng.integers(0, 256, SIZE, dtype=np.uint8).tobytes()
        a.write(0, blob)
        b.write(0, blob)
        fill(a, rng, [(int(o), 700, "data") for o in rng.integers(0, SIZE, 12)] + [(20 * BS, 3 * BS, "zero")])
        fill(b, rng, [(int(o), 300, "data") for o in rng.integers(0, SIZE, 6)])
    return s, t


def _paths(d):
    return ResyncPaths(str(d / "s.digests"), str(d / "t.digests"), str(d / "t.ckpt"))


def _cancel_after(windows: int):
    calls = [0]

    def cancelled():
        calls[0] += 1
        return calls[0] > windows
    return cancelled


def _reference(tmp_path, fmt_s, fmt_t):
    """An uninterrupted resync of the same pair, for comparison."""
    ref = tmp_path / "ref"
    ref.mkdir()
    s, t = _pair(ref, fmt_s, fmt_t)
    with reopen(s) as a, reopen(t, read_only=False) as b, small_windows(BS, WINDOW):
        stats = resync(a, b, block_size=BS, paths=_paths(ref))
    return contents(t), stats, load_manifest(str(ref / "t.digests")).digests


@pytest.mark.parametrize("fmt_s, fmt_t", [("raw", "raw"), ("raw", "vhdx"), ("vhdx", "raw")])
def test_cancel_then_resume_gives_the_same_result_without_redoing_work(tmp_path, fmt_s, fmt_t):
    ref_bytes, ref_stats, ref_digests = _reference(tmp_path, fmt_s, fmt_t)
    s, t = _pair(tmp_path, fmt_s, fmt_t)
    differ = differing_blocks(contents(s), contents(t), BS)
    with small_windows(BS, WINDOW):
        with reopen(s) as a, reopen(t, read_only=False) as b, pytest.raises(ResyncCancelled) as e:
            resync(a, b, block_size=BS, paths=_paths(tmp_path), cancel=_cancel_after(6))
        done = e.value.blocks_done
        assert done == 6 * WINDOW and os.path.exists(tmp_path / "t.ckpt")
        first = set(e.value.stats.changes.block_indices().tolist())
        with reopen(s) as a, reopen(t, read_only=False) as b:
            ca, cb = Counting(a), Counting(b)
            stats = resync(ca, cb, block_size=BS, paths=_paths(tmp_path))
    assert stats.resumed_blocks == done
    for disk in (ca, cb):
        assert all(off >= done * BS for off, _ in disk.reads + disk.writes + disk.zeroes)
    assert contents(t) == ref_bytes == contents(s)
    assert first | set(stats.changes.block_indices().tolist()) == differ == set(
        ref_stats.changes.block_indices().tolist())
    assert np.array_equal(load_manifest(str(tmp_path / "t.digests")).digests, ref_digests)
    assert np.array_equal(load_manifest(str(tmp_path / "s.digests")).digests, reference_digests(contents(s), BS))
    assert not os.path.exists(tmp_path / "t.ckpt")


def test_source_changed_since_the_checkpoint_starts_over(tmp_path):
    s, t = _pair(tmp_path, "raw", "raw")
    with small_windows(BS, WINDOW):
        with reopen(s) as a, reopen(t, read_only=False) as b, pytest.raises(ResyncCancelled):
            resync(a, b, block_size=BS, paths=_paths(tmp_path), cancel=_cancel_after(5))
        with reopen(s, read_only=False) as a:
            a.write(BS, b"changed in a block the first run already did")
        with reopen(s) as a, reopen(t, read_only=False) as b:
            stats = resync(a, b, block_size=BS, paths=_paths(tmp_path))
    assert stats.resumed_blocks == 0 and any("starting over" in w for w in stats.warnings)
    assert contents(t) == contents(s)


def test_torn_checkpoint_resumes_from_the_last_whole_record(tmp_path):
    s, t = _pair(tmp_path, "raw", "vhdx")
    with small_windows(BS, WINDOW):
        with reopen(s) as a, reopen(t, read_only=False) as b, pytest.raises(ResyncCancelled):
            resync(a, b, block_size=BS, paths=_paths(tmp_path), cancel=_cancel_after(7))
        ckpt = tmp_path / "t.ckpt"
        with open(ckpt, "r+b") as f:
            f.truncate(os.path.getsize(ckpt) - 5)
        with reopen(s) as a, reopen(t, read_only=False) as b:
            stats = resync(a, b, block_size=BS, paths=_paths(tmp_path))
    assert stats.resumed_blocks == 6 * WINDOW
    assert contents(t) == contents(s)


def test_cancel_with_an_event(tmp_path):
    import threading
    s, t = _pair(tmp_path, "raw", "raw")
    event = threading.Event()
    event.set()
    with reopen(s) as a, reopen(t, read_only=False) as b, pytest.raises(ResyncCancelled) as e:
        resync(a, b, block_size=BS, paths=_paths(tmp_path), cancel=event)
    assert e.value.blocks_done == 0 and e.value.exit_code == 130


KILLER = textwrap.dedent("""
    import os, sys
    from replicator.disk.probe import open_disk
    from replicator.resync import ResyncPaths, engine, resync
    d, bs, window, windows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    engine.WINDOW_BYTES = bs * window
    seen = [0]
    def progress(stats):
        seen[0] += 1
        if seen[0] == windows:
            os._exit(9)             # no cleanup at all, like kill -9
    paths = ResyncPaths(d + "/s.digests", d + "/t.digests", d + "/t.ckpt")
    with open_disk(d + "/src.raw") as s, open_disk(d + "/dst.vhdx", read_only=False) as t:
        resync(s, t, block_size=bs, paths=paths, progress=progress, checkpoint_seconds=0)
""")


def test_killed_resync_resumes(tmp_path):
    s, t = _pair(tmp_path, "raw", "vhdx")
    before_t = contents(t)
    proc = subprocess.run([sys.executable, "-c", KILLER, str(tmp_path), str(BS), str(WINDOW), "9"],
                          capture_output=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert proc.returncode == 9, proc.stderr.decode()
    assert contents(t) != before_t                      # it did write before dying
    with small_windows(BS, WINDOW), reopen(s) as a, reopen(t, read_only=False) as b:
        stats = resync(a, b, block_size=BS, paths=_paths(tmp_path))
    assert stats.resumed_blocks == 9 * WINDOW
    assert contents(t) == contents(s)

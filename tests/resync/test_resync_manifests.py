"""Manifests let an unchanged side skip its read; a changed or damaged one is never trusted."""
from __future__ import annotations

import os

import numpy as np
import pytest

from replicator.resync import ResyncPaths, SourceChanged, load_manifest, resync

from .diskutil import Counting, contents, create, fill, reference_digests, reopen, small_windows

SIZE, BS = 3 * (1 << 20) + 4096, 65536


def _pair(tmp_path, fmt_t="raw", fmt_s="raw"):
    rng = np.random.default_rng(5)
    s, t = tmp_path / f"src.{fmt_s}", tmp_path / f"dst.{fmt_t}"
    with create(s, fmt_s, SIZE) as a, create(t, fmt_t, SIZE) as b:
        fill(a, rng, [(0, SIZE, "data")])
        fill(b, rng, [(100_000, 1 << 20, "data")])
    return s, t


def _paths(tmp_path):
    return ResyncPaths(str(tmp_path / "s.digests"), str(tmp_path / "t.digests"), str(tmp_path / "t.ckpt"))


def _resync(tmp_path, s, t, **kw):
    with reopen(s) as a, reopen(t, read_only=False) as b:
        ca, cb = Counting(a), Counting(b)
        stats = resync(ca, cb, block_size=BS, paths=_paths(tmp_path), **kw)
    return stats, ca, cb


def _write(path, offset, data):
    with reopen(path, read_only=False) as d:
        d.write(offset, data)


@pytest.mark.parametrize("fmt", ["raw", "vhdx"])
def test_unchanged_target_is_not_read_again(tmp_path, fmt):
    s, t = _pair(tmp_path, fmt)
    first, _, _ = _resync(tmp_path, s, t)
    assert first.target_bytes_read > 0 and not first.target_from_manifest
    _write(s, 70_000, b"new data" * 1000)               # only the source changes
    second, ca, cb = _resync(tmp_path, s, t)
    assert cb.reads == [] and second.target_from_manifest and second.target_bytes_read == 0
    assert ca.bytes_read == SIZE and not second.source_from_manifest
    assert second.blocks_differing == 1
    assert contents(t) == contents(s)
    assert np.array_equal(load_manifest(str(tmp_path / "t.digests")).digests, reference_digests(contents(s), BS))


@pytest.mark.parametrize("fmt", ["raw", "vhdx"])
def test_unchanged_source_is_not_read_except_the_blocks_to_copy(tmp_path, fmt):
    s, t = _pair(tmp_path, fmt_s=fmt)
    _resync(tmp_path, s, t)
    _write(t, 3 * BS + 10, b"target-only write")          # the replica drifted; the source did not
    stats, ca, cb = _resync(tmp_path, s, t)
    assert stats.source_from_manifest and not stats.target_from_manifest
    assert ca.reads == [(3 * BS, BS)]                     # just the block being copied
    assert cb.bytes_read == SIZE
    assert contents(t) == contents(s)


def test_both_unchanged_reads_nothing(tmp_path):
    s, t = _pair(tmp_path, "vhdx")
    _resync(tmp_path, s, t)
    with reopen(t, read_only=False):
        pass                                              # opened read-write without writing: still unchanged
    stats, ca, cb = _resync(tmp_path, s, t)
    assert ca.reads == cb.reads == [] and stats.blocks_differing == 0


def test_vhdx_target_with_new_data_write_guid_is_read_again(tmp_path):
    s, t = _pair(tmp_path, "vhdx")
    _resync(tmp_path, s, t)
    with reopen(t) as d:
        guid = d.data_write_guid
    _write(t, 5 * BS, b"written behind our back")
    with reopen(t) as d:
        assert d.data_write_guid != guid
    stats, _, cb = _resync(tmp_path, s, t)
    assert not stats.target_from_manifest and cb.bytes_read > 0
    assert stats.changes.block_indices().tolist() == [5]
    assert contents(t) == contents(s)


@pytest.mark.parametrize("damage", ["flip header", "flip digest", "truncate", "garbage"])
def test_damaged_manifest_is_reported_and_the_disk_read(tmp_path, damage):
    s, t = _pair(tmp_path)
    _resync(tmp_path, s, t)
    _write(t, 0, b"drift")                                # make trusting the old digests observable
    _resync(tmp_path, s, t)
    _write(t, 0, b"drift")
    mpath = tmp_path / "t.digests"
    raw = bytearray(mpath.read_bytes())
    if damage == "flip header":
        raw[20] ^= 0xFF
    elif damage == "flip digest":
        raw[-1] ^= 0x01
    elif damage == "truncate":
        raw = raw[:-16]
    else:
        raw = bytearray(b"not a manifest at all")
    mpath.write_bytes(raw)
    stats, _, cb = _resync(tmp_path, s, t)
    assert any("target manifest ignored" in w and "offset" in w for w in stats.warnings), stats.warnings
    assert cb.bytes_read > 0 and stats.blocks_differing == 1
    assert contents(t) == contents(s)
    load_manifest(str(mpath))                             # replaced by a good one


def test_manifest_of_another_block_size_is_not_used(tmp_path):
    s, t = _pair(tmp_path)
    _resync(tmp_path, s, t)
    with reopen(s) as a, reopen(t, read_only=False) as b:
        cb = Counting(b)
        stats = resync(a, cb, block_size=BS * 2, paths=_paths(tmp_path))
    assert not stats.target_from_manifest and cb.bytes_read > 0 and not stats.warnings


def test_dry_run_saves_nothing(tmp_path):
    s, t = _pair(tmp_path)
    with reopen(s) as a, reopen(t) as b:
        stats = resync(a, b, block_size=BS, paths=_paths(tmp_path), dry_run=True)
    assert stats.blocks_differing > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst.raw", "src.raw"]


def test_source_written_during_the_run_is_reported(tmp_path):
    s, t = _pair(tmp_path)
    fd = os.open(s, os.O_WRONLY)
    try:
        def progress(stats):
            if stats.blocks_compared == 8:      # small windows: this is the middle of the run
                os.pwrite(fd, b"late write", SIZE - 100)
        with small_windows(BS, 4), pytest.raises(SourceChanged):
            _resync(tmp_path, s, t, progress=progress)
    finally:
        os.close(fd)
    assert not (tmp_path / "s.digests").exists() and not (tmp_path / "t.ckpt").exists()
    # the target manifest describes what the target really holds, so the next run can trust it
    assert np.array_equal(load_manifest(str(tmp_path / "t.digests")).digests, reference_digests(contents(t), BS))
    stats, _, cb = _resync(tmp_path, s, t)
    assert stats.target_from_manifest and cb.reads == [] and contents(t) == contents(s)


def test_source_changed_behind_its_identity_is_caught_when_copying(tmp_path):
    """A writer that bypasses the VHDX DataWriteGuid: the re-read block no longer has the manifest's
    digest, so the run says so and records the digest of what it really wrote."""
    s, t = _pair(tmp_path, fmt_s="vhdx")
    marker = b"MARKER-block-seven" * 100
    _write(s, 7 * BS, marker)
    _resync(tmp_path, s, t)
    _write(t, 7 * BS + 5000, b"drift")                    # block 7 will be copied from the source
    raw = s.read_bytes()
    at = raw.index(marker)
    with open(s, "r+b") as f:                            # behind the engine's back
        f.seek(at)
        f.write(b"X" * len(marker))
    with pytest.raises(SourceChanged):
        _resync(tmp_path, s, t)
    assert contents(t) == contents(s)
    assert np.array_equal(load_manifest(str(tmp_path / "t.digests")).digests, reference_digests(contents(t), BS))

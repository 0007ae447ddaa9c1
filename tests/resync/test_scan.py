"""Scan: the change set since the last manifest is exactly the blocks whose contents were changed."""
from __future__ import annotations

import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.errors import FormatError, UsageError
from replicator.resync import load_manifest, scan

from .diskutil import Counting, contents, create, differing_blocks, fill, reference_digests, reopen, small_windows

BS = 4096


@st.composite
def scan_cases(draw):
    fmt = draw(st.sampled_from(["raw", "vhdx"]))
    size = draw(st.integers(1, 48)) * BS - draw(st.sampled_from([0, 512, 3584] + ([] if fmt == "vhdx" else [1])))
    op = st.tuples(st.integers(0, size - 1), st.integers(1, 3 * BS), st.sampled_from(["data", "data", "zero",
                                                                                      "same"]))
    return dict(fmt=fmt, size=size, base=draw(st.lists(op, max_size=5)), writes=draw(st.lists(op, max_size=6)),
                seed=draw(st.integers(0, 2**32 - 1)), window=draw(st.integers(1, 6)))


def _apply(disk, rng, ops):
    for off, n, kind in ops:
        if kind == "same":          # a write that leaves the bytes as they were: no change to report
            n = min(n, disk.size - off)
            disk.write(off, disk.read(off, n))
        else:
            fill(disk, rng, [(off, n, kind)])


@settings(max_examples=40, deadline=None)
@given(c=scan_cases())
def test_scan_reports_the_blocks_changed_since_the_manifest(c):
    rng = np.random.default_rng(c["seed"])
    with tempfile.TemporaryDirectory() as d, small_windows(BS, c["window"]):
        path, mpath = f"{d}/disk.{c['fmt']}", f"{d}/disk.digests"
        with create(path, c["fmt"], c["size"]) as disk:
            _apply(disk, rng, c["base"])
        with reopen(path) as disk:
            first = scan(disk, mpath, block_size=BS)
        before = contents(path)
        assert first.baseline
        assert set(first.changes.block_indices().tolist()) == differing_blocks(before, bytes(len(before)), BS)
        with reopen(path, read_only=False) as disk:
            _apply(disk, rng, c["writes"])
        after = contents(path)
        with reopen(path) as disk:
            second = scan(disk, mpath)
        assert set(second.changes.block_indices().tolist()) == differing_blocks(before, after, BS)
        assert np.array_equal(load_manifest(mpath).digests, reference_digests(after, BS))


@pytest.mark.parametrize("fmt", ["raw", "vhdx"])
def test_unchanged_disk_is_not_read(tmp_path, fmt):
    path = tmp_path / f"d.{fmt}"
    with create(path, fmt, 1 << 20) as disk:
        fill(disk, np.random.default_rng(0), [(1000, 50_000, "data")])
    with reopen(path) as disk:
        scan(disk, str(tmp_path / "m"))
    with reopen(path) as disk:
        counting = Counting(disk)
        result = scan(counting, str(tmp_path / "m"))
    assert result.read_skipped and counting.reads == [] and result.changes.extents == []


def test_change_set_extents_are_coalesced_byte_ranges(tmp_path):
    path = tmp_path / "d.raw"
    with create(path, "raw", 10 * BS + 100) as disk:
        disk.write(0, b"\1" * disk.size)
    with reopen(path) as disk:
        scan(disk, str(tmp_path / "m"), block_size=BS)
    with reopen(path, read_only=False) as disk:
        disk.write(BS + 5, b"x" * (2 * BS))         # blocks 1..3
        disk.write(10 * BS + 99, b"y")             # the short last block
    with reopen(path) as disk:
        result = scan(disk, str(tmp_path / "m"))
    assert result.changes.extents == [(BS, 3 * BS), (10 * BS, 100)]
    assert result.to_json()["extents"][1] == {"offset": 10 * BS, "length": 100}


def test_damaged_manifest_is_an_error_not_a_new_baseline(tmp_path):
    path = tmp_path / "d.raw"
    with create(path, "raw", 1 << 20):
        pass
    with reopen(path) as disk:
        scan(disk, str(tmp_path / "m"))
    raw = bytearray((tmp_path / "m").read_bytes())
    raw[130] ^= 1
    (tmp_path / "m").write_bytes(raw)
    with reopen(path) as disk, pytest.raises(FormatError, match="offset 128"):
        scan(disk, str(tmp_path / "m"))
    with reopen(path) as disk, pytest.raises(UsageError, match="block"):
        (tmp_path / "m").unlink()
        scan(disk, str(tmp_path / "m"), block_size=BS)
        scan(disk, str(tmp_path / "m"), block_size=2 * BS)


def test_grown_disk_reports_the_new_data(tmp_path):
    path = tmp_path / "d.raw"
    with create(path, "raw", 4 * BS) as disk:
        disk.write(0, b"a" * disk.size)
    with reopen(path) as disk:
        scan(disk, str(tmp_path / "m"), block_size=BS)
    with open(path, "r+b") as f:
        f.truncate(8 * BS)
        f.seek(6 * BS)
        f.write(b"b" * 10)
    with reopen(path) as disk:
        result = scan(disk, str(tmp_path / "m"))
    assert result.changes.block_indices().tolist() == [6]

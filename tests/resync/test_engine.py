"""Resync copies exactly the differing blocks, and the target ends up equal to the source."""
from __future__ import annotations

import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.disk.base import ExtentKind
from replicator.errors import UsageError
from replicator.resync import ChangeSet, Grid, ResyncPaths, digest_disk, resync, runs_of

from ..externals import qemu_compare
from .diskutil import Counting, contents, create, differing_blocks, fill, reference_digests, reopen, small_windows

FORMATS = ["raw", "vhdx"]


@st.composite
def pair_cases(draw):
    fmt_s, fmt_t = draw(st.sampled_from(FORMATS)), draw(st.sampled_from(FORMATS))
    bs = draw(st.sampled_from([4096, 65536]))
    n_blocks = draw(st.integers(1, 40))
    align = 512 if "vhdx" in (fmt_s, fmt_t) else 1
    tail = draw(st.integers(1, bs // align)) * align
    size = (n_blocks - 1) * bs + tail
    piece = st.tuples(st.integers(0, size - 1), st.integers(1, 3 * bs), st.sampled_from(["data", "data", "zero"]))
    return dict(fmt_s=fmt_s, fmt_t=fmt_t, bs=bs, size=size, base=draw(st.lists(piece, max_size=6)),
                src_only=draw(st.lists(piece, max_size=5)), dst_only=draw(st.lists(piece, max_size=5)),
                window=draw(st.integers(1, 8)), seed=draw(st.integers(0, 2**32 - 1)),
                manifests=draw(st.booleans()))


def _zero_extent_blocks(disk, bs: int) -> set[int]:
    """Blocks lying entirely inside ZERO extents: they must never be read."""
    data = set()
    for e in disk.extents():
        if e.kind is ExtentKind.DATA:
            data.update(range(e.offset // bs, -(-e.end // bs)))
    return set(range(-(-disk.size // bs))) - data


def _build(d, c):
    rng = np.random.default_rng(c["seed"])
    src, dst = create(d + "/src", c["fmt_s"], c["size"]), create(d + "/dst", c["fmt_t"], c["size"])
    with src, dst:
        for off, n, kind in c["base"]:          # identical on both sides
            n = min(n, c["size"] - off)
            blob = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            for disk in (src, dst):
                disk.write_zeroes(off, n) if kind == "zero" else disk.write(off, blob)
        fill(src, rng, c["src_only"])
        fill(dst, rng, c["dst_only"])
    return d + "/src", d + "/dst"


def _run(c, d, src_path, dst_path, **kw):
    paths = ResyncPaths(d + "/s.digests", d + "/t.digests", d + "/t.ckpt") if c["manifests"] else None
    with reopen(src_path) as s, reopen(dst_path, read_only=False) as t:
        cs, ct = Counting(s), Counting(t)
        zero_blocks = _zero_extent_blocks(s, c["bs"])
        with small_windows(c["bs"], c["window"]):
            stats = resync(cs, ct, block_size=c["bs"], paths=paths, **kw)
    return stats, cs, ct, zero_blocks


def _blocks_of(ranges, bs):
    return {b for off, n in ranges for b in range(off // bs, -(-(off + n) // bs))}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=pair_cases())
def test_resync_copies_exactly_the_differing_blocks(c):
    with tempfile.TemporaryDirectory() as d:
        src_path, dst_path = _build(d, c)
        before_s, before_t = contents(src_path), contents(dst_path)
        differ = differing_blocks(before_s, before_t, c["bs"])
        stats, cs, ct, zero_blocks = _run(c, d, src_path, dst_path)
        assert contents(dst_path) == before_s
        assert contents(src_path) == before_s
        assert set(stats.changes.block_indices().tolist()) == differ
        assert stats.blocks_differing == len(differ)
        assert ct.blocks_written(c["bs"]) == differ
        assert not _blocks_of(cs.reads, c["bs"]) & zero_blocks
        assert stats.blocks_compared == -(-c["size"] // c["bs"])
        assert stats.bytes_copied + stats.bytes_zeroed == sum(
            min(c["bs"], c["size"] - b * c["bs"]) for b in differ)


@settings(max_examples=15, deadline=None)
@given(c=pair_cases())
def test_dry_run_reports_and_writes_nothing(c):
    with tempfile.TemporaryDirectory() as d:
        src_path, dst_path = _build(d, c)
        before_s, before_t = contents(src_path), contents(dst_path)
        stats, _, ct, _ = _run(c, d, src_path, dst_path, dry_run=True)
        assert contents(dst_path) == before_t
        assert not ct.writes and not ct.zeroes
        assert set(stats.changes.block_indices().tolist()) == differing_blocks(before_s, before_t, c["bs"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_vhdx_target_matches_source_for_qemu(tmp_path, fmt):
    size, bs = 6 << 20, 65536
    rng = np.random.default_rng(1)
    with create(tmp_path / "src.raw", "raw", size) as s, create(tmp_path / "dst.vhdx", "vhdx", size) as t:
        fill(s, rng, [(0, 300_000, "data"), (2 << 20, 1 << 20, "data"), (5 << 20, 12345, "data")])
        fill(t, rng, [(100_000, 700_000, "data"), (4 << 20, 2 << 20, "data")])
    src = tmp_path / "src.raw"
    if fmt == "vhdx":       # the source a VHDX too
        with reopen(src) as r, create(tmp_path / "src.vhdx", "vhdx", size) as v:
            v.write(0, r.read(0, size))
        src = tmp_path / "src.vhdx"
    with reopen(src) as s, reopen(tmp_path / "dst.vhdx", read_only=False) as t:
        stats = resync(s, t, block_size=bs)
    assert stats.blocks_differing > 0
    assert qemu_compare(tmp_path / "dst.vhdx", tmp_path / "src.raw", "vhdx", "raw").returncode == 0


def test_digest_disk_matches_the_kernel_on_the_bytes(tmp_path):
    size = 3 * 65536 + 777
    rng = np.random.default_rng(2)
    with create(tmp_path / "a", "raw", size) as a:
        fill(a, rng, [(70_000, 50_000, "data"), (3 * 65536, 777, "data")])
    with reopen(tmp_path / "a") as a:
        got, read = digest_disk(a, 65536)
    assert np.array_equal(got, reference_digests(contents(tmp_path / "a"), 65536))
    assert read < size          # the first block is a hole and was not read


def test_sizes_and_block_size_are_checked(tmp_path):
    with create(tmp_path / "a", "raw", 4096) as a, create(tmp_path / "b", "raw", 8192) as b:
        with pytest.raises(UsageError, match="same virtual size"):
            resync(a, b)
        with pytest.raises(UsageError, match="power of two"):
            resync(a, a, block_size=3000)


def test_empty_disks(tmp_path):
    with create(tmp_path / "a", "raw", 0) as a, create(tmp_path / "b", "raw", 0) as b:
        stats = resync(a, b)
    assert stats.blocks_compared == 0 and stats.changes.extents == []


def test_change_set_coalesces_and_clips_the_last_block():
    cs = ChangeSet.from_mask(np.array([1, 1, 0, 1, 1, 1], bool), 100, 550)
    assert cs.extents == [(0, 200), (300, 250)]
    assert cs.block_indices().tolist() == [0, 1, 3, 4, 5]
    assert runs_of(np.array([2, 3, 4, 9])) == [(2, 5), (9, 10)]
    assert Grid(100, 550).zero_digests(0, 6).shape == (6, 2)

"""Differencing chains. qemu cannot create or open differencing VHDX, so every chain is checked against a
flattened raw shadow, against `check`, and the parents' bytes must never change."""
from __future__ import annotations

import hashlib
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.errors import ParentError
from replicator.vhdx import VhdxDisk, create_vhdx
from replicator.vhdx.check import check_vhdx

MiB = 1 << 20
SIZE = 12 * MiB


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def apply_ops(disk, shadow, ops):
    for kind, off, n, b in ops:
        n = min(n, disk.size - off)
        if kind == "w":
            disk.write(off, bytes([b]) * n)
            shadow[off:off + n] = bytes([b]) * n
        else:
            disk.write_zeroes(off, n)
            shadow[off:off + n] = bytes(n)


op = st.tuples(st.sampled_from("wwwz"), st.integers(0, SIZE - 1), st.integers(1, 2 * MiB + 3000),
               st.integers(1, 255))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layers=st.lists(st.lists(op, max_size=6), min_size=2, max_size=4),
       lss=st.sampled_from([512, 4096]), bs=st.sampled_from([MiB, 2 * MiB]))
def test_chain_reads_equal_flattened_shadow(tmp_path, layers, lss, bs):
    d = tmp_path / f"chain-{os.getpid()}-{abs(hash(str(layers))) % 10**9}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    shadow = bytearray(SIZE)
    paths = []
    for depth, ops in enumerate(layers):
        path = str(d / f"layer{depth}.vhdx")
        disk = (create_vhdx(path, SIZE, block_size=bs, logical_sector_size=lss) if depth == 0
                else create_vhdx(path, 0, parent=paths[-1], block_size=bs))
        digests_before = [sha(p) for p in paths]
        with disk:
            apply_ops(disk, shadow, ops)
            assert disk.read(0, SIZE) == shadow
        assert [sha(p) for p in paths] == digests_before, "writing a child changed a parent"
        paths.append(path)
    with VhdxDisk.open(paths[-1]) as top:
        assert top.read(0, SIZE) == shadow
        exts = list(top.extents())
        for e in exts:
            if e.kind.value == "zero":
                assert shadow[e.offset:e.end] == bytes(e.length)
    assert check_vhdx(paths[-1]) == []


def _chain(tmp_path):
    base = str(tmp_path / "base.vhdx")
    with create_vhdx(base, SIZE, block_size=MiB) as b:
        b.write(0, b"\x01" * SIZE)
    child = str(tmp_path / "child.vhdx")
    with create_vhdx(child, 0, parent=base, block_size=MiB) as c:
        c.write(MiB + 512, b"\x02" * 1024)
    return base, child


def test_unaligned_write_in_child_keeps_parent_bytes_around_it(tmp_path):
    base, child = _chain(tmp_path)
    with VhdxDisk.open(child, read_only=False) as c:
        c.write(3 * MiB + 5, b"\x03" * 3)
    with VhdxDisk.open(child) as c:
        got = c.read(3 * MiB, 512)
    assert got == b"\x01" * 5 + b"\x03" * 3 + b"\x01" * 504


def test_parent_found_by_relative_path_after_moving_the_pair(tmp_path):
    (tmp_path / "a").mkdir()
    base, child = _chain(tmp_path / "a")
    moved = tmp_path / "moved"
    shutil.move(str(tmp_path / "a"), moved)
    with VhdxDisk.open(str(moved / "child.vhdx")) as c:
        assert c.parent_path == str(moved / "base.vhdx")
        assert c.read(MiB + 512, 1024) == b"\x02" * 1024
        assert c.read(0, 16) == b"\x01" * 16


def test_parent_found_by_absolute_path_when_child_moves_alone(tmp_path):
    base, child = _chain(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    moved = str(tmp_path / "elsewhere" / "child.vhdx")
    shutil.move(child, moved)
    with VhdxDisk.open(moved) as c:
        assert c.parent_path == base
        assert c.read(0, 16) == b"\x01" * 16


def test_modified_parent_is_refused_and_nothing_is_written(tmp_path):
    base, child = _chain(tmp_path)
    with VhdxDisk.open(base, read_only=False) as b:
        b.write(0, b"\xff")
    before = sha(child)
    with pytest.raises(ParentError, match="DataWriteGuid"):
        VhdxDisk.open(child, read_only=False)
    assert sha(child) == before


def test_missing_parent_names_the_paths_tried(tmp_path):
    base, child = _chain(tmp_path)
    os.unlink(base)
    with pytest.raises(ParentError, match="base.vhdx"):
        VhdxDisk.open(child)


def test_data_write_guid_changes_on_first_write_only(tmp_path):
    path = str(tmp_path / "g.vhdx")
    create_vhdx(path, SIZE, block_size=MiB).close()
    with VhdxDisk.open(path) as d:
        g0 = d.data_write_guid
    with VhdxDisk.open(path, read_only=False) as d:
        assert d.data_write_guid == g0          # opening alone is not a change
        d.write(0, b"x")
        g1 = d.data_write_guid
        d.write(MiB, b"y")
        assert d.data_write_guid == g1          # once per session
    assert g1 != g0
    with VhdxDisk.open(path) as d:
        assert d.data_write_guid == g1

"""DirectWriteIO (large aligned writes bypass the page cache) writes exactly what FileIO writes, falls
back where O_DIRECT is refused, and qemu-img agrees; allocation_needed bounds the new blocks a write makes."""
from __future__ import annotations

import random
import subprocess

import pytest

from replicator.vhdx import VhdxDisk, create_vhdx
from replicator.vhdx.fileio import DirectWriteIO, FileIO

from ..externals import qemu_compare

MiB = 1 << 20
SIZE = 48 * MiB


def writes(seed: int):
    rng = random.Random(seed)
    out = []
    for _ in range(60):
        n = rng.choice([512, 4096, 65536, 3 * 65536 + 512, MiB, 5 * MiB])
        off = rng.randrange(0, SIZE - n) // 512 * 512
        out.append((off, rng.randbytes(n)))
    return out


def build(path: str, io_factory, seed: int) -> None:
    create_vhdx(path, SIZE, block_size=2 * MiB).close()
    with VhdxDisk.open(path, read_only=False, io_factory=io_factory) as d:
        for off, data in writes(seed):
            d.write(off, data)


@pytest.mark.parametrize("seed", [1, 2])
def test_direct_writes_give_the_same_disk(tmp_path, seed):
    a, b = str(tmp_path / "buffered.vhdx"), str(tmp_path / "direct.vhdx")
    build(a, FileIO, seed)
    build(b, DirectWriteIO, seed)
    with VhdxDisk.open(a) as x, VhdxDisk.open(b) as y:
        assert x.read(0, SIZE) == y.read(0, SIZE)
    assert qemu_compare(a, b, fmt_b="vhdx").returncode == 0
    subprocess.run(["qemu-img", "check", "-f", "vhdx", b], check=True, capture_output=True)


def test_direct_writes_are_used_where_the_filesystem_allows(tmp_path):
    path = str(tmp_path / "d.vhdx")
    create_vhdx(path, SIZE).close()
    io = DirectWriteIO(path, True)
    try:
        on_tmpfs = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                                  text=True).stdout.strip() == "tmpfs"
        assert (io.direct_fd >= 0) != on_tmpfs
    finally:
        io.close()


def test_allocation_needed_counts_only_blocks_not_present(tmp_path):
    path = str(tmp_path / "a.vhdx")
    with create_vhdx(path, SIZE, block_size=2 * MiB) as d:
        assert d.allocation_needed([(0, 1), (2 * MiB - 1, 2)]) == 4 * MiB       # blocks 0 and 1
        d.write(0, b"x" * 4096)
        assert d.allocation_needed([(0, 2 * MiB)]) == 0
        assert d.allocation_needed([(0, 6 * MiB), (5 * MiB, MiB)]) == 4 * MiB
    child = str(tmp_path / "child.vhdx")
    with create_vhdx(child, 0, parent=path, block_size=2 * MiB) as c:   # plus a sector bitmap block
        assert c.allocation_needed([(0, 4096)]) == 2 * MiB + MiB
    with VhdxDisk.open(path) as d:                                      # the BAT says so after a reopen
        assert d.allocation_needed([(0, 4 * MiB)]) == 2 * MiB

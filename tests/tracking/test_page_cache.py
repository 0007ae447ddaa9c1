"""The guest's disk stays in small page-cache folios (disk/base.py small_folios): the export drops the
image's clean pages when it starts, and neither the export nor a copy's reader reads ahead. A 4 KiB write
into a large folio costs several times one into a small one (docs/performance.md); these tests check the
page cache itself, with `fincore`, against a control that shows what the same reads do without the advice."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from .helpers import MiB, make_vhdx, pattern, qemu_io, tracked
from .test_export_process import _handle

pytestmark = pytest.mark.skipif(shutil.which("fincore") is None, reason="fincore (util-linux) is not installed")


def resident(path) -> int:
    """Bytes of the file in the page cache."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.strip())


def read_all(path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(4 * MiB):
            pass


def drop(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def disk(tmp_path):
    path = make_vhdx(tmp_path / "d0.vhdx", 64 * MiB, fill=[(0, pattern(7, 48 * MiB))])
    tracked(path).close()
    os.sync()
    read_all(path)
    if resident(path) < os.path.getsize(path) // 2:
        pytest.skip("this file system does not keep a file's pages in the page cache")
    drop(path)
    if resident(path) > os.path.getsize(path) // 4:
        pytest.skip("this file system keeps clean pages on POSIX_FADV_DONTNEED (tmpfs)")
    read_all(path)
    return path


def test_the_export_drops_the_images_clean_pages_when_it_starts(tmp_path, disk):
    size = os.path.getsize(disk)
    assert resident(disk) > size // 2          # the whole image cached, as after its creation or a copy
    h = _handle(tmp_path, disk)
    try:
        assert resident(disk) < size // 8      # what is left: the metadata the export read after its drop
    finally:
        h.shutdown()


def test_reads_of_the_live_disk_bring_in_no_readahead(tmp_path, disk):
    h = _handle(tmp_path, disk)
    try:
        step, steps = 256 * 1024, 8
        drop(disk)                                 # whatever the export's start left, the reads below start cold

        # the control: the same sequential reads through a descriptor without the advice
        before = resident(disk)
        fd = os.open(disk, os.O_RDONLY)
        try:
            for i in range(steps):
                os.pread(fd, step, 24 * MiB + i * step)
        finally:
            os.close(fd)
        ahead = resident(disk) - before - steps * step
        if ahead < 128 * 1024:                     # more than the slack allowed below
            pytest.skip(f"no readahead on this device ({ahead} bytes beyond the reads)")

        # the guest's own sequential reads, through the export
        before = resident(disk)
        qemu_io(h.uri("d0.vhdx"), *(f"read {40 * MiB + i * step} {step}" for i in range(steps)))
        brought = resident(disk) - before
        assert brought <= steps * step + 64 * 1024, (brought, ahead)

        reader = h.disks["d0.vhdx"].disk           # replicatord's reader: fully present blocks from the file
        buf = bytearray(step)
        before = resident(disk)
        for i in range(steps):
            reader.readinto(4 * MiB + i * step, buf)
            assert bytes(buf) == pattern(7, 48 * MiB)[4 * MiB + i * step:4 * MiB + (i + 1) * step]
        brought = resident(disk) - before
        assert brought <= steps * step + 64 * 1024, (brought, ahead)
    finally:
        h.shutdown()

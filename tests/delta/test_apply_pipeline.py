"""The native apply's pipeline: one batch in the kernel while the next is read and planned. Batches are made
small here so a short stream spans many; the kernel call is slowed so the planning of the next batch surely
overlaps it. Checked: later batches' writes land after earlier ones' (the same bytes as the Python loop),
metadata is committed only when every planned write is written, and a fault in one batch is raised with the
batches behind it left unwritten."""
from __future__ import annotations

import io
import os
import subprocess
import threading
import time

import pytest

from replicator import delta, kernels
from replicator.delta import DeltaFormatError, apply_stream
from replicator.delta import apply as apply_mod
from replicator.vhdx import VhdxDisk, create_vhdx
from replicator.vhdx.fileio import DirectWriteIO

from .helpers import MemDisk, records
from .test_apply_native import image_bytes, stream_of, with_bad_digests

pytestmark = pytest.mark.skipif(kernels.FrameApplier is None, reason="the native kernels are not active")

MiB = 1 << 20
SIZE = 64 * MiB


class Watch:
    """Counts frames planned and frames the kernel finished, and whether planning ever ran while a batch
    was in the kernel; end_planned_writes asserts that nothing planned is unwritten."""

    def __init__(self, monkeypatch, disk):
        self.planned = self.done = self.commits = self.overlapped = 0
        self.in_kernel = threading.Event()
        self.lock = threading.Lock()
        check, plan, end = apply_mod._check, disk.plan_write, disk.end_planned_writes

        def slow_check(applier, batch, *rest):
            self.in_kernel.set()
            try:
                time.sleep(0.03)            # long enough for the next batch to be planned meanwhile
                check(applier, batch, *rest)
            finally:
                self.in_kernel.clear()
            with self.lock:
                self.done += len(batch)

        def watched_plan(offset, length):
            time.sleep(0.003)               # time for a batch just handed over to enter the kernel
            self.overlapped += self.in_kernel.is_set()
            with self.lock:
                self.planned += 1
            return plan(offset, length)

        def watched_end():
            with self.lock:
                assert self.planned == self.done, f"metadata committed with {self.planned - self.done} " \
                                                  "planned frames unwritten"
            self.commits += 1
            end()

        monkeypatch.setattr(apply_mod, "_check", slow_check)
        disk.plan_write, disk.end_planned_writes = watched_plan, watched_end


@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(apply_mod, "BATCH_BYTES", 2 * MiB)
    monkeypatch.setattr(apply_mod, "PARALLEL_FROM", 256 << 10)


def fresh(tmp_path, name: str) -> str:
    path = str(tmp_path / name)
    create_vhdx(path, SIZE, block_size=MiB).close()
    return path


def ops_rewriting_earlier_batches():
    """1 MiB frames, two per batch; every range is written again three batches later with other bytes
    (never within one batch, so only the order of the batches keeps the later bytes), a ZERO and a TRIM
    among them."""
    ops = []
    for i in range(16):
        ops.append(("data", (i % 6) * 2 * MiB, os.urandom(64) * (MiB // 64)))
        if i == 7:
            ops.append(("zero", 3 * MiB, MiB))
        if i == 11:
            ops.append(("trim", 20 * MiB, 2 * MiB))
    return ops


def test_later_batches_land_after_earlier_ones_and_metadata_waits_for_the_data(tmp_path, monkeypatch,
                                                                               small_batches):
    stream = stream_of(ops_rewriting_earlier_batches(), 2)
    shadow = MemDisk(SIZE)
    apply_stream(io.BytesIO(stream), shadow)
    path = fresh(tmp_path, "d.vhdx")
    with VhdxDisk.open(path, read_only=False, io_factory=DirectWriteIO) as disk:
        watch = Watch(monkeypatch, disk)
        rooms = iter(([True] * 7 + [False]) * 100)       # the log's room runs out now and then
        disk.planned_room = lambda: next(rooms)
        stats = apply_stream(io.BytesIO(stream), disk)
        disk.flush()
    assert stats.native
    assert watch.overlapped >= 3, "the next batch was never planned while one was in the kernel"
    assert watch.commits >= 4 and watch.planned == watch.done == 16
    assert image_bytes(path) == bytes(shadow.buf)
    subprocess.run(["qemu-img", "check", "-f", "vhdx", path], check=True, capture_output=True)


def test_a_fault_in_one_batch_is_raised_and_the_batches_behind_it_are_not_written(tmp_path, monkeypatch,
                                                                                  small_batches):
    ops = [("data", i * 2 * MiB, os.urandom(64) * (MiB // 64)) for i in range(12)]
    stream = stream_of(ops, 2)
    assert [f.kind for f in delta.DeltaDecoder(io.BytesIO(stream))] == [delta.FrameKind.ZSTD] * 12
    bad = with_bad_digests(stream, [6])                    # batch 4 (frames 7 and 8), its first frame
    path = fresh(tmp_path, "d.vhdx")
    with VhdxDisk.open(path, read_only=False, io_factory=DirectWriteIO) as disk:
        watch = Watch(monkeypatch, disk)
        with pytest.raises(DeltaFormatError, match=r"^delta frame 7 at offset \d+ .*XXH3-128"):
            apply_stream(io.BytesIO(bad), disk)
    assert watch.overlapped >= 1
    got = image_bytes(path)
    for _, off, data in ops[:6]:                 # the batches before the fault
        assert got[off:off + len(data)] == data
    for _, off, data in ops[8:]:                 # planned behind it, never written
        assert got[off:off + len(data)] == bytes(len(data))


def test_a_batch_that_failed_in_the_kernel_comes_before_a_fault_the_reader_meets_later(tmp_path, monkeypatch,
                                                                                      small_batches):
    """Batch 2 (frames 3 and 4) fails its digest check in the kernel and is over before the reader meets a
    truncated frame 6 in the batch being planned: the error raised is frame 3's, as the Python loop's
    would be, not the later one."""
    ops = [("data", i * 2 * MiB, os.urandom(64) * (MiB // 64)) for i in range(8)]
    bad = with_bad_digests(stream_of(ops, 2), [2])
    frames = [r for r in records(bad) if r[0] == "frame"]
    bad = bad[:frames[5][1] + 10]                          # frame 6 ends inside its header
    path = fresh(tmp_path, "d.vhdx")
    with VhdxDisk.open(path, read_only=False, io_factory=DirectWriteIO) as disk:
        plan = disk.plan_write

        def slow_plan(offset, length):                     # frame 5 is planned once batch 2 is over
            if offset == ops[4][1]:
                time.sleep(0.3)
            return plan(offset, length)
        disk.plan_write = slow_plan
        with pytest.raises(DeltaFormatError, match=r"^delta frame 3 at offset \d+ .*XXH3-128"):
            apply_stream(io.BytesIO(bad), disk)
    got = image_bytes(path)
    for _, off, data in ops[:2]:
        assert got[off:off + len(data)] == data
    for _, off, data in ops[4:]:
        assert got[off:off + len(data)] == bytes(len(data))

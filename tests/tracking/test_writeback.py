"""When the export writes the guest's data back itself (tracking/writeback.py): the kernel's background
threshold read as mm/page-writeback.c reckons it, and a real export that leaves a busy guest's data to the
kernel and writes it back once the guest is quiet."""
from __future__ import annotations

import time

import pytest

from replicator.tracking import writeback
from replicator.tracking.remote import ExportHandle

from .helpers import MiB, make_vhdx, qemu_io, tracked, wait_until

GiB = 1 << 30

MEMINFO = """MemTotal:       24576000 kB
MemFree:        20000000 kB
MemAvailable:   23000000 kB
Active(file):     600000 kB
Inactive(file):   400000 kB
Dirty:            105000 kB
Writeback:          5000 kB
HugePages_Total:       0
"""


def test_meminfo_is_read_in_bytes():
    m = writeback.parse_meminfo(MEMINFO)
    assert m["MemFree"] == 20000000 * 1024 and m["Dirty"] == 105000 * 1024
    assert m["HugePages_Total"] == 0                 # a count, not kB
    with open("/proc/meminfo") as f:                 # this host's, as the export reads it
        live = writeback.parse_meminfo(f.read())
    assert live["MemTotal"] > live["MemFree"] > 0 and "Dirty" in live


def test_the_background_threshold_is_the_ratio_of_dirtyable_memory_or_the_bytes_set():
    m = writeback.parse_meminfo(MEMINFO)
    dirtyable = (20000000 + 600000 + 400000) * 1024
    assert writeback.background_threshold(m, 0, 10) == dirtyable // 10
    assert writeback.background_threshold(m, 256 * MiB, 10) == 256 * MiB      # _bytes wins when set
    assert writeback.pressure(m, 0, 10) == pytest.approx(110000 * 1024 / (dirtyable // 10))
    assert writeback.pressure(m, 0, 0) > 1e6                                   # ratio 0: any dirty page is pressure
    assert 0 <= writeback.host_pressure()


def test_a_memory_limited_cgroup_keeps_the_steps(tmp_path):
    """Under a cgroup v2 memory limit the kernel throttles at the group's own thresholds: the export then
    writes back in steps whatever the host's figures say."""
    svc = tmp_path / "system.slice" / "replicatord.service"
    svc.mkdir(parents=True)
    (tmp_path / "system.slice" / "memory.max").write_text("max\n")
    (svc / "memory.max").write_text("max\n")
    cgroup = "0::/system.slice/replicatord.service\n"
    assert not writeback.memory_limited(cgroup, str(tmp_path))
    (tmp_path / "system.slice" / "memory.max").write_text("2147483648\n")       # a parent's limit counts
    assert writeback.memory_limited(cgroup, str(tmp_path))
    assert not writeback.memory_limited("0::/\n", str(tmp_path))                 # the root group: no limit
    assert not writeback.memory_limited("4:memory:/x\n", str(tmp_path))          # cgroup v1 only
    assert not writeback.memory_limited("0::/../../etc\n", str(tmp_path))        # nothing outside the root
    assert not writeback.memory_limited("0::/nowhere\n", str(tmp_path))          # no such group
    with open("/proc/self/cgroup") as f:                                        # this host's, as read
        writeback.memory_limited(f.read())


@pytest.mark.parametrize("unsynced,quiet,host,expected", [
    (0, 10.0, 1.0, False),                      # nothing written: nothing to do
    (4096, 1.0, 0.0, True),                     # a quiet guest's data goes back at once
    (writeback.STEP * 8, 0.2, 0.0, False),      # a busy guest on a host without pressure: the kernel's
    (writeback.STEP - 1, 0.2, 0.9, False),      # under pressure, in steps
    (writeback.STEP, 0.2, writeback.PRESSURE, True),
])
def test_when_a_disk_is_due(unsynced, quiet, host, expected):
    assert writeback.due(unsynced, quiet, host) is expected


def test_a_disk_being_copied_goes_back_in_steps_without_pressure():
    assert writeback.due(writeback.STEP, 0.2, 0.0, copying=True)
    assert not writeback.due(writeback.STEP - 1, 0.2, 0.0, copying=True)


def test_a_busy_guests_data_is_left_to_the_kernel_and_written_back_when_it_is_quiet(tmp_path):
    if writeback.host_pressure() >= writeback.PRESSURE / 2:
        pytest.skip("this host's dirty page cache is near the kernel's background threshold already")
    disk = make_vhdx(tmp_path / "d0.vhdx", 128 * MiB)
    tracked(disk).close()
    run = tmp_path / "run"
    run.mkdir()
    h = ExportHandle("vm1", {"d0.vhdx": disk}, str(run)).start()
    try:
        written = 3 * writeback.STEP // 2
        qemu_io(h.uri("d0.vhdx"), f"write -P 0x6b 0 {written}", cache="writeback")
        t = time.monotonic()
        unsynced = h.control.call("status")["d0.vhdx"]["unsynced"]
        if time.monotonic() - t < writeback.QUIET * 0.8:      # asked before the guest counted as quiet
            assert unsynced >= written, "a busy guest's data was written back without memory pressure"
        wait_until(lambda: h.control.call("status")["d0.vhdx"]["unsynced"] == 0, timeout=10,
                   what="the quiet guest's data written back")
    finally:
        h.shutdown()

"""Logs written to memory (tracking/memlogs.py) on the host's real tmpfs: a new log goes to memory while the
budget allows, moves to disk while it is written once the host's logs outgrow it, and every sealed log --
in memory, moved, or kept over a clean stop -- replays onto the replica to exactly the disk as of its cut."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

import pytest

from replicator.hrl import HrlReader, HrlWriter, apply_chain
from replicator.tracking.memlogs import MemoryLogs, parse_budget
from replicator.tracking.tracker import TrackedDisk
from replicator.vhdx import VhdxDisk

from replicator.tracking.remote import ExportHandle

from ..processes import alive
from .helpers import KiB, MiB, copy_file, make_vhdx, pattern, qemu_io, read_vhdx, tracked, wait_until

SIZE = 32 * MiB
REGION = 256 * KiB
SHM = "/dev/shm"


@pytest.fixture
def shm_root():
    if not os.path.isdir(SHM):
        pytest.skip("no /dev/shm on this host")
    root = os.path.join(SHM, f"replicator-test-{uuid.uuid4().hex[:12]}")
    os.mkdir(root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _replay(tmp_path, base: str, sealed, image: bytes) -> None:
    replica = copy_file(base, tmp_path / f"replica-{uuid.uuid4().hex[:6]}.vhdx")
    with VhdxDisk.open(replica, read_only=False) as rep:
        apply_chain(rep, [s.path for s in sealed])
    assert read_vhdx(replica) == image


def _disk(tmp_path):
    path = make_vhdx(tmp_path / "disk.vhdx", SIZE, fill=[(0, pattern(1, 4 * MiB))])
    return path, copy_file(path, tmp_path / "base.vhdx")


def _entries(path: str):
    """Every write a log records, with its data (checksums verified)."""
    with HrlReader(path) as r:
        return [(w.offset, w.length, r.read_data(w)) for w in r.writes]


# ---------------------------------------------------------------------------------------------- the writer
@pytest.mark.parametrize("background", [False, True])
def test_a_log_moved_while_written_reads_as_if_it_never_moved(tmp_path, shm_root, background):
    mem, disk = os.path.join(shm_root, "a.hrl"), str(tmp_path / "a.hrl")
    plain = HrlWriter(str(tmp_path / "plain.hrl"), background=background)
    moving = HrlWriter(mem, background=background)
    writes = [(i * 8 * KiB, pattern(i, 4 * KiB if i % 3 else 300 * KiB)) for i in range(60)]
    for n, (off, data) in enumerate(writes):
        for w in (plain, moving):
            w.append(off, data)
            if n == 20:
                w.append_zeroes(8 * MiB, 3 * MiB)     # a hole in the middle of the move
        if n == 10:
            moving.spill_to(disk)
    plain.seal()
    moving.seal()
    assert moving.spilled and moving.path == disk
    assert not os.path.exists(mem), "the memory copy outlived the move"
    entries = _entries(disk)
    assert entries == _entries(plain.path), "the moved log's entries differ from the same log never moved"
    assert len(entries) == 61 and entries[21][:2] == (8 * MiB, 3 * MiB)
    with HrlReader(plain.path) as pa, HrlReader(disk) as pb:
        assert pb.header.eol_location == os.path.getsize(disk) == pa.header.eol_location
    # the 3 MiB of logged zeros did not become 3 MiB of written zeros
    assert os.stat(disk).st_blocks * 512 < os.path.getsize(disk) - 2 * MiB


def test_sealing_in_the_middle_of_a_move_finishes_it(tmp_path, shm_root):
    mem, disk = os.path.join(shm_root, "b.hrl"), str(tmp_path / "b.hrl")
    w = HrlWriter(mem, background=True)
    for i in range(40):
        w.append(i * MiB, pattern(i, 512 * KiB))     # 20 MiB before the move: one write copies 1 MiB of it
    w.spill_to(disk)
    w.append(0, pattern(99, 4 * KiB))
    header = w.seal()
    assert w.path == disk and not os.path.exists(mem)
    with HrlReader(disk) as r:
        assert r.header.unique_id == header.unique_id
        assert len(list(r.writes)) == 41


def test_a_move_given_up_leaves_no_half_copy(tmp_path, shm_root):
    mem, disk = os.path.join(shm_root, "c.hrl"), str(tmp_path / "c.hrl")
    w = HrlWriter(mem, background=True)
    for i in range(40):
        w.append(i * MiB, pattern(i, 512 * KiB))
    w.spill_to(disk)
    w.close(discard=True)
    w.join()
    assert not os.path.exists(disk)


def test_a_move_that_cannot_be_made_leaves_the_log_where_it_is(tmp_path, shm_root):
    mem = os.path.join(shm_root, "d.hrl")
    w = HrlWriter(mem, background=True)
    w.append(0, pattern(1, 64 * KiB))
    w.spill_to(str(tmp_path / "no-such-folder" / "d.hrl"))
    w.append(MiB, pattern(2, 64 * KiB))
    w.seal()
    assert not w.spilled and "cannot create log" in w.spill_error
    assert w.path == mem
    assert [(o, len(d)) for o, _, d in _entries(mem)] == [(0, 64 * KiB), (MiB, 64 * KiB)]


# ---------------------------------------------------------------------------------------------- the tracker
def test_logs_live_in_memory_and_go_when_acknowledged(tmp_path, shm_root):
    path, base = _disk(tmp_path)
    memory = MemoryLogs.open(1 << 30, shm_root)
    t = tracked(path, region_size=REGION, memory=memory)
    try:
        assert t.log_in_memory
        t.write(1 * MiB + 100, pattern(3, 3 * MiB))
        image = t.read(0, SIZE)
        sealed = t.cut()
        assert os.path.dirname(sealed.path) == t.state.memory_dir != t.sidecar.logs_dir
        assert t.log_path(os.path.basename(sealed.path)) == sealed.path
        assert memory.measure() >= 3 * MiB
        _replay(tmp_path, base, [sealed], image)
        t.acknowledge(sealed.unique_id)
        assert not os.path.exists(sealed.path)
        assert not os.path.exists(os.path.join(t.state.memory_dir, "spare.hrl")), "memory kept for a spare"
        assert not os.path.exists(os.path.join(t.sidecar.logs_dir, "spare.hrl"))
    finally:
        t.close()


def test_over_budget_the_active_log_moves_to_disk_and_new_logs_start_there(tmp_path, shm_root):
    path, base = _disk(tmp_path)
    memory = MemoryLogs.open(2 * MiB, shm_root)
    t = tracked(path, region_size=REGION, memory=memory, log_thread=True)
    try:
        t.write(0, pattern(4, 3 * MiB))
        t.flush()
        t.log.commit(durable=True)               # the writes reached the memory file (the spool is drained)
        assert memory.measure() > memory.budget
        t.spill_log()                             # what the export does when it measured that
        for i in range(8):
            t.write(10 * MiB + i * 64 * KiB, pattern(10 + i, 64 * KiB))
        image = t.read(0, SIZE)
        first = t.cut()
        assert os.path.dirname(first.path) == t.sidecar.logs_dir, "the log did not move to disk"
        assert not [n for n in os.listdir(t.state.memory_dir) if n.endswith(".hrl")]
        assert not t.log_in_memory, "a log started in memory while the budget was spent"
        memory.measure()
        assert memory.room > 0
        t.write(20 * MiB, pattern(30, 1 * MiB))
        image2 = t.read(0, SIZE)
        second = t.cut()
        assert os.path.dirname(second.path) == t.sidecar.logs_dir
        assert t.log_in_memory, "the budget has room again, but the new log is on disk"
        t.write(24 * MiB, pattern(31, 3 * MiB))
        t.flush()
        t.log.commit(durable=True)
        memory.measure()
        image3 = t.read(0, SIZE)
        third = t.cut()
        assert os.path.dirname(third.path) == t.state.memory_dir
        assert not t.log_in_memory and os.path.dirname(t.log.path) == t.sidecar.logs_dir
        _replay(tmp_path, base, [first], image)
        _replay(tmp_path, base, [first, second], image2)
        _replay(tmp_path, base, [first, second, third], image3)
    finally:
        t.close()


def test_a_clean_stop_keeps_pending_memory_logs_on_disk(tmp_path, shm_root):
    path, base = _disk(tmp_path)
    memory = MemoryLogs.open(1 << 30, shm_root)
    t = tracked(path, region_size=REGION, memory=memory, log_thread=True)
    mem_dir = t.state.memory_dir
    t.write(5 * MiB, pattern(5, 1 * MiB))
    t.cut()
    t.write(7 * MiB, pattern(6, 200 * KiB))
    image = t.read(0, SIZE)
    t.close()
    assert not os.path.exists(mem_dir), "the disk's memory directory outlived a clean stop"
    # as after a reboot: nothing in memory, no memory budget; the chain is whole, no resync
    t = TrackedDisk(path, region_size=REGION)
    try:
        assert not t.resync_required, t.reason
        paths = [t.log_path(r.name) for r in t.state.sealed_logs]
        assert len(paths) == 2 and all(os.path.dirname(p) == t.sidecar.logs_dir for p in paths)
        replica = copy_file(base, tmp_path / "replica.vhdx")
        with VhdxDisk.open(replica, read_only=False) as rep:
            apply_chain(rep, paths)
        assert read_vhdx(replica) == image
    finally:
        t.close()


def test_logs_lost_with_the_memory_mean_a_resync(tmp_path, shm_root):
    """A crash of the host loses the memory: the sealed logs it held are gone, and the next open must say so
    (the chain is broken), never ship a shorter chain."""
    path, _ = _disk(tmp_path)
    memory = MemoryLogs.open(1 << 30, shm_root)
    t = tracked(path, region_size=REGION, memory=memory)
    t.write(5 * MiB, pattern(5, 1 * MiB))
    t.cut()
    t.sidecar.save(t.state)
    mem_dir = t.state.memory_dir
    state = t.state
    t.disk.close()                        # no clean stop: as a killed export leaves it
    t.sidecar.close()
    shutil.rmtree(mem_dir)                # and then the host went down
    t = TrackedDisk(path, region_size=REGION, memory=MemoryLogs.open(1 << 30, shm_root))
    try:
        assert t.resync_required
        assert state.sealed_logs
    finally:
        t.close()


def test_budget_parsing():
    assert parse_budget("0") == 0
    assert parse_budget("2G") == 2 << 30
    assert parse_budget("512M") == 512 << 20
    assert parse_budget("auto") >= 0
    with pytest.raises(ValueError):
        parse_budget("lots")


def test_a_shared_directory_not_private_to_us_is_refused(shm_root):
    os.mkdir(os.path.join(shm_root, f"replicator-logs-{os.getuid()}"), 0o777)
    os.chmod(os.path.join(shm_root, f"replicator-logs-{os.getuid()}"), 0o777)
    with pytest.raises(ValueError, match="not a directory private"):
        MemoryLogs.open(1 << 30, shm_root)


# ---------------------------------------------------------------------------------------------- the export
@pytest.fixture
def tracked_disk(tmp_path):
    path = make_vhdx(tmp_path / "d0.vhdx", 64 * MiB, fill=[(0, pattern(1, MiB))])
    tracked(path).close()
    return path


def _export(tmp_path, disk, **kw) -> ExportHandle:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    return ExportHandle("vm1", {"d0.vhdx": disk}, str(run), **kw).start()


def _written(path: str) -> dict[int, bytes]:
    with HrlReader(path) as r:
        return {w.offset: r.read_data(w) for w in r.writes}


def test_the_export_writes_its_logs_to_memory_and_keeps_them_over_a_clean_stop(tmp_path, tracked_disk, shm_root):
    h = _export(tmp_path, tracked_disk, memory_logs=64 * MiB, memory_root=shm_root)
    try:
        qemu_io(h.uri("d0.vhdx"), f"write -P 0x5a {4 * MiB} {MiB}")
        sealed, = h.cut()
        d = h.disks["d0.vhdx"]
        assert sealed.path.startswith(shm_root + "/") and sealed.path.startswith(d.state.memory_dir)
        assert d.sidecar.log_path(os.path.basename(sealed.path), d.state.memory_dir) == sealed.path
        assert b"".join(_written(sealed.path).values()) == b"\x5a" * MiB
        qemu_io(h.uri("d0.vhdx"), f"write -P 0x6b {8 * MiB} 4096")
        mem_dir = d.state.memory_dir
    finally:
        assert h.detach() is True
    wait_until(lambda: not alive(h.pid), what="the export stops")
    assert not os.path.exists(mem_dir)
    t = TrackedDisk(tracked_disk)             # as after a reboot: the pending logs are on disk
    try:
        assert not t.resync_required, t.reason
        logs = [t.log_path(r.name) for r in t.state.sealed_logs]
        assert len(logs) == 3           # the fixture's clean stop, the cut, the export's clean stop
        assert [os.path.dirname(p) for p in logs] == [t.sidecar.logs_dir] * 3
        assert b"".join(_written(logs[1]).values()) == b"\x5a" * MiB
        assert _written(logs[2]) == {8 * MiB: b"\x6b" * 4096}
    finally:
        t.close()


def test_the_export_moves_its_log_to_disk_once_over_budget(tmp_path, tracked_disk, shm_root):
    h = _export(tmp_path, tracked_disk, memory_logs=2 * MiB, memory_root=shm_root)
    try:
        qemu_io(h.uri("d0.vhdx"), f"write -P 0x11 {4 * MiB} {4 * MiB}")
        d = h.disks["d0.vhdx"]
        on_disk = os.path.join(d.sidecar.logs_dir, d.state.active_log)
        wait_until(lambda: os.path.exists(on_disk), what="the export moves the log to disk (it measures twice a second)")
        qemu_io(h.uri("d0.vhdx"), f"write -P 0x22 {16 * MiB} {MiB}")
        sealed, = h.cut()
        assert sealed.path == on_disk
        assert not any(n.endswith(".hrl") for n in os.listdir(d.state.memory_dir))
        got = _written(sealed.path)
        assert b"".join(v for k, v in sorted(got.items()) if k < 16 * MiB) == b"\x11" * (4 * MiB)
        assert b"".join(v for k, v in sorted(got.items()) if k >= 16 * MiB) == b"\x22" * MiB
        buf = bytearray(MiB)
        d.disk.readinto(16 * MiB, buf)
        assert bytes(buf) == b"\x22" * MiB
    finally:
        h.shutdown()


def test_a_full_tmpfs_moves_the_log_to_disk_at_once(tmp_path):
    """A real tmpfs of 1 MiB (mounted for the test; root only): the append that finds it full moves the log
    to its overflow path and is written there; nothing is lost, the log is not given up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small-tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        w = HrlWriter(str(mnt / "e.hrl"), background=True, overflow=str(tmp_path / "e.hrl"))
        writes = [(i * MiB, pattern(i, 192 * KiB)) for i in range(12)]     # 2.3 MiB: twice the tmpfs
        for off, data in writes:
            w.append(off, data)
        w.seal()
        assert w.spilled and w.path == str(tmp_path / "e.hrl") and not os.listdir(mnt)
        assert [(o, d) for o, _, d in _entries(w.path)] == writes
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_recorded_memory_folder_is_never_trusted(tmp_path, shm_root):
    """state.json names the memory folder of the last run; after a reboot that name is anyone's to take.
    A forged log put there is not read: the chain is checked against logs/ (and the folder is not used)."""
    path, _ = _disk(tmp_path)
    t = tracked(path, region_size=REGION, memory=MemoryLogs.open(1 << 30, shm_root))
    t.write(5 * MiB, pattern(5, 1 * MiB))
    t.cut()
    recorded = t.memory.dir_for(t.sidecar.dir)
    t.close()
    assert t.state.memory_dir is None
    state = json.loads(open(t.sidecar.state_path).read())
    state["memory_dir"] = recorded            # as if the clean stop had left it (an older state)
    with open(t.sidecar.state_path, "w") as f:
        json.dump(state, f)
    os.makedirs(recorded, exist_ok=True)
    for rec in state["sealed_logs"]:          # forged logs under the real names
        with open(os.path.join(recorded, rec["name"]), "wb") as f:
            f.write(b"not a log" * 100)
    t = TrackedDisk(path, region_size=REGION)     # memory logs off this time
    try:
        assert not t.resync_required, t.reason
        assert t.state.memory_dir is None
        assert all(os.path.dirname(t.log_path(r.name)) == t.sidecar.logs_dir for r in t.state.sealed_logs)
        t.begin_resync()                       # cleans its own folders only
        t.run_deferred()
        assert sorted(os.listdir(recorded)) == sorted(r["name"] for r in state["sealed_logs"])
    finally:
        t.close()


def test_auto_is_nothing_in_a_memory_limited_cgroup(tmp_path):
    """tmpfs pages count against a cgroup's memory limit, v2 (memory.max) or v1 (memory.limit_in_bytes)."""
    from replicator.tracking.memlogs import auto_budget, limited_v1
    from replicator.tracking.writeback import memory_limited
    grp = tmp_path / "process_api" / "abc"
    grp.mkdir(parents=True)
    (tmp_path / "process_api" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (grp / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    cgroup = "9:name=systemd:/\n4:memory:/process_api/abc\n0::/\n"
    assert not limited_v1(cgroup, str(tmp_path))
    (tmp_path / "process_api" / "memory.limit_in_bytes").write_text("4294967296\n")    # a parent's limit counts
    assert limited_v1(cgroup, str(tmp_path))
    assert not limited_v1("4:memory:/../../etc\n", str(tmp_path))
    assert not limited_v1("0::/\n", str(tmp_path))
    with open("/proc/self/cgroup") as f:          # this host, as the export reads it
        here = f.read()
    assert (auto_budget() == 0) == (limited_v1(here) or memory_limited(here) or not os.path.isdir(SHM))


def test_the_folders_of_disks_that_are_gone_are_swept(tmp_path, shm_root):
    """An export killed, its disk then deleted: nobody opens that disk again to clean its memory folder, so
    the next export to start on the host removes it. The folders of disks that exist stay."""
    gone, kept = tmp_path / "gone.vhdx.rpl", tmp_path / "kept.vhdx.rpl"
    gone.mkdir()
    kept.mkdir()
    memory = MemoryLogs.open(1 << 30, shm_root)
    g, k = memory.dir_for(str(gone)), memory.dir_for(str(kept))
    for folder in (g, k):
        with open(os.path.join(folder, "00000001.hrl"), "wb") as f:
            f.write(b"x" * 8192)
    making = os.path.join(memory.dir, "f" * 24)       # another export making its folder: no owner yet
    os.mkdir(making)
    shutil.rmtree(gone)
    assert MemoryLogs.open(1 << 30, shm_root).measure() >= 8192
    assert not os.path.exists(g) and os.listdir(k) and os.path.isdir(making)

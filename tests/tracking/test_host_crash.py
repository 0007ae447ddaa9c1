"""Host-crash detection: the dirty bit set before a region's first write reaches only the page cache, so a
tracker left unclean in the same boot (a crash of our process) trusts its bitmap, while one left unclean
under another boot_id (the host went down) compares every region. A clean stop fdatasyncs the bitmap and
vouches for it after a reboot too."""
from __future__ import annotations

import json
import os
import uuid

import numpy as np

from replicator.tracking import TrackedDisk
from replicator.tracking.state import Sidecar, current_boot_id

from .helpers import KiB, MiB, extents_as_ranges, make_vhdx, pattern, tracked

SIZE = 16 * MiB
REGION = 256 * KiB
N_REGIONS = SIZE // REGION
WRITES = [(1 * MiB + 100, 5000), (4 * MiB - 700, 1400), (9 * MiB, 64 * KiB)]    # the second crosses a region
HOST_DOWN = "the host went down"


def written_regions() -> set[int]:
    out = set()
    for off, n in WRITES:
        out.update(range(off // REGION, (off + n - 1) // REGION + 1))
    return out


def state_json(path) -> dict:
    with open(Sidecar(str(path)).state_path) as f:
        return json.load(f)


def edit_state(path, change) -> None:
    """Rewrite state.json as another boot (or an older version of the tracker) would have left it."""
    sc = Sidecar(str(path))
    with open(sc.state_path) as f:
        raw = json.load(f)
    change(raw)
    with open(sc.state_path, "w") as f:
        json.dump(raw, f)


def abandon(t: TrackedDisk) -> None:
    """The tracker's process 'dies': its file descriptors go away, nothing else runs (no close())."""
    t.sidecar.close()
    if t.log is not None:
        t.log.close()
    t.disk.io.close()


def unclean(tmp_path) -> str:
    """A tracked disk (replica level with it), then the WRITES, then abandoned without a clean stop."""
    path = make_vhdx(tmp_path / "disk.vhdx", SIZE, fill=[(0, pattern(1, SIZE))])
    t = tracked(path, region_size=REGION)
    assert t.dirty_extents() == []
    for k, (off, n) in enumerate(WRITES):
        t.write(off, pattern(10 + k, n))
    abandon(t)
    st = state_json(path)
    assert st["clean"] is False and st["boot_id"] == current_boot_id()
    return path


def dirty_regions(t: TrackedDisk) -> set[int]:
    return {int(i) for i in np.flatnonzero(t.dirty)}


def persisted_regions(path) -> set[int]:
    return {int(i) for i in np.flatnonzero(Sidecar(str(path)).load_bitmap(N_REGIONS))}


def test_boot_id_is_recorded_at_open(tmp_path):
    path = make_vhdx(tmp_path / "disk.vhdx", SIZE)
    boot = current_boot_id()
    assert boot and str(uuid.UUID(boot)) == boot
    t = tracked(path, region_size=REGION)
    st = state_json(path)
    assert st["boot_id"] == boot and st["clean"] is False
    t.close()
    edit_state(path, lambda raw: raw.update(boot_id=str(uuid.uuid4())))
    t = TrackedDisk(path, region_size=REGION)
    assert state_json(path)["boot_id"] == boot                     # the open records this boot again
    t.close()


def test_process_crash_in_the_same_boot_trusts_the_bitmap(tmp_path):
    path = unclean(tmp_path)
    t = TrackedDisk(path, region_size=REGION)
    assert t.resync_required and "not closed cleanly" in t.reason and HOST_DOWN not in t.reason, t.reason
    assert dirty_regions(t) == written_regions()
    t.close()


def test_host_crash_makes_every_region_dirty(tmp_path):
    path = unclean(tmp_path)
    other = str(uuid.uuid4())
    edit_state(path, lambda raw: raw.update(boot_id=other))
    t = TrackedDisk(path, region_size=REGION)
    assert t.resync_required and t.reason.startswith(HOST_DOWN), t.reason
    assert t.dirty.all() and t.dirty_extents() == [(0, SIZE)]
    assert persisted_regions(path) == set(range(N_REGIONS))       # durable before the first write
    st = state_json(path)
    assert st["boot_id"] == current_boot_id() and st["state"] == "resync_required"
    assert st["reason"].startswith(HOST_DOWN)
    t.close()
    # the reason and the regions survive a clean stop and a reopen (now in this boot)
    t = TrackedDisk(path, region_size=REGION)
    assert t.resync_required and t.reason.startswith(HOST_DOWN), t.reason
    assert t.dirty.all()
    t.resync_done()
    assert not t.resync_required and t.dirty_extents() == []
    t.close()


def test_host_crash_while_resync_already_required_still_distrusts_the_bitmap(tmp_path):
    path = unclean(tmp_path)
    t = TrackedDisk(path, region_size=REGION)                       # resync required, bitmap trusted
    assert t.resync_required and dirty_regions(t) == written_regions()
    t.write(12 * MiB, pattern(20, 4096))
    abandon(t)
    edit_state(path, lambda raw: raw.update(boot_id=str(uuid.uuid4())))
    t = TrackedDisk(path, region_size=REGION)
    assert t.resync_required and t.dirty.all()
    t.close()


def test_clean_stop_vouches_for_the_bitmap_after_a_reboot(tmp_path):
    path = make_vhdx(tmp_path / "disk.vhdx", SIZE, fill=[(0, pattern(1, SIZE))])
    t = tracked(path, region_size=REGION)
    for k, (off, n) in enumerate(WRITES):
        t.write(off, pattern(10 + k, n))
    t.close()
    edit_state(path, lambda raw: raw.update(boot_id=str(uuid.uuid4())))
    t = TrackedDisk(path, region_size=REGION)
    assert not t.resync_required, t.reason
    assert dirty_regions(t) == written_regions()                    # the pending log's regions, no more
    assert {r for off, end in extents_as_ranges(t.dirty_extents()) for r in range(off // REGION, end // REGION)} \
        == written_regions()
    t.close()


def test_clean_stop_fdatasyncs_the_bitmap(tmp_path, monkeypatch):
    path = make_vhdx(tmp_path / "disk.vhdx", SIZE, fill=[(0, pattern(1, SIZE))])
    t = tracked(path, region_size=REGION)
    t.write(WRITES[0][0], pattern(10, WRITES[0][1]))
    bitmap_fd = t.sidecar._bitmap_fd
    assert bitmap_fd >= 0
    synced = []
    real = os.fdatasync

    def watching(fd):
        synced.append(fd)
        return real(fd)
    monkeypatch.setattr(os, "fdatasync", watching)
    t.close()
    assert bitmap_fd in synced, "a clean stop did not fdatasync the dirty bitmap"


def test_state_without_boot_id_behaves_as_before(tmp_path):
    path = unclean(tmp_path)
    edit_state(path, lambda raw: raw.pop("boot_id"))
    assert "boot_id" not in state_json(path)
    t = TrackedDisk(path, region_size=REGION)
    assert t.resync_required and "not closed cleanly" in t.reason and HOST_DOWN not in t.reason, t.reason
    assert dirty_regions(t) == written_regions()
    assert state_json(path)["boot_id"] == current_boot_id()
    t.close()


def test_first_write_to_a_region_marks_the_bitmap_without_fdatasync(tmp_path, monkeypatch):
    # every block allocated beforehand: the write itself needs no metadata update of the VHDX
    path = make_vhdx(tmp_path / "disk.vhdx", SIZE, fill=[(0, pattern(1, SIZE))])
    t = tracked(path, region_size=REGION)
    t.write(0, pattern(2, 4096))             # the log's first writes and the bitmap's fd are behind us
    bitmap_path = t.sidecar.bitmap_path
    seen_at_write = []
    real_write = t.disk.write

    def observing_write(offset, data):
        with open(bitmap_path, "rb") as f:                          # a fresh open: what another process sees
            raw = f.read()
        seen_at_write.append({int(i) for i in np.flatnonzero(np.unpackbits(np.frombuffer(raw, dtype=np.uint8),
                                                                           bitorder="little"))})
        return real_write(offset, data)
    monkeypatch.setattr(t.disk, "write", observing_write)
    syncs = []
    real_fdatasync, real_fsync = os.fdatasync, os.fsync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(("fdatasync", fd)), real_fdatasync(fd))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (syncs.append(("fsync", fd)), real_fsync(fd))[1])

    region = 5
    assert not t.dirty[region]
    t.write(region * REGION + 1000, pattern(3, 3000))
    assert syncs == [], f"the first write to a clean region flushed something: {syncs}"
    assert region in seen_at_write[-1], "the dirty bit was not in the bitmap file before the write"
    assert t.dirty[region]
    # a write crossing into two clean regions marks both, still without a flush
    t.write(8 * REGION - 512, pattern(4, 1024))
    assert syncs == []
    assert {7, 8} <= seen_at_write[-1]
    monkeypatch.undo()
    t.close()

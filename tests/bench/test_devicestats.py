"""bench/devicestats.py: what reached the disk under a folder, from /proc/diskstats."""
from __future__ import annotations

import os
import shutil
import tempfile

from .helpers import ROOT, bench_module

MiB = 1 << 20


def _module():
    return bench_module("devicestats")


def test_an_fsynced_file_is_counted_on_its_disk():
    """32 MiB written and fsynced in a folder: at least that much reached the disk the folder is on (the
    checkout's: /tmp may be a tmpfs)."""
    ds = _module()
    tmp_path = tempfile.mkdtemp(dir=ROOT, prefix=".devicestats-")
    device = ds.device_of(tmp_path)
    assert device and os.path.exists(f"/sys/block/{device}"), device       # a whole disk, not a partition
    before = ds.sample(device)
    try:
        with open(os.path.join(tmp_path, "f"), "wb") as f:
            f.write(os.urandom(32 * MiB))
            f.flush()
            os.fsync(f.fileno())
        moved = ds.moved(before, ds.sample(device))
    finally:
        shutil.rmtree(tmp_path)
    assert moved["device_written_mib"] >= 32, moved
    assert ds.moved(None, before) == {} and ds.sample("no-such-disk") is None

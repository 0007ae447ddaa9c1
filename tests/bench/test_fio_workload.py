"""An fio job as a copy-frequency workload: fio runs once, its I/O log is replayed with its timing."""
from __future__ import annotations

import numpy as np

from replicator.bench import workloads

MiB = 1 << 20


def test_fio_job_becomes_a_timed_write_workload(tmp_path):
    job = tmp_path / "job.fio"
    job.write_text("[randw]\nrw=randwrite\nbs=16k\nio_size=4m\nfilename=/dev/should-be-replaced\n"
                   "rate=2m\nrandrepeat=1\n")
    w = workloads.parse(f"fio:{job}", disk_size=16 * MiB, rate=0, duration=0)
    assert w.name == "fio" and len(w.t) == 256                 # 4 MiB of 16 KiB writes
    assert np.all(np.diff(w.t) >= 0) and w.t[-1] > 1.0          # rate=2m: about two seconds of I/O
    assert np.all(w.length == 16 * 1024) and np.all(w.offset % (16 * 1024) == 0)
    assert np.all(w.offset + w.length <= 16 * MiB)
    assert len(set(w.offset.tolist())) > 100                   # random, not sequential
    assert len(bytes(w.data(0))) == 16 * 1024

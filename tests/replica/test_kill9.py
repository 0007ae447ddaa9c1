"""kill -9 of the replica process while it applies a cycle: the restarted store completes or discards the
cycle, and its disk then equals the primary before or after that cycle, with the matching generation."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from replicator.replica import ReplicaStore

from .test_store import DISK_ID, SIZE, Primary, replica_bytes, upload

COMMIT = """
import sys
from replicator.replica import ReplicaStore
ReplicaStore(sys.argv[1]).disk(sys.argv[2]).commit(sys.argv[3])
"""


@pytest.mark.parametrize("additional_points", [0, 2])
def test_kill9_during_apply_never_leaves_a_half_applied_cycle(tmp_path, additional_points):
    """With earlier points kept the journal goes through "undo" then "apply"; with none, "apply" only
    (redo from the spool)."""
    base = str(tmp_path / "base")
    rd = ReplicaStore(base).ensure_disk(DISK_ID, SIZE)
    rd.set_retention(additional_points)
    expected = ["undo", "apply"] if additional_points else ["apply"]
    p = Primary(seed=11)
    upload(rd, p.cycle(t=1, n_writes=4))
    old = bytes(p.data)
    stream = p.cycle(t=2, n_writes=60)               # a big cycle: the apply takes a while
    new = bytes(p.data)
    sid = "ab" * 16
    up = rd.open_upload(sid)
    up.write(0, stream)
    up.sync()
    up.close()
    digests = {hashlib.sha256(old).hexdigest(): 1, hashlib.sha256(new).hexdigest(): 2}
    phases = []
    rng = random.Random(5)
    for attempt, target in enumerate(expected * 4):
        work = str(tmp_path / f"w{attempt}")
        shutil.copytree(base, work)
        state = os.path.join(work, "disks", str(DISK_ID), "state.json")
        proc = subprocess.Popen([sys.executable, "-c", COMMIT, work, str(DISK_ID), sid])
        seen = _wait_for_phase(state, target, proc)
        time.sleep(rng.uniform(0, 0.02))                 # somewhere inside that phase
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        phases.append(seen)
        store = ReplicaStore(work)                      # the restart: recovery runs when the disk is opened
        disk = store.disk(DISK_ID)
        got = hashlib.sha256(replica_bytes(disk)).hexdigest()
        assert got in digests, f"killed in {seen}: the replica is neither before nor after the cycle"
        assert disk.generation == digests[got] and disk.state.journal is None
        if disk.generation == 1:                        # not applied yet: committing again completes it
            disk.commit(sid)
            assert replica_bytes(disk) == new
        shutil.rmtree(work)
    # a kill may miss (the commit ended first, as on a busy machine); each phase must still have been hit
    assert set(expected) <= set(phases), f"kills did not land inside the journal: {phases}"


def _wait_for_phase(state_path: str, phase: str, proc, timeout: float = 60.0):
    """Poll the store's state until its journal reaches `phase` (or the commit ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with open(state_path) as f:
                journal = json.load(f)["journal"]
        except (OSError, ValueError):
            continue
        if journal and journal["phase"] == phase:
            return phase
        time.sleep(0.001)
    return None

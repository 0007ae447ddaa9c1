"""replication_cpus: replicatord's threads on the CPUs it names, the machine's export (the guest's I/O path) on
every CPU replicatord was started with; a reload moves replicatord and leaves the export; a CPU it may not use
is refused in one line."""
from __future__ import annotations

import os
import time

import pytest

from replicator.tracking.nbdclient import NbdClient

from .primary_harness import Daemon

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to keep apart")


def affinities(pid: int) -> set[frozenset]:
    """The distinct CPU sets of a process's threads."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out.add(frozenset(os.sched_getaffinity(int(tid))))
        except OSError:
            pass                    # ended meanwhile
    return out


def until(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_replication_on_its_cpus_and_the_export_on_all(tmp_path):
    started = frozenset(os.sched_getaffinity(0))
    last = max(started)
    d = Daemon(tmp_path, disks=(("d0.vhdx", 16),))
    with open(d.config) as f:
        plain = f.read()
    pinned = plain.replace('state_dir = "state"\n', f'state_dir = "state"\nreplication_cpus = "{last}"\n', 1)
    assert pinned != plain
    with open(d.config, "w") as f:
        f.write(pinned)
    try:
        st = d.start(until="Replicating", timeout=60)
        export = st["export"]["pid"]
        guest = NbdClient(str(tmp_path / "state" / "nbd" / "vm01.sock"), "d0.vhdx")
        guest.pwrite(3 << 20, b"\x5a" * 65536)
        d.run("machine", "vm01", "cycle")            # a cycle's threads are made while pinned: they follow
        assert affinities(d.proc.pid) == {frozenset({last})}
        assert affinities(export) == {started}        # the guest's requests may run on any CPU
        assert d.replica_equals_primary()

        with open(d.config, "w") as f:                # a reload without it: replicatord back on every CPU
            f.write(plain)
        d.run("reload")
        until(lambda: affinities(d.proc.pid) == {started})
        assert d.wait(lambda m: m["state"] == "Replicating")["export"]["pid"] == export
        assert affinities(export) == {started}

        with open(d.config, "w") as f:
            f.write(plain.replace('state_dir = "state"\n', f'state_dir = "state"\nreplication_cpus = "{last + 1}"\n'))
        bad = d.run("reload", check=False)
        assert bad.returncode == 2 and "daemon.replication_cpus: replicatord may run only on CPUs" in bad.stderr
        assert d.proc.poll() is None and affinities(d.proc.pid) == {started}
        with open(d.config, "w") as f:                # the CLI reads the file too
            f.write(plain)
        guest.pwrite(5 << 20, b"\xa5" * 65536)
        guest.close()
        d.run("machine", "vm01", "cycle")
        assert d.replica_equals_primary()
    finally:
        d.stop()

"""replication_cpus: replicatord's threads on the CPUs it names, the machine's export (the guest's I/O path) on
every CPU replicatord was started with, a restarted export too; a reload moves replicatord and leaves the
export; a CPU replicatord may not use is refused by the daemon in one line, at start and at a reload."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from replicator.tracking.nbdclient import NbdClient

from .primary_harness import BIN, Daemon

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


def with_cpus(text: str, cpus: str) -> str:
    out = text.replace('state_dir = "state"\n', f'state_dir = "state"\nreplication_cpus = "{cpus}"\n', 1)
    assert out != text
    return out


def test_replication_on_its_cpus_and_the_export_on_all(tmp_path):
    started = frozenset(os.sched_getaffinity(0))
    last = max(started)
    d = Daemon(tmp_path, disks=(("d0.vhdx", 16),))
    with open(d.config) as f:
        plain = f.read()
    pinned = with_cpus(plain, str(last))
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
        guest.close()

        os.kill(export, signal.SIGKILL)               # the export dies: the one replicatord starts again is
        st = d.wait(lambda m: m["export"]["pid"] not in (None, export), timeout=60)      # the guest's too
        export = st["export"]["pid"]
        assert affinities(export) == {started}
        d.run("machine", "vm01", "resync")            # the disk is marked for one; its threads are pinned too
        d.wait(lambda m: m["state"] == "Replicating" and m["disks"]["d0.vhdx"]["tracking"] == "tracking",
               timeout=60)
        assert affinities(d.proc.pid) == {frozenset({last})}
        guest = NbdClient(str(tmp_path / "state" / "nbd" / "vm01.sock"), "d0.vhdx")   # holds the export

        with open(d.config, "w") as f:                # a CPU it may not use: the daemon refuses the reload
            f.write(with_cpus(plain, str(max(started) + 1)))
        bad = d.run("reload", check=False)
        assert bad.returncode != 0 and "configuration not reloaded" in bad.stderr
        assert f"daemon.replication_cpus: replicatord may run only on CPUs" in bad.stderr
        d.proc.send_signal(signal.SIGHUP)             # and SIGHUP alike
        until(lambda: d.daemon_log().count("daemon.replication_cpus: replicatord may run only on CPUs") >= 1)
        assert d.proc.poll() is None and affinities(d.proc.pid) == {frozenset({last})}

        with open(d.config, "w") as f:                # a reload without it: replicatord back on every CPU
            f.write(plain)
        d.run("reload")
        until(lambda: affinities(d.proc.pid) == {started})
        assert d.wait(lambda m: m["state"] == "Replicating")["export"]["pid"] == export
        assert affinities(export) == {started}
        guest.pwrite(5 << 20, b"\xa5" * 65536)
        guest.close()
        d.run("machine", "vm01", "cycle")
        assert d.replica_equals_primary()
    finally:
        d.stop()


def test_a_cpu_replicatord_may_not_use_is_refused_at_start(tmp_path):
    """Checked against replicatord's own CPUs, not those of the shell that runs the CLI."""
    d = Daemon(tmp_path, disks=(("d0.vhdx", 16),))
    with open(d.config) as f:
        text = f.read()
    with open(d.config, "w") as f:
        f.write(with_cpus(text, str(max(os.sched_getaffinity(0)) + 1)))
    out = subprocess.run([os.path.join(BIN, "replicatord"), "--config", d.config], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "daemon.replication_cpus: replicatord may run only on CPUs" in out.stderr
    with open(d.config, "w") as f:                    # a CPU the service may use, checked from a narrower shell
        f.write(with_cpus(text, str(max(os.sched_getaffinity(0)))))
    narrow = subprocess.run(["taskset", "-c", str(min(os.sched_getaffinity(0))),
                             os.path.join(BIN, "replicatord"), "--config", d.config, "--check-config"],
                            capture_output=True, text=True, timeout=60)
    assert narrow.returncode == 0, narrow.stderr

"""A replicatord pinned to replication_cpus that connects to a per-user libvirt URI (qemu:///session) starts
that user's libvirtd itself when none runs: the daemon, and every guest it starts after, must land on the CPUs
replicatord was started with, not on replication's (a child inherits the affinity of the thread that forks it)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

NOBODY = 65534
CHILD = textwrap.dedent("""
    import os, sys
    from replicator import priority
    from replicator.hypervisor import Hypervisor
    import replicator.hypervisor.libvirt     # imported while /root's interpreter files can still be read
    if os.geteuid() == 0:           # a per-user libvirtd is what an unprivileged user gets: root's goes to the system one
        os.setgroups([])
        os.setgid(%(uid)d)
        os.setuid(%(uid)d)
    priority.pin_replication(frozenset({%(cpu)d}))
    assert os.sched_getaffinity(0) == {%(cpu)d}
    hv = Hypervisor.open("qemu:///session")
    print("connected", flush=True)
    sys.stdin.readline()            # connected until the test has looked
    hv.close()
""")


def _daemons_of(runtime_dir: str) -> list[int]:
    """The processes whose environment names this XDG_RUNTIME_DIR: the session libvirtd the child started."""
    mark = f"XDG_RUNTIME_DIR={runtime_dir}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        if mark in env and name in ("libvirtd", "virtqemud"):
            found.append(int(pid))
    return found


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_session_libvirtd_started_by_a_pinned_replicatord_runs_on_the_guests_cpus():
    if shutil.which("libvirtd") is None:
        pytest.skip("libvirtd is not installed (./tools/bootstrap installs libvirt-daemon)")
    start = set(os.sched_getaffinity(0))
    cpu = max(start)
    work = tempfile.mkdtemp(prefix="rls-", dir="/tmp")
    home, run = os.path.join(work, "home"), os.path.join(work, "run")
    os.makedirs(home)
    os.makedirs(run, mode=0o700)
    uid = NOBODY if os.geteuid() == 0 else os.geteuid()
    for d in (work, home, run):
        os.chown(d, uid, uid)
    env = dict(os.environ, HOME=home, XDG_RUNTIME_DIR=run, XDG_CONFIG_HOME=os.path.join(home, ".config"),
               XDG_CACHE_HOME=os.path.join(home, ".cache"))
    child = subprocess.Popen([sys.executable, "-c", CHILD % {"uid": uid, "cpu": cpu}], env=env, cwd=work,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    daemons: list[int] = []
    try:
        line = child.stdout.readline()
        assert line.strip() == "connected", child.stderr.read()
        deadline = time.monotonic() + 10
        while not daemons and time.monotonic() < deadline:
            daemons = _daemons_of(run)
            time.sleep(0.05)
        assert daemons, "no session libvirtd was started for the child"
        for pid in daemons:
            on = os.sched_getaffinity(pid)
            assert on == start, f"the session libvirtd {pid} runs on {sorted(on)}, not on {sorted(start)}"
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=30) == 0, child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
        for pid in daemons or _daemons_of(run):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        shutil.rmtree(work, ignore_errors=True)

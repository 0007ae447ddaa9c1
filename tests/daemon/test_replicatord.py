"""replicatord as an operator runs it: a config, the daemon in the background, a VM's writes over NBD,
status and operations through the CLI and the admin API, kill -9 and restart."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from replicator import priority
from replicator.replica import ReplicaStore
from replicator.tracking.shim import PRIORITY_BOOST
from replicator.vhdx import VhdxDisk, create_vhdx

from ..externals import qemu_compare, tool
from ..ports import free_port  # noqa: F401 (the tests import it from here)
from ..processes import autogroup_nice, sessions_get_autogroups

MiB = 1 << 20
BIN = os.path.dirname(sys.executable)


class Site:
    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.port = free_port()
        for name, size in (("d0.vhdx", 64), ("d1.vhdx", 32)):
            with create_vhdx(str(tmp_path / name), size * MiB, block_size=2 * MiB) as d:
                d.write(0, bytes([size]) * MiB)
        self.config = str(tmp_path / "replicatord.toml")
        with open(self.config, "w") as f:
            f.write(f'''[daemon]
state_dir = "state"
admin_listen = "127.0.0.1:{self.port}"

[[machine]]
name = "vm01"
disks = ["d0.vhdx", "d1.vhdx"]
target = "local://{tmp_path}/replica"
frequency = "15m"
additional_points = 2
''')
        self.proc = None

    def start(self, own_session: bool = False):
        self.log = open(self.dir / "daemon.log", "ab")
        self.proc = subprocess.Popen([os.path.join(BIN, "replicatord"), "--config", self.config],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=own_session)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if self.status()["machines"][0]["state"] == "Replicating":
                    return
            except Exception:
                pass
            time.sleep(0.2)
        raise AssertionError(open(self.dir / "daemon.log").read())

    def cli(self, *args) -> str:
        return subprocess.run([os.path.join(BIN, "replicator"), *args, "--config", self.config], check=True,
                              capture_output=True, text=True).stdout

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json"))

    def qemu_io(self, disk: str, *cmds: str) -> None:
        sock = self.dir / "state" / "nbd" / "vm01.sock"
        args = [tool("qemu-io"), "-f", "raw"] + [x for c in cmds for x in ("-c", c)]
        subprocess.run(args + [f"nbd+unix:///{disk}?socket={sock}"], check=True, capture_output=True)

    def snapshot(self, disk: str) -> str:
        out = str(self.dir / f"snap-{disk}")
        shutil.copy(self.dir / disk, out)
        VhdxDisk.open(out, read_only=False).close()
        return out

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        self.proc.wait(60)
        self.log.close()


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path)
    s.start()
    yield s
    if s.proc.poll() is None:
        s.stop()


@pytest.mark.skipif(not sessions_get_autogroups(), reason="a new session gets no autogroup of its own here "
                    "(kernel.sched_autogroup_enabled is 0, or a sandbox without them)")
def test_replicatord_in_a_session_of_its_own_puts_replication_behind_the_guests(tmp_path):
    """Started as systemd starts a service, replicatord lowers its session's autogroup, so that replication's
    CPU work weighs less than a guest's session; its export stays ahead (priority.guest_first). Started from
    a terminal's session, it leaves that session alone."""
    mine = autogroup_nice(os.getpid())
    s = Site(tmp_path)
    s.start(own_session=True)
    try:
        assert autogroup_nice(s.proc.pid) == priority.REPLICATION_NICE
        export = autogroup_nice(s.status()["machines"][0]["export"]["pid"])
        assert export == (PRIORITY_BOOST if os.geteuid() == 0 else 0)
    finally:
        s.stop()
    s.start()
    try:
        assert autogroup_nice(s.proc.pid) == mine == autogroup_nice(os.getpid())
    finally:
        s.stop()


def replica_equals(site, disk_file: str, snap: str) -> bool:
    disk_id = site.status()["machines"][0]["disks"][disk_file]["disk_id"]
    rd = ReplicaStore(str(site.dir / "replica")).disk(disk_id)
    return qemu_compare(rd.image_path, snap, "vhdx", "vhdx").returncode == 0


def test_daemon_replicates_reports_and_survives_kill9(site):
    st = site.status()["machines"][0]
    assert st["state"] == "Replicating" and st["stats"]["health"] == "Normal"
    site.qemu_io("d0.vhdx", "write -P 0x71 3M 2M", "write -z 10M 1M")
    site.qemu_io("d1.vhdx", "write -P 0x72 0 512k")
    out = site.cli("machine", "vm01", "cycle")
    assert "Replicating" in out
    # the daemon holds the disks; their bytes are flushed after each cycle's cut, so a copy now is the cut
    for disk in ("d0.vhdx", "d1.vhdx"):
        assert replica_equals(site, disk, site.snapshot(disk))
    site.cli("machine", "vm01", "pause")
    assert site.status()["machines"][0]["state"] == "Suspended"
    site.cli("machine", "vm01", "resume")
    assert site.status()["machines"][0]["state"] == "Replicating"
    text = site.cli("status")
    assert "vm01: Replicating" in text and "health Normal" in text
    # wrong token: refused; right token: Prometheus metrics
    base = f"http://127.0.0.1:{site.port}"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(base + "/metrics", headers={"Authorization": "Bearer x"}))
    assert e.value.code == 401
    token = open(site.dir / "state" / "admin.token").read().strip()
    metrics = urllib.request.urlopen(urllib.request.Request(
        base + "/metrics", headers={"Authorization": f"Bearer {token}"})).read().decode()
    assert 'machine="vm01"' in metrics and "# TYPE" in metrics
    # kill -9 while the VM writes; the restarted daemon resynchronizes and the replica levels
    site.qemu_io("d0.vhdx", "write -P 0x73 20M 4M")
    before = site.status()["machines"][0]["stats"]["successful_cycles"]
    site.stop(signal.SIGKILL)
    site.start()                                     # waits until the machine is Replicating again
    site.cli("machine", "vm01", "cycle")
    st = site.status()["machines"][0]
    assert st["state"] == "Replicating", st
    assert st["stats"]["successful_cycles"] > before >= 2, "statistics must survive the restart"
    for disk in ("d0.vhdx", "d1.vhdx"):
        assert replica_equals(site, disk, site.snapshot(disk)), disk
    states = [h["to"] for h in json.load(open(site.dir / "state" / "machines" / "vm01.json"))["history"]]
    assert "Replicating" in states


@pytest.mark.parametrize("delete", [True, False])
def test_removing_protection_deletes_the_replica_only_when_asked(tmp_path, delete):
    s = Site(tmp_path)
    if delete:
        with open(s.config, "a") as f:
            f.write("delete_replica_on_remove = true\n")
    s.start()
    s.cli("machine", "vm01", "cycle")
    ids = [d["disk_id"] for d in s.status()["machines"][0]["disks"].values()]
    replica = tmp_path / "replica" / "disks"
    assert sorted(os.listdir(replica)) == sorted(ids)
    s.stop()
    text = open(s.config).read()
    create_vhdx(str(tmp_path / "d2.vhdx"), 16 * MiB).close()
    with open(s.config, "w") as f:                   # the operator removes vm01 from the configuration
        f.write(text[:text.index("[[machine]]")] + f'''[[machine]]
name = "vm02"
disks = ["d2.vhdx"]
target = "local://{tmp_path}/replica"
frequency = "15m"
''')
    s.log = open(tmp_path / "daemon.log", "ab")
    s.proc = subprocess.Popen([os.path.join(BIN, "replicatord"), "--config", s.config], stdout=s.log,
                              stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while time.time() < deadline and not os.path.exists(tmp_path / "state" / "admin.token"):
        time.sleep(0.1)
    while time.time() < deadline:
        try:
            if [m["name"] for m in s.status()["machines"]] == ["vm02"]:
                break
        except subprocess.CalledProcessError:
            time.sleep(0.2)
    s.stop()
    log = open(tmp_path / "daemon.log").read()
    assert not os.path.exists(tmp_path / "state" / "machines" / "vm01.json"), log
    assert not os.path.exists(tmp_path / "d0.vhdx.rpl") and os.path.exists(tmp_path / "d0.vhdx")
    if delete:
        assert not set(ids) & set(os.listdir(replica)), log
        assert "replica of d0.vhdx deleted" in log
    else:
        assert set(ids) <= set(os.listdir(replica))
        assert "protection removed; its replica on local://" in log

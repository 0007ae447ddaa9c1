"""A real Linux guest whose disk is replicatord's export, while replicatord runs cycles, is restarted,
reloaded (SIGHUP), killed with SIGKILL, and while the export process itself is killed once.

The guest (QEMU's NBD client with reconnect-delay, as docs/operations.md configures it) must see no I/O
error through all of it; its filesystem must be clean and every file it synced intact; after the last
cycle the replica must equal the primary byte for byte, and hold the same clean filesystem.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from replicator.replica import ReplicaStore
from replicator.vhdx import VhdxDisk

from ..daemon.primary_harness import BIN, free_port
from .conftest import requires_qemu
from .harness import make_disk_image, verify_image

pytestmark = [requires_qemu, pytest.mark.timeout(600)]
MiB = 1 << 20


class Replicatord:
    def __init__(self, folder):
        self.dir, self.port = folder, free_port()
        self.config = str(folder / "replicatord.toml")
        with open(self.config, "w") as f:
            f.write(f'''[daemon]
state_dir = "state"
admin_listen = "127.0.0.1:{self.port}"

[[machine]]
name = "vm01"
disks = ["disk.vhdx"]
target = "local://{folder}/replica"
frequency = "30s"
''')
        self.proc = None

    def start(self) -> None:
        self.log = open(self.dir / "daemon.log", "ab")
        self.proc = subprocess.Popen([os.path.join(BIN, "replicatord"), "--config", self.config],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def cli(self, *args, check=True) -> subprocess.CompletedProcess:
        return subprocess.run([os.path.join(BIN, "replicator"), *args, "--config", self.config], check=check,
                              capture_output=True, text=True, timeout=300)

    def status(self) -> dict:
        import json
        return json.loads(self.cli("status", "--json").stdout)["machines"][0]

    def wait(self, pred, timeout=120, what="condition") -> dict:
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"replicatord exited: {self.text()}"
            try:
                last = self.status()
                if pred(last):
                    return last
            except (subprocess.CalledProcessError, ValueError, KeyError, IndexError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}; last status {last}\n{self.text()}")

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)
        if sig in (signal.SIGTERM, signal.SIGKILL):
            self.proc.wait(120)

    def text(self) -> str:
        return open(self.dir / "daemon.log", errors="replace").read()[-6000:]


def _rounds_go_on(g, more: int = 2, timeout: float = 240) -> None:
    g.wait_rounds(g.rounds() + more, timeout=timeout)


def test_guest_keeps_its_disk_through_restarts_reloads_kills_and_an_export_crash(tmp_path, guest):
    make_disk_image(tmp_path / "disk.vhdx", 128 * MiB)
    d = Replicatord(tmp_path)
    d.start()
    try:
        st = d.wait(lambda m: m["state"] == "Replicating", what="initial replication")
        export_pid = st["export"]["pid"]
        sock = st["disks"]["disk.vhdx"]["nbd"].split("socket=")[1]
        guest.start(sock, export="disk.vhdx", reconnect_delay=60)
        guest.wait_rounds(3, timeout=300)
        d.cli("machine", "vm01", "cycle")

        d.signal(signal.SIGTERM)                                  # a restart: the export stays
        _rounds_go_on(guest, 1)
        d.start()
        st = d.wait(lambda m: m["state"] == "Replicating", what="the restarted daemon")
        assert st["export"]["pid"] == export_pid, "the restarted daemon started another export"
        _rounds_go_on(guest)

        d.signal(signal.SIGHUP)                                   # a reload
        _rounds_go_on(guest)
        d.wait(lambda m: m["state"] == "Replicating", what="the reloaded daemon")
        assert "reloading the configuration" in d.text()
        assert d.status()["export"]["pid"] == export_pid

        d.signal(signal.SIGKILL)                                  # replicatord killed
        _rounds_go_on(guest)
        d.start()
        st = d.wait(lambda m: m["state"] == "Replicating", what="the daemon after kill -9")
        assert st["export"]["pid"] == export_pid
        d.cli("machine", "vm01", "cycle")

        os.kill(export_pid, signal.SIGKILL)                       # the export itself dies once
        st = d.wait(lambda m: m["export"]["pid"] not in (None, export_pid), what="a new export")
        _rounds_go_on(guest, 2, timeout=300)                      # the guest reconnected and carries on
        d.cli("machine", "vm01", "cycle")                         # the resync the crash asked for
        d.wait(lambda m: m["state"] == "Replicating" and m["disks"]["disk.vhdx"]["tracking"] == "tracking",
               what="the resync after the export crash")

        guest.shutdown()
        assert guest.errors() == [], guest.tail()
        d.cli("machine", "vm01", "cycle")
        disk_id = d.status()["disks"]["disk.vhdx"]["disk_id"]
    finally:
        if d.proc.poll() is None:
            d.signal(signal.SIGTERM)
    # the export had no client left: it closed with the daemon, and the disk is the operator's again
    with VhdxDisk.open(str(tmp_path / "disk.vhdx"), read_only=True) as p:
        primary = p.read(0, p.size)
    image = ReplicaStore(str(tmp_path / "replica")).disk(disk_id).image_path
    with VhdxDisk.open(image, read_only=True) as r:
        assert r.read(0, r.size) == primary, "the replica differs from the primary at the last cut"
    files = verify_image(tmp_path / "disk.vhdx")
    assert files > 0 and verify_image(image) == files

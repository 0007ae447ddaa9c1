"""Reloading replicatord's configuration (`replicator reload`, SIGHUP): the new settings apply, the export
process (the guest's disk) is the same one before and after, and an invalid configuration is refused in one
line while the running one goes on."""
from __future__ import annotations

import signal
import time

from replicator.tracking.nbdclient import NbdClient

from .primary_harness import Daemon


def test_reload_applies_the_new_configuration_and_keeps_the_export(tmp_path):
    d = Daemon(tmp_path, disks=(("d0.vhdx", 16),))
    try:
        st = d.start(until="Replicating", timeout=60)
        pid = st["export"]["pid"]
        guest = NbdClient(str(tmp_path / "state" / "nbd" / "vm01.sock"), "d0.vhdx")   # holds the disk
        assert st["stats"]["rpo_target"] == 900
        with open(d.config) as f:
            text = f.read()
        with open(d.config, "w") as f:
            f.write(text.replace('frequency = "15m"', 'frequency = "5m"'))
        out = d.run("reload")
        assert "reloading" in out.stdout
        st = d.wait(lambda m: m["stats"]["rpo_target"] == 300, timeout=60)
        assert st["export"]["pid"] == pid and st["state"] == "Replicating"

        with open(d.config, "w") as f:
            f.write(text.replace('frequency = "15m"', 'frequency = "7s"'))
        bad = d.run("reload", check=False)
        assert bad.returncode != 0 and "frequency: must be 30s, 5m or 15m" in bad.stderr
        d.proc.send_signal(signal.SIGHUP)                          # the daemon refuses it on its own too
        deadline = time.monotonic() + 30
        while "configuration not reloaded" not in d.daemon_log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "configuration not reloaded, the running one goes on" in d.daemon_log()
        assert d.machine()["stats"]["rpo_target"] == 300 and d.proc.poll() is None

        with open(d.config, "w") as f:
            f.write(text.replace('frequency = "15m"', 'frequency = "30s"'))
        d.proc.send_signal(signal.SIGHUP)                          # systemctl reload
        st = d.wait(lambda m: m["stats"]["rpo_target"] == 30, timeout=60)
        assert st["export"]["pid"] == pid and d.proc.poll() is None
        guest.pwrite(0, b"\x61" * 65536)
        guest.close()
        d.run("machine", "vm01", "cycle")
        time.sleep(0.2)
        assert d.replica_equals_primary()
        # every cycle leaves a line saying which bytes (the initial one carried the disk's 1 MiB of data)
        log = d.daemon_log()
        assert "initial cycle replicated" in log and "1.0 MiB changed" in log
        assert "delta cycle replicated" in log and "0.1 MiB changed" in log
    finally:
        d.stop()

"""memory_logs: replicatord hands the host's budget for change logs in memory to the exports it starts; the
default writes a machine's logs to memory, "none" to the disk's sidecar, and the replica equals the primary
either way."""
from __future__ import annotations

import json
import os

import pytest

from replicator.tracking.nbdclient import NbdClient
from replicator.tracking.state import Sidecar

from .primary_harness import Daemon


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode().split("\0")


@pytest.mark.parametrize("setting, budget", [(None, None), ('"none"', "0"), ('"64M"', str(64 << 20))])
def test_the_export_gets_the_hosts_budget(tmp_path, setting, budget):
    d = Daemon(tmp_path, disks=(("d0.vhdx", 16),))
    if setting is not None:
        with open(d.config) as f:
            text = f.read()
        with open(d.config, "w") as f:
            f.write(text.replace('state_dir = "state"\n', f'state_dir = "state"\nmemory_logs = {setting}\n', 1))
    try:
        st = d.start(until="Replicating", timeout=60)
        export = st["export"]["pid"]
        args = cmdline(export)
        if budget is None:
            assert "--memory-logs" not in args          # the export's own default: auto
        else:
            assert args[args.index("--memory-logs") + 1] == budget
        guest = NbdClient(str(tmp_path / "state" / "nbd" / "vm01.sock"), "d0.vhdx")
        guest.pwrite(3 << 20, b"\x5a" * 65536)
        guest.close()
        disk = os.path.join(str(tmp_path), "d0.vhdx")
        sc = Sidecar(disk)
        with open(sc.state_path) as f:
            state = json.load(f)
        active = state["active_log"]
        in_memory = state["memory_dir"] is not None and os.path.exists(os.path.join(state["memory_dir"], active))
        assert in_memory == (budget != "0"), state
        assert os.path.exists(os.path.join(sc.logs_dir, active)) == (budget == "0")
        d.run("machine", "vm01", "cycle")
        assert d.replica_equals_primary()
        place = d.machine()["disks"]["d0.vhdx"]["log"]
        assert place == ("disk" if budget == "0" else "memory"), place
        assert f"log in {place}" in d.cli("status")
    finally:
        d.stop()


def test_a_host_run_from_a_controller_says_its_own_budget_or_refuses_it(tmp_path):
    """From a controller the budget is the host's own choice (--memory-logs), as --replication-cpus: a value
    that is not one is refused in one line before anything else happens."""
    import subprocess

    from .primary_harness import BIN
    p = subprocess.run([os.path.join(BIN, "replicatord"), "--state", str(tmp_path / "s"), "--memory-logs", "lots"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "--memory-logs must be auto, none or a size like 2G, not 'lots'" in p.stderr

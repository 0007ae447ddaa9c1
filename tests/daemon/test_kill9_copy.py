"""replicatord killed with SIGKILL in the middle of an initial copy read from the running export (a fuzzy
copy, sent in segments as it is encoded): the export outlives the daemon and keeps serving the guest, the
restarted daemon attaches to it and copies again, no stream of the dead copy is left on either side, and
the replica ends byte-identical."""
from __future__ import annotations

import os
import signal

from replicator.vhdx import VhdxDisk

from .primary_harness import MiB, Daemon


def export_pids(folder) -> list[int]:
    """Export processes (python -m replicator.tracking.shim) serving disks under `folder`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "replicator.tracking.shim" in cmd and str(folder) in cmd:
            found.append(int(pid))
    return found


def leftovers(root) -> list[str]:
    return [os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs if f.endswith(".delta")]


def test_kill9_during_initial_copy_restarts_it_and_leaves_nothing(tmp_path):
    d = Daemon(tmp_path, 'bandwidth_limit = "3M"\ncompression = false', disks=(("d0.vhdx", 40),))
    with VhdxDisk.open(str(tmp_path / "d0.vhdx"), read_only=False) as disk:
        disk.write(2 * MiB, os.urandom(24 * MiB))          # about 8 s of copy at 3 MiB/s
    try:
        d.start()
        d.wait(lambda m: any(j["kind"] == "initial" and j["bytes_done"] >= 3 * MiB for j in m["jobs"]), 60)
        exports = export_pids(tmp_path)
        assert len(exports) == 1, exports
        d.stop(signal.SIGKILL)
        d.qemu_io("d0.vhdx", "write -P 0x6b 3M 1M")       # the guest goes on writing with no daemon
        assert export_pids(tmp_path) == exports
        d.start()
        d.wait(lambda m: m["state"] == "Replicating" and not m["jobs"], timeout=120)
        assert export_pids(tmp_path) == exports, "the restarted daemon attaches to the running export"
        d.run("machine", "vm01", "cycle")
        assert d.replica_equals_primary()
        assert leftovers(tmp_path / "d0.vhdx.rpl") == []
        assert leftovers(tmp_path / "replica") == []
    finally:
        d.stop()

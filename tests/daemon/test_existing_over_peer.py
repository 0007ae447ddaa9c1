"""Initial replication from existing copies with a peer replica: the copies are restored on the replica
host, the primary waits and says how to adopt them there, and once they are adopted the first cycle is a
checksum resync that sends only the blocks that differ; the replica then equals the primary."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

from replicator.vhdx import VhdxDisk

from .two_sites import BIN, MiB, same, two_sites

DISKS = {"vm01": [("d0.vhdx", 16), ("d1.vhdx", 16)]}


def test_existing_copies_adopted_on_a_peer_replica_host(tmp_path):
    a, b = two_sites(tmp_path, DISKS)
    text = open(a.config).read().replace('additional_points = 2\n', 'additional_points = 2\n'
                                         'initial_replication = { mode = "existing", path = "unused" }\n')
    with open(a.config, "w") as f:
        f.write(text)
    old = b.dir / "old"
    old.mkdir()
    for n, _ in DISKS["vm01"]:                      # yesterday's copies, restored on the replica host
        shutil.copy(a.dir / n, old / n)
    with VhdxDisk.open(str(a.dir / "d0.vhdx"), read_only=False) as d:
        d.write(3 * MiB, os.urandom(256 << 10))     # what changed on the primary since
    b.start(ready=())
    try:
        a.start(ready=("ReadyForInitialReplication", "InitialReplicationInProgress", "WaitingForInitialReplication"))
        a.wait(lambda: "adopt them on the replica host first" in a.status()["machines"][0]["reason"],
               "the machine to ask for the adoption")
        reason = a.status()["machines"][0]["reason"]
        ids = dict(re.findall(r"COPY-OF-(\S+) --disk-id (\S+)", reason))
        assert set(ids) == {"d0.vhdx", "d1.vhdx"}, reason
        for n, disk_id in ids.items():
            subprocess.run([os.path.join(BIN, "replicator"), "seed", "import", "--from-existing", str(old / n),
                            "--disk-id", disk_id, "--machine", "vm01", "--replica-root", str(b.dir / "replica")],
                           check=True, capture_output=True, timeout=120)
        out = a.cli("machine", "vm01", "cycle").stdout
        assert "Replicating" in out, out
        st = a.status()["machines"][0]
        assert st["last_cycle"]["bytes_sent"] < 2 * MiB, st["last_cycle"]      # not the 8 MiB of data
        for n, disk_id in ids.items():
            same(b.replica_bytes(disk_id), a.disk_bytes(a.dir / n), f"replica of {n}")
    finally:
        a.stop()
        b.stop()

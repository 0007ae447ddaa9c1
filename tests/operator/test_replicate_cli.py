"""`replicator replicate` as operators run it: several at once on one disk (and on a copy of it with the same
VirtualDiskId, into the same replica), `--json` for scripts. Whatever the race, each run ends with exit 0
or a one-line error with its code; the replica ends equal to the disk."""
from __future__ import annotations

import json
import shutil
import subprocess

from replicator.replica import ReplicaStore
from replicator.vhdx import VhdxDisk

from .helpers import BIN, MiB, random_vhdx


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([f"{BIN}/replicator", *[str(a) for a in args]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_concurrent_replicate_runs_give_one_line_errors(tmp_path):
    disk = tmp_path / "vm.vhdx"
    payload = random_vhdx(disk, size=64 * MiB, data=24 * MiB)
    shutil.copy(disk, tmp_path / "copy.vhdx")                # same VirtualDiskId: the same replica disk
    to = f"local://{tmp_path / 'replica'}"
    ok = 0
    for _ in range(3):
        procs = [start("replicate", d, "--to", to, "--json") for d in (disk, disk, tmp_path / "copy.vhdx", disk)]
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert "Traceback" not in err, err
            if p.returncode == 0:
                ok += 1
                cycle = json.loads(out.splitlines()[-1])
                assert cycle["disk"] in ("vm.vhdx", "copy.vhdx") and cycle["generation"] >= 1
            else:
                assert len(err.splitlines()) == 1 and err.startswith("replicator: error: "), err
    assert ok >= 3                                            # at least one run of each round went through
    final = start("replicate", disk, "--to", to, "--json")
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    store = ReplicaStore(str(tmp_path / "replica"))
    rd = store.disk(store.disk_ids()[0])
    with VhdxDisk.open(rd.image_path) as r:
        assert r.read(0, len(payload)) == payload


def test_replicate_json_lines(tmp_path):
    disk = tmp_path / "vm.vhdx"
    random_vhdx(disk, size=32 * MiB, data=8 * MiB)
    to = f"local://{tmp_path / 'replica'}"
    for kind in ("initial", "delta"):
        p = start("replicate", disk, "--to", to, "--json")
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        [line] = out.splitlines()
        cycle = json.loads(line)
        assert cycle["kind"] == kind
        assert set(cycle) >= {"disk", "generation", "changed_bytes", "sent_bytes", "stream_bytes", "seconds"}
        assert (cycle["changed_bytes"] >= 8 * MiB) == (kind == "initial")

"""Kind 2: one bad stream must not wedge a store. A well-formed stream (or seed volume) whose header
disagrees with the replica -- another disk size, another disk -- is refused before anything is journaled,
with 0 or with kept recovery points; the next genuine cycle applies, points list and export work, and a
store wedged by an older build (the bad stream already journaled) is unwedged at its next open."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from replicator import delta
from replicator.errors import FormatError
from replicator.replica import ReplicaStore
from replicator.seed import export as seed_export
from replicator.seed.importer import verify_seed
from replicator.transport import AuthorizationEntry, ReplicaRefused

from .conftest import MiB, Peer, Primary, image_bytes

CLI = os.path.join(os.path.dirname(sys.executable), "replicator")


def forged(p: Primary, **fields) -> bytes:
    """A well-formed stream of p's next cycle whose header says what `fields` say."""
    h = dict(disk_id=p.disk_id, disk_size=p.size, block_size=MiB, generation=p.generation + 1,
             base_generation=p.generation, consistency="crash", source_logs=[], created=1.7e9, kind="delta",
             extra={})
    h.update(fields)
    sink = io.BytesIO()
    enc = delta.DeltaEncoder(delta.StreamHeader(**h), sink)
    enc.add_data(0, b"\xee" * 4096)
    enc.finish()
    return sink.getvalue()


@pytest.mark.parametrize("keep", [0, 2])
@pytest.mark.parametrize("fields", [{"disk_size": 32 * MiB}, {"disk_size": 8 * MiB}])
def test_a_stream_for_another_disk_size_is_refused_unjournaled(servers, pki, tmp_path, keep, fields):
    root = str(tmp_path / "root")
    server = servers.cert([AuthorizationEntry("primary1", root)])
    peer = Peer(server, pki, tmp_path, "primary1")
    p = Primary()
    peer.call("ensure_disk", p.disk_id, p.size)
    peer.send(p.disk_id, p.cycle())
    peer.call("checkpoint", p.disk_id, 1, 1, additional_points=keep)
    good = bytes(p.data)
    with pytest.raises(ReplicaRefused, match="stream is for a disk of") as err:
        peer.send(p.disk_id, forged(p, **fields))
    assert err.value.code == "sequence"
    disk = server._stores[root].disk(p.disk_id)
    assert disk.state.journal is None and disk.generation == 1 and image_bytes(disk) == good
    assert json.load(open(os.path.join(disk.path, "state.json")))["journal"] is None
    # nothing wedged: the next genuine cycles apply, and the CLI lists and exports the root
    peer.send(p.disk_id, p.cycle())
    peer.send(p.disk_id, p.cycle())
    assert disk.generation == 3 and image_bytes(disk) == bytes(p.data)
    listed = subprocess.run([CLI, "points", "list", "--root", root],
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    out = str(tmp_path / "out.vhdx")
    exported = subprocess.run([CLI, "points", "export", "--root", root,
                               str(p.disk_id), "--generation", "3", "--out", out],
                              capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0, exported.stderr
    from replicator.vhdx import VhdxDisk
    with VhdxDisk.open(out) as v:
        assert v.read(0, v.size) == bytes(p.data)


def test_a_store_wedged_by_an_older_build_recovers_at_open(tmp_path):
    """The bad stream already journaled in phase apply (what older builds did): the next open drops it
    (it never wrote: apply refuses a size mismatch before writing) and the genuine cycle applies."""
    store = ReplicaStore(str(tmp_path / "root"))
    p = Primary()
    disk = store.ensure_disk(p.disk_id, p.size)
    up = disk.open_upload("aa01")
    up.write(0, p.cycle())
    up.sync()
    up.close()
    disk.commit("aa01")
    good = bytes(p.data)
    bad = forged(p, disk_size=32 * MiB)
    with open(disk.spool_path("bb02"), "wb") as f:
        f.write(bad)
    disk.state.journal = {"stream": "bb02", "phase": "apply", "undo": False, "generation": 2, "time": 1.7e9,
                          "consistency": "crash"}
    disk._save()
    again = ReplicaStore(str(tmp_path / "root")).disk(p.disk_id)
    assert again.state.journal is None and again.generation == 1 and image_bytes(again) == good
    assert not os.path.exists(again.spool_path("bb02"))
    up = again.open_upload("cc03")
    up.write(0, p.cycle())
    up.sync()
    up.close()
    again.commit("cc03")
    assert again.generation == 2 and image_bytes(again) == bytes(p.data)


def _seed(tmp_path, size: int = 8 * MiB):
    from replicator.vhdx import create_vhdx
    src = str(tmp_path / "d0.vhdx")
    with create_vhdx(src, size) as d:
        d.write(MiB, b"\x5a" * 65536)
    media = str(tmp_path / "media")
    r = subprocess.run([CLI, "seed", "export", "vm01", src, "--to", media],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return os.path.join(media, "vm01")


def test_seed_verify_refuses_a_volume_whose_header_names_another_disk_size(tmp_path):
    machine_dir = _seed(tmp_path)
    verify_seed(machine_dir)                                    # the genuine seed verifies
    manifest = json.load(open(os.path.join(machine_dir, "seed.json")))
    vol = manifest["disks"][0]["volumes"][0]
    # a careless (or hostile) seed: the volume rewritten for another size, its digest made to match
    from replicator.kernels import Xxh3Hasher
    with open(os.path.join(machine_dir, vol["file"]), "rb") as f:
        dec = delta.DeltaDecoder(f)
        frames = list(dec)
        h = dec.header
    sink = io.BytesIO()
    enc = delta.DeltaEncoder(delta.StreamHeader(**{**h.__dict__, "disk_size": h.disk_size * 2}), sink)
    for fr in frames:
        enc.add_data(fr.offset, fr.data) if fr.data is not None else enc.add_zero(fr.offset, fr.length)
    enc.finish()
    raw = sink.getvalue()
    with open(os.path.join(machine_dir, vol["file"]), "wb") as f:
        f.write(raw)
    hasher = Xxh3Hasher()
    hasher.update(raw)
    vol["bytes"], vol["xxh3"] = len(raw), hasher.hexdigest()
    with open(os.path.join(machine_dir, "seed.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(FormatError, match="disk_size"):
        verify_seed(machine_dir)
    r = subprocess.run([CLI, "seed", "verify", machine_dir],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "disk_size" in r.stdout + r.stderr

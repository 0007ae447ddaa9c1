"""A careless operator at the `replicator` command line: wrong folders, busy ports, missing work dirs,
wrong recovery points. Each mistake is one line on stderr with its exit code, never a traceback, and no
command leaves a half-written output behind."""
from __future__ import annotations

import json
import os
import socket

from replicator.errors import CannotListen, DiskIOError, FormatError, UsageError

from .helpers import MiB, assert_one_line_error, leftovers, random_vhdx, replicator


def test_points_list_of_a_root_that_does_not_exist(tmp_path):
    missing = tmp_path / "nonexistent"
    assert_one_line_error(replicator("points", "list", "--root", missing), UsageError.exit_code, str(missing),
                          "does not exist")
    assert not missing.exists()                           # and it was not created by looking
    (tmp_path / "empty").mkdir()
    assert_one_line_error(replicator("points", "list", "--root", tmp_path / "empty"), UsageError.exit_code,
                          "not a replica store")
    assert_one_line_error(replicator("points", "export", "--root", missing, "d", "--out", tmp_path / "x.vhdx"),
                          UsageError.exit_code, "does not exist")


def _replica_with_a_disk(tmp_path):
    """A replica store holding one disk, made the way an operator does: seed export, then seed import."""
    disk = tmp_path / "vm.vhdx"
    payload = random_vhdx(disk, data=6 * MiB)
    assert replicator("seed", "export", "vm01", disk, "--to", tmp_path / "media", "--volume-size", "4M"
                      ).returncode == 0
    root = tmp_path / "replica"
    assert replicator("seed", "import", tmp_path / "media" / "vm01", "--replica-root", root).returncode == 0
    listed = json.loads(replicator("points", "list", "--root", root, "--json").stdout)
    assert len(listed) == 1
    return root, listed[0], payload


def test_failed_points_export_leaves_nothing_at_out(tmp_path):
    root, disk, payload = _replica_with_a_disk(tmp_path)
    out = tmp_path / "out" / "failover.vhdx"
    out.parent.mkdir()
    bad = disk["generation"] + 40
    proc = replicator("points", "export", "--root", root, disk["disk"], "--generation", bad, "--out", out)
    assert_one_line_error(proc, UsageError.exit_code, f"generation {bad}")
    assert not out.exists() and leftovers(out.parent) == []
    # the command that works still works, and leaves only its output
    good = replicator("points", "export", "--root", root, disk["disk"], "--out", out)
    assert good.returncode == 0, good.stderr
    assert os.listdir(out.parent) == ["failover.vhdx"]
    from replicator.vhdx import VhdxDisk
    with VhdxDisk.open(str(out)) as d:
        assert d.read(0, len(payload)) == payload
    # an existing output is refused, untouched
    before = out.stat().st_mtime_ns
    assert_one_line_error(replicator("points", "export", "--root", root, disk["disk"], "--out", out),
                          UsageError.exit_code, "already exists")
    assert out.stat().st_mtime_ns == before
    # a folder that is not there
    assert_one_line_error(replicator("points", "export", "--root", root, disk["disk"], "--out",
                                     tmp_path / "nowhere" / "x.vhdx"), UsageError.exit_code, "does not exist")


def test_convert_into_a_missing_folder_or_from_a_broken_source(tmp_path):
    src = tmp_path / "src.vhdx"
    random_vhdx(src, data=2 * MiB)
    assert_one_line_error(replicator("vhdx", "convert", "-O", "raw", src, tmp_path / "no" / "t.raw"),
                          UsageError.exit_code, "does not exist")
    broken = tmp_path / "broken.vhdx"
    raw = bytearray(src.read_bytes())
    raw[64 * 1024:64 * 1024 + 4096] = bytes(4096)           # both headers gone: not a usable VHDX
    raw[128 * 1024:128 * 1024 + 4096] = bytes(4096)
    broken.write_bytes(raw)
    proc = replicator("vhdx", "convert", "-O", "vhdx", broken, tmp_path / "t.vhdx")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "t.vhdx").exists() and leftovers(tmp_path) == []


def test_convert_failing_midway_leaves_nothing(tmp_path):
    """A target folder that fills up: the partial copy is removed and the error is one line."""
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(8 * MiB))
    small = tmp_path / "small"
    small.mkdir()
    if os.system(f"mount -t tmpfs -o size=2m tmpfs {small} 2>/dev/null") != 0:
        import pytest
        pytest.skip("cannot mount a small tmpfs here")
    try:
        proc = replicator("vhdx", "convert", "-O", "raw", src, small / "copy.raw")
        assert_one_line_error(proc, DiskIOError.exit_code)
        assert os.listdir(small) == []
    finally:
        os.system(f"umount {small}")


def test_replica_serve_on_a_busy_port(tmp_path):
    pki = tmp_path / "pki"
    assert replicator("certs", "init", pki).returncode == 0
    assert replicator("certs", "issue", pki, "replica.test").returncode == 0
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        proc = replicator("replica", "serve", "--host", "127.0.0.1", "--port", port, "--cert",
                          pki / "replica.test.pem", "--key", pki / "replica.test.key", "--ca", pki / "ca.pem",
                          "--allow", f"*={tmp_path / 'r'}", timeout=60)
    finally:
        busy.close()
    assert_one_line_error(proc, CannotListen.exit_code, f"127.0.0.1:{port}")
    # a certificate file that is not there is named, in one line too
    proc = replicator("replica", "serve", "--host", "127.0.0.1", "--port", "0", "--cert", pki / "nope.pem",
                      "--key", pki / "replica.test.key", "--ca", pki / "ca.pem", "--allow", f"*={tmp_path}")
    assert proc.returncode != 0 and len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "nope.pem" in proc.stderr


def test_bench_with_a_missing_work_folder(tmp_path):
    proc = replicator("bench", "copy-frequency", "--work", tmp_path / "missing", "--duration", "1m",
                      "--disk-size", "64M", "--out", tmp_path / "reports")
    assert_one_line_error(proc, UsageError.exit_code, "missing", "does not exist")
    assert not (tmp_path / "reports").exists() or os.listdir(tmp_path / "reports") == []


def test_seed_export_honours_the_volume_size(tmp_path):
    disk = tmp_path / "vm.vhdx"
    random_vhdx(disk, size=24 * MiB, data=16 * MiB)
    proc = replicator("seed", "export", "vm01", disk, "--to", tmp_path / "media", "--volume-size", "4M")
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "media" / "vm01"
    manifest = json.loads((folder / "seed.json").read_text())
    sizes = [v["bytes"] for v in manifest["disks"][0]["volumes"]]
    assert all(s <= 4 * MiB for s in sizes), sizes
    assert all(s > 2 * MiB for s in sizes[:-1]), sizes         # filled, not one chunk per volume
    assert len(sizes) <= 16 // 2 + 1
    for s, v in zip(sizes, manifest["disks"][0]["volumes"]):
        assert os.path.getsize(folder / v["file"]) == s
    assert leftovers(folder / manifest["disks"][0]["disk_id"]) == []
    assert replicator("seed", "verify", folder).returncode == 0
    assert_one_line_error(replicator("seed", "export", "vm02", disk, "--to", tmp_path / "m2", "--volume-size",
                                     "3M"), UsageError.exit_code, "too small")
    assert_one_line_error(replicator("seed", "export", "vm02", disk, "--to", tmp_path / "m2", "--volume-size",
                                     "4 parsecs"), UsageError.exit_code, "cannot read size")


def test_manipulated_seed_manifest(tmp_path):
    """The manifest edited by hand: every kind of wrong field is a one-line format error (exit 3), from
    `seed verify` and from `seed import` alike, and nothing reaches the replica."""
    disk = tmp_path / "vm.vhdx"
    random_vhdx(disk, data=6 * MiB)
    assert replicator("seed", "export", "vm01", disk, "--to", tmp_path / "media", "--volume-size", "4M"
                      ).returncode == 0
    folder = tmp_path / "media" / "vm01"
    good = json.loads((folder / "seed.json").read_text())

    def edit(change):
        m = json.loads(json.dumps(good))
        change(m)
        return m

    cases = {
        "disk_id": edit(lambda m: m["disks"][0].update(disk_id="not-a-uuid")),
        "size": edit(lambda m: m["disks"][0].update(size="big")),
        "file": edit(lambda m: m["disks"][0]["volumes"][0].pop("file")),
        "volumes": edit(lambda m: m["disks"][0].update(volumes={"a": 1})),
        "disks": edit(lambda m: m.update(disks=None)),
        "generation": edit(lambda m: m["disks"][0]["volumes"][1].update(generation=7)),
        "start": edit(lambda m: m["disks"][0]["volumes"][1].update(start=5)),
        "xxh3": edit(lambda m: m["disks"][0]["volumes"][0].update(xxh3=12)),
        "../": edit(lambda m: m["disks"][0]["volumes"][0].update(file="../../../etc/passwd")),
        "manifest": [1, 2, 3],
        "unknown field": edit(lambda m: m.update(extra=1)),
    }
    replica = tmp_path / "replica"
    for word, manifest in cases.items():
        (folder / "seed.json").write_text(json.dumps(manifest))
        verify = assert_one_line_error(replicator("seed", "verify", folder), FormatError.exit_code, word)
        imp = assert_one_line_error(replicator("seed", "import", folder, "--replica-root", replica),
                                    FormatError.exit_code, word)
        assert verify.split("seed manifest")[-1] == imp.split("seed manifest")[-1]
        assert not os.path.exists(replica / "disks") or os.listdir(replica / "disks") == []
    (folder / "seed.json").write_text("{not json")
    assert_one_line_error(replicator("seed", "verify", folder), FormatError.exit_code, "not JSON")

"""An offline seed imported into a storage root that two trust groups share: the import records whose
disks they are (--trust-group, or the one group the replicatord configuration maps to the root), so the
other group's primary -- its own certificate, authorized into the same root -- can neither read, claim nor
write them, while the owner's primary continues them. An import that cannot tell whose disks they are is
refused in one line and creates nothing."""
from __future__ import annotations

import json
import os

import pytest

from replicator.transport import AuthorizationEntry, AuthorizationError
from replicator.vhdx import VhdxDisk

from ..operator.helpers import assert_one_line_error, random_vhdx, replicator
from .conftest import MiB, Peer, image_bytes

CONFIG = '''[daemon]
state_dir = "{state}"
[replica]
auth = "kerberos"
{allow}
'''
ALLOW = '[[replica.allow]]\nprincipal = "{principal}"\nstorage = "{root}"\ntrust_group = "{group}"\n'


def _config(tmp_path, name: str, root, groups: dict[str, str]) -> str:
    path = tmp_path / name
    path.write_text(CONFIG.format(state=tmp_path / "state", allow="".join(
        ALLOW.format(principal=p, root=root, group=g) for p, g in groups.items())))
    return str(path)


def _seed(tmp_path, name: str, seed: int) -> tuple[str, str, bytes]:
    """A seed of one disk: (machine folder, disk id, the disk's bytes)."""
    disk = tmp_path / f"{name}.vhdx"
    random_vhdx(disk, size=8 * MiB, data=4 * MiB, seed=seed)
    assert replicator("seed", "export", name, disk, "--to", tmp_path / "media").returncode == 0
    folder = tmp_path / "media" / name
    with VhdxDisk.open(str(disk)) as d:
        data = d.read(0, d.size)
    return str(folder), json.loads((folder / "seed.json").read_text())["disks"][0]["disk_id"], data


def test_an_imported_seed_belongs_to_its_trust_group(servers, pki, tmp_path):
    root = tmp_path / "root"
    server = servers.cert([AuthorizationEntry("primary1", str(root), "tenant-a"),
                           AuthorizationEntry("primary2", str(root), "tenant-b")])
    owner, other = Peer(server, pki, tmp_path, "primary1"), Peer(server, pki, tmp_path, "primary2")
    shared = _config(tmp_path, "shared.toml", root, {"primary1": "tenant-a", "primary2": "tenant-b"})
    folder, disk_id, data = _seed(tmp_path, "vm01", 1)

    # two groups map to the root: whose disk is it? refused, nothing created
    assert_one_line_error(replicator("seed", "import", folder, "--replica-root", root, "--config", shared), 2,
                          "tenant-a, tenant-b", "--trust-group")
    assert not root.exists()

    done = replicator("seed", "import", folder, "--replica-root", root, "--config", shared, "--trust-group",
                      "tenant-a")
    assert done.returncode == 0 and "tenant-a" in done.stdout, done.stderr
    assert json.loads((root / "owners.json").read_text()) == {disk_id: "tenant-a"}
    # the other tenant's primary gets nothing: not the disk, its digests, an upload, nor the id itself
    for call, args in (("state", ()), ("ensure_disk", (8 * MiB,)), ("digests", (65536,))):
        with pytest.raises(AuthorizationError, match="belongs to trust group 'tenant-a'"):
            other.call(call, disk_id, *args)
    status, body = other.raw("PUT", f"/v1/disks/{disk_id}/uploads/abcd?offset=0", data=b"x" * 100)
    assert status == 403 and b"tenant-a" in body
    assert json.loads((root / "owners.json").read_text()) == {disk_id: "tenant-a"}
    assert [n for n in os.listdir(root / "disks" / disk_id / "spool") if n.endswith(".delta")] == []
    # the owner's primary continues it from the seed
    info = owner.call("ensure_disk", disk_id, 8 * MiB)
    assert info["generation"] >= 1 and info["committed"]
    assert image_bytes(server._stores[str(root)].disk(disk_id)) == data

    # an import into a disk another group owns is refused whole
    assert_one_line_error(replicator("seed", "import", folder, "--replica-root", root, "--trust-group", "tenant-b"),
                          22, disk_id, "belongs to trust group 'tenant-a'")
    assert json.loads((root / "owners.json").read_text()) == {disk_id: "tenant-a"}


def test_the_trust_group_comes_from_the_roots_one_mapping(servers, pki, tmp_path):
    root = tmp_path / "root"
    server = servers.cert([AuthorizationEntry("primary1", str(tmp_path / "elsewhere"), "tenant-a"),
                           AuthorizationEntry("primary2", str(root), "tenant-b")])
    config = _config(tmp_path, "one.toml", root, {"primary2": "tenant-b"})
    folder, disk_id, data = _seed(tmp_path, "vm02", 2)
    done = replicator("seed", "import", folder, "--replica-root", root, "--config", config)
    assert done.returncode == 0 and "tenant-b" in done.stdout, done.stderr
    assert json.loads((root / "owners.json").read_text()) == {disk_id: "tenant-b"}
    assert Peer(server, pki, tmp_path, "primary2").call("state", disk_id)
    # without a configuration, the groups owning disks in the root decide: one of them, no question
    folder3, disk3, _ = _seed(tmp_path, "vm03", 3)
    done = replicator("seed", "import", folder3, "--replica-root", root, "--config", tmp_path / "none.toml")
    assert done.returncode == 0, done.stderr
    assert json.loads((root / "owners.json").read_text()) == {disk_id: "tenant-b", disk3: "tenant-b"}
    # ... two of them: ambiguous
    owners = json.loads((root / "owners.json").read_text())
    (root / "owners.json").write_text(json.dumps({**owners, "00000000-0000-0000-0000-000000000001": "tenant-c"}))
    folder4, disk4, _ = _seed(tmp_path, "vm04", 4)
    assert_one_line_error(replicator("seed", "import", folder4, "--replica-root", root, "--config",
                                     tmp_path / "none.toml"), 2, "tenant-b, tenant-c", "--trust-group")
    assert disk4 not in os.listdir(root / "disks")

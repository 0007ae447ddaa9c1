"""Kind 6's sibling: a seed manifest whose volume names lead outside the seed folder -- `..` anywhere, an
absolute path, a Windows path, an empty or `.` part -- is refused by `seed verify` and `seed import` in one
line naming the field, before any file it names is opened and before anything reaches the replica."""
from __future__ import annotations

import json
import os

import pytest

from replicator.errors import FormatError

from ..operator.helpers import MiB, assert_one_line_error, random_vhdx, replicator


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    where = tmp_path_factory.mktemp("seed")
    random_vhdx(where / "vm.vhdx", size=8 * MiB, data=2 * MiB)
    assert replicator("seed", "export", "vm01", where / "vm.vhdx", "--to", where / "media").returncode == 0
    folder = where / "media" / "vm01"
    return folder, json.loads((folder / "seed.json").read_text())


@pytest.mark.parametrize("name", ["../vol", "../../../etc/passwd", "a/../../vol", "sub/../vol", "/etc/passwd",
                                  "//etc/passwd", "C:\\vol", "..\\vol", "./vol", "a//vol", "vol/", ".."])
def test_volume_paths_outside_the_seed_folder_are_refused(seed, tmp_path, name):
    folder, good = seed
    manifest = json.loads(json.dumps(good))
    real = manifest["disks"][0]["volumes"][0]["file"]
    manifest["disks"][0]["volumes"][0]["file"] = name
    bad = tmp_path / "vm01"
    bad.mkdir()
    for f in os.listdir(folder):
        if f != "seed.json":
            os.symlink(folder / f, bad / f)
    (bad / "seed.json").write_text(json.dumps(manifest))
    for cmd in (("seed", "verify", bad), ("seed", "import", bad, "--replica-root", tmp_path / "replica")):
        line = assert_one_line_error(replicator(*cmd), FormatError.exit_code, "disks[0].volumes[0].file",
                                     "not a relative path inside the seed folder")
        assert real not in line
    assert not (tmp_path / "replica").exists()

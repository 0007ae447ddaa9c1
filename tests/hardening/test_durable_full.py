"""write_json_atomic on a full volume (a real small tmpfs): the write fails, the previous file is intact,
and no temporary file is left behind to fill the volume further."""
from __future__ import annotations

import errno
import json
import os

import pytest

from replicator.durable import write_json_atomic

from .test_disk_full import small_fs  # noqa: F401  (a real 12 MiB tmpfs)


def test_full_volume_keeps_old_file_and_leaves_no_temp(small_fs):
    path = os.path.join(small_fs, "state.json")
    write_json_atomic(path, {"generation": 1})
    with open(os.path.join(small_fs, "filler"), "wb", buffering=0) as f:    # fill what is left
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    with pytest.raises(OSError) as err:
        write_json_atomic(path, {"generation": 2, "pad": "x" * 200_000})
    assert err.value.errno == errno.ENOSPC
    with open(path) as f:
        assert json.load(f) == {"generation": 1}
    assert sorted(os.listdir(small_fs)) == ["filler", "state.json"]

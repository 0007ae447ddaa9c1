"""The manifest and checkpoint formats: round trips, atomic replacement, and precise errors on damage."""
from __future__ import annotations

import os
import struct
import uuid

import numpy as np
import pytest

from replicator.errors import FormatError
from replicator.resync import manifest as M

from .diskutil import create, reopen


def _manifest(n_bytes=1_000_000, bs=65536, seed=0):
    rng = np.random.default_rng(seed)
    digests = rng.integers(0, 2**63, (M.block_count(n_bytes, bs), 2), dtype=np.uint64)
    ident = M.Identity(M.KIND_VHDX, uuid.uuid4().bytes_le, uuid.uuid4().bytes_le + bytes(16))
    return M.Manifest(bs, n_bytes, ident, digests, 123)


def test_round_trip(tmp_path):
    m = _manifest()
    M.save_manifest(str(tmp_path / "m"), m)
    got = M.load_manifest(str(tmp_path / "m"))
    assert (got.block_size, got.disk_size, got.identity, got.made_ns) == (65536, 1_000_000, m.identity, 123)
    assert np.array_equal(got.digests, m.digests)
    assert os.path.getsize(tmp_path / "m") == 128 + 16 * 16
    assert os.listdir(tmp_path) == ["m"]        # no temp file left behind


def test_replace_is_atomic_rename(tmp_path):
    path = str(tmp_path / "m")
    M.save_manifest(path, _manifest(seed=1))
    inode = os.stat(path).st_ino
    M.save_manifest(path, _manifest(seed=2))
    assert os.stat(path).st_ino != inode        # a new file renamed over the old, never rewritten in place
    assert np.array_equal(M.load_manifest(path).digests, _manifest(seed=2).digests)


def _recrc(raw: bytearray) -> None:
    raw[124:128] = struct.pack("<I", M.kernels.crc32c(bytes(raw[:124])))


@pytest.mark.parametrize("offset, value, fix_crc, where", [
    (0, b"X", False, 0),                 # magic
    (50, b"\xff", False, 124),           # any header byte: the CRC catches it
    (8, b"\x02", True, 8),               # version
    (10, b"\x09", True, 10),             # algorithm
    (16, b"\x00\x30", True, 16),         # block size not a power of two
    (32, b"\x05", True, 32),             # block count
    (200, b"\x01", False, 128),          # a digest: the array checksum catches it
])
def test_damage_names_the_offset(tmp_path, offset, value, fix_crc, where):
    path = tmp_path / "m"
    M.save_manifest(str(path), _manifest())
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(value)] = bytes(a ^ b for a, b in zip(raw[offset:offset + len(value)], value))
    if fix_crc:
        _recrc(raw)
    path.write_bytes(raw)
    with pytest.raises(FormatError) as e:
        M.load_manifest(str(path))
    assert e.value.offset == where and str(path) in e.value.message


@pytest.mark.parametrize("keep", [0, 100, 128 + 16 * 5, 128 + 16 * 16 - 1])
def test_truncation_is_an_error(tmp_path, keep):
    path = tmp_path / "m"
    M.save_manifest(str(path), _manifest())
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(FormatError, match="offset"):
        M.load_manifest(str(path))


def test_checkpoint_keeps_the_valid_prefix(tmp_path):
    path = str(tmp_path / "c")
    src = M.Identity(M.KIND_FILE, bytes(range(16)), bytes(range(32)))
    w = M.CheckpointWriter(path, 4096, 10 * 4096, src, M.Identity())
    rows = np.arange(20, dtype=np.uint64).reshape(10, 2)
    for first in range(0, 10, 3):
        w.add(first, rows[first:first + 3])
    w.sync()
    w.close()
    state = M.load_checkpoint(path)
    assert np.array_equal(state.digests, rows) and state.source == src
    full = os.path.getsize(path)
    for cut, left in ((full - 1, 9), (full - 16 - 16 - 1, 6)):   # torn tail: the records before survive
        with open(path, "r+b") as f:
            f.truncate(cut)
        assert len(M.load_checkpoint(path).digests) == left
    raw = bytearray(open(path, "rb").read())
    raw[160 + 16 + 3] ^= 1                              # damage the first record's digests
    open(path, "wb").write(raw)
    assert len(M.load_checkpoint(path).digests) == 0


def test_raw_identity_changes_with_any_write(tmp_path):
    """The settle wait makes even a write right after the identity was taken visible."""
    with create(tmp_path / "a", "raw", 1 << 20):
        pass
    with reopen(tmp_path / "a", read_only=False) as d:
        for i in range(5):
            before = M.disk_identity(d)
            d.write(i * 512, b"x")
            assert M.disk_identity(d, settle=False) != before
            assert before.same_disk(M.disk_identity(d))


def test_vhdx_identity_is_the_data_write_guid(tmp_path):
    with create(tmp_path / "a.vhdx", "vhdx", 4 << 20) as d:
        d.write(0, b"x" * 512)
    with reopen(tmp_path / "a.vhdx") as d:
        first = M.disk_identity(d)
        assert first.version_key[:16] == d.data_write_guid.bytes_le
    with reopen(tmp_path / "a.vhdx", read_only=False):
        pass                                             # opened read-write, nothing written
    with reopen(tmp_path / "a.vhdx", read_only=False) as d:
        assert M.disk_identity(d) == first
        d.write(512, b"y" * 512)
        assert M.disk_identity(d) != first


def test_block_devices_have_no_identity():
    class Dev:
        path = "/dev/null"
    assert not M.disk_identity(Dev()).trusted


def test_manifest_paths(tmp_path):
    assert M.manifest_path_for("x/disk.raw") == "x/disk.raw.digests"
    a = M.manifest_path_for("x/disk.raw", str(tmp_path))
    b = M.manifest_path_for("y/disk.raw", str(tmp_path))
    assert a != b and os.path.dirname(a) == str(tmp_path)
    assert M.checkpoint_path_for(a).endswith(".resync-checkpoint")

"""Recycled log files (hrl.writer.take_spare / HrlWriter(recycle=...)): a new log written over a shipped
log's file is exactly the new log -- its size is its EOLLocation, it reads back exactly what was written,
and no byte of the old log is left readable -- and the file grows in GROW steps ahead of the log's end,
cut to the log's bytes at the seal."""
from __future__ import annotations

import hashlib
import os

import pytest

from replicator.hrl import HrlReader, HrlWriter, LogNotSealed
from replicator.hrl import writer as writer_mod
from replicator.hrl.format import HEADER_SIZE
from replicator.hrl.writer import GROW, take_spare

MiB = 1 << 20
OLD = b"\xa5"                    # every byte of the old log's data: easy to find if any is left


def pattern(seed: int, length: int) -> bytes:
    return hashlib.shake_128(seed.to_bytes(8, "little")).digest(length)


def old_log(path, size: int = 4 * MiB) -> int:
    """A sealed log full of OLD bytes (in 256 KiB writes), standing in for a shipped log; returns its inode."""
    w = HrlWriter(str(path))
    piece = OLD * (256 << 10)
    for k in range(size // len(piece)):
        w.append(k * len(piece), piece)
    w.seal(durable=False)
    assert os.path.getsize(path) > 2 * MiB
    return os.stat(path).st_ino


def assert_exact(path, writes, disk_size=64 * MiB) -> None:
    """The file is exactly the sealed log: its size is EOLLocation and CurrentSize, and it reads back `writes`."""
    with HrlReader(str(path), disk_size) as r:
        assert os.path.getsize(path) == r.header.eol_location == r.header.current_size
        assert r.header.total_metadata_entries == len(writes)
        assert [(w.offset, r.read_data(w)) for w in r.writes] == writes
        assert r.verify_data() == sum(len(d) for _, d in writes)


def test_sealed_log_over_a_larger_spare_is_byte_exact(tmp_path):
    spare, path = tmp_path / "spare.hrl", tmp_path / "00000002.hrl"
    ino = old_log(spare)
    old_size = os.path.getsize(spare)
    writes = [(0, pattern(1, 5000)), (3 * MiB + 512, pattern(2, 300 << 10)), (7 * 4096, pattern(3, 64 << 10)),
              (40 * MiB, pattern(4, 1000))]
    w = HrlWriter(str(path), recycle=str(spare))
    assert w.fd >= 0 and os.fstat(w.fd).st_ino == ino            # the spare's file, not a new one
    for off, data in writes:
        w.append(off, data)
    header = w.seal()
    assert not spare.exists()
    assert os.stat(path).st_ino == ino
    size = os.path.getsize(path)
    assert size == header.eol_location < old_size                # cut to the log: the old tail is gone
    assert_exact(path, writes)
    raw = path.read_bytes()
    assert OLD * 16 not in raw, "bytes of the old log are still in the new one"


def test_unsealed_writer_takes_the_spare_name_away(tmp_path):
    spare, path = tmp_path / "spare.hrl", tmp_path / "00000002.hrl"
    ino = old_log(spare)
    w = HrlWriter(str(path), recycle=str(spare))
    w.append(0, pattern(5, 4096))
    w.commit()
    assert not spare.exists(), "the spare's name survives while its file is the active log"
    assert os.stat(path).st_ino == ino
    # the new header went over the old one at once: the file is an open log, not the old sealed one
    with pytest.raises(LogNotSealed):
        HrlReader(str(path))
    w.close()
    assert sorted(os.listdir(tmp_path)) == ["00000002.hrl"]


def test_no_spare_creates_a_new_file_and_no_spare(tmp_path):
    spare, path = tmp_path / "spare.hrl", tmp_path / "00000001.hrl"
    w = HrlWriter(str(path), recycle=str(spare))
    writes = [(4096, pattern(6, 9000))]
    for off, data in writes:
        w.append(off, data)
    w.seal()
    assert sorted(os.listdir(tmp_path)) == ["00000001.hrl"]
    assert_exact(path, writes)


def test_take_spare_without_a_spare(tmp_path):
    assert take_spare(str(tmp_path / "spare.hrl"), str(tmp_path / "new.hrl")) == -1
    assert os.listdir(tmp_path) == []


def test_take_spare_refuses_an_existing_target_and_keeps_the_spare(tmp_path):
    spare, target = tmp_path / "spare.hrl", tmp_path / "00000003.hrl"
    ino = old_log(spare)
    spare_bytes = spare.read_bytes()
    target.write_bytes(b"an existing log")
    assert take_spare(str(spare), str(target)) == -1
    assert os.stat(spare).st_ino == ino and spare.read_bytes() == spare_bytes
    assert target.read_bytes() == b"an existing log"
    # so a writer asked to recycle onto an existing name fails as a plain create does (O_EXCL)
    with pytest.raises(Exception, match="cannot create log"):
        HrlWriter(str(target), recycle=str(spare))
    assert os.stat(spare).st_ino == ino and target.read_bytes() == b"an existing log"


def test_take_spare_moves_the_file(tmp_path):
    spare, target = tmp_path / "spare.hrl", tmp_path / "00000004.hrl"
    ino = old_log(spare)
    fd = take_spare(str(spare), str(target))
    try:
        assert fd >= 0 and os.fstat(fd).st_ino == ino == os.stat(target).st_ino
        assert not spare.exists()
    finally:
        os.close(fd)


def test_log_longer_than_grow_grows_in_steps_and_ends_exact(tmp_path):
    path = tmp_path / "big.hrl"
    w = HrlWriter(str(path))
    assert os.fstat(w.fd).st_size == HEADER_SIZE + GROW      # grown ahead at once, with the header's write
    sizes, writes, off, seed = set(), [], 0, 10
    chunk = 3 * MiB + 4096                       # direct writes (>= BUFFER); some cross a GROW step
    while w.cursor < GROW + 8 * MiB:
        data = pattern(seed, chunk)
        w.append(off, data)
        writes.append((off, data))
        off, seed = off + chunk, seed + 1
        small = pattern(seed, 700)                # buffered ones too
        w.append(off, small)
        writes.append((off, small))
        off, seed = off + len(small), seed + 1
        st = os.fstat(w.fd).st_size
        assert st >= w.cursor                     # never behind the log's end
        sizes.add(st)
    assert len(sizes) == 2, f"the file should have grown once past its first step, not to {sorted(sizes)}"
    a, b = sorted(sizes)
    assert a == HEADER_SIZE + GROW and b - a > GROW
    w.seal()
    assert_exact(path, writes, disk_size=1 << 30)


def test_grow_steps_with_a_recycled_spare_smaller_than_the_log(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_mod, "GROW", 1 * MiB)
    spare, path = tmp_path / "spare.hrl", tmp_path / "00000002.hrl"
    ino = old_log(spare, size=2 * MiB)
    spare_size = os.path.getsize(spare)
    w = HrlWriter(str(path), recycle=str(spare))
    assert os.fstat(w.fd).st_size == spare_size                   # the spare's size is room already
    writes, sizes = [], set()
    for k in range(30):
        data = pattern(100 + k, 300 << 10)   # direct writes (>= BUFFER): no buffering
        w.append(k * (300 << 10), data)
        writes.append((k * (300 << 10), data))
        sizes.add(os.fstat(w.fd).st_size)
        assert os.fstat(w.fd).st_size >= w.cursor
    assert 3 <= len(sizes) <= 8, sorted(sizes)     # ~9 MiB in 1 MiB steps: a handful of extensions, not 30
    w.seal()
    assert os.stat(path).st_ino == ino
    assert_exact(path, writes)
    assert OLD * 16 not in path.read_bytes()


def test_zero_run_over_a_spare_reads_back_as_zeros(tmp_path):
    spare, path = tmp_path / "spare.hrl", tmp_path / "00000002.hrl"
    old_log(spare)
    w = HrlWriter(str(path), recycle=str(spare))
    w.append(0, pattern(7, 4096))
    w.append_zeroes(MiB, 512 << 10)               # its data area lies over the old log's data
    w.append(2 * MiB, pattern(8, 4096))
    w.seal()
    with HrlReader(str(path), 64 * MiB) as r:
        zero = r.writes[1]
        assert (zero.offset, zero.length) == (MiB, 512 << 10)
        assert r.read_raw(zero.data_location, zero.length) == bytes(zero.length)
        r.verify_data()
    assert OLD * 16 not in path.read_bytes()

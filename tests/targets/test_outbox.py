"""Outbox streams: a sender reads a stream while its encoder is still writing it, and sees exactly the
bytes of the finished file; an encoder failure reaches every reader."""
from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from replicator.errors import DiskIOError
from replicator.targets.outbox import PUBLISH, EncoderFailed, OutboxStream


def slow_writer(stream: OutboxStream, pieces, fail: bool = False):
    def run():
        try:
            with stream.writer() as sink:
                for p in pieces:
                    sink.write(p)
                    time.sleep(0.002)
                if fail:
                    raise RuntimeError("encoder broke")
        except RuntimeError:
            pass
    t = threading.Thread(target=run)
    t.start()
    return t


def pieces(total: int, step: int = 300_001):
    data = os.urandom(total)
    return data, [data[i:i + step] for i in range(0, total, step)]


def test_async_reader_gets_every_byte_while_the_file_grows(tmp_path):
    data, parts = pieces(5 * PUBLISH + 12345)
    stream = OutboxStream(str(tmp_path / "s.delta"))
    assert stream.final is None

    async def read_all():
        got = bytearray()
        async for chunk in stream.chunks(0, chunk=65536):
            got += chunk
        return bytes(got)
    t = slow_writer(stream, parts)
    got = asyncio.run(read_all())
    t.join()
    assert got == data and stream.final == len(data)
    with open(stream.path, "rb") as f:
        assert f.read() == data


def test_threaded_reader_resumes_from_an_offset(tmp_path):
    data, parts = pieces(3 * PUBLISH + 7)
    stream = OutboxStream(str(tmp_path / "s.delta"))
    t = slow_writer(stream, parts)
    got = b"".join(stream.read_chunks(1000))
    t.join()
    assert got == data[1000:]


def test_encoder_failure_wakes_the_readers(tmp_path):
    _, parts = pieces(PUBLISH // 2)
    stream = OutboxStream(str(tmp_path / "s.delta"))

    async def read_all():
        async for _ in stream.chunks(0):
            pass
    t = slow_writer(stream, parts, fail=True)
    with pytest.raises(EncoderFailed, match="encoder broke"):
        asyncio.run(read_all())
    t.join()


def test_a_finished_path_and_a_missing_one(tmp_path):
    path = tmp_path / "done.delta"
    path.write_bytes(b"x" * 5000)
    s = OutboxStream.of(str(path))
    assert s.final == 5000 and OutboxStream.of(s) is s
    assert b"".join(OutboxStream.of(str(path)).read_chunks(10)) == b"x" * 4990
    with pytest.raises(DiskIOError, match="cannot read the outbox stream"):
        OutboxStream.of(str(tmp_path / "missing.delta"))


def test_a_recycled_file_is_written_over_and_cut_to_the_new_stream(tmp_path):
    spent = str(tmp_path / "spent.bin")
    first, parts = pieces(2 * PUBLISH)
    s1 = OutboxStream(str(tmp_path / "one.delta"))
    slow_writer(s1, parts).join()
    OutboxStream.recycle(s1.path, spent)
    inode = os.stat(spent).st_ino
    second, parts = pieces(PUBLISH // 3)                   # shorter: the old tail must not survive
    s2 = OutboxStream(str(tmp_path / "two.delta"), recycle=spent)
    assert not os.path.exists(spent) and os.stat(s2.path).st_ino == inode
    slow_writer(s2, parts).join()
    assert b"".join(s2.read_chunks(0)) == second
    with open(s2.path, "rb") as f:
        assert f.read() == second

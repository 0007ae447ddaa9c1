"""A log written in the background (HrlWriter(background=True), the export's logs): the same log as one
written in place, byte for byte where it counts; the appender waits for the file only when SPOOL_MAX
bytes are queued; a failure of the file work on the thread reaches the appender as one clear error."""
from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from replicator.errors import DiskIOError
from replicator.hrl import HrlReader, HrlWriter
from replicator.hrl import writer as writer_mod

MiB = 1 << 20
UID = uuid.UUID(int=7)


def pattern(seed: int, length: int) -> bytes:
    return hashlib.shake_128(seed.to_bytes(8, "little")).digest(length)


def script(seed: int) -> list[tuple]:
    """Writes of every shape the log batches differently: small (buffered), >= BUFFER (direct), zero runs
    (holes over a recycled file), enough entries to close metadata blocks on their own."""
    rnd = random.Random(seed)
    ops = []
    for k in range(700):
        kind = rnd.random()
        off = rnd.randrange(0, 60 * MiB) // 512 * 512
        if kind < 0.7:
            ops.append(("w", off, pattern(seed * 1000 + k, rnd.choice([512, 4096, 8192, 65536]))))
        elif kind < 0.8:
            ops.append(("w", off, bytearray(pattern(seed * 1000 + k, rnd.choice([256 << 10, 300 << 10])))))
        else:
            ops.append(("z", off, rnd.choice([4096, 1 << 20, 3 << 20])))
    return ops


def write_log(path, ops, *, background: bool, recycle=None) -> HrlWriter:
    w = HrlWriter(str(path), unique_id=UID, background=background, recycle=recycle)
    for i, (kind, off, x) in enumerate(ops):
        if kind == "w":
            w.append(off, x)
            if isinstance(x, bytearray):
                x[:] = b"\xee" * len(x)          # the caller reuses its buffer at once: the log keeps its copy
        else:
            w.append_zeroes(off, x)
        if i % 97 == 0:
            w.commit()                            # as a guest's flush does
    w.seal(durable=False)
    return w


def contents(path) -> tuple:
    with HrlReader(str(path), 64 * MiB) as r:
        return (os.path.getsize(path), r.header.eol_location, r.header.total_metadata_entries,
                [(x.offset, x.length, x.data_location, x.data_checksum) for x in r.writes],
                hashlib.sha256(b"".join(r.read_data(x) for x in r.writes)).hexdigest())


@pytest.mark.parametrize("seed", [1, 2])
def test_background_log_equals_one_written_in_place(tmp_path, seed):
    write_log(tmp_path / "inline.hrl", script(seed), background=False)
    # over a recycled file full of another log's bytes, too: none of them may be read back
    old = tmp_path / "spare.hrl"
    write_log(old, [("w", k * MiB, b"\xa5" * MiB) for k in range(48)], background=False)
    write_log(tmp_path / "spooled.hrl", script(seed), background=True, recycle=str(old))
    assert not old.exists()
    assert contents(tmp_path / "spooled.hrl") == contents(tmp_path / "inline.hrl")
    with HrlReader(str(tmp_path / "spooled.hrl"), 64 * MiB) as r:
        assert r.verify_data() > 0
        assert b"\xa5" * 512 not in b"".join(r.read_data(x) for x in r.writes)


def test_appends_wait_only_when_spool_max_bytes_are_queued(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_mod, "SPOOL_MAX", 1 * MiB)
    w = HrlWriter(str(tmp_path / "a.hrl"), background=True)
    gate, entered = threading.Event(), threading.Event()
    w._spool.put(lambda: (entered.set(), gate.wait()))           # the file work stalls, as on a busy device
    assert entered.wait(5)
    t0 = time.monotonic()
    for k in range(4):                                           # 1 MiB queued: the appender goes on
        w.append(k * (256 << 10), pattern(k, 256 << 10))
    assert time.monotonic() - t0 < 1.0
    done = threading.Event()
    threading.Thread(target=lambda: (w.append(9 * MiB, pattern(9, 256 << 10)), done.set()), daemon=True).start()
    assert not done.wait(0.5)                                    # over SPOOL_MAX: it waits for the file
    gate.set()
    assert done.wait(5)
    w.seal(durable=False)
    with HrlReader(str(tmp_path / "a.hrl"), 64 * MiB) as r:
        assert [x.offset for x in r.writes] == [0, 256 << 10, 512 << 10, 768 << 10, 9 * MiB]
        assert r.verify_data() == 5 * (256 << 10)


def test_a_failed_write_on_the_thread_reaches_the_appender(tmp_path):
    """A real failure (the file size limit: EFBIG) in a child process: the next append or the seal raises
    one DiskIOError naming the log; the log's fd is closed by close()."""
    code = textwrap.dedent(f"""
        import os, resource, signal, sys
        from replicator.errors import DiskIOError
        from replicator.hrl import HrlWriter
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 20, 3 << 20))
        w = HrlWriter({str(tmp_path / "big.hrl")!r}, background=True)
        try:
            for k in range(400):
                w.append(k * 65536, b"x" * 65536)
            w.seal(durable=False)
        except DiskIOError as e:
            fd = w.fd
            w.close()
            import time; time.sleep(0.2)
            print("ERR", e.message, "line" if "\\n" not in e.message else "lines")
            print("CLOSED", w.fd == -1)
            sys.exit(0)
        print("NO ERROR")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("ERR ") and "big.hrl: log write failed: File too large" in lines[0], lines
    assert lines[0].endswith(" line")
    assert lines[1] == "CLOSED True"


def test_a_log_that_cannot_be_created_fails_its_first_append_or_seal(tmp_path):
    (tmp_path / "taken.hrl").write_bytes(b"someone else's")
    w = HrlWriter(str(tmp_path / "taken.hrl"), background=True)
    with pytest.raises(DiskIOError, match="taken.hrl: cannot create log"):
        for k in range(100):
            w.append(k * 4096, b"y" * (256 << 10))
        w.seal(durable=False)
    w.close()
    assert (tmp_path / "taken.hrl").read_bytes() == b"someone else's"


def test_a_creation_that_fails_before_the_constructor_queues_its_header_is_still_raised_later(tmp_path,
                                                                                               monkeypatch):
    """The race the test above can lose: the spool's thread has already failed to create the file when
    the constructor queues the header. The constructor still returns; the next append or seal raises."""
    real = HrlWriter._write

    def after_the_open(self, data, offset):
        deadline = time.monotonic() + 30
        while self._spool.error is None and time.monotonic() < deadline:
            time.sleep(0.001)               # until the spool's thread has recorded its failure
        assert self._spool.error is not None
        return real(self, data, offset)
    monkeypatch.setattr(HrlWriter, "_write", after_the_open)
    (tmp_path / "taken.hrl").write_bytes(b"someone else's")
    w = HrlWriter(str(tmp_path / "taken.hrl"), background=True)
    monkeypatch.setattr(HrlWriter, "_write", real)
    with pytest.raises(DiskIOError, match="taken.hrl: cannot create log"):
        w.append(0, b"y" * 4096)
        w.seal(durable=False)
    w.close()
    assert (tmp_path / "taken.hrl").read_bytes() == b"someone else's"


def test_a_log_given_up_drops_its_queued_writes_and_lets_go_of_its_file(tmp_path):
    """A log closed with discard (the tracker gave it up for a resync) writes nothing more once its
    current job ends, and join() returns only when its thread has closed the file: the file may then be
    recycled as the next log's without a late write landing in it."""
    path = tmp_path / "given-up.hrl"
    w = HrlWriter(str(path), background=True)
    gate, entered = threading.Event(), threading.Event()
    w._spool.put(lambda: (entered.set(), gate.wait()))
    assert entered.wait(5)
    for k in range(8):
        w.append(k * MiB, pattern(k, 256 << 10))
    size_before = os.path.getsize(path)
    w.close(discard=True)
    gate.set()
    w.join()
    assert w.fd == -1
    assert os.path.getsize(path) == size_before              # none of the queued appends was written

"""pytest-benchmark microbenchmarks for the hot paths beyond the kernels (bench/bench_kernels.py):
VHDX read and write, HRL write and read, delta encode and decode, replica apply. Each works on 64 MiB of
realistic data (corpus blocks when var/bench/corpus.raw exists, a compressible mix otherwise), so the
medians read as throughput; the anchors each issue names are measured by the scripts next to this file.

    .venv/bin/python -m pytest bench/bench_hotpaths.py --benchmark-columns=median,ops
"""
from __future__ import annotations

import io
import os
import random
import uuid

import pytest

from replicator import delta
from replicator.hrl import HrlReader, HrlWriter
from replicator.replica import ReplicaStore
from replicator.vhdx import VhdxDisk, create_vhdx

MiB = 1 << 20
DATA = 64 * MiB
CORPUS = os.path.join(os.path.dirname(__file__), "..", "var", "bench", "corpus.raw")


@pytest.fixture(scope="module")
def payload() -> bytes:
    if os.path.exists(CORPUS):
        with open(CORPUS, "rb") as f:
            f.seek(512 * MiB)
            return f.read(DATA)
    rng = random.Random(1)
    return b"".join(rng.randbytes(4096) + b"text " * 819 + bytes(4096) for _ in range(DATA // 12288 + 1))[:DATA]


def _writes(n=1024, size=64 << 10, span=DATA * 4):
    rng = random.Random(2)
    return [(rng.randrange(0, span // size) * size, size) for _ in range(n)]


def test_vhdx_write_64mib_scattered(benchmark, tmp_path, payload):
    def run():
        path = str(tmp_path / f"w{random.getrandbits(32)}.vhdx")
        with create_vhdx(path, DATA * 4, block_size=2 * MiB) as d:
            for i, (off, n) in enumerate(_writes()):
                d.write(off, payload[i * n % DATA:i * n % DATA + n])
        os.unlink(path)
    benchmark.pedantic(run, rounds=3, iterations=1)


def test_vhdx_read_64mib(benchmark, tmp_path, payload):
    path = str(tmp_path / "r.vhdx")
    with create_vhdx(path, DATA, block_size=2 * MiB) as d:
        d.write(0, payload)
    buf = bytearray(4 * MiB)

    def run():
        with VhdxDisk.open(path) as d:
            for off in range(0, DATA, len(buf)):
                d.readinto(off, buf)
    benchmark.pedantic(run, rounds=5, iterations=1)


def _log(path, payload):
    w = HrlWriter(path)
    for i, (off, n) in enumerate(_writes()):
        w.append(off, payload[i * n % DATA:i * n % DATA + n])
    w.seal()


def test_hrl_write_64mib(benchmark, tmp_path, payload):
    def run():
        path = str(tmp_path / f"{random.getrandbits(32)}.hrl")
        _log(path, payload)
        os.unlink(path)
    benchmark.pedantic(run, rounds=3, iterations=1)


def test_hrl_read_verify_coalesce_64mib(benchmark, tmp_path, payload):
    path = str(tmp_path / "r.hrl")
    _log(path, payload)

    def run():
        with HrlReader(path) as r:
            r.verify_data()
            r.extents()
    benchmark.pedantic(run, rounds=5, iterations=1)


def _header(size=DATA):
    return delta.StreamHeader(disk_id=uuid.UUID(int=1), disk_size=size, block_size=MiB, generation=1,
                              base_generation=0, consistency="crash", source_logs=[], created=0.0, kind="delta",
                              extra={})


def _stream(payload) -> bytes:
    sink = io.BytesIO()
    enc = delta.DeltaEncoder(_header(), sink)
    enc.add_data(0, payload)
    enc.finish()
    return sink.getvalue()


def test_delta_encode_64mib(benchmark, payload):
    benchmark.pedantic(lambda: _stream(payload), rounds=3, iterations=1)


def test_delta_decode_verify_64mib(benchmark, payload):
    stream = _stream(payload)
    benchmark.pedantic(lambda: delta.verify_stream(io.BytesIO(stream)), rounds=5, iterations=1)


def test_replica_apply_64mib_cycle(benchmark, tmp_path, payload):
    stream = _stream(payload)

    def run():
        root = str(tmp_path / f"root{random.getrandbits(32)}")
        rd = ReplicaStore(root).ensure_disk(uuid.UUID(int=1), DATA)
        up = rd.open_upload("ab" * 16)
        up.write(0, stream)
        up.sync()
        up.close()
        rd.commit("ab" * 16)
    benchmark.pedantic(run, rounds=3, iterations=1)

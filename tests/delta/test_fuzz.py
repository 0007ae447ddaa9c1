"""Fuzzing the decoder: random bytes, random bytes behind a valid header, and valid streams mutated by
flips, inserts, deletions, splices and field rewrites with the CRC fixed up. Every example must decode or
raise a ReplicatorError subclass -- never another exception, never a hang (SIGALRM after 10 s) -- and a
frame it yields must be a frame of the original stream. Hypothesis explores; a fixed-seed batch makes CI
reproducible."""
from __future__ import annotations

import io
import random
import signal
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.delta import DeltaDecoder, apply_stream
from replicator.errors import ReplicatorError

from .helpers import KiB, MiB, MemDisk, content, decode_all, encode, header, records, refix, small_stream

H, OPS, STREAM = small_stream()
_, GOOD = decode_all(STREAM)
BIG_H = header(disk_size=2 * MiB, block_size=64 * KiB)
BIG = encode(BIG_H, [("data", 0, content("mixed", 300 * KiB, 3)), ("zero", 1 * MiB, 64 * KiB),
                     ("data", 1 * MiB + 100, content("text", 70 * KiB, 4))])
_, BIG_GOOD = decode_all(BIG)
TIME_LIMIT = 10


@contextmanager
def time_limit(seconds: int):
    def boom(*_):
        raise TimeoutError("decoder hung")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_decoder(data: bytes, good=None) -> None:
    """Decode and apply; only ReplicatorError may escape. With `good` (damage that did not recompute a
    CRC), every frame yielded must be the original frame at that place."""
    got = []
    with time_limit(TIME_LIMIT):
        try:
            dec = DeltaDecoder(io.BytesIO(data))
            for f in dec:
                got.append(f)
            assert dec.trailer is not None
        except ReplicatorError:
            assert good is None or got == good[:len(got)]
            return
        assert good is None or got == good
        try:
            apply_stream(io.BytesIO(data), MemDisk(dec.header.disk_size))
        except ReplicatorError:
            pass


def mutate(base: bytes, rng: random.Random) -> tuple[bytes, bool]:
    """A damaged copy, and whether a CRC was recomputed (then only the trailer digest can catch it)."""
    buf, forged = bytearray(base), False
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos:pos] = rng.randbytes(rng.randrange(1, 64))
        elif op == 2:
            del buf[pos:pos + rng.randrange(1, 200)]
        elif op == 3:
            src = rng.randrange(len(base))
            buf[pos:pos + 40] = base[src:src + 40]
        elif op == 4:
            del buf[pos:]
        else:
            buf, forged = bytearray(rewrite_field(bytes(buf), rng)), True
    return bytes(buf), forged


def rewrite_field(data: bytes, rng: random.Random) -> bytes:
    """Change a few bytes inside one record header or the trailer, then fix its CRC so checks go deeper."""
    try:
        recs = [r for r in records(data) if r[0] in ("frame", "trailer", "header")]
    except Exception:
        return data
    what, start, size = rng.choice(recs)
    if start + size > len(data) or size <= 8:
        return data
    buf = bytearray(data)
    lo = 16 if what == "header" else 4
    for _ in range(rng.randrange(1, 3)):
        i = start + rng.randrange(lo, size - 4)
        buf[i] = rng.choice((0, 0xFF, buf[i] ^ (1 << rng.randrange(8)), rng.randrange(256)))
    return refix(bytes(buf), start, size)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    run_decoder(data)
    run_decoder(b"RPLDELTA" + data)
    run_decoder(H.pack() + data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), big=st.booleans())
def test_mutated_streams(seed, big):
    base, good = (BIG, BIG_GOOD) if big else (STREAM, GOOD)
    data, forged = mutate(base, random.Random(seed))
    run_decoder(data, None if forged else good)


@pytest.mark.parametrize("batch", range(4))
def test_fixed_seed_batch(batch):
    rng = random.Random(batch)
    for _ in range(300):
        base, good = (BIG, BIG_GOOD) if rng.random() < 0.3 else (STREAM, GOOD)
        data, forged = mutate(base, rng)
        run_decoder(data, None if forged else good)

"""The VHDX log (§2.3): entry encoding and the §2.3.3 search for the active sequence.

Our writer only ever produces one-entry sequences; other writers (Hyper-V) keep several entries live with
tails pointing back, wrap around the ring, and leave stale entries of older sessions. These tests build
such rings directly so the reader is proven on layouts our writer never makes.
"""
from __future__ import annotations

import random
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.vhdx.log import (SECTOR, DataUpdate, ZeroUpdate, _Ring, decode_entry, encode_entry,
                                 find_active_sequence)

MiB = 1 << 20
GUID = uuid.UUID("12345678-1234-5678-1234-567812345678")


def updates_strategy():
    data = st.builds(lambda off, b: DataUpdate(off * SECTOR, bytes([b]) * 8 + random.Random(b).randbytes(4080)
                                                + bytes([b]) * 8),
                     st.integers(0, 4000), st.integers(0, 255))
    zero = st.builds(lambda off, n: ZeroUpdate(off * SECTOR, n * SECTOR), st.integers(0, 4000), st.integers(1, 300))
    return st.lists(st.one_of(data, zero), max_size=140)


@settings(max_examples=60, deadline=None)
@given(updates=updates_strategy(), seq=st.integers(1, 2**64 - 1))
def test_entry_roundtrip(updates, seq):
    blob = encode_entry(updates, sequence_number=seq, log_guid=GUID, tail=0, flushed_file_offset=3 * MiB,
                        last_file_offset=4 * MiB)
    ring = _Ring(blob + bytes(SECTOR))
    e = decode_entry(ring, 0, GUID, 0)
    assert e is not None
    assert e.sequence_number == seq and e.length == len(blob)
    assert list(e.updates) == list(updates)


def test_any_flipped_byte_invalidates_the_entry():
    blob = encode_entry([DataUpdate(0, bytes(range(256)) * 16), ZeroUpdate(MiB, MiB)], sequence_number=7,
                        log_guid=GUID, tail=0, flushed_file_offset=MiB, last_file_offset=2 * MiB)
    rng = random.Random(1)
    for _ in range(200):
        bad = bytearray(blob)
        bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
        assert decode_entry(_Ring(bytes(bad)), 0, GUID, 0) is None


def _ring(size, placements):
    """placements: (position, sequence, tail, guid, marker byte). Entries may wrap the ring's end."""
    raw = bytearray(size)
    for pos, seq, tail, guid, marker in placements:
        blob = encode_entry([DataUpdate(marker * SECTOR, bytes([marker]) * SECTOR)], sequence_number=seq,
                            log_guid=guid, tail=tail, flushed_file_offset=MiB, last_file_offset=MiB)
        for i, b in enumerate(blob):
            raw[(pos + i) % size] = b
    return bytes(raw)


def test_multi_entry_sequence_replays_from_the_heads_tail():
    e = 2 * SECTOR   # each entry: one descriptor sector + one data sector
    raw = _ring(MiB, [(0, 10, 0, GUID, 1), (e, 11, 0, GUID, 2), (2 * e, 12, e, GUID, 3)])
    active = find_active_sequence(raw, GUID, 0)
    assert [x.sequence_number for x in active] == [11, 12]     # the head's tail is entry 11


def test_sequence_wrapping_the_end_of_the_ring():
    size, e = 64 * SECTOR, 2 * SECTOR
    start = size - SECTOR                                       # first entry straddles the end
    raw = _ring(size, [(start, 40, start, GUID, 1), ((start + e) % size, 41, start, GUID, 2)])
    active = find_active_sequence(raw, GUID, 0)
    assert [x.sequence_number for x in active] == [40, 41]
    assert active[0].position == start


def test_stale_entries_of_another_session_are_ignored():
    e = 2 * SECTOR
    other = uuid.uuid4()
    raw = _ring(MiB, [(0, 99, 0, other, 1), (e, 5, e, GUID, 2), (2 * e, 100, 2 * e, other, 3)])
    active = find_active_sequence(raw, GUID, 0)
    assert [x.sequence_number for x in active] == [5]


def test_torn_head_falls_back_to_the_previous_complete_sequence():
    e = 2 * SECTOR
    raw = bytearray(_ring(MiB, [(0, 1, 0, GUID, 1), (e, 2, e, GUID, 2), (2 * e, 3, 2 * e, GUID, 3)]))
    raw[2 * e + SECTOR + 100] ^= 0xFF                              # tear entry 3's data sector
    active = find_active_sequence(bytes(raw), GUID, 0)
    assert [x.sequence_number for x in active] == [2]


def test_sequence_whose_tail_is_missing_is_not_valid():
    e = 2 * SECTOR
    raw = _ring(MiB, [(e, 8, 0, GUID, 1)])                         # tail points at an empty slot
    assert find_active_sequence(raw, GUID, 0) == []

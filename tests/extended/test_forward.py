"""The change journal and merged reads a replica forwards to its extended replica (replica/forward.py)."""
from __future__ import annotations

import io
import os
import uuid

import pytest

from replicator import delta
from replicator.replica import ReplicaStore
from replicator.replica.forward import ChangeJournal, RacedCommit, coalesce, encode_forward, snapshot

MiB = 1 << 20


def test_coalesce_merges_overlapping_and_touching_ranges():
    assert coalesce([(10, 5), (0, 4), (4, 2), (12, 10), (40, 0), (30, 1)]) == [(0, 6), (10, 12), (30, 1)]


def test_journal_notes_merges_trims_and_ignores_a_torn_line(tmp_path):
    j = ChangeJournal(str(tmp_path))
    assert not j.enabled
    j.enable()
    j.record(1, [(0, 4096), (8192, 4096)])
    j.record(2, [(4096, 4096)])
    j.record(3, [(1 << 20, 512)])
    with open(j.path, "ab") as f:
        f.write(b'{"g":4,"r":[[0,')               # a crash while appending
    assert j.changes(0, 3) == [(0, 12288), (1 << 20, 512)]
    assert j.changes(1, 2) == [(4096, 4096)]
    j.trim(2)
    assert [g for g, _, _ in j.entries()] == [3]
    j.record(5, [(0, 512)])                          # after a torn line: a line of its own
    assert [g for g, _, _ in j.entries()] == [3, 5]


def test_a_compacted_journal_reads_a_superset_and_trims_only_what_was_forwarded(tmp_path):
    j = ChangeJournal(str(tmp_path))
    j.enable()
    j.COMPACT_AT = 200
    for g in range(1, 12):
        j.record(g, [(g * 4096, 4096)])
    assert len(j.entries()) < 11 and any(hi > lo for lo, hi, _ in j.entries())     # some were folded

    def covered(ranges, g):
        return any(o <= g * 4096 and g * 4096 + 4096 <= o + n for o, n in ranges)
    assert all(covered(j.changes(4, 6), g) for g in (5, 6))     # a superset, never less
    j.trim(6)
    assert all(covered(j.changes(6, 11), g) for g in range(7, 12))
    j.trim(11)
    assert j.entries() == []


def _send(store: ReplicaStore, disk_id: uuid.UUID, generation: int, writes, size: int = 8 * MiB) -> None:
    """One committed cycle on a replica store, as a primary's stream would make it."""
    d = store.ensure_disk(disk_id, size, block_size=MiB)
    header = delta.StreamHeader(disk_id=disk_id, disk_size=size, block_size=MiB, generation=generation,
                                base_generation=generation - 1, created=1.7e9 + generation)
    sink = io.BytesIO()
    with delta.DeltaEncoder(header, sink) as enc:
        for off, data in writes:
            enc.add_data(off, data)
        enc.finish()
    stream = f"{generation:08x}-0000-4000-8000-000000000000"
    up = d.open_upload(stream)
    up.write(0, sink.getvalue())
    up.sync()
    up.close()
    d.commit(stream)


def test_commits_are_noted_before_apply_and_merged_reads_are_last_write_wins(tmp_path):
    store = ReplicaStore(str(tmp_path / "b"))
    disk_id = uuid.uuid4()
    _send(store, disk_id, 1, [(0, b"\x01" * MiB)])
    path = store.disk(disk_id).path
    ChangeJournal(path).enable()
    _send(store, disk_id, 2, [(MiB, b"\x02" * 65536), (3 * MiB, b"\x03" * 4096)])
    _send(store, disk_id, 3, [(MiB, b"\x04" * 4096)])               # overwrites part of generation 2
    j = ChangeJournal(path)
    ranges = j.changes(1, 3)
    assert ranges == [(MiB, 65536), (3 * MiB, 4096)]
    snap = snapshot(path)
    assert snap.generation == 3
    header = delta.StreamHeader(disk_id=disk_id, disk_size=8 * MiB, block_size=MiB, generation=2,
                                base_generation=1)
    sink = io.BytesIO()
    stats = encode_forward(path, snap, ranges, header, sink)
    assert stats.plain_bytes + stats.zeroed_bytes == 65536 + 4096       # the merged change, not the sum
    sink.seek(0)
    frames = {fr.offset: bytes(fr.data) for fr in delta.DeltaDecoder(sink) if fr.data is not None}
    assert frames[MiB][:4096] == b"\x04" * 4096 and frames[MiB][4096:] == b"\x02" * (65536 - 4096)


def test_a_read_that_raced_a_commit_is_refused(tmp_path):
    store = ReplicaStore(str(tmp_path / "b"))
    disk_id = uuid.uuid4()
    _send(store, disk_id, 1, [(0, b"\x01" * MiB)])
    path = store.disk(disk_id).path
    snap = snapshot(path)
    _send(store, disk_id, 2, [(0, b"\x02" * 4096)])                  # lands while the extended leg reads
    header = delta.StreamHeader(disk_id=disk_id, disk_size=8 * MiB, block_size=MiB, generation=1,
                                base_generation=0)
    with pytest.raises(RacedCommit):
        encode_forward(path, snap, [(0, 4096)], header, io.BytesIO())
    st = os.stat(os.path.join(path, "state.json"))
    assert st.st_size > 0

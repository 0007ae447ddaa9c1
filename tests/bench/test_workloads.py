"""Workload models: reproducible from their seed, with the shape their name promises."""
from __future__ import annotations

import uuid

import numpy as np

from replicator.bench import workloads
from replicator.hrl import HrlWriter

MiB = 1 << 20


def make(model, seed=1, rate=200_000, duration=300, disk=64 * MiB):
    return workloads.synthetic(model, disk_size=disk, rate=rate, duration=duration, seed=seed)


def test_same_seed_same_writes_and_bytes():
    for model in workloads.MODELS:
        a, b, c = make(model), make(model), make(model, seed=2)
        assert np.array_equal(a.t, b.t) and np.array_equal(a.offset, b.offset) and np.array_equal(a.length, b.length)
        assert all(bytes(a.data(i)) == bytes(b.data(i)) for i in range(0, len(a.t), 97))
        assert not np.array_equal(a.offset[:50], c.offset[:50])


def test_writes_stay_on_the_disk_in_time_and_at_the_rate():
    for model in workloads.MODELS:
        w = make(model)
        assert (w.offset >= 0).all() and (w.offset + w.length <= w.disk_size).all()
        assert (np.diff(w.t) >= 0).all() and w.t[-1] < w.duration
        assert 0.85 < w.bytes_written / (200_000 * 300) < 1.15, model
        assert len(w.data(0)) == w.length[0]


def top_share(w, block=64 << 10, top=0.01):
    """Share of written bytes that land in the hottest `top` fraction of the disk's blocks."""
    counts = np.bincount(w.offset // block, weights=w.length, minlength=w.disk_size // block)
    hottest = np.sort(counts)[::-1][:max(1, int(len(counts) * top))]
    return hottest.sum() / counts.sum()


def test_zipf_and_db_are_hotter_than_uniform():
    uniform, zipf, db = make("uniform"), make("zipf"), make("db")
    assert top_share(zipf) > 3 * top_share(uniform)
    assert top_share(db) > 2 * top_share(uniform)


def test_append_is_sequential():
    w = make("append")
    ends = w.offset[:-1] + w.length[:-1]
    following = w.offset[1:] == ends
    assert following.mean() > 0.99            # every write starts where the last ended, except at a wrap


def test_hrl_chain_replays_writes_in_order(tmp_path):
    paths, prev = [], uuid.UUID(int=0)
    for k in range(2):
        p = str(tmp_path / f"{k}.hrl")
        w = HrlWriter(p, previous_unique_id=prev)
        for j in range(5):
            w.append((k * 5 + j) * 4096, bytes([k * 5 + j + 1]) * 4096)
        prev = w.seal().unique_id
        paths.append(p)
    wl = workloads.parse("hrl:" + ",".join(paths), disk_size=None, rate=1, duration=1)
    try:
        assert list(wl.offset) == [i * 4096 for i in range(10)]
        assert bytes(wl.data(7)) == bytes([8]) * 4096
        assert (np.diff(wl.t) > 0).all() and wl.disk_size >= 10 * 4096
    finally:
        wl.close()

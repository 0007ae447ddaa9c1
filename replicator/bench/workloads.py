"""Write workloads for the copy-frequency simulation: seeded, reproducible streams of timestamped writes.

A workload is three arrays (virtual time in seconds, disk offset, length) plus a way to get each write's
bytes. Synthetic models draw their bytes from a seeded pool of "real-ish" data (text, small integers,
incompressible bytes and zeros, like a guest's files), so the delta streams compress as real data does.
An HRL chain replays the writes of existing Hyper-V Replica Logs with their recorded timestamps.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

KiB, MiB = 1 << 10, 1 << 20
POOL_SIZE = 16 * MiB
POOL_CHUNK = 64 * KiB
MODELS = ("uniform", "zipf", "append", "db")


@dataclass
class Workload:
    name: str
    description: str
    disk_size: int
    duration: float
    t: np.ndarray                     # float64 virtual seconds, non-decreasing
    offset: np.ndarray                # int64
    length: np.ndarray                # int64
    data: Callable[[int], object]     # index -> bytes-like of length[i]
    closers: list = field(default_factory=list)

    @property
    def bytes_written(self) -> int:
        return int(self.length.sum())

    def close(self) -> None:
        for c in self.closers:
            c()
        self.closers.clear()


@functools.lru_cache(maxsize=4)
def data_pool(seed: int, size: int = POOL_SIZE) -> np.ndarray:
    """Chunks of 64 KiB: 45 % text, 20 % small integers, 25 % random bytes, 10 % zeros (seeded; read-only)."""
    rng = np.random.default_rng(seed)
    vocab = [bytes(rng.integers(97, 123, int(n), dtype=np.uint8)) for n in rng.integers(2, 11, 3000)]
    n = size // POOL_CHUNK
    kinds = rng.choice(4, n, p=[0.45, 0.20, 0.25, 0.10])
    out = np.zeros(size, dtype=np.uint8)
    for i, kind in enumerate(kinds):
        lo = i * POOL_CHUNK
        if kind == 0:
            words = rng.zipf(1.3, 14000) % len(vocab)
            text = b" ".join(vocab[w] for w in words)[:POOL_CHUNK].ljust(POOL_CHUNK, b"\n")
            out[lo:lo + POOL_CHUNK] = np.frombuffer(text, np.uint8)
        elif kind == 1:
            out[lo:lo + POOL_CHUNK] = rng.geometric(0.02, POOL_CHUNK // 4).astype("<u4").view(np.uint8)
        elif kind == 2:
            out[lo:lo + POOL_CHUNK] = rng.integers(0, 256, POOL_CHUNK, dtype=np.uint8)
    out.flags.writeable = False
    return out


def _arrivals(rng, lengths: np.ndarray, rate: float) -> np.ndarray:
    """Poisson-like arrival times whose long-run byte rate is `rate` bytes per second."""
    return np.cumsum(rng.exponential(1.0, len(lengths)) * lengths / rate)


def _count(rate: float, duration: float, mean_len: float) -> int:
    return max(1, int(rate * duration / mean_len * 1.05) + 16)


def _zipf_blocks(rng, n: int, blocks: int, s: float) -> np.ndarray:
    """n draws of block indices with P(k-th hottest) ~ 1/k^s, hot blocks scattered over the disk."""
    weights = 1.0 / np.arange(1, blocks + 1) ** s
    cdf = np.cumsum(weights) / weights.sum()
    rank = np.minimum(np.searchsorted(cdf, rng.random(n)), blocks - 1)
    return rng.permutation(blocks)[rank]


def _uniform(rng, disk_size, rate, duration):
    lengths = rng.integers(1, 17, _count(rate, duration, 34 * KiB)) * 4 * KiB      # 4 to 64 KiB
    offsets = rng.integers(0, (disk_size - lengths) // (4 * KiB) + 1) * 4 * KiB
    return "uniform random 4-64 KiB writes (4 KiB aligned) over the whole disk", lengths, offsets


def _zipf(rng, disk_size, rate, duration):
    n = _count(rate, duration, 16 * KiB)
    lengths = np.full(n, 16 * KiB, dtype=np.int64)
    offsets = _zipf_blocks(rng, n, disk_size // (16 * KiB), 1.1) * 16 * KiB
    return ("hot-spot: 16 KiB writes, block popularity Zipf(s=1.1) over the whole disk, hot blocks scattered",
            lengths, offsets)


def _append(rng, disk_size, rate, duration):
    lengths = rng.integers(1, 17, _count(rate, duration, 34 * KiB)) * 4 * KiB
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])) % (disk_size - 64 * KiB)
    return "sequential log append: 4-64 KiB writes one after the other, wrapping at the end of the disk", \
        lengths, starts


def _db(rng, disk_size, rate, duration):
    """70 % of the bytes are 8 KiB page updates (Zipf s=0.9 over the first 90 %), 30 % WAL appends."""
    n = _count(rate, duration, 8 * KiB * 0.9 + 32 * KiB * 0.1)
    wal = rng.random(n) < 0.1
    lengths = np.where(wal, 32 * KiB, 8 * KiB).astype(np.int64)
    data_area = disk_size * 9 // 10 // (8 * KiB)
    pages = _zipf_blocks(rng, n, data_area, 0.9) * 8 * KiB
    wal_lo, wal_len = data_area * 8 * KiB, disk_size - data_area * 8 * KiB - 32 * KiB
    wal_pos = wal_lo + (np.cumsum(np.where(wal, lengths, 0)) - lengths * wal) % max(wal_len, 32 * KiB)
    offsets = np.where(wal, wal_pos // (4 * KiB) * (4 * KiB), pages)
    return ("database-like: 8 KiB page writes (Zipf s=0.9 over 90 % of the disk) mixed with sequential "
            "32 KiB write-ahead-log appends in the last 10 % (1 write in 10)", lengths, offsets)


_MODELS = {"uniform": _uniform, "zipf": _zipf, "append": _append, "db": _db}


def synthetic(model: str, *, disk_size: int, rate: float, duration: float, seed: int = 1) -> Workload:
    """`rate` bytes per second of writes for `duration` virtual seconds, reproducible from `seed`."""
    if model not in _MODELS:
        raise ValueError(f"unknown workload {model!r}: use one of {', '.join(MODELS)} or hrl:PATH")
    rng = np.random.default_rng([seed, MODELS.index(model)])
    description, lengths, offsets = _MODELS[model](rng, disk_size, rate, duration)
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    t = _arrivals(rng, lengths, rate)
    keep = t < duration
    t, offsets, lengths = t[keep], offsets[keep], lengths[keep]
    pool = data_pool(seed)
    src = rng.integers(0, (POOL_SIZE - 64 * KiB) // 512, len(t)) * 512
    view = memoryview(pool.data)

    def data(i: int):
        return view[src[i]:src[i] + lengths[i]]
    return Workload(model, description, disk_size, float(duration), t, offsets, lengths, data)


def hrl_chain(paths: list[str], disk_size: int | None = None) -> Workload:
    """Replay the writes of a log chain at their recorded times (HRL stores whole seconds: writes within a
    second are spread evenly over it). Zero-fill entries are replayed as zeros."""
    from ..hrl import open_chain
    readers = open_chain(paths, disk_size, verify_data=False)
    writes = [(r, w) for r in readers for w in r.writes]
    if not writes:
        for r in readers:
            r.close()
        raise ValueError("the log chain holds no writes")
    stamps = np.array([w.timestamp for _, w in writes], dtype=np.float64)
    t = _spread_within_seconds(np.maximum.accumulate(stamps) - stamps[0])   # a clock step back: hold
    offsets = np.array([w.offset for _, w in writes], dtype=np.int64)
    lengths = np.array([w.length for _, w in writes], dtype=np.int64)
    size = disk_size or int(-(-int((offsets + lengths).max()) // MiB) * MiB)

    def data(i: int):
        r, w = writes[i]
        return r.read_data(w, verify=False)
    description = f"replay of {len(paths)} Hyper-V Replica Log(s), {len(writes)} writes with their recorded times"
    return Workload("hrl", description, size, float(t[-1] + 1.0), t, offsets, lengths, data,
                    [r.close for r in readers])


FIO_REPLACED = ("filename", "directory", "ioengine", "size", "filesize", "write_iolog", "read_iolog")


def fio_job(job_path: str, disk_size: int, seed: int = 1) -> Workload:
    """Run an fio job once against a scratch file with fio's I/O log on, and replay its writes (and trims,
    as zeros) at their recorded times. The job's own target, engine and size are replaced by a scratch
    file of `disk_size` bytes; everything else (pattern, block sizes, rates, runtime) is the job's."""
    import shutil
    import subprocess
    import tempfile
    fio = shutil.which("fio")
    if fio is None:
        raise ValueError("fio is not installed")
    work = tempfile.mkdtemp(prefix="fio-workload-")
    try:
        job = os.path.join(work, "job.fio")
        with open(job_path) as src, open(job, "w") as dst:
            for line in src:
                if line.split("=", 1)[0].strip() not in FIO_REPLACED:
                    dst.write(line)
        log = os.path.join(work, "io.log")
        subprocess.run([fio, f"--filename={os.path.join(work, 'target')}", f"--size={disk_size}",
                        "--ioengine=psync", f"--write_iolog={log}", "--output=/dev/null", job],
                       check=True, capture_output=True)
        t, offsets, lengths, trims = _parse_iolog(log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not len(t):
        raise ValueError(f"{job_path}: the fio job made no writes")
    if int(lengths.max()) > POOL_SIZE:
        raise ValueError(f"{job_path}: writes of {int(lengths.max())} bytes are larger than the data pool")
    pool = data_pool(seed)
    rng = np.random.default_rng(seed)
    src = (rng.random(len(t)) * ((POOL_SIZE - lengths) // 512)).astype(np.int64) * 512   # each slice fits
    view = memoryview(pool.data)
    zeros = bytes(int(lengths.max()))

    def data(i: int):
        return zeros[:lengths[i]] if trims[i] else view[src[i]:src[i] + lengths[i]]
    description = f"fio job {os.path.basename(job_path)} replayed from its I/O log ({len(t)} writes)"
    return Workload("fio", description, disk_size, float(t[-1] + 1.0), t, offsets, lengths, data)


def _parse_iolog(path: str):
    """fio iolog version 3: 'MSEC FILE ACTION OFFSET LENGTH'; writes are kept, trims become zero writes."""
    t, offsets, lengths, trims = [], [], [], []
    with open(path) as f:
        if "version 3" not in f.readline():
            raise ValueError(f"{path}: not an fio version 3 I/O log")
        for line in f:
            parts = line.split()
            if len(parts) == 5 and parts[2] in ("write", "trim"):
                t.append(int(parts[0]) / 1000.0)
                offsets.append(int(parts[3]))
                lengths.append(int(parts[4]))
                trims.append(parts[2] == "trim")
    return (np.array(t, dtype=np.float64), np.array(offsets, dtype=np.int64),
            np.array(lengths, dtype=np.int64), np.array(trims, dtype=bool))


def _spread_within_seconds(t: np.ndarray) -> np.ndarray:
    out = t.copy()
    _, first, counts = np.unique(t, return_index=True, return_counts=True)
    for lo, n in zip(first, counts):
        out[lo:lo + n] += np.arange(n) / n
    return out


def parse(spec: str, *, disk_size: int, rate: float, duration: float, seed: int = 1) -> Workload:
    """'uniform', 'zipf', 'append', 'db', 'hrl:LOG1[,LOG2...]' (a chain, oldest first) or 'fio:JOBFILE'."""
    if spec.startswith("fio:"):
        return fio_job(spec[4:], disk_size, seed)
    if spec.startswith("hrl:"):
        return hrl_chain([p for p in spec[4:].split(",") if p], disk_size)
    return synthetic(spec, disk_size=disk_size, rate=rate, duration=duration, seed=seed)

#!/usr/bin/env python3
"""Throughput of replicator's XXH3-128 block kernel against `xxhsum -H2` on the same (cached) file.

    .venv/bin/python bench/kernels_vs_xxhsum.py FILE [--reps N] [--threads N] [--recache]

The file is read once first so both sides hash from the page cache; then each repetition times, in
turn, `xxhsum -H2 FILE` (one process, one thread, the whole file) and the kernels on the same file,
all threads: xxh3_128_blocks over an mmap (open + mmap + hash + close) in 1 MiB and 64 KiB blocks,
and xxh3_128_file_blocks (pread per thread, no mapping). Medians are printed with the ratio of each
throughput to xxhsum's. Before timing, the kernel's whole-file XXH3-128 is checked against xxhsum's,
so both sides provably compute the same function.

Why two file paths: mapping costs the kernel page-table work per 4 KiB page unless the page cache
holds the file in large folios. A file read from disk usually is (readahead allocates them); a file
just written by another program often is not, and then mmap + populate alone can cost more than
xxhsum's whole run. --recache drops this file's cached pages (POSIX_FADV_DONTNEED, this file only)
and reads it back, giving the state a file read from disk has; it costs one cold read.
"""
from __future__ import annotations

import argparse
import mmap
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

import replicator.kernels as kernels

KIB, MIB = 1024, 1024 * 1024


def warm(path: str, recache: bool) -> None:
    """Pull the file into the page cache so no side pays for the disk."""
    with open(path, "rb", buffering=0) as f:
        if recache:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(16 * MIB)
        while f.readinto(buf):
            pass


def xxhsum_digest(path: str) -> str:
    out = subprocess.run(["xxhsum", "-H2", path], check=True, capture_output=True, text=True).stdout
    return out.split()[0]


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def timed(run, who: int = resource.RUSAGE_SELF) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all threads, or of the finished child processes)."""
    cpu0, wall0 = _cpu(who), time.perf_counter()
    run()
    return time.perf_counter() - wall0, _cpu(who) - cpu0


def time_xxhsum(path: str) -> tuple[float, float]:
    cmd = ["xxhsum", "-H2", path]
    return timed(lambda: subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                 resource.RUSAGE_CHILDREN)


def _mapped(f):
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)


def _hash_mapped(path: str, block_size: int, threads: int | None) -> None:
    with open(path, "rb") as f, _mapped(f) as mm:
        kernels.xxh3_128_blocks(mm, block_size, threads=threads)


def time_kernel(path: str, block_size: int, threads: int | None) -> tuple[float, float]:
    return timed(lambda: _hash_mapped(path, block_size, threads))


def time_file_kernel(path: str, block_size: int, threads: int | None) -> tuple[float, float]:
    return timed(lambda: kernels.xxh3_128_file_blocks(path, block_size, threads=threads))


def check_same_function(path: str) -> str:
    with open(path, "rb") as f, _mapped(f) as mm:
        ours = kernels.xxh3_128(mm).hex()
    theirs = xxhsum_digest(path)
    if ours != theirs:
        sys.exit(f"MISMATCH: kernels.xxh3_128 {ours} != xxhsum -H2 {theirs}")
    return ours


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="kernel threads (default: all CPUs)")
    parser.add_argument("--recache", action="store_true",
                        help="drop and re-read this file's cached pages first (see above)")
    args = parser.parse_args(argv)
    if shutil.which("xxhsum") is None:
        sys.exit("xxhsum not found (Debian package: xxhash)")
    if kernels.implementation != "native":
        print("warning: native kernels not loaded; timing the pure Python fallback", file=sys.stderr)

    size = os.path.getsize(args.file)
    warm(args.file, args.recache)
    digest = check_same_function(args.file)
    isa = kernels.native.isa() if kernels.native else "python"
    threads = args.threads or kernels.default_threads()
    print(f"file {args.file}: {size / MIB:.0f} MiB, XXH3-128 {digest} (kernel == xxhsum -H2)")
    print(f"kernel: {kernels.implementation} {isa}, {threads} thread(s); {args.reps} repetitions, medians\n")

    cases = {
        "xxhsum -H2 (whole file)": lambda: time_xxhsum(args.file),
        "mmap + blocks, 1 MiB": lambda: time_kernel(args.file, MIB, args.threads),
        "mmap + blocks, 64 KiB": lambda: time_kernel(args.file, 64 * KIB, args.threads),
        "mmap + blocks, 1 MiB, 1 thread": lambda: time_kernel(args.file, MIB, 1),
        "file_blocks (pread), 1 MiB": lambda: time_file_kernel(args.file, MIB, args.threads),
        "file_blocks (pread), 64 KiB": lambda: time_file_kernel(args.file, 64 * KIB, args.threads),
        "file_blocks (pread), 1 MiB, 1 thread": lambda: time_file_kernel(args.file, MIB, 1),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for name, run in cases.items():  # one untimed round: process start-up, page tables, thread stacks
        run()
    for _ in range(args.reps):
        for name, run in cases.items():
            times[name].append(run())

    # Other processes on the machine skew a 2-core run: show how busy it was, and the CPU time used
    # (GB per CPU-second is what the code costs, whatever the machine was doing meanwhile).
    print("load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + "\n")
    base = statistics.median(wall for wall, _ in times["xxhsum -H2 (whole file)"])
    print(f"{'':36} {'median s':>9} {'GB/s':>7} {'vs xxhsum':>10} {'CPU s':>7} {'GB/CPU-s':>9}")
    for name, samples in times.items():
        wall = statistics.median(w for w, _ in samples)
        cpu = statistics.median(c for _, c in samples)
        print(f"{name:36} {wall:9.3f} {size / wall / 1e9:7.2f} {base / wall:9.2f}x {cpu:7.3f} "
              f"{size / cpu / 1e9 if cpu else float('nan'):9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

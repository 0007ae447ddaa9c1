#!/usr/bin/env python3
"""Throughput of replicator's XXH3-128 block kernel against `xxhsum -H2` on the same (cached) file.

    .venv/bin/python bench/kernels_vs_xxhsum.py FILE [--reps N] [--threads N]

The file is read once first so both sides hash from the page cache; then each repetition times, in
turn, `xxhsum -H2 FILE` (one process, one thread, the whole file) and the kernel over an mmap of the
file in 1 MiB and 64 KiB blocks (open + mmap + hash + close, all threads). Medians are printed with
the ratio of the kernel's throughput to xxhsum's. Before timing, the kernel's whole-file XXH3-128 is
checked against xxhsum's, so both sides provably compute the same function.
"""
from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import time

import replicator.kernels as kernels

KIB, MIB = 1024, 1024 * 1024


def warm(path: str) -> None:
    """Pull the file into the page cache so no side pays for the disk."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 * MIB)
        while f.readinto(buf):
            pass


def xxhsum_digest(path: str) -> str:
    out = subprocess.run(["xxhsum", "-H2", path], check=True, capture_output=True, text=True).stdout
    return out.split()[0]


def time_xxhsum(path: str) -> float:
    start = time.perf_counter()
    subprocess.run(["xxhsum", "-H2", path], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _mapped(f):
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)


def time_kernel(path: str, block_size: int, threads: int | None) -> float:
    start = time.perf_counter()
    with open(path, "rb") as f, _mapped(f) as mm:
        kernels.xxh3_128_blocks(mm, block_size, threads=threads)
    return time.perf_counter() - start


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
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="kernel threads (default: all CPUs)")
    args = parser.parse_args(argv)
    if shutil.which("xxhsum") is None:
        sys.exit("xxhsum not found (Debian package: xxhash)")
    if kernels.implementation != "native":
        print("warning: native kernels not loaded; timing the pure Python fallback", file=sys.stderr)

    size = os.path.getsize(args.file)
    warm(args.file)
    digest = check_same_function(args.file)
    isa = kernels.native.isa() if kernels.native else "python"
    threads = args.threads or kernels.default_threads()
    print(f"file {args.file}: {size / MIB:.0f} MiB, XXH3-128 {digest} (kernel == xxhsum -H2)")
    print(f"kernel: {kernels.implementation} {isa}, {threads} thread(s); {args.reps} repetitions, medians\n")

    cases = {
        "xxhsum -H2 (whole file)": lambda: time_xxhsum(args.file),
        "kernel 1 MiB blocks": lambda: time_kernel(args.file, MIB, args.threads),
        "kernel 64 KiB blocks": lambda: time_kernel(args.file, 64 * KIB, args.threads),
        "kernel 1 MiB blocks, 1 thread": lambda: time_kernel(args.file, MIB, 1),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for name, run in cases.items():  # one untimed round: process start-up, page tables, thread stacks
        run()
    for _ in range(args.reps):
        for name, run in cases.items():
            times[name].append(run())

    base = statistics.median(times["xxhsum -H2 (whole file)"])
    print(f"{'':32} {'median s':>9} {'GB/s':>7} {'vs xxhsum':>10}")
    for name, samples in times.items():
        med = statistics.median(samples)
        print(f"{name:32} {med:9.3f} {size / med / 1e9:7.2f} {base / med:9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

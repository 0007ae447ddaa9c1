"""Sequential read of a whole VHDX: replicator vs `qemu-img convert -O raw`, same file, one run.

Both sides produce the same thing, a sparse raw copy on the same filesystem, and are run alternately on a
warm file; the output is each side's median and the ratio (qemu time / replicator time, >1 = faster).
A second figure, replicator reading into memory only, shows the read path without the write side.

    python bench/vhdx_read_vs_qemu.py var/bench/corpus.vhdx [--runs 5]
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import statistics
import subprocess
import sys
import time

from replicator.disk.base import ExtentKind
from replicator.disk.copy import copy_disk
from replicator.disk.raw import create_raw
from replicator.vhdx import VhdxDisk


def warm(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


def qemu_convert(src: str, out: str) -> float:
    if os.path.exists(out):
        os.unlink(out)
    t0 = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", src, out], check=True)
    return time.perf_counter() - t0


def our_convert(src: str, out: str) -> float:
    if os.path.exists(out):
        os.unlink(out)
    t0 = time.perf_counter()
    with VhdxDisk.open(src) as disk, create_raw(out, disk.size) as dst:
        copy_disk(disk, dst, flush=False)      # qemu-img convert does not fsync its output either
    return time.perf_counter() - t0


def our_read(src: str) -> tuple[float, int]:
    buf = bytearray(4 << 20)
    total = 0
    t0 = time.perf_counter()
    with VhdxDisk.open(src) as disk:
        for ext in disk.extents():
            if ext.kind is not ExtentKind.DATA:
                continue
            for pos in range(ext.offset, ext.end, len(buf)):
                n = min(len(buf), ext.end - pos)
                disk.readinto(pos, memoryview(buf)[:n])
                total += n
    return time.perf_counter() - t0, total


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("vhdx")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--scratch", default=None, help="directory for the raw outputs (default: next to input)")
    args = ap.parse_args()
    scratch = args.scratch or os.path.dirname(os.path.abspath(args.vhdx))
    out_q, out_r = os.path.join(scratch, "bench-qemu.raw"), os.path.join(scratch, "bench-ours.raw")
    warm(args.vhdx)
    qemu_times, our_times, read_times = [], [], []
    for _ in range(args.runs):
        qemu_times.append(qemu_convert(args.vhdx, out_q))
        our_times.append(our_convert(args.vhdx, out_r))
        t, data_bytes = our_read(args.vhdx)
        read_times.append(t)
    identical = filecmp.cmp(out_q, out_r, shallow=False)
    for p in (out_q, out_r):
        os.unlink(p)
    with VhdxDisk.open(args.vhdx) as disk:
        size = disk.size
    q, o, r = (statistics.median(x) for x in (qemu_times, our_times, read_times))
    result = {
        "file": args.vhdx, "virtual_size": size, "data_bytes": data_bytes, "runs": args.runs,
        "qemu_convert_s": round(q, 3), "replicator_convert_s": round(o, 3), "replicator_read_only_s": round(r, 3),
        "ratio_convert": round(q / o, 2), "ratio_read_only": round(q / r, 2),
        "replicator_read_MBps": round(data_bytes / r / 1e6), "outputs_identical": identical,
    }
    print(json.dumps(result, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())

"""Writes through the tracked export vs qemu-nbd serving the same VHDX: same client (fio, ioengine=nbd),
same load, one run. Target: replicator >= 0.7x qemu-nbd's throughput.

Each round starts both servers on a fresh copy of the same dynamic VHDX (so both allocate blocks), over a
Unix socket, and runs the same fio job against each; reports medians of MB/s and the ratio. replicator also
writes every byte into the active Hyper-V Replica Log and tracks dirty regions; qemu-nbd does neither.

    python bench/track_vs_qemu_nbd.py [--size 1G] [--bs 64k] [--rw randwrite] [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from replicator.cli.common import parse_size
from replicator.tracking import TrackedDisk
from replicator.tracking.service import ExportService
from replicator.vhdx import create_vhdx


def fio(uri: str, args) -> float:
    """MB/s written by one fio run against an NBD URI."""
    cmd = ["fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", f"--rw={args.rw}", f"--bs={args.bs}",
           f"--size={args.size}", f"--iodepth={args.iodepth}", "--numjobs=1", f"--runtime={args.runtime}",
           "--time_based=0", "--randrepeat=1", "--output-format=json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return job["write"]["bw_bytes"] / 1e6


def wait_for(path: str, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.02)


def run_qemu_nbd(image: str, sock: str, args) -> float:
    proc = subprocess.Popen(["qemu-nbd", "-f", "vhdx", "-k", sock, "-x", "d", "-t", "-e", "8", "--cache=writeback", image])
    try:
        wait_for(sock)
        return fio(f"nbd+unix:///d?socket={sock}", args)
    finally:
        proc.terminate()
        proc.wait()


def run_replicator(image: str, sock: str, args) -> float:
    disk = TrackedDisk(image)
    disk.resync_done()                       # tracking on: every write is logged
    with ExportService({"d": disk}, socket_path=sock) as svc:
        return fio(svc.uri("d"), args)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--bs", default="64k")
    ap.add_argument("--rw", default="randwrite")
    ap.add_argument("--iodepth", type=int, default=8)
    ap.add_argument("--runtime", type=int, default=30)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = os.path.abspath(tempfile.mkdtemp(prefix="bench-track-", dir="var/bench" if os.path.isdir("var/bench") else None))
    base = os.path.join(work, "base.vhdx")
    create_vhdx(base, parse_size(args.size) * 2, block_size=32 << 20).close()
    ours, theirs = [], []
    try:
        for i in range(args.runs):
            for name, fn, acc in (("qemu", run_qemu_nbd, theirs), ("ours", run_replicator, ours)):
                image = os.path.join(work, f"{name}-{i}.vhdx")
                shutil.copy(base, image)
                acc.append(fn(image, os.path.join(work, f"{name}.sock"), args))
                shutil.rmtree(image + ".rpl", ignore_errors=True)
                os.unlink(image)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    q, o = statistics.median(theirs), statistics.median(ours)
    print(json.dumps({"load": f"fio {args.rw} bs={args.bs} size={args.size} iodepth={args.iodepth}",
                      "runs": args.runs, "qemu_nbd_MBps": round(q), "replicator_MBps": round(o),
                      "ratio": round(o / q, 2), "target": 0.7}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The replica's apply of one cycle's stream: the native apply (kernels.FrameApplier) against the Python
loop (decode on a second thread, VhdxDisk.write through O_DIRECT), on the same spool and the same image.

  .venv/bin/python bench/replica_apply.py SPOOL IMAGE [--runs 3]

SPOOL is a delta stream as the replica spools it (replicate_vs_rsync.py leaves one as
var/bench/replicate/replica-root/disks/*/spool/spent.bin after its last cycle); IMAGE the replica VHDX it
was applied to (chain/base.vhdx next to it), copied here once so the original is left alone. The copy
has the stream applied once, untimed, so every timed apply meets the same allocated blocks, as a cycle
does on a replica in steady state. The variants alternate; the spool is read through before each one
(it was written moments before a commit). The decode alone (verify_stream, what the commit's check pass
costs) is timed too. Prints medians and the ratio of the Python loop's time to the native apply's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from replicator import delta, kernels  # noqa: E402
from replicator.vhdx import VhdxDisk  # noqa: E402
from replicator.vhdx.fileio import DirectWriteIO  # noqa: E402


class PythonLoopIO(DirectWriteIO):
    """The same O_DIRECT writer, which the native apply does not take (its type is not DirectWriteIO)."""


def read_through(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def timed(fn) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def apply(spool: str, image: str, io_factory) -> None:
    with open(spool, "rb") as f, VhdxDisk.open(image, read_only=False, io_factory=io_factory) as disk:
        stats = delta.apply_stream(f, disk)
        disk.flush()
    assert stats.native == (io_factory is DirectWriteIO and kernels.FrameApplier is not None)


def verify(spool: str) -> None:
    with open(spool, "rb") as f:
        delta.verify_stream(f)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spool")
    ap.add_argument("image")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", default=os.path.join(HERE, "..", "var", "bench", "replica-apply"))
    args = ap.parse_args()
    if kernels.FrameApplier is None:
        print("the native kernels are not active: nothing to compare", file=sys.stderr)
        return 2
    os.makedirs(args.work, exist_ok=True)
    image = os.path.join(args.work, "replica.vhdx")
    shutil.copyfile(args.image, image)
    apply(args.spool, image, DirectWriteIO)                    # blocks allocated: the steady state
    with open(args.spool, "rb") as f:
        dec = delta.DeltaDecoder(f)
        frames = sum(1 for _ in dec)
        plain = dec.trailer.plain_bytes
    runs = {"native": [], "python": [], "decode": []}
    for i in range(args.runs):
        for name, fn in (("native", lambda: apply(args.spool, image, DirectWriteIO)),
                         ("python", lambda: apply(args.spool, image, PythonLoopIO)),
                         ("decode", lambda: verify(args.spool))):
            read_through(args.spool)
            r = timed(fn)
            runs[name].append(r)
            print(f"run {i} {name}: {r['wall_s']:.2f} s wall, {r['cpu_s']:.2f} s CPU", file=sys.stderr, flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "cpu_s")} for k, v in runs.items()}
    report = {"spool_bytes": os.path.getsize(args.spool), "frames": frames, "plain_bytes": plain,
              "runs": runs, "median": med,
              "python_over_native_wall": med["python"]["wall_s"] / med["native"]["wall_s"],
              "python_over_native_cpu": med["python"]["cpu_s"] / med["native"]["cpu_s"]}
    os.unlink(image)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

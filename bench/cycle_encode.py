"""The primary's encode of one cycle: an HRL log of 1 GiB of changed real-data blocks (256 KiB extents at
random places of the 3 GiB corpus, the change replicate_vs_rsync.py makes) encoded into a delta stream file
the way a cycle writes its outbox (encode_log, ZSTD_LANES lanes), wall and CPU seconds.

  .venv/bin/python bench/cycle_encode.py [--runs 5] [--corpus var/bench/corpus] [--case real|random]

The log is written once (var/bench/cycle-encode/), read through before each run (a cycle reads a log
written moments before). With a second checkout given by --other, the runs
alternate between this checkout and that one, each in a fresh process, on the same log.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

from benchcorpus import ensure

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
MiB, GiB = 1 << 20, 1 << 30


def make_log(path: str, corpus: str, case: str, change: int, extent: int, seed: int) -> int:
    sys.path.insert(0, HERE)
    from replicate_vs_rsync import data_blocks, make_change
    from replicator.hrl import HrlWriter
    size = os.path.getsize(corpus)
    rng = random.Random(seed)
    change_list = make_change(size, change, extent, data_blocks(corpus), rng)
    w = HrlWriter(path)
    with open(corpus, "rb") as f:
        for dst, n, src in change_list:
            data = os.urandom(n) if case == "random" else os.pread(f.fileno(), n, src)
            w.append(dst, data)
    w.seal()
    return size


def encode_once(root: str, log: str, size: int, out: str) -> dict:
    sys.path.insert(0, root)
    import uuid
    from replicator import delta
    from replicator.hrl import HrlReader
    from replicator.replication.cycle import STREAM_BLOCK, ZSTD_LANES
    header = delta.StreamHeader(disk_id=uuid.UUID(int=1), disk_size=size, block_size=STREAM_BLOCK, generation=2,
                                base_generation=1, consistency="crash", source_logs=[], created=0.0,
                                kind="delta", extra={}, zstd_lanes=ZSTD_LANES)
    with open(log, "rb") as f:
        while f.read(16 * MiB):
            pass
    t0, c0 = time.perf_counter(), time.process_time()
    with open(out, "wb") as sink, HrlReader(log, size) as reader:
        stats = delta.encode_log(reader, header, sink)
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
            "stream": stats.stream_bytes, "root": os.path.abspath(root)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--corpus", default=os.path.join(ROOT, "var", "bench", "corpus"),
                    help="make-corpus's files without their suffix (default var/bench/corpus: .raw and .vhdx)")
    ap.add_argument("--case", default="real", choices=["real", "random"])
    ap.add_argument("--work", default=os.path.join(ROOT, "var", "bench", "cycle-encode"))
    ap.add_argument("--other", default="", help="a second checkout to alternate with (its kernels built)")
    ap.add_argument("--child", nargs=3, metavar=("ROOT", "LOG", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        root, log, size = args.child
        print(json.dumps(encode_once(root, log, int(size), os.path.join(os.path.dirname(log), "out.delta"))))
        return
    os.makedirs(args.work, exist_ok=True)
    log = os.path.join(args.work, f"{args.case}.hrl")
    corpus = ensure(args.corpus + ".raw")
    size = os.path.getsize(corpus)
    if not os.path.exists(log):
        sys.path.insert(0, ROOT)
        make_log(log, corpus, args.case, GiB, 256 << 10, 4)
    roots = [ROOT] + ([args.other] if args.other else [])
    runs: dict[str, list] = {os.path.abspath(r): [] for r in roots}
    for i in range(args.runs):
        for r in roots:
            out = subprocess.run([sys.executable, __file__, "--child", r, log, str(size)], capture_output=True,
                                 text=True, check=True).stdout
            res = json.loads(out)
            runs[res["root"]].append(res)
            print(i, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}),
                  file=sys.stderr, flush=True)
    med = statistics.median
    print(json.dumps({r: {"wall_s": round(med(x["wall"] for x in v), 3), "cpu_s": round(med(x["cpu"] for x in v), 3),
                          "stream_bytes": v[0]["stream"], "runs": len(v)} for r, v in runs.items()}, indent=1))


if __name__ == "__main__":
    main()

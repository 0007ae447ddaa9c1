"""Resync of two 3 GiB images that differ in 1 % of their 64 KiB blocks: replicator vs rsync, one run.

The pair: the shared corpus (ext4 of real files, `make-corpus`) copied twice; the source copy is mutated
with `make-corpus --mutate SRC 1 SEED`, the target copy stays the stale replica. Every timed run starts
from that same state (the target is re-copied from the corpus, then `sync`ed so no tool pays for the
copy's writeback) with both files in the page cache.

Variants, run in rotating order, each N times (median reported):
  replicator          in-process resync, no manifests: both sides read and digested
  replicator+manifest the target has a valid manifest (made by `scan` before the run), so only the
                      source is read; the source has none
  rsync               rsync --inplace --no-whole-file --ignore-times --fsync --stats SRC DST (the issue's
                      command; rsync picks its block size, ~sqrt(file size), here about 56 KiB)
  rsync-B64K          the same with -B 65536: rsync given our block size, its best case on this data

Fairness: --ignore-times makes rsync run its delta algorithm although size and mtime match (-c would add a
whole-file checksum pass over both files before the delta pass, which resync does not do); --fsync gives
it our durability (resync fsyncs the target before it returns). Bytes moved: rsync's "Literal data" (and
its total protocol traffic), ours the bytes copied (and, as an estimate of what a networked resync would
send, that plus 16 bytes of digest per block).

    python bench/resync_vs_rsync.py [--runs 5] [--corpus var/bench/corpus.raw] [--seed 42]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

from benchcorpus import MAKE_CORPUS, ensure
from replicator.cli.resync import resync_files
from replicator.disk.probe import open_disk
from replicator.resync import manifest_path_for, scan

BLOCK = 64 << 10


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def warm(*paths: str) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(16 << 20):
                pass


def prepare(corpus: str, work: str, seed: int) -> tuple[str, str]:
    """The mutated source (made once: every tool only reads it) and the target path."""
    os.makedirs(work, exist_ok=True)
    src, dst = os.path.join(work, "src.raw"), os.path.join(work, "dst.raw")
    stamp = os.path.join(work, "src.stamp")
    want = f"{os.stat(corpus).st_mtime_ns} {seed}"
    if not (os.path.exists(src) and os.path.exists(stamp) and open(stamp).read() == want):
        sh("cp", "--sparse=always", corpus, src)
        print(sh(MAKE_CORPUS, "--mutate", src, "1", str(seed)).strip(), file=sys.stderr)
        with open(stamp, "w") as f:
            f.write(want)
    return src, dst


def reset_target(corpus: str, dst: str, mdir: str) -> None:
    for name in os.listdir(mdir):
        os.unlink(os.path.join(mdir, name))
    if os.path.exists(dst):
        os.unlink(dst)
    sh("cp", "--sparse=always", corpus, dst)
    os.sync()


def run_ours(src: str, dst: str, mdir: str, with_manifest: bool) -> dict:
    if with_manifest:
        with open_disk(dst) as d:
            scan(d, manifest_path_for(dst, mdir), block_size=BLOCK)
        os.sync()
    t0 = time.perf_counter()
    st = resync_files(src, dst, block_size=BLOCK, manifest_dir=mdir, use_manifests=with_manifest)
    seconds = time.perf_counter() - t0
    assert st.target_from_manifest == with_manifest and not st.source_from_manifest
    return {"seconds": seconds, "bytes_copied": st.bytes_copied, "bytes_zeroed": st.bytes_zeroed,
            "blocks_differing": st.blocks_differing, "source_read": st.source_bytes_read,
            "target_read": st.target_bytes_read, "wire_estimate": st.bytes_copied + 16 * st.blocks_compared}


def _stat(text: str, label: str) -> int:
    m = re.search(rf"^{label}: ([\d,]+)", text, re.M)
    return int(m.group(1).replace(",", "")) if m else -1


def run_rsync(src: str, dst: str, *extra: str) -> dict:
    argv = ["rsync", "--inplace", "--no-whole-file", "--ignore-times", "--fsync", "--stats", *extra, src, dst]
    t0 = time.perf_counter()
    out = sh(*argv)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "literal": _stat(out, "Literal data"), "matched": _stat(out, "Matched data"),
            "sent": _stat(out, "Total bytes sent"), "received": _stat(out, "Total bytes received")}


def same(a: str, b: str) -> bool:
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--corpus", default="var/bench/corpus.raw")
    ap.add_argument("--work", default="var/bench/resync")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    ensure(args.corpus)
    if shutil.which("rsync") is None:
        print("rsync is not installed", file=sys.stderr)
        return 2
    src, dst = prepare(args.corpus, args.work, args.seed)
    mdir = os.path.join(args.work, "manifests")
    os.makedirs(mdir, exist_ok=True)
    variants = {"replicator": lambda: run_ours(src, dst, mdir, False),
                "replicator+manifest": lambda: run_ours(src, dst, mdir, True),
                "rsync": lambda: run_rsync(src, dst),
                "rsync-B64K": lambda: run_rsync(src, dst, "-B", str(BLOCK))}
    results: dict[str, list[dict]] = {k: [] for k in variants}
    identical = True
    for i in range(args.runs):
        names = list(variants)
        for name in names[i % len(names):] + names[:i % len(names)]:    # rotate: noise hits all alike
            reset_target(args.corpus, dst, mdir)
            warm(src, dst)
            results[name].append(variants[name]())
            if i == 0:
                identical &= same(src, dst)
            print(f"run {i + 1} {name:20} {results[name][-1]['seconds']:.2f} s", file=sys.stderr)
    print(json.dumps(summary(args, results, identical), indent=2))
    return 0 if identical else 1


def summary(args, results: dict, identical: bool) -> dict:
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in results.items()}
    ours, mine = results["replicator"][0], results["replicator+manifest"][0]
    out = {
        "data": f"{args.corpus} ({os.path.getsize(args.corpus)} bytes, ext4 of real files), source mutated: "
                f"1 % of 64 KiB blocks, seed {args.seed}; warm page cache",
        "runs": args.runs, "median_seconds": {k: round(v, 3) for k, v in med.items()},
        "all_seconds": {k: [round(r["seconds"], 3) for r in v] for k, v in results.items()},
        "speedup": {f"{o} vs {r}": round(med[r] / med[o], 2)
                    for o in ("replicator", "replicator+manifest") for r in ("rsync", "rsync-B64K")},
        "bytes_moved": {"replicator_copied": ours["bytes_copied"], "replicator_zeroed": ours["bytes_zeroed"],
                        "replicator_wire_estimate": ours["wire_estimate"]},
        "bytes_read": {"replicator": {"source": ours["source_read"], "target": ours["target_read"]},
                       "replicator+manifest": {"source": mine["source_read"], "target": mine["target_read"]}},
        "blocks_differing": ours["blocks_differing"], "targets_identical_to_source": identical,
    }
    for r in ("rsync", "rsync-B64K"):
        first = results[r][0]
        out["bytes_moved"][f"{r}_literal"] = first["literal"]
        out["bytes_moved"][f"{r}_matched"] = first["matched"]
        out["bytes_moved"][f"{r}_protocol_total"] = first["sent"] + first["received"]
    return out

if __name__ == "__main__":
    sys.exit(main())

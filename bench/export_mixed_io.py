"""Issue 12: a guest's writes beside its own reads on another connection (another disk queue, or another
disk of the machine), through the export as replicatord starts it and through qemu-nbd, in one run.

  .venv/bin/python bench/export_mixed_io.py [--runtime 20] [--rounds 2] [--beside reads|flushes]
                                           [--export-root DIR] [--out docs/bench/export-mixed-io.json]

One fio, two jobs on two NBD connections to the same disk (a copy of the 4 GiB corpus VHDX that
bench/guest_impact.py builds):
  w  4 KiB random writes, queue depth 1, guest_impact's rate cap (54 MiB/s) and region: the latency-sensitive
     guest;
  r  4 KiB random reads, queue depth 4, anywhere on the disk, as fast as they come; or, with
     --beside flushes, a guest's journal: 64 KiB writes at queue depth 1 elsewhere on the disk, a FLUSH after
     every 4 (fio's fsync=4).
--export-root runs the export from another checkout (an A/B against older code, in the same run).
The file's page cache is dropped before each server starts, so reads begin cold. Servers, alternated per
round: `python -m replicator.tracking.shim` (the export process replicatord starts; no replication runs)
and `qemu-nbd -f vhdx --cache=writeback -t`. Each in a session of its own, as is fio.

Reported per server (median of the rounds): the writes' IOPS, median, p99, p99.9 and max latency (fio's
total latency of every I/O, from its log), the reads' IOPS; and the export's over qemu-nbd's. What it shows:
whether one connection's reads hold up another's writes. Before the export read off its loop and stopped
polling one connection while others were busy, they did (docs/performance.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import hoststeal
from guest_impact import ensure_corpus

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MiB, GiB = 1 << 20, 1 << 30
REGION = (32 * MiB, 736 * MiB)          # guest_impact's write region on the 4 GiB corpus
RATE = "54m"


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def start_server(kind: str, disk: str, work: str, root: str = ROOT) -> tuple[subprocess.Popen, str]:
    sock, control = os.path.join(work, "nbd.sock"), os.path.join(work, "control.sock")
    for p in (sock, control):
        if os.path.exists(p):
            os.unlink(p)
    if kind == "qemu-nbd":
        argv, uri = ["qemu-nbd", "-f", "vhdx", "--cache=writeback", "-t", "-k", sock, disk], f"nbd+unix:///?socket={sock}"
    else:
        argv = [sys.executable, "-m", "replicator.tracking.shim", "--name", "vm", "--nbd-socket", sock,
                "--control", control, f"disk={disk}"]
        uri = f"nbd+unix:///disk?socket={sock}"
    out = open(os.path.join(work, f"{kind}.log"), "a")
    proc = subprocess.Popen(argv, cwd=root, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{kind} did not start (see {out.name})")
        time.sleep(0.05)
    time.sleep(0.5)
    return proc, uri


BESIDE = {
    "reads": ["--rw=randread", "--bs=4k", "--iodepth=4", "--norandommap", "--randrepeat=0"],
    "flushes": ["--rw=randwrite", "--bs=64k", "--iodepth=1", "--fsync=4", f"--offset={REGION[0] + REGION[1]}",
                "--size=1g", "--refill_buffers=1", "--randrepeat=0"],
}


def run_one(kind: str, disk: str, work: str, runtime: int, beside: str = "reads", root: str = ROOT) -> dict:
    drop_cache(disk)
    proc, uri = start_server(kind, disk, work, root)
    prefix = os.path.join(work, f"w-{kind}")
    for suffix in ("_lat.1.log", "_clat.1.log", "_slat.1.log"):
        if os.path.exists(prefix + suffix):
            os.unlink(prefix + suffix)
    common = ["--ioengine=nbd", f"--uri={uri}", "--time_based", f"--runtime={runtime}"]
    argv = ["fio", "--output-format=json", f"--output={prefix}.json",
            "--name=w", *common, "--rw=randwrite", "--bs=4k", "--iodepth=1", f"--offset={REGION[0]}",
            f"--size={REGION[1]}", f"--rate={RATE}", "--refill_buffers=1", "--buffer_compress_percentage=50",
            "--randrepeat=1", f"--write_lat_log={prefix}", "--log_avg_msec=0",
            "--name=r", *common, *BESIDE[beside]]
    steal0 = hoststeal.sample()
    try:
        subprocess.run(argv, check=True, start_new_session=True, stdout=subprocess.DEVNULL)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    steal = hoststeal.share(steal0, hoststeal.sample())
    lat = np.loadtxt(prefix + "_lat.1.log", delimiter=",", usecols=1, ndmin=1) / 1e6
    with open(prefix + ".json") as f:
        text = f.read()
    jobs = {j["jobname"]: j for j in json.loads(text[text.index("{"):])["jobs"]}
    pct = lambda q: round(float(np.percentile(lat, q)), 3)       # noqa: E731
    return {"server": kind, "w_iops": round(jobs["w"]["write"]["iops"]), "w_median_ms": pct(50),
            "w_p99_ms": pct(99), "w_p999_ms": pct(99.9), "w_max_ms": round(float(lat.max()), 2),
            "r_iops": round(jobs["r"]["read" if beside == "reads" else "write"]["iops"]), "steal": steal}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=20, help="seconds per run")
    ap.add_argument("--rounds", type=int, default=2, help="rounds, each running both servers (alternating first)")
    ap.add_argument("--corpus", default=os.path.join(ROOT, "var", "bench", "guest-impact-corpus", "4096M"))
    ap.add_argument("--beside", choices=sorted(BESIDE), default="reads", help="the second job (see above)")
    ap.add_argument("--export-root", default=ROOT, help="the checkout the export runs from")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    _, corpus_vhdx = ensure_corpus(args.corpus, 4 * GiB)
    work = tempfile.mkdtemp(prefix="mixed-io-", dir=os.path.join(ROOT, "var", "bench"))
    try:
        disk = os.path.join(work, "disk.vhdx")
        subprocess.run(["cp", "--sparse=always", corpus_vhdx, disk], check=True)
        runs = []
        for i in range(args.rounds):
            order = ("export", "qemu-nbd") if i % 2 == 0 else ("qemu-nbd", "export")
            for kind in order:
                r = run_one(kind, disk, work, args.runtime, args.beside, os.path.abspath(args.export_root))
                print(json.dumps(r), file=sys.stderr, flush=True)
                runs.append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {}
    for kind in ("export", "qemu-nbd"):
        mine = [r for r in runs if r["server"] == kind]
        med[kind] = {k: statistics.median(r[k] for r in mine) for k in mine[0] if k != "server"}
    e, q = med["export"], med["qemu-nbd"]
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "runtime_s": args.runtime, "rounds": args.rounds,
              "beside": args.beside, "export_root": args.export_root,
              "runs": runs, "median": med,
              "ratios": {"w_iops": round(e["w_iops"] / q["w_iops"], 3), "w_p99": round(e["w_p99_ms"] / q["w_p99_ms"], 2),
                         "w_p999": round(e["w_p999_ms"] / q["w_p999_ms"], 2), "r_iops": round(e["r_iops"] / q["r_iops"], 3)}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

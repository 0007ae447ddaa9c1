"""The tracked export vs qemu-nbd serving the same VHDX: same client (fio, ioengine=nbd), same loads, one run.
Target: replicator >= 1.0x qemu-nbd's IOPS in every case (issue 12).

A base dynamic VHDX is filled with random data first (so reads read data and writes overwrite allocated
blocks, the steady state of a VM disk). Each round copies it twice, serves one copy with
`qemu-nbd -f vhdx` and the other with replicator's ExportService (tracking on: every write also goes into
the active Hyper-V Replica Log and marks a dirty region), each on a Unix socket, and runs every case against
both, alternating which goes first. Before the cases one sequential 1 MiB write pass covers each disk (the
same for both servers), so the tracker's first-write-per-region cost (a durable dirty bit) is behind us:
this is the export with replication paused, the state issue 12 compares with qemu-nbd. After each case
the log is cut (as a cycle does); the sealed logs are deleted at the end of the round.
Reports the median IOPS of the rounds per case and the ratio.

    python bench/track_vs_qemu_nbd.py [--size 1G] [--runtime 10] [--runs 3]
        [--cases 4k:randread:1,4k:randwrite:1,...] [--json out.json]
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
from replicator.tracking.shim import open_disks
from replicator.tracking.service import ExportService
from replicator.vhdx import create_vhdx

DEFAULT_CASES = ",".join(f"{bs}:{rw}:{qd}" for qd in (1, 16) for bs in ("4k", "64k")
                         for rw in ("randread", "randwrite"))


def warm_up(uri: str, args) -> None:
    subprocess.run(["fio", "--name=warm", "--ioengine=nbd", f"--uri={uri}", "--rw=write", "--bs=1M",
                    f"--size={args.size}", "--iodepth=4", "--output-format=json"], check=True, capture_output=True)


def fio(uri: str, bs: str, rw: str, iodepth: int, args) -> float:
    """IOPS of one time-based fio run against an NBD URI."""
    cmd = ["fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--size={args.size}", f"--iodepth={iodepth}", "--numjobs=1", f"--runtime={args.runtime}",
           "--time_based=1", "--randrepeat=0", "--norandommap", "--output-format=json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return job["read" if "read" in rw else "write"]["iops"]


def wait_for(path: str, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.02)


def fill(path: str, size: int) -> None:
    """A dynamic VHDX (32 MiB blocks) holding random data over its whole virtual size."""
    d = create_vhdx(path, size, block_size=32 << 20)
    try:
        chunk = 8 << 20
        for off in range(0, size, chunk):
            d.write(off, os.urandom(min(chunk, size - off)))
    finally:
        d.close()


class QemuNbd:
    def __init__(self, image: str, sock: str):
        self.sock = sock
        self.proc = subprocess.Popen(["qemu-nbd", "-f", "vhdx", "-k", sock, "-x", "d", "-t", "-e", "8",
                                      "--cache=writeback", image])
        wait_for(sock)
        self.uri = f"nbd+unix:///d?socket={sock}"

    def after_case(self) -> None:
        pass

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


class Replicator:
    def __init__(self, image: str, sock: str):
        # The bench measures the I/O path: a long 64 KiB write case must not trip the log-size resync.
        # Opened as the export process opens a guest's disk (its log written on a thread of its own, the
        # session's GUIDs changed up front, metadata commits in the background, small page-cache folios);
        # only the logs stay on disk (no memory budget without the export's pacing task to enforce it).
        self.disk = open_disks({"d": image}, 0)["d"]
        self.disk.max_log_share = 1000.0
        self.disk.resync_done()                       # tracking on: every write is logged
        self.svc = ExportService({"d": self.disk}, socket_path=sock).start()
        self.uri = self.svc.uri("d")

    def after_case(self) -> None:
        assert self.svc.cut()[0] is not None, self.disk.reason

    def close(self) -> None:
        self.svc.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cases", default=DEFAULT_CASES, help="bs:rw:iodepth,...")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    cases = [(bs, rw, int(qd)) for bs, rw, qd in (c.split(":") for c in args.cases.split(","))]
    work = os.path.abspath(tempfile.mkdtemp(prefix="bench-track-", dir="var/bench" if os.path.isdir("var/bench") else None))
    base = os.path.join(work, "base.vhdx")
    fill(base, parse_size(args.size))
    results = {c: {"qemu": [], "ours": []} for c in cases}
    try:
        for i in range(args.runs):
            servers = {}
            for name, cls in (("qemu", QemuNbd), ("ours", Replicator)):
                image = os.path.join(work, f"{name}.vhdx")
                shutil.copy(base, image)
                servers[name] = cls(image, os.path.join(work, f"{name}.sock"))
                warm_up(servers[name].uri, args)
                servers[name].after_case()
            try:
                for k, case in enumerate(cases):
                    order = ("qemu", "ours") if (i + k) % 2 == 0 else ("ours", "qemu")
                    for name in order:
                        iops = fio(servers[name].uri, *case, args)
                        servers[name].after_case()
                        results[case][name].append(iops)
                        print(f"round {i + 1} {case[0]} {case[1]} QD{case[2]} {name}: {iops:,.0f} IOPS",
                              file=sys.stderr, flush=True)
            finally:
                for name, s in servers.items():
                    s.close()
                    image = os.path.join(work, f"{name}.vhdx")
                    shutil.rmtree(image + ".rpl", ignore_errors=True)
                    os.unlink(image)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for (bs, rw, qd), r in results.items():
        q, o = statistics.median(r["qemu"]), statistics.median(r["ours"])
        rows.append({"case": f"{rw} bs={bs} QD{qd}", "qemu_nbd_iops": round(q), "replicator_iops": round(o),
                     "ratio": round(o / q, 2), "qemu_runs": [round(x) for x in r["qemu"]],
                     "replicator_runs": [round(x) for x in r["ours"]]})
    report = {"load": f"fio ioengine=nbd, {args.size} dynamic VHDX full of data, {args.runtime} s per case",
              "runs": args.runs, "target_ratio": 1.0, "cases": rows}
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

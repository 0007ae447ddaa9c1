"""Issue 4: 1 GiB of changed blocks replicated over loopback mutual TLS vs rsync of the same change.

  .venv/bin/python bench/replicate_vs_rsync.py [--runs 3] [--change-mib 1024] [--cases real,random]

Setup (all under --work, default var/bench/replicate):
  primary.vhdx   copy of var/bench/corpus.vhdx (3 GiB ext4 of real files), opened as a TrackedDisk and
                 exported over NBD (ExportService, unix socket) from this process; DiskReplicator cycles
                 run on the export's loop and ship to a ReplicaServer (cert mode, mTLS, port 0) running in
                 its own spawned process (one per timed cycle, so its VmHWM is the cycle's own).
  primary.raw    a raw mirror of the primary (copy of corpus.raw, which holds the same bytes): every
                 change is written to both, so rsync moves exactly the change our cycle moves.
  rsyncd/dst.raw rsync's replica: re-copied from primary.raw before each change (not timed), then
                 `rsync --inplace --no-whole-file --ignore-times --fsync --stats primary.raw
                 rsync://127.0.0.1:PORT/bench/dst.raw` to an rsync daemon on loopback. Optional variant
                 rsync-zstd (--rsync rsync,rsync-zstd) adds --compress --compress-choice=zstd
                 --compress-level=1; each variant starts from the same before-state.

One run = a new change: --change-mib of 64 KiB blocks, in extents of --extent-kib at random places of the
disk, written through NBD by a libnbd client (/usr/bin/python3, a separate process) in random order, so the
writes land in the HRL log the way a VM's would. Case "real": the data are other blocks of the corpus
(real files, compressible); case "random": incompressible bytes. Then, timed: one cycle (cut, encode +
zstd the log, send over mTLS, commit/apply on the replica), and rsync of the same change. Untimed checks:
the replica image equals primary.raw (qemu-img compare), rsync's dst equals primary.raw (xxh3 digests),
and at the end the primary VHDX itself equals primary.raw.

Page cache: this machine hands free memory back to its host, which reclaims cached pages at its own pace;
rsync of a cold 3 GiB file took 22 s, of a warm one 11.4 s, and "as it happened" anywhere between (12.6-18.9
s). So each timed step starts warm: the primary's change-tracking folder (the log the cycle reads, and the
outbox's recycled stream file the encoder writes over) and the replica's spool folder (the recycled spool
the upload writes over) before our cycle -- what a 30 s copy frequency leaves in the page cache, where this
bench's cycles are minutes apart and the host pages out what sat idle for 60 s --, primary.raw and rsync's
dst.raw (which rsync --inplace writes over) before each rsync variant, read through once, untimed. Both sides get
their best case and the ratio no longer depends on when the host reclaimed what. rsync is also timed cold
(--rsync-cache; the page cache dropped first, as root): a running VM's image, written by QEMU with
cache=none, is not in the host's page cache either, while the log a cycle reads was written moments ago.

Reference sizes: zstd -1 of the changed blocks concatenated (the issue's wire-byte bound, <= 1.05x), and the
loopback TLS ceiling (bench/transport_throughput.py's ceiling(): Python TLS socket pair, same certificates,
one process each side) moving a 1 GiB file, measured once per run between the other steps.
Medians over --runs; every case's runs start from the previous run's state (the replica stays in sync).
Host steal: each timed step records the share of CPU time the host took away (bench/hoststeal.py); the
speedup is also given over the runs where neither step lost more than 10 % (speedup_ours_quiet).
Peak RSS: the replica server process's VmHWM (fresh process per cycle) and this process's (the primary:
export + tracker + replicator) VmHWM, reset through /proc/self/clear_refs before each change.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import multiprocessing
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import transport_throughput as tt      # noqa: E402  (ceiling, _server, make_file, vm_hwm)
from benchcorpus import ensure           # noqa: E402
from hoststeal import NOISY, steal_share  # noqa: E402

from replicator.disk.base import ExtentKind      # noqa: E402
from replicator.disk.raw import file_extents    # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
BLOCK = 64 << 10
RSS_LIMIT = 256 * MiB
mp = multiprocessing.get_context("spawn")

# The NBD writer: the system python has libnbd's binding. argv: uri raw spec source|random seed
WRITER = r"""
import os, random, struct, sys, nbd
uri, raw, spec, source, seed = sys.argv[1:6]
BLOCK = 65536
data = open(spec, "rb").read()
pairs = [struct.unpack_from("<qqq", data, i) for i in range(0, len(data), 24)]
rng = random.Random(int(seed))
h = nbd.NBD()
h.connect_uri(uri)
fd = os.open(raw, os.O_WRONLY)
src = os.open(source, os.O_RDONLY) if source != "random" else -1
for dst_off, length, src_off in pairs:
    if src < 0:
        buf = rng.randbytes(length)
    else:
        buf = os.pread(src, length, src_off)
        assert len(buf) == length
    h.pwrite(buf, dst_off)
    os.pwrite(fd, buf, dst_off)
h.flush()
h.shutdown()
os.fsync(fd)
"""


def sh(*argv: str, **kw) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw).stdout


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def data_blocks(path: str) -> list[int]:
    """Offsets of the 64 KiB blocks of a sparse file that hold data (SEEK_DATA/SEEK_HOLE)."""
    out, size = [], os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        for e in file_extents(fd, 0, size):
            if e.kind is ExtentKind.DATA:
                out.extend(range(e.offset // BLOCK * BLOCK, e.offset + e.length, BLOCK))
    finally:
        os.close(fd)
    return sorted(set(out))


def make_change(size: int, change: int, extent: int, sources: list[int], rng: random.Random):
    """(dst_offset, length, src_offset) extents: `change` bytes at random extent-aligned places, in random
    order; the data of each extent comes from `extent // BLOCK` random corpus data blocks (src_offset is
    per extent: consecutive source blocks, as files are mostly contiguous)."""
    slots = size // extent
    picks = rng.sample(range(slots), change // extent)
    out = []
    for s in picks:
        src = rng.choice(sources)
        src = min(src, size - extent) // BLOCK * BLOCK
        out.append((s * extent, extent, src))
    return out


def write_spec(path: str, change) -> None:
    import struct
    with open(path, "wb") as f:
        for t in change:
            f.write(struct.pack("<qqq", *t))


def zstd1_size(raw: str, change) -> tuple[int, int]:
    """zstd -1 of the changed blocks concatenated (in disk order, read back from the primary's mirror)."""
    p = subprocess.Popen(["zstd", "-1", "-c", "-q"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    import threading
    counted = [0]

    def count():
        while chunk := p.stdout.read(MiB):
            counted[0] += len(chunk)
    t = threading.Thread(target=count)
    t.start()
    plain = 0
    fd = os.open(raw, os.O_RDONLY)
    for off, n, _ in sorted(change):
        buf = os.pread(fd, n, off)
        p.stdin.write(buf)
        plain += len(buf)
    os.close(fd)
    p.stdin.close()
    t.join()
    p.wait()
    return counted[0], plain


# ---------------------------------------------------------------------------------------------- replica
def start_server(pki: str, root: str):
    ready, stop = mp.Queue(), mp.Queue()
    proc = mp.Process(target=tt._server, args=(pki, root, 16 * MiB, ready, stop))
    proc.start()
    return proc, ready, stop, ready.get(timeout=60)


def stop_server(proc, ready, stop):
    stop.put(None)
    hwm, counters = ready.get(timeout=120)
    proc.join()
    return hwm, counters


def run_cycle(svc, tracked, pki: str, port: int):
    from replicator.replication import DiskReplicator
    from replicator.targets.peer import PeerTarget
    target = PeerTarget(f"https://localhost:{port}", cert=f"{pki}/primary.pem", key=f"{pki}/primary.key",
                        ca=f"{pki}/ca.pem")
    rep = DiskReplicator(tracked, target)
    commit, run_cycle.commit_s = target.commit, 0.0

    async def timed_commit(*a, **kw):       # the replica's apply: the part that follows the whole upload
        c0 = time.perf_counter()
        try:
            return await commit(*a, **kw)
        finally:
            run_cycle.commit_s += time.perf_counter() - c0
    target.commit = timed_commit

    async def cycle():
        try:
            return await rep.run_cycle()
        finally:
            await target.close()
    t0, c0 = time.perf_counter(), time.process_time()
    result = svc._call(cycle(), timeout=3600)
    run_cycle.cpu = time.process_time() - c0
    return result, time.perf_counter() - t0


def replica_image(root: str, disk_id) -> str:
    from replicator.replica import ReplicaStore
    return ReplicaStore(root).disk(disk_id).image_path


# ---------------------------------------------------------------------------------------------- rsync
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_rsyncd(work: str):
    mod = os.path.join(work, "rsyncd")
    os.makedirs(mod, exist_ok=True)
    conf = os.path.join(work, "rsyncd.conf")
    with open(conf, "w") as f:
        f.write(f"use chroot = no\npid file = {work}/rsyncd.pid\nlog file = {work}/rsyncd.log\n"
                f"uid = {os.getuid()}\ngid = {os.getgid()}\n"
                f"[bench]\n  path = {mod}\n  read only = no\n  munge symlinks = no\n")
    port = free_port()
    proc = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--port={port}", "--address=127.0.0.1",
                             f"--config={conf}"])
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, port, os.path.join(mod, "dst.raw")


def _stat(text: str, label: str) -> int:
    m = re.search(rf"^{label}: ([\d,.]+)", text, re.M)
    return int(m.group(1).replace(",", "").split(".")[0]) if m else -1


def run_rsync(src: str, port: int, extra: list[str]) -> dict:
    argv = ["/usr/bin/time", "-f", "maxrss_kib=%M", "rsync", "--inplace", "--no-whole-file", "--ignore-times",
            "--fsync", "--stats", *extra,
            src, f"rsync://127.0.0.1:{port}/bench/dst.raw"]
    t0 = time.perf_counter()
    p = subprocess.run(argv, check=True, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    out, rss = p.stdout, re.search(r"maxrss_kib=(\d+)", p.stderr)
    return {"seconds": elapsed, "sent": _stat(out, "Total bytes sent"),
            "received": _stat(out, "Total bytes received"), "literal": _stat(out, "Literal data"),
            "client_maxrss": int(rss.group(1)) * 1024 if rss else -1}


@contextlib.contextmanager
def perf_record(folder: str, name: str):
    """`perf record -a -g` around the block when `folder` is set (for where a cycle's CPU goes)."""
    if not folder:
        yield
        return
    os.makedirs(folder, exist_ok=True)
    p = subprocess.Popen(["perf", "record", "-a", "-g", "-F", "499", "-o", os.path.join(folder, f"{name}.data")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)         # perf needs a moment before it samples
    try:
        yield
    finally:
        p.send_signal(2)
        p.wait()


def warm(*paths: str) -> None:
    """Read files (or every file under folders) through once, so the timed step finds them cached."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += [os.path.join(d, f) for d, _, names in os.walk(p) for f in names]
        else:
            files.append(p)
    buf = bytearray(16 * MiB)
    for f in files:
        try:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
        except OSError:
            pass        # a file that went away meanwhile holds nothing the step reads


def drop_caches() -> None:
    """Write back, then drop the whole page cache (root only): the next reader goes to the device."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def same_file(a: str, b: str) -> bool:
    from replicator.kernels import xxh3_128_file_blocks
    import numpy as np
    return bool(np.array_equal(xxh3_128_file_blocks(a, 16 * MiB), xxh3_128_file_blocks(b, 16 * MiB)))


# ---------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--change-mib", type=int, default=1024)
    ap.add_argument("--extent-kib", type=int, default=256)
    ap.add_argument("--cases", default="real,random")
    ap.add_argument("--rsync", default="rsync", help="variants, comma-separated: rsync, rsync-zstd")
    ap.add_argument("--rsync-cache", default="warm,cold",
                    help="page-cache states rsync is timed in: warm (its files read through first), cold "
                         "(the page cache dropped first; needs root)")
    ap.add_argument("--corpus", default=os.path.join(HERE, "..", "var", "bench", "corpus"),
                    help="make-corpus's files without their suffix (.raw, .vhdx); made with 3G when missing")
    ap.add_argument("--work", default=os.path.join(HERE, "..", "var", "bench", "replicate"))
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--perf", default="", help="a folder: each timed cycle runs under `perf record -a -g` "
                    "(system-wide: primary, replica and kernel), saved as CASE-RUN.data")
    args = ap.parse_args()

    from replicator.tracking import TrackedDisk
    from replicator.tracking.service import ExportService
    from replicator.transport import certs

    work = os.path.abspath(args.work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)      # noqa: E731
    corpus_raw, corpus_vhdx = ensure(args.corpus + ".raw"), args.corpus + ".vhdx"
    primary, mirror, root = f"{work}/primary.vhdx", f"{work}/primary.raw", f"{work}/replica-root"
    sh("cp", "--sparse=always", corpus_vhdx, primary)
    sh("cp", "--sparse=always", corpus_raw, mirror)
    pki = f"{work}/pki"
    certs.init_ca(pki)
    certs.issue(pki, "replica", dns=["localhost"])
    certs.issue(pki, "primary")
    stream = f"{work}/ceiling.bin"
    tt.make_file(stream, GiB)
    sources = data_blocks(corpus_raw)
    size = os.path.getsize(corpus_raw)
    change_bytes, extent = args.change_mib * MiB, args.extent_kib << 10
    rng = random.Random(args.seed)
    variants = {"rsync": [], "rsync-zstd": ["--compress", "--compress-choice=zstd", "--compress-level=1"]}
    variants = {k: variants[k] for k in args.rsync.split(",") if k}
    caches = [c for c in args.rsync_cache.split(",") if c]
    if "cold" in caches and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        log("cannot drop the page cache (not root): rsync is timed warm only")
        caches = [c for c in caches if c != "cold"]
    measures = [(name, extra, cache) for name, extra in variants.items() for cache in caches]
    labels = [name if cache == "warm" else f"{name}-cold" for name, _, cache in measures]

    cmp0 = subprocess.run(["qemu-img", "compare", "-f", "vhdx", "-F", "raw", primary, mirror],
                          capture_output=True, text=True)
    log("corpus.vhdx vs corpus.raw:", cmp0.stdout.strip())
    assert cmp0.returncode == 0

    tracked = TrackedDisk(primary)
    disk_id = tracked.disk.virtual_disk_id
    svc = ExportService({"vm": tracked}, socket_path=f"{work}/nbd.sock").start()
    rsyncd, rport, rdst = start_rsyncd(work)
    results: dict = {}
    ceilings, problems = [], []
    hwm_reset = False
    try:
        proc, ready, stop, port = start_server(pki, root)
        first, secs = run_cycle(svc, tracked, pki, port)
        stop_server(proc, ready, stop)
        log(f"initial copy: {first.kind} {first.bytes_sent / MiB:.0f} MiB on the wire, {secs:.1f} s")
        for case in args.cases.split(","):
            runs = []
            for i in range(args.runs):
                sh("cp", "--sparse=always", mirror, rdst)    # rsync's replica = primary before the change
                os.sync()
                change = make_change(size, change_bytes, extent, sources, rng)
                if case == "random":
                    change = [(d, n, -1) for d, n, _ in change]
                spec = f"{work}/change.spec"
                write_spec(spec, change)
                hwm_reset = reset_hwm()
                t0 = time.perf_counter()
                sh("/usr/bin/python3", "-c", WRITER, svc.uri("vm"), mirror, spec,
                   "random" if case == "random" else corpus_raw, str(rng.randrange(1 << 30)))
                write_s = time.perf_counter() - t0
                zstd1, plain = zstd1_size(mirror, change)
                os.sync()
                run = {"write_s": write_s, "zstd1": zstd1, "plain": plain}
                # timed: our cycle
                proc, ready, stop, port = start_server(pki, root)
                warm(tracked.sidecar.dir, *glob.glob(os.path.join(root, "disks", "*", "spool")))
                with perf_record(args.perf, f"{case}-{i}"), steal_share(run):
                    res, secs = run_cycle(svc, tracked, pki, port)
                run["primary_hwm"] = tt.vm_hwm()
                run["server_hwm"], counters = stop_server(proc, ready, stop)
                run["cpu_primary_s"], run["cpu_replica_s"] = run_cycle.cpu, counters.get("cpu", 0.0)
                run["commit_s"] = run_cycle.commit_s
                run.update(ours_s=secs, kind=res.kind, bytes_sent=res.bytes_sent, stream_bytes=res.stream_bytes,
                           plain_bytes=res.plain_bytes, server_received=counters.get("bytes_received", 0))
                cmp = subprocess.run(["qemu-img", "compare", "-f", "vhdx", "-F", "raw",
                                      replica_image(root, disk_id), mirror], capture_output=True, text=True)
                run["replica_equal"] = cmp.returncode == 0
                if cmp.returncode:
                    problems.append(f"{case} run {i}: replica differs: {cmp.stdout.strip()} {cmp.stderr.strip()}")
                # timed: rsync of the same change, every variant and cache state from the same before-state
                for k, ((name, extra, cache), label) in enumerate(zip(measures, labels)):
                    if k:
                        sh("cp", "--sparse=always", "--reflink=never", f"{work}/before.raw", rdst)
                        os.sync()
                    elif len(measures) > 1:
                        sh("cp", "--sparse=always", rdst, f"{work}/before.raw")
                        os.sync()
                    if cache == "warm":
                        warm(mirror, rdst)
                    else:
                        drop_caches()
                    with steal_share(steal := {}):
                        r = run_rsync(mirror, rport, extra)
                    r["steal"] = steal["steal"]
                    r["equal"] = same_file(mirror, rdst)
                    if not r["equal"]:
                        problems.append(f"{case} run {i}: {label} result differs")
                    run[label] = r
                c = tt.ceiling(pki, stream)
                ceilings.append(c)
                run["ceiling_MBps"] = c["bytes"] / c["seconds"] / 1e6
                log(case, i, json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in run.items()}))
                runs.append(run)
            results[case] = runs
    finally:
        rsyncd.terminate()
        rsyncd.wait()
        svc.stop()
    final = subprocess.run(["qemu-img", "compare", "-f", "vhdx", "-F", "raw", primary, mirror],
                           capture_output=True, text=True)
    if final.returncode:
        problems.append(f"primary VHDX differs from its raw mirror: {final.stdout.strip()}")

    med = statistics.median
    ceil = med(c["bytes"] / c["seconds"] / 1e6 for c in ceilings)
    report = {"setup": {"disk_GiB": round(size / GiB, 2), "change_MiB": args.change_mib,
                        "extent_KiB": args.extent_kib, "runs": args.runs, "cipher": ceilings[0]["cipher"],
                        "primary_hwm_reset_per_run": hwm_reset},
              "tls_ceiling_MBps": round(ceil), "cases": {}, "problems": problems}
    ok = not problems
    for case, runs in results.items():
        ours_s = med(r["ours_s"] for r in runs)
        plain = med(r["plain"] for r in runs)
        wire = med(r["bytes_sent"] for r in runs)
        z1 = med(r["zstd1"] for r in runs)
        c = {"ours_s": round(ours_s, 2), "changed_MB": round(plain / 1e6),
             "ours_changed_MBps": round(plain / ours_s / 1e6),
             "ours_wire_MBps": round(wire / ours_s / 1e6),
             "share_of_tls_ceiling_changed": round(plain / ours_s / 1e6 / ceil, 3),
             "share_of_tls_ceiling_wire": round(wire / ours_s / 1e6 / ceil, 3),
             "wire_bytes_ours": int(wire), "wire_bytes_zstd1": int(z1),
             "wire_vs_zstd1": round(med(r["bytes_sent"] / r["zstd1"] for r in runs), 3),
             "stream_bytes": int(med(r["stream_bytes"] for r in runs)),
             "nbd_write_s": round(med(r["write_s"] for r in runs), 1),
             "primary_peak_rss_MiB": round(max(r["primary_hwm"] for r in runs) / MiB, 1),
             "replica_peak_rss_MiB": round(max(r["server_hwm"] for r in runs) / MiB, 1),
             "replica_equal_every_run": all(r["replica_equal"] for r in runs),
             "cpu_s_primary": round(med(r["cpu_primary_s"] for r in runs), 2),
             "cpu_s_replica": round(med(r["cpu_replica_s"] for r in runs), 2),
             "commit_s": round(med(r["commit_s"] for r in runs), 2),
             "steal_max": max(r["steal"] for r in runs)}
        for name in labels:
            rs = med(r[name]["seconds"] for r in runs)
            c[name] = {"seconds": round(rs, 2),
                       "wire_bytes": int(med(r[name]["sent"] + r[name]["received"] for r in runs)),
                       "literal_bytes": int(med(r[name]["literal"] for r in runs)),
                       "speedup_ours": round(med(r[name]["seconds"] / r["ours_s"] for r in runs), 2),
                       "wire_ours_over_rsync": round(med(r["bytes_sent"] / (r[name]["sent"] + r[name]["received"])
                                                         for r in runs), 3),
                       "client_peak_rss_MiB": round(max(r[name]["client_maxrss"] for r in runs) / MiB, 1),
                       "equal_every_run": all(r[name]["equal"] for r in runs)}
            quiet = [r[name]["seconds"] / r["ours_s"] for r in runs
                     if max(r["steal"], r[name]["steal"]) <= NOISY]
            c[name]["quiet_runs"] = len(quiet)      # both timed steps with at most NOISY of the CPU stolen
            c[name]["speedup_ours_quiet"] = round(med(quiet), 2) if quiet else None
        c["targets"] = {"2x_faster_than_rsync": all(c[n]["speedup_ours"] >= 2 for n in labels),
                        "wire_le_1.05x_zstd1": c["wire_vs_zstd1"] <= 1.05,
                        "rss_le_256MiB": max(c["primary_peak_rss_MiB"], c["replica_peak_rss_MiB"]) <= 256}
        report["cases"][case] = c
    print(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

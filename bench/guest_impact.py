"""Issue 12: what replication costs the guest. The same fio jobs through replicatord's tracked NBD export
(the VM's disk) in four phases, and against qemu-nbd serving a copy of the same VHDX, in one run.

  .venv/bin/python bench/guest_impact.py [--size 4G] [--runtime 30] [--work DIR] [--quick]

Everything runs as an operator runs it: replicatord processes from config files, the admin API, fio.
  corpus     `../shared/bench-data/make-corpus DIR SIZE` (an ext4 disk of this machine's real files, raw and
             dynamic VHDX), cached in --corpus (default var/bench/guest-impact-corpus/SIZE). make-corpus
             cannot fill disks under ~1 GiB (its file set is ~700 MB): for those (--quick) the same sources
             are copied up to 55 % of the disk and the disk is built the same way (mke2fs -d, qemu-img).
  replica    a second replicatord, replica role, on loopback, mutual TLS (certificates from our own CA made
             with `replicator certs init/issue`), storing under WORK/site-c/replica-root, or under
             --replica-root (a folder on another file system, as the replica would be on another host).
  primary    replicatord protecting machine "vm" (one disk: a copy of corpus.vhdx) to it over HTTPS,
             frequency 30s, initial replication `scheduled` far ahead so it starts when the bench says
             (`POST /v1/machines/vm/cycle`, what `replicator machine vm cycle` does). fio writes to the URI
             the daemon publishes in `/v1/status` (disks.NAME.nbd).
  yardstick  `qemu-nbd -f vhdx --cache=writeback -t` on another copy of corpus.vhdx (e).
  sessions   fio and both replicatords each start in a session of their own, as libvirt's QEMU (daemonized)
             and systemd's services are; the export makes its own. With autogroups (on in most kernels) CPU
             is shared between sessions first: in one session, fio won every wake-up against replicatord's
             encoders by its nice value alone, which no guest does (measured: p99.9 during the initial copy
             4.1 ms shared, 25 ms apart, before replicatord put its own session behind the guests').

The jobs: fio --ioengine=nbd randwrite, 4 KiB and 64 KiB, iodepth 1 and 16, --time_based --runtime, every
I/O in a latency log (--write_lat_log --log_avg_msec=0 --log_unix_epoch=1: wall-clock completion times, so a
completion can be placed against the daemon's job times). The jobs write inside one range of the disk that
the corpus already allocates (so no phase pays VHDX block allocation and another not), 50 %-compressible
buffers refilled per I/O, at most --rate bytes/s (the "sustained write rate"; default: what keeps the
tracker's active log under 80 % of its limit, half the disk, between two cuts -- past it the tracker stops
logging and asks for a resync, which would make the export cheaper and the phase meaningless; a job that
crossed it anyway is reported in `problems`). Jobs whose IOPS reached the cap are marked `rate_bound`.

Phases (per job, in this order):
  e  qemu-nbd on a copy of the same VHDX.
  c  during the initial replication: per job a fresh setup (new copy of the corpus, empty replica, new
     daemons); fio starts, 0.5 s later the initial replication is started; the figures are those of the
     I/Os in flight while its job ran ([created, finished] from /v1/jobs/ID), IOPS = completions inside it
     per second of it. `window_s` says how much of the fio run that was.
  a  replication paused: `POST /v1/machines/vm/pause` (= `replicator machine vm pause`); before each job the
     machine is resumed and a cycle ships what the previous job wrote, so each job starts on an empty log.
  b  steady cycles: the daemon's own scheduler (frequency 30s), or with --cycle-every S (--quick: 2 s, as
     the configuration only takes 30s/5m/15m) cycles asked through the admin API every S seconds.
  d  during a checksum resync: `POST /v1/machines/vm/resync` (= `replicator machine vm resync`), started again
     as soon as it ends while fio runs; figures over the union of the resync jobs' intervals.
Per phase and job: IOPS, median, p99, p99.9 and max of the total latency (submission to completion, fio's
`lat`); the ratios issue 12 names. JSON to docs/bench/guest-impact.json and a table in guest-impact.md
(--quick writes both into --work unless --out is given).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np

import devicestats
import cpufreeze
import hoststeal
from benchcorpus import MAKE_CORPUS
from replicator.disk.base import ExtentKind
from replicator.disk.raw import file_extents
from replicator.tracking.remote import shutdown_all_under

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIN = os.path.dirname(sys.executable)
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
FAR_AHEAD = "2099-01-01T00:00:00"
ALL_JOBS = ("4k-qd1", "4k-qd16", "64k-qd1", "64k-qd16")
PHASES = {"e": "qemu-nbd (yardstick)", "a": "replication paused", "b": "steady cycles",
          "c": "initial replication", "d": "checksum resync"}
ORDER = ("e", "c", "a", "b", "d")


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def parse_size(s: str) -> int:
    s = s.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}.get(s[-1:], 1)
    return int(float(s[:-1] if s[-1:] in "KMGT" else s) * mult)


def sh(*argv, **kw) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw).stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, what: str, timeout: float = 60, proc=None, logfile=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            v = pred()
            if v:
                return v
        except (OSError, KeyError, ValueError, StopIteration):
            pass
        time.sleep(0.1)
    tail = open(logfile).read()[-3000:] if logfile and os.path.exists(logfile) else ""
    raise RuntimeError(f"timed out waiting for {what}\n{tail}")


# ---------------------------------------------------------------------------------------------- corpus
def small_corpus(out: str, size: int) -> None:
    """make-corpus's recipe for disks its file set does not fit: the same sources, up to 55 % of the disk."""
    src = tempfile.mkdtemp(prefix="gi-corpus-", dir=out)
    try:
        budget, used = int(size * 0.55), 0
        for top in ("/usr/share/doc", "/usr/share/locale", "/usr/lib/python3.11", "/usr/bin"):
            for dp, _, files in os.walk(top):
                for f in sorted(files):
                    p = os.path.join(dp, f)
                    if os.path.islink(p) or not os.path.isfile(p):
                        continue
                    n = os.path.getsize(p)
                    if used + n > budget:
                        continue
                    t = os.path.join(src, os.path.relpath(p, "/usr"))
                    os.makedirs(os.path.dirname(t), exist_ok=True)
                    shutil.copyfile(p, t)
                    used += n
        raw, vhdx = os.path.join(out, "corpus.raw"), os.path.join(out, "corpus.vhdx")
        sh("mke2fs", "-q", "-t", "ext4", "-d", src, raw, str(size // KiB) + "K")
        sh("qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic", raw, vhdx)
    finally:
        shutil.rmtree(src, ignore_errors=True)


def ensure_corpus(folder: str, size: int) -> tuple[str, str]:
    raw, vhdx = os.path.join(folder, "corpus.raw"), os.path.join(folder, "corpus.vhdx")
    if os.path.exists(raw) and os.path.exists(vhdx) and os.path.getsize(raw) == size:
        return raw, vhdx
    os.makedirs(folder, exist_ok=True)
    log(f"building the corpus in {folder} ({size / GiB:.2f} GiB)")
    p = subprocess.run([MAKE_CORPUS, folder, f"{size // MiB}M"], capture_output=True, text=True) \
        if size >= GiB else None          # its ~700 MB of files do not fit a smaller disk
    if p is None or p.returncode != 0 or not os.path.exists(vhdx):
        log("make-corpus cannot fill this size; the same sources, fewer files", p.stderr.strip()[-200:] if p else "")
        for f in (raw, vhdx):
            if os.path.exists(f):
                os.unlink(f)
        small_corpus(folder, size)
    return raw, vhdx


def write_region(raw: str, vhdx: str, want: int) -> tuple[int, int]:
    """(offset, length): the longest run of the VHDX's blocks that all hold data (from the raw image's
    SEEK_DATA extents, at the VHDX block size), capped at `want`."""
    info = json.loads(sh("qemu-img", "info", "--output=json", "-f", "vhdx", vhdx))
    bs = int(info.get("cluster-size") or 32 * MiB)
    size = os.path.getsize(raw)
    used = np.zeros(-(-size // bs), dtype=bool)
    fd = os.open(raw, os.O_RDONLY)
    try:
        for e in file_extents(fd, 0, size):
            if e.kind is ExtentKind.DATA:
                used[e.offset // bs:-(-(e.offset + e.length) // bs)] = True
    finally:
        os.close(fd)
    best, run_start = (0, 0), None
    for i, u in enumerate(list(used) + [False]):
        if u and run_start is None:
            run_start = i
        elif not u and run_start is not None:
            if i - run_start > best[1] - best[0]:
                best = (run_start, i)
            run_start = None
    off, length = best[0] * bs, (best[1] - best[0]) * bs
    if length < 4 * MiB:
        return 0, want
    return off, min(length, want)


# ---------------------------------------------------------------------------------------------- daemons
class Daemon:
    def __init__(self, folder: str, config_text: str, admin_port: int):
        self.dir, self.admin_port = folder, admin_port
        os.makedirs(folder, exist_ok=True)
        self.config = os.path.join(folder, "replicatord.toml")
        with open(self.config, "w") as f:
            f.write(config_text)
        self.logfile = os.path.join(folder, "daemon.log")
        self.proc = None

    def launch(self) -> "Daemon":
        self.log = open(self.logfile, "ab")
        # a session of its own, as systemd starts a service
        self.proc = subprocess.Popen([os.path.join(BIN, "replicatord"), "--config", self.config], cwd=self.dir,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def ready(self) -> "Daemon":
        wait_for(lambda: self.api("GET", "/v1/status")[0] == 200, "replicatord's admin API", proc=self.proc,
                 logfile=self.logfile)
        return self

    def stop(self, wait: bool = True) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        if wait and self.proc is not None:
            if self.proc.poll() is None:
                try:
                    self.proc.wait(60)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.log.close()
            self.proc = None

    def api(self, method: str, path: str, timeout: float = 3600) -> tuple[int, dict]:
        with open(os.path.join(self.dir, "state", "admin.token")) as f:
            token = f.read().strip()
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method=method, data=b"" if
                                     method == "POST" else None, headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def ok(self, method: str, path: str) -> dict:
        code, body = self.api(method, path)
        if code != 200:
            raise RuntimeError(f"{method} {path}: {code} {body.get('error', body)}")
        return body

    def machine(self, name: str = "vm") -> dict:
        return next(m for m in self.ok("GET", "/v1/status")["machines"] if m["name"] == name)

    def job(self, job_id: str) -> dict:
        return self.ok("GET", f"/v1/jobs/{job_id}")


class Site:
    """A replica replicatord and a primary replicatord protecting machine vm (disk primary.vhdx) to it."""

    def __init__(self, work: str, pki: str, corpus_vhdx: str, tag: str, replica_root: str | None = None,
                 copy_rate: str | None = None, replication_cpus: str | None = None, memory_logs: str | None = None):
        self.work, self.pki = work, pki
        self.dir = os.path.join(work, f"site-{tag}")
        shutil.rmtree(self.dir, ignore_errors=True)
        store = os.path.join(replica_root, f"site-{tag}") if replica_root else os.path.join(self.dir, "replica-root")
        shutil.rmtree(store, ignore_errors=True)
        os.makedirs(self.dir)
        self.disk = os.path.join(self.dir, "primary.vhdx")
        sh("cp", "--sparse=always", corpus_vhdx, self.disk)
        rport, tls = free_port(), lambda n: f'cert = "{pki}/{n}.pem"\nkey = "{pki}/{n}.key"\nca = "{pki}/ca.pem"\n'
        ra, pa = free_port(), free_port()
        cpus = f'replication_cpus = "{replication_cpus}"\n' if replication_cpus else ""
        mem = f'memory_logs = "{memory_logs}"\n' if memory_logs else ""
        self.replica = Daemon(os.path.join(self.dir, "replica"), f'''[daemon]
state_dir = "state"
admin_listen = "127.0.0.1:{ra}"
{cpus}
[replica]
listen = "127.0.0.1"
auth = "certificate"
port = {rport}
{tls("replica")}
[[replica.allow]]
principal = "primary"
storage = "{store}"
''', ra)
        self.primary = Daemon(os.path.join(self.dir, "primary"), f'''[daemon]
state_dir = "state"
admin_listen = "127.0.0.1:{pa}"
{cpus}{mem}
[[machine]]
name = "vm"
disks = ["{self.disk}"]
target = "https://127.0.0.1:{rport}"
auth = "certificate"
{tls("primary")}frequency = "30s"
initial_replication = {{ mode = "scheduled", at = {FAR_AHEAD} }}
{f'copy_rate_when_busy = "{copy_rate}"' if copy_rate else ""}
''', pa)

    def start(self) -> "Site":
        self.replica.launch()
        self.primary.launch()           # both at once: the primary needs the replica only at its first cycle
        self.replica.ready()
        self.primary.ready()
        m = wait_for(lambda: (lambda m: m if m["disks"]["primary.vhdx"]["nbd"] else None)(self.primary.machine()),
                     "the export's URI", logfile=self.primary.logfile)
        self.uri = m["disks"]["primary.vhdx"]["nbd"]
        return self

    def stop(self) -> None:
        """Both daemons, then the export (it outlives replicatord for its idle grace: left running, the next
        site's export_pid found it on the same socket path and measured a process about to end)."""
        self.primary.stop(wait=False)
        self.replica.stop(wait=False)
        self.primary.stop()
        self.replica.stop()
        shutdown_all_under(self.dir)

    def export_pid(self) -> int | None:
        """(Waited for a moment: one run measured no CPU when the export was looked for too early.)"""
        sock = self.uri.split("socket=", 1)[-1]
        for _ in range(50):
            pid = export_pid(sock)
            if pid:
                return pid
            time.sleep(0.1)
        return None

    def log_mark(self) -> int:
        """Where the primary's log ends now (held_back counts the cycles after it)."""
        return os.path.getsize(self.primary.logfile) if os.path.exists(self.primary.logfile) else 0

    def held_back(self, since: int) -> float:
        """Seconds the copies and their logs were held back (copy_rate_when_busy) in the initial and resync
        cycles logged after `since`. From the cycle log lines: status's last_cycle is overwritten by the
        next scheduled cycle, which may come right after a long copy."""
        with open(self.primary.logfile, errors="replace") as f:
            f.seek(since)
            return round(sum(float(m.group(1)) for m in re.finditer(
                r"(?:initial|resync) cycle replicated .*\(([\d.]+) s of it held back", f.read())), 2)

    def tracking(self) -> dict:
        d = self.primary.machine()["disks"]["primary.vhdx"]
        return {"tracking": d["tracking"], "reason": d["reason"]}


# ---------------------------------------------------------------------------------------------- fio
def job_spec(name: str) -> tuple[int, int]:
    bs, qd = name.split("-")
    return parse_size(bs), int(qd[2:])


class Fio:
    def __init__(self, out_dir: str, phase: str, job: str, uri: str, args, region: tuple[int, int]):
        bs, qd = job_spec(job)
        self.prefix = os.path.join(out_dir, f"{phase}-{job}")
        for suffix in ("_lat.1.log", "_clat.1.log", "_slat.1.log", ".json"):
            if os.path.exists(self.prefix + suffix):
                os.unlink(self.prefix + suffix)
        self.bs, self.qd, self.rate = bs, qd, args.rate
        self.argv = ["fio", f"--name={phase}-{job}", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                     f"--bs={bs}", f"--iodepth={qd}", "--numjobs=1", "--time_based", f"--runtime={args.runtime}",
                     f"--offset={region[0]}", f"--size={region[1]}", "--randrepeat=1", "--refill_buffers=1",
                     "--buffer_compress_percentage=50", f"--write_lat_log={self.prefix}", "--log_avg_msec=0",
                     "--log_unix_epoch=1", "--output-format=json", f"--output={self.prefix}.json"]
        if args.rate:
            self.argv.append(f"--rate={args.rate}")

    def start(self, server_pid: int | None = None) -> "Fio":
        """server_pid: the process serving the disk (qemu-nbd, our export), whose CPU time is measured."""
        self.server_pid, self.cpu0 = server_pid, cpu_seconds(server_pid)
        self.t0, self.steal0 = time.time(), hoststeal.sample()
        self.device = devicestats.device_of(self.prefix.rsplit("/", 1)[0])
        self.dev0 = devicestats.sample(self.device)
        # a session of its own, as libvirt's QEMU is (it daemonizes it)
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        return self

    def wait(self) -> "Fio":
        _, err = self.proc.communicate(timeout=3600)
        self.cpu1, self.t1, self.steal1 = cpu_seconds(self.server_pid), time.time(), hoststeal.sample()
        self.dev1 = devicestats.sample(self.device)
        if self.proc.returncode:
            raise RuntimeError(f"fio failed ({self.proc.returncode}): {err.strip()[-2000:]}")
        return self

    def run(self, server_pid: int | None = None) -> "Fio":
        return self.start(server_pid).wait()

    def results(self) -> tuple[np.ndarray, np.ndarray, dict]:
        """Completion times (epoch s) and total latencies (s) of every I/O, and fio's own summary."""
        with open(self.prefix + "_lat.1.log") as f:
            rows = f.read().replace(",", " ").split("\n")
        ncol = len(rows[0].split())
        a = np.array(" ".join(rows).split(), dtype=np.int64).reshape(-1, ncol)
        with open(self.prefix + ".json") as f:
            text = f.read()
        job = json.loads(text[text.index("{"):])["jobs"][0]
        w = job["write"]
        summary = {"fio_iops": round(w["iops"], 1), "fio_ios": w["total_ios"], "fio_runtime_s": job["job_runtime"] / 1e3}
        return a[:, 0] / 1e3, a[:, 1] / 1e9, summary


def cpu_seconds(pid: int | None) -> float | None:
    """User plus system CPU seconds of a process and all its threads so far."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def export_pid(nbd_socket: str) -> int | None:
    """The export process serving this socket (its command line names it)."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"replicator.tracking.shim" in argv and nbd_socket.encode() in argv:
                return int(d)
    return None


def stats(done: np.ndarray, lat: np.ndarray, windows: list[tuple[float, float]] | None, freezes=None) -> dict:
    """IOPS and latency percentiles. windows=None: the whole run; otherwise the I/Os in flight during the
    windows count for latency, those completed inside them for IOPS. freezes: the CPUs' freezes meanwhile
    (bench/cpufreeze.py), for the worst completion less the time some CPU was frozen during it."""
    start = done - lat
    if windows is None:
        t0, t1 = float(start.min()), float(done.max())
        windows, inflight, completed = [(t0, t1)], np.ones(len(done), bool), np.ones(len(done), bool)
    else:                  # only the part of each window that fio ran through (first submission, last completion)
        lo, hi = float(start.min()), float(done.max())
        windows = [(max(a, lo), min(b, hi)) for a, b in windows if min(b, hi) > max(a, lo)]
        inflight, completed = np.zeros(len(done), bool), np.zeros(len(done), bool)
        for a, b in windows:
            inflight |= (start <= b) & (done >= a)
            completed |= (done >= a) & (done <= b)
    span = sum(b - a for a, b in windows)
    sel = lat[inflight]
    out = {"window_s": round(span, 2), "ios": int(completed.sum()),
           "iops": round(completed.sum() / span, 1) if span > 0 else 0.0}
    if len(sel):
        ms = sel * 1e3
        out.update(median_ms=round(float(np.median(ms)), 3), p99_ms=round(float(np.percentile(ms, 99)), 3),
                   p999_ms=round(float(np.percentile(ms, 99.9)), 3), max_ms=round(float(ms.max()), 2))
        if freezes is not None:
            less = cpufreeze.less_freezes(start[inflight], lat[inflight], freezes) * 1e3
            out["max_ms_less_freezes"] = round(float(less.max()), 2)
    else:
        out.update(median_ms=None, p99_ms=None, p999_ms=None, max_ms=None)
    return out


FREEZES: cpufreeze.Watch | None = None     # the run's CPU freeze watchers (main starts them)


def measure(fio: Fio, windows=None) -> dict:
    done, lat, summary = fio.results()
    freezes = FREEZES.freezes(fio.t0, fio.t1) if FREEZES is not None else None
    r = stats(done, lat, windows, freezes)
    if freezes is not None:             # what the host took while fio ran: count, longest, total (any CPU)
        r["freezes"] = len(freezes)
        r["freeze_max_ms"] = round(max((d for _, _, d in freezes), default=0.0) * 1e3, 1)
        r["frozen_ms"] = round(sum(e - s for s, e in cpufreeze.union(freezes)) * 1e3, 1)
    r.update(summary)
    r["run_s"] = round(float(done.max() - (done - lat).min()), 2)
    r["rate_bound"] = bool(fio.rate) and bool(r["iops"] * fio.bs >= 0.95 * fio.rate)
    r["steal"] = hoststeal.share(fio.steal0, fio.steal1)     # the host's share of our CPU time while fio ran
    r.update(devicestats.moved(fio.dev0, fio.dev1))         # what reached the disk while fio ran
    if fio.cpu0 is not None and fio.cpu1 is not None:       # cores the server used while fio ran
        r["server_cores"] = round((fio.cpu1 - fio.cpu0) / max(1e-6, fio.t1 - fio.t0), 3)
    return r


# ---------------------------------------------------------------------------------------------- phases
def phase_qemu(work: str, corpus_vhdx: str, jobs, args, region, logs: str) -> dict:
    img, sock = os.path.join(work, "qemu.vhdx"), os.path.join(work, "qemu.sock")
    sh("cp", "--sparse=always", corpus_vhdx, img)
    # on disk before qemu-nbd starts: its first write updates the VHDX header and flushes, which would
    # otherwise write back the whole fresh copy inside fio's first I/O (466 ms at 4k-qd1 until 2026-12-07
    # 21:35, every run: a worst completion that was the copy's, not qemu-nbd's)
    fd = os.open(img, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if os.path.exists(sock):
        os.unlink(sock)
    proc = subprocess.Popen(["qemu-nbd", "-f", "vhdx", "-k", sock, "-x", "d", "-t", "--cache=writeback", img])
    out = {}
    try:
        wait_for(lambda: os.path.exists(sock), "qemu-nbd's socket", proc=proc)
        for job in jobs:
            out[job] = measure(Fio(logs, "e", job, f"nbd+unix:///d?socket={sock}", args, region).run(proc.pid))
            log("e", job, brief(out[job]))
    finally:
        proc.terminate()
        proc.wait()
        os.unlink(img)
    return out


def brief(r: dict) -> str:
    return (f"{r['iops']:.0f} IOPS over {r['window_s']} s, median {r['median_ms']} ms, p99.9 {r['p999_ms']} ms, "
            f"max {r['max_ms']} ms, server {r.get('server_cores')} cores")


def job_window(site: Site, job_id: str, until) -> tuple[float, float, dict]:
    """Follow a daemon job until it ends (or `until()` says stop following); its [created, finished]."""
    while True:
        j = site.primary.job(job_id)
        if j["state"] != "running":
            if j["state"] != "succeeded":
                raise RuntimeError(f"{j['kind']} job {job_id} {j['state']}: {j.get('error')}")
            return j["created"], j["finished"], j
        if until():
            return j["created"], None, j
        time.sleep(0.2)


def phase_initial(work: str, pki: str, corpus_vhdx: str, job: str, args, region, logs: str, last: bool):
    """A fresh site, fio, and 0.5 s into it the initial replication; returns (result, site or None)."""
    site = Site(work, pki, corpus_vhdx, "c", args.replica_root, args.copy_rate_when_busy,
                args.replication_cpus, args.memory_logs).start()
    try:
        mark = site.log_mark()
        fio = Fio(logs, "c", job, site.uri, args, region).start(site.export_pid())
        time.sleep(0.5)
        body = site.primary.ok("POST", "/v1/machines/vm/cycle?wait=0")
        job_id = body["job"]["id"]
        t0, t1, j = job_window(site, job_id, until=lambda: fio.proc.poll() is not None)
        fio.wait()
        if t1 is None:                       # the initial replication outlasted fio: only the overlap counts
            t1 = time.time()
            _, end, j = job_window(site, job_id, until=lambda: False)
        else:
            end = t1
        r = measure(fio, [(t0, t1)])
        r["initial_s"] = round(end - t0, 2)
        r["initial_bytes"] = j.get("bytes_done")
        r["overlap_of_run"] = round(r["window_s"] / max(r["run_s"], 1e-9), 3)
        r.update(site.tracking())
        r["paced_s"] = site.held_back(mark)
        log("c", job, brief(r), f"(initial {r['initial_s']} s, {(r['initial_bytes'] or 0) / MiB:.0f} MiB, "
            f"{r['paced_s']} s held back)")
        if last:
            return r, site
    except BaseException:
        site.stop()
        raise
    site.stop()
    return r, None


def fresh_log(site: Site) -> None:
    """Ship what the log holds, so the next job starts on an empty one."""
    site.primary.ok("POST", "/v1/machines/vm/cycle?wait=1")


def phase_paused(site: Site, job: str, args, region, logs: str) -> dict:
    if site.primary.machine()["state"] != "Replicating":
        site.primary.ok("POST", "/v1/machines/vm/resume")
    fresh_log(site)
    site.primary.ok("POST", "/v1/machines/vm/pause")
    assert site.primary.machine()["state"] == "Suspended"
    r = measure(Fio(logs, "a", job, site.uri, args, region).run(site.export_pid()))
    r["state"] = site.primary.machine()["state"]
    r.update(site.tracking())
    site.primary.ok("POST", "/v1/machines/vm/resume")
    log("a", job, brief(r))
    return r


def phase_steady(site: Site, job: str, args, region, logs: str) -> dict:
    cycles, stop = [], threading.Event()
    before = site.primary.machine()["stats"]["totals"]

    def driver():                      # --cycle-every: an operator's cycle every S seconds, on a fixed grid
        nxt = time.time() + args.cycle_every
        while not stop.wait(max(0.0, nxt - time.time())):
            t = time.time()
            code, body = site.primary.api("POST", "/v1/machines/vm/cycle?wait=1")
            cycles.append({"start": t, "s": round(time.time() - t, 3), "ok": code == 200,
                           "bytes": (body.get("last_cycle") or {}).get("bytes_sent")})
            nxt = max(nxt + args.cycle_every, time.time())

    fio = Fio(logs, "b", job, site.uri, args, region).start(site.export_pid())
    th = threading.Thread(target=driver) if args.cycle_every else None
    if th:
        th.start()
    try:
        fio.wait()
    finally:
        stop.set()
        if th:
            th.join()
    r = measure(fio)
    m = site.primary.machine()
    after = m["stats"]["totals"]           # the scheduler's cycles are not jobs: counted, not timed
    r["cycles"] = len(cycles) if th else after["success"] - before["success"]
    r["cycles_missed"] = after["missed"] - before["missed"]
    r["cycle_source"] = f"admin API every {args.cycle_every} s" if th else "replicatord's scheduler (30s)"
    if th:
        r["cycle_s"] = [c["s"] for c in cycles]
        r["cycles_failed"] = sum(not c["ok"] for c in cycles)
    else:
        r["cycles_failed"] = after["failed"] - before["failed"]
    r.update(site.tracking())
    log("b", job, brief(r), f"({r['cycles']} cycles)")
    return r


def phase_resync(site: Site, job: str, args, region, logs: str) -> dict:
    mark = site.log_mark()
    fio = Fio(logs, "d", job, site.uri, args, region).start(site.export_pid())
    time.sleep(0.5)
    windows, jobs = [], []
    end_by = fio.t0 + args.runtime
    while fio.proc.poll() is None and time.time() < end_by - 0.5:
        body = site.primary.ok("POST", "/v1/machines/vm/resync?wait=0")
        t0, t1, j = job_window(site, body["job"]["id"], until=lambda: fio.proc.poll() is not None)
        if t1 is None:
            t1 = time.time()
            job_window(site, body["job"]["id"], until=lambda: False)
        windows.append((t0, t1))
        jobs.append({"s": round(t1 - t0, 2), "bytes": j.get("bytes_done")})
    fio.wait()
    r = measure(fio, windows)
    r["resyncs"] = jobs
    r.update(site.tracking())
    r["paced_s"] = site.held_back(mark)
    log("d", job, brief(r), f"({len(jobs)} resyncs)")
    return r


# ---------------------------------------------------------------------------------------------- report
def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def compare(res: dict, jobs) -> dict:
    out = {}
    for job in jobs:
        q = res["e"][job]
        g = lambda p, k: res[p][job][k] if p in res and job in res[p] else None      # noqa: E731
        r = {"steady_over_paused_iops": ratio(g("b", "iops"), g("a", "iops")),
             "paused_over_qemu_iops": ratio(g("a", "iops"), q["iops"]),
             "steady_over_qemu_iops": ratio(g("b", "iops"), q["iops"]),
             "worst_minus_qemu_ms": {p: (round(g(p, "max_ms") - q["max_ms"], 2) if g(p, "max_ms") is not None
                                         else None) for p in "abcd"},
             "p999_over_qemu": {p: ratio(g(p, "p999_ms"), q["p999_ms"]) for p in "abcd"}}
        if q.get("max_ms_less_freezes") is not None:        # the same, each less what the host froze meanwhile
            r["worst_minus_qemu_less_freezes_ms"] = {
                p: (round(g(p, "max_ms_less_freezes") - q["max_ms_less_freezes"], 2)
                    if g(p, "max_ms_less_freezes") is not None else None) for p in "abcd"}
        r["targets"] = {
            "steady_ge_0.9x_paused": (r["steady_over_paused_iops"] or 0) >= 0.9,
            "paused_ge_1.0x_qemu": (r["paused_over_qemu_iops"] or 0) >= 1.0,
            "worst_le_qemu_plus_50ms": all(v is not None and v <= 50 for v in r["worst_minus_qemu_ms"].values()),
            "p999_le_2x_qemu": all(v is not None and v <= 2 for v in r["p999_over_qemu"].values())}
        if "worst_minus_qemu_less_freezes_ms" in r:     # beside the target, not instead of it
            r["targets"]["worst_le_qemu_plus_50ms_less_freezes"] = all(
                v is not None and v <= 50 for v in r["worst_minus_qemu_less_freezes_ms"].values())
        out[job] = r
    return out


def markdown(report: dict) -> str:
    s = report["setup"]
    lines = [f"# Guest impact (issue 12): fio through replicatord's export vs qemu-nbd", "",
             f"`bench/guest_impact.py` on {s['when']}, {s['machine']}. Disk: {s['disk']}; fio writes in "
             f"[{s['region'][0] / MiB:.0f} MiB, +{s['region'][1] / MiB:.0f} MiB), {s['runtime_s']} s per job, "
             f"rate cap {s['rate'] / MiB if s['rate'] else 0:.0f} MiB/s; cycles: {s['cycles']}. "
             f"Latency = fio's total latency (submission to completion) of every I/O; for phases c and d the "
             f"I/Os in flight while the daemon's job ran. fio (the guest), both replicatords and the export each "
             f"run in a session of their own, as libvirt's QEMU and systemd's services do (from 2026-12-06 "
             f"16:00; before, fio and the replicatords shared the bench's session); copy_rate_when_busy: "
             f"{s.get('copy_rate_when_busy', 'none (before 2026-12-06 16:00)')}; replication_cpus: "
             f"{s.get('replication_cpus', 'none (every CPU)')}; memory_logs: "
             f"{s.get('memory_logs', 'none (before 2026-12-07 14:00)')}.", ""]
    if s.get("note"):
        lines += [s["note"], ""]
    for job in s["jobs"]:
        lines += [f"## {job}", "", "| phase | IOPS | median ms | p99 ms | p99.9 ms | max ms | window s | server cores "
                  "| host steal | disk writes MiB | CPU freezes | max ms less freezes |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for p in ORDER:
            r = report["phases"].get(p, {}).get(job)
            if r:
                star = " *" if r.get("rate_bound") else ""
                lines.append(f"| {p}: {PHASES[p]} | {r['iops']:,.0f}{star} | {r['median_ms']} | {r['p99_ms']} | "
                             f"{r['p999_ms']} | {r['max_ms']} | {r['window_s']} | {r.get('server_cores', '')} | "
                             f"{r.get('steal', 0):.0%} | {r.get('device_written_mib', '')} | "
                             + (f"{r['freezes']}, longest {r['freeze_max_ms']} ms | {r.get('max_ms_less_freezes')} |"
                                if "freezes" in r else " | |"))
        c = report["ratios"][job]
        lines += ["", f"steady/paused IOPS {c['steady_over_paused_iops']} (target >= 0.9), paused/qemu-nbd "
                  f"{c['paused_over_qemu_iops']} (>= 1.0), steady/qemu-nbd {c['steady_over_qemu_iops']}; worst "
                  "completion minus qemu-nbd's (<= 50 ms): " + ", ".join(
                      f"{p} {v} ms" for p, v in c["worst_minus_qemu_ms"].items()) + "; p99.9 / qemu-nbd's (<= 2): "
                  + ", ".join(f"{p} {v}" for p, v in c["p999_over_qemu"].items())
                  + ("; worst completion minus qemu-nbd's, each less the CPUs' freezes meanwhile: " + ", ".join(
                      f"{p} {v} ms" for p, v in c["worst_minus_qemu_less_freezes_ms"].items())
                     if "worst_minus_qemu_less_freezes_ms" in c else ""), ""]
    lines += ["`*`: the job ran at the rate cap (IOPS there show only that the server kept up). Server cores: "
              "CPU time of qemu-nbd (e) or of our export process (a-d) over fio's run, per second. Host steal: the "
              "share of this machine's CPU time the host took away while fio ran (bench/hoststeal.py); above "
              f"{hoststeal.NOISY:.0%} a phase says more about the host than about us. Disk writes: what reached the "
              "block device under the bench's folder while fio ran, from anyone (bench/devicestats.py). CPU "
              "freezes: the times a CPU ran nothing at all for 5 ms or more while fio ran (the host took it; "
              "bench/cpufreeze.py), how many and the longest; max ms less freezes: the worst completion once the "
              "time some CPU was frozen during each I/O is taken off it (an upper bound on what the host explains). "
              "The targets are judged on max ms.", ""]
    if report["problems"]:
        lines += ["Problems:", ""] + [f"- {p}" for p in report["problems"]] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default=None, help="corpus disk size (default 4G; --quick 256M)")
    ap.add_argument("--runtime", type=int, default=None, help="seconds per fio job (default 30; --quick 5)")
    ap.add_argument("--quick", action="store_true", help="256M disk, 5 s jobs, one job (4k-qd16), cycles every "
                    "2 s through the admin API: for development and the smoke test (under 90 s)")
    ap.add_argument("--work", default=os.path.join(ROOT, "var", "bench", "guest-impact"))
    ap.add_argument("--corpus", default=None, help="corpus cache (default var/bench/guest-impact-corpus/SIZE)")
    ap.add_argument("--jobs", default=None, help=f"comma-separated, of {', '.join(ALL_JOBS)}, or all (default all; "
                    "--quick 4k-qd16)")
    ap.add_argument("--phases", default="eacbd", help="which of e a b c d to run (e is always run)")
    ap.add_argument("--rate", default=None, help="fio's rate cap in bytes/s (e.g. 32M; 0 = none); default: "
                    "what keeps the tracker's log under 80%% of half the disk between cuts")
    ap.add_argument("--cycle-every", type=float, default=None, help="phase b: cycles through the admin API every "
                    "S seconds instead of the daemon's 30 s scheduler (--quick: 2)")
    ap.add_argument("--replica-root", default=None, help="the replica's storage (default WORK/site-c/replica-root); "
                    "a folder on another file system keeps the replica's writes out of the primary's journal")
    ap.add_argument("--copy-rate-when-busy", default=None, help="the machine's copy_rate_when_busy (e.g. 50M, "
                    "none); default: replicatord's")
    ap.add_argument("--replication-cpus", default=None, metavar="LIST",
                    help="both replicatords' replication_cpus (e.g. 1: replication on CPU 1, the export on every "
                         "CPU, fio unpinned); default: none, replication on every CPU")
    ap.add_argument("--memory-logs", default=None, metavar="BUDGET",
                    help="the primary's memory_logs (auto, none or a size like 2G: the export's active logs in "
                         "memory); default: replicatord's (auto)")
    ap.add_argument("--no-freeze-watch", action="store_true", help="no CPU freeze watchers (bench/cpufreeze.py: "
                    "one SCHED_FIFO sleeper per CPU, 0.73%% of it measured)")
    ap.add_argument("--note", default=None, help="what the machine was doing (default: shared and busy)")
    ap.add_argument("--out", default=None, help="JSON path; the .md beside it (default docs/bench/guest-impact.json; "
                    "--quick: WORK/guest-impact.json)")
    args = ap.parse_args(argv)
    q = args.quick
    args.size = parse_size(args.size or ("256M" if q else "4G"))
    args.runtime = args.runtime or (5 if q else 30)
    jobs = (args.jobs or ("4k-qd16" if q else "all")).split(",")
    jobs = list(ALL_JOBS) if jobs == ["all"] else jobs
    assert all(j in ALL_JOBS for j in jobs), f"jobs must be among {ALL_JOBS}"
    args.cycle_every = args.cycle_every if args.cycle_every is not None else (2.0 if q else 0.0)
    between_cuts = max(args.runtime, args.cycle_every or 30)
    args.rate = (parse_size(args.rate) if args.rate is not None
                 else int(0.8 * (args.size / 2) / between_cuts) // MiB * MiB)
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    out_json = os.path.abspath(args.out or (os.path.join(work, "guest-impact.json") if q
                                            else os.path.join(ROOT, "docs", "bench", "guest-impact.json")))
    corpus_dir = args.corpus or os.path.join(ROOT, "var", "bench", "guest-impact-corpus", f"{args.size // MiB}M")
    phases = [p for p in ORDER if p in args.phases + "e"]
    t_start = time.time()

    raw, vhdx = ensure_corpus(corpus_dir, args.size)
    region = write_region(raw, vhdx, max(args.size // 4, 16 * MiB))
    logs = os.path.join(work, "fio")
    os.makedirs(logs, exist_ok=True)
    pki = os.path.join(work, "pki")
    if not os.path.exists(os.path.join(pki, "primary.pem")):
        shutil.rmtree(pki, ignore_errors=True)
        sh(os.path.join(BIN, "replicator"), "certs", "init", pki)
        for name in ("replica", "primary"):
            sh(os.path.join(BIN, "replicator"), "certs", "issue", pki, name)
    log(f"disk {args.size / GiB:.2f} GiB, region {region[0] / MiB:.0f}+{region[1] / MiB:.0f} MiB, jobs {jobs}, "
        f"{args.runtime} s each, rate cap {args.rate / MiB:.0f} MiB/s, phases {''.join(phases)}")

    res: dict = {p: {} for p in phases}
    problems: list[str] = []
    site = None
    global FREEZES
    FREEZES = None if args.no_freeze_watch else cpufreeze.Watch(os.path.join(work, "freezes")).start()
    try:
        res["e"] = phase_qemu(work, vhdx, jobs, args, region, logs)
        if "c" in phases:
            for i, job in enumerate(jobs):
                res["c"][job], site = phase_initial(work, pki, vhdx, job, args, region, logs, i == len(jobs) - 1)
        if site is None and any(p in phases for p in "abd"):         # no phase c: one initial replication
            site = Site(work, pki, vhdx, "c", args.replica_root, args.copy_rate_when_busy,
                        args.replication_cpus, args.memory_logs).start()
            site.primary.ok("POST", "/v1/machines/vm/cycle?wait=1")
        if site is not None:
            wait_for(lambda: site.primary.machine()["state"] == "Replicating", "the initial replication to end",
                     timeout=3600, logfile=site.primary.logfile)
            for p, fn in (("a", phase_paused), ("b", phase_steady), ("d", phase_resync)):
                if p not in phases:
                    continue
                for job in jobs:
                    res[p][job] = fn(site, job, args, region, logs)
                if p in "ab":
                    fresh_log(site)
    finally:
        if site is not None:
            site.stop()
        if FREEZES is not None:
            FREEZES.stop()

    for p in phases:
        for job, r in res[p].items():
            if r.get("tracking") == "resync_required" and p != "d":
                problems.append(f"{p} {job}: the tracker left logging ({r.get('reason')}): the export did less "
                                "than it does normally; lower --rate")
            if not r["ios"]:
                problems.append(f"{p} {job}: no I/O completed in the phase's window")
    report = {
        "setup": {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} cores, {platform.node()}",
                  "disk": f"{args.size / GiB:.2f} GiB ext4 of real files ({os.path.basename(corpus_dir)} corpus), "
                          f"dynamic VHDX {os.path.getsize(vhdx) / MiB:.0f} MiB",
                  "jobs": jobs, "runtime_s": args.runtime, "rate": args.rate, "region": list(region),
                  "cycles": (f"admin API every {args.cycle_every} s" if args.cycle_every
                             else "replicatord's scheduler, frequency 30s"),
                  "quick": q, "seconds": round(time.time() - t_start, 1),
                  "replica_root": args.replica_root or "under --work (the primary's file system)",
                  "copy_rate_when_busy": args.copy_rate_when_busy or "replicatord's default",
                  "replication_cpus": args.replication_cpus or "none (every CPU)",
                  "memory_logs": args.memory_logs or "replicatord's default (auto)",
                  "freeze_watch": ("none" if FREEZES is None else
                                   f"every {cpufreeze.PERIOD * 1e3:.0f} ms per CPU, "
                                   f"{'SCHED_FIFO' if FREEZES.realtime else 'not SCHED_FIFO: busy CPUs count'}"),
                  "sessions": "fio, both replicatords and the export each in a session of their own",
                  "note": args.note or "Figures from a shared, busy 2-core machine." if not q else
                          "--quick: a smoke run (256 MiB disk, 5 s jobs); the figures mean little."},
        "phases": res, "ratios": compare(res, jobs) if all(res.get(p) for p in "ab") else {},
        "problems": problems}
    os.makedirs(os.path.dirname(out_json), exist_ok=True)
    with open(out_json, "w") as f:
        json.dump(report, f, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    if report["ratios"]:
        with open(os.path.splitext(out_json)[0] + ".md", "w") as f:
            f.write(markdown(report))
    print(json.dumps(report["ratios"], indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    log(f"done in {time.time() - t_start:.0f} s: {out_json}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

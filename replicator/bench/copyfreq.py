"""`replicator bench copy-frequency`: how often to ship changes, measured on a time-compressed simulation.

For each copy frequency the workload's writes go, in virtual-time order, through a real tracked disk (the
tracked export's write path: VHDX + active Hyper-V Replica Log + dirty regions); at every virtual cycle
boundary a real replication cycle cuts the log, encodes it into a delta stream and applies it to a replica
store on this host. Bytes, compression and CPU are measured; only the clock is virtual: writes are applied
as fast as the host allows and the link is a model (transfer time = stream bytes / link bandwidth).

The schedule model (the same for the measured run and for any other link bandwidth):
  cut_k       = k x interval (cuts happen on schedule; a sealed log waits for the link if it is busy)
  done_k      = max(cut_k, done_{k-1}) + processing_k + stream_bytes_k / link
  RPO_k       = done_k - (virtual time of the first write after cut_{k-1}), cycles with writes only
  in half     = done_k - cut_k <= interval / 2
processing_k is the cycle's measured wall time on this host (cut, encode, local send, verify, apply).
"""
from __future__ import annotations

import asyncio
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..cli.common import human
from ..durable import output_file, output_path
from ..errors import UsageError
from ..replication import DiskReplicator
from ..targets import Decorator, LocalTarget
from ..targets.base import PointInfo
from ..targets.outbox import OutboxStream
from ..tracking import TrackedDisk
from ..tracking.service import ExportService
from ..vhdx import create_vhdx
from .workloads import Workload

MiB = 1 << 20


@dataclass
class Cycle:
    cut: float                    # virtual seconds
    first_write: float | None     # virtual time of the first write of this cycle (None: no writes)
    writes: int
    written_bytes: int            # bytes the workload wrote during the cycle
    kind: str                     # delta / resync
    stream_bytes: int
    plain_bytes: int
    processing: float             # wall seconds of the cycle on this host
    cpu_primary: float
    cpu_replica: float
    log_bytes: int                # active log's data bytes at the cut (0 when tracking had stopped)


@dataclass
class Run:
    interval: float
    workload: str
    disk_size: int
    duration: float
    max_log_share: float
    wall_seconds: float = 0.0
    cycles: list[Cycle] = field(default_factory=list)


class _MeteredTarget(Decorator):
    """A LocalTarget whose receive and apply run in one worker thread each, timed with thread CPU time."""

    def __init__(self, inner: LocalTarget):
        super().__init__(inner)
        self.cpu = 0.0

    async def send(self, disk_id, stream_id, path, throttle=None):
        def receive():
            t0 = time.thread_time()
            up = self.inner.store.disk(disk_id).open_upload(stream_id)
            sent = 0
            try:
                for chunk in OutboxStream.of(path).read_chunks(up.durable):
                    up.write(up.size, chunk)
                    sent += len(chunk)
                up.sync()
            finally:
                up.close()
                self.cpu += time.thread_time() - t0
            return sent
        return await asyncio.to_thread(receive)

    async def commit(self, disk_id, stream_id):
        def apply():
            t0 = time.thread_time()
            try:
                return self.inner.store.disk(disk_id).commit(stream_id)
            finally:
                self.cpu += time.thread_time() - t0
        p = await asyncio.to_thread(apply)
        return PointInfo(p.generation, p.time, p.consistency)


# ---------------------------------------------------------------------------------------------- simulation
def simulate(wl: Workload, interval: float, workdir: str, *, max_log_share: float = 0.5, progress=None) -> Run:
    """Run the workload through a tracked disk, cutting and shipping every `interval` virtual seconds."""
    os.makedirs(workdir, exist_ok=True)
    primary = os.path.join(workdir, "primary.vhdx")
    create_vhdx(primary, wl.disk_size, block_size=2 * MiB).close()
    tracked = TrackedDisk(primary, max_log_share=max_log_share)
    target = _MeteredTarget(LocalTarget(os.path.join(workdir, "replica")))
    rep = DiskReplicator(tracked, target)
    svc = ExportService({"disk": tracked}, socket_path=os.path.join(workdir, "nbd.sock")).start()
    run = Run(interval, wl.name, wl.disk_size, wl.duration, max_log_share)
    start = time.perf_counter()
    try:
        svc._call(rep.run_cycle(), timeout=None)                 # initial replication of the empty disk
        n_cycles, i = max(1, math.ceil(wl.duration / interval - 1e-9)), 0
        for k in range(1, n_cycles + 1):
            cut = min(k * interval, wl.duration) if k == n_cycles else k * interval
            j = int(np.searchsorted(wl.t, cut, side="left"))
            run.cycles.append(_cycle(svc, tracked, rep, target, wl, i, j, cut))
            i = j
            if progress:
                progress(k, n_cycles)
    finally:
        svc.stop()
    run.wall_seconds = time.perf_counter() - start
    return run


def _cycle(svc, tracked, rep, target, wl: Workload, i: int, j: int, cut: float) -> Cycle:
    async def write_all():
        for n in range(i, j):
            tracked.write(int(wl.offset[n]), wl.data(n))
        return tracked.log.data_bytes if tracked.log is not None else 0
    log_bytes = svc._call(write_all(), timeout=None)
    target.cpu = 0.0
    cpu0, t0 = time.process_time(), time.perf_counter()
    res = svc._call(rep.run_cycle(), timeout=None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return Cycle(cut=cut, first_write=float(wl.t[i]) if j > i else None, writes=j - i,
                 written_bytes=int(wl.length[i:j].sum()), kind=res.kind, stream_bytes=res.stream_bytes,
                 plain_bytes=res.plain_bytes, processing=wall, cpu_primary=max(0.0, cpu - target.cpu),
                 cpu_replica=target.cpu, log_bytes=log_bytes)


def check_workdir(workdir: str | None) -> None:
    """The scratch folder the operator named must exist and be a folder (it is not created: a typo would
    put gigabytes of simulated disks somewhere unexpected)."""
    if workdir is not None and not os.path.isdir(workdir):
        raise UsageError(f"work folder {workdir} does not exist (create it, or leave --work out for a temporary "
                         "folder)")


def run_all(wl: Workload, intervals: list[float], *, workdir: str | None = None, max_log_share: float = 0.5,
            progress=None) -> list[Run]:
    """One fresh primary and replica per frequency, removed afterwards."""
    check_workdir(workdir)
    base = tempfile.mkdtemp(prefix="copyfreq-", dir=workdir)
    runs = []
    try:
        for interval in intervals:
            d = os.path.join(base, f"f{int(interval)}")
            cb = (lambda k, n, iv=interval: progress(iv, k, n)) if progress else None
            runs.append(simulate(wl, interval, d, max_log_share=max_log_share, progress=cb))
            shutil.rmtree(d, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return runs


# ---------------------------------------------------------------------------------------------- analysis
def schedule(run: Run, link: float) -> tuple[np.ndarray, np.ndarray]:
    """done_k and (done_k - cut_k) for a link of `link` bytes per second (see the module docstring)."""
    done, prev = np.zeros(len(run.cycles)), 0.0
    for k, c in enumerate(run.cycles):
        prev = max(c.cut, prev) + c.processing + c.stream_bytes / link
        done[k] = prev
    cuts = np.array([c.cut for c in run.cycles])
    return done, done - cuts


def analyze(run: Run, link: float) -> dict:
    done, took = schedule(run, link)
    rpo = np.array([d - c.first_write for d, c in zip(done, run.cycles) if c.first_write is not None])
    cs = run.cycles
    stream, plain = sum(c.stream_bytes for c in cs), sum(c.plain_bytes for c in cs)
    threshold = run.max_log_share * run.disk_size
    hours = run.duration / 3600
    return {
        "interval": run.interval, "cycles": len(cs),
        "bytes_shipped": stream, "bytes_shipped_per_hour": stream / hours, "changed_bytes": plain,
        "bytes_written": sum(c.written_bytes for c in cs),
        "compression_ratio": plain / stream if stream else None,
        "cpu_primary_s": sum(c.cpu_primary for c in cs), "cpu_replica_s": sum(c.cpu_replica for c in cs),
        "rpo_median_s": _pct(rpo, 50), "rpo_p99_s": _pct(rpo, 99), "rpo_max_s": float(rpo.max()) if len(rpo) else None,
        "within_half": int((took <= run.interval / 2).sum()),
        "worst_cycle_s": float(took.max()) if len(took) else 0.0,
        "log_peak_share_of_threshold": max((c.log_bytes for c in cs), default=0) / threshold,
        "resyncs": sum(c.kind == "resync" for c in cs),
        "min_link_for_half": min_link(run),
    }


def _pct(a: np.ndarray, q: float) -> float | None:
    return float(np.percentile(a, q)) if len(a) else None


def min_link(run: Run) -> float | None:
    """The least link bandwidth (bytes/s) at which every cycle finishes within half its interval; None if
    processing alone takes longer. When every cycle fits, none waits for its predecessor."""
    half, need = run.interval / 2, 0.0
    for c in run.cycles:
        spare = half - c.processing
        if spare <= 0:
            return None
        need = max(need, c.stream_bytes / spare)
    return need


def eligible(a: dict) -> bool:
    return a["within_half"] == a["cycles"] and a["resyncs"] == 0 and a["log_peak_share_of_threshold"] < 1


def recommend(runs: list[Run], link: float) -> dict:
    """The frequency with the lowest p99 RPO among those whose every cycle finishes within half its interval
    and whose log never reaches the resync threshold; with reasons for each frequency."""
    rows = [analyze(r, link) for r in runs]
    reasons = [_reason(a, link) for a in rows]
    ok = [a for a in rows if eligible(a)]
    if ok:
        best = min(ok, key=lambda a: (a["rpo_p99_s"] if a["rpo_p99_s"] is not None else 0, a["interval"]))
        why = (f"{fmt_interval(best['interval'])} is the most frequent schedule whose every cycle finished within "
               f"half its interval on a {fmt_rate(link)} link, so it gives the lowest RPO "
               f"(p99 {fmt_s(best['rpo_p99_s'])}) while leaving the link idle at least half the time.")
        return {"link": link, "frequency": best["interval"], "text": why, "reasons": reasons}
    needs = [(a["min_link_for_half"], a["interval"]) for a in rows if a["min_link_for_half"] is not None
             and a["resyncs"] == 0 and a["log_peak_share_of_threshold"] < 1]
    why = f"no frequency meets half its interval on a {fmt_rate(link)} link."
    if needs:
        need, iv = min(needs)
        why += f" The least demanding, {fmt_interval(iv)}, needs at least {fmt_rate(need)}."
    return {"link": link, "frequency": None, "text": why, "reasons": reasons}


def _reason(a: dict, link: float) -> str:
    iv = fmt_interval(a["interval"])
    if a["resyncs"] or a["log_peak_share_of_threshold"] >= 1:
        return f"{iv}: the log outgrew the resync threshold ({a['resyncs']} resync(s)) - too infrequent"
    if a["within_half"] < a["cycles"]:
        need = a["min_link_for_half"]
        more = f"needs >= {fmt_rate(need)}" if need else "processing alone exceeds half the interval"
        return (f"{iv}: {a['cycles'] - a['within_half']} of {a['cycles']} cycles overran half the interval "
                f"(worst {fmt_s(a['worst_cycle_s'])}); {more}")
    return (f"{iv}: every cycle within half its interval (worst {fmt_s(a['worst_cycle_s'])}), p99 RPO "
            f"{fmt_s(a['rpo_p99_s'])}, ships {fmt_bytes(a['bytes_shipped_per_hour'])}/h")


# ---------------------------------------------------------------------------------------------- formatting
def fmt_interval(s: float) -> str:
    return f"{s / 60:g} min" if s >= 60 and s % 60 == 0 else f"{s:g} s"


def fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.1f} s"


def fmt_bytes(n: float) -> str:
    return human(n, 1)


def fmt_rate(bps: float) -> str:
    """Bytes per second as MiB/s with the Mbit/s a link is sold by."""
    return f"{fmt_bytes(bps)}/s ({bps * 8 / 1e6:.3g} Mbit/s)"


def as_dict(run: Run) -> dict:
    return asdict(run)


# ---------------------------------------------------------------------------------------------- reports
def plot(runs: list[Run], link: float, path: str) -> None:
    """Left: p99 RPO against link bandwidth per frequency (dotted where cycles overrun half the interval).
    Right: data shipped per hour and the least link that keeps every cycle within half its interval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    links = np.logspace(np.log10(link) - 2, np.log10(link) + 2, 61)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    for r in runs:
        rows = [analyze(r, lk) for lk in links]
        p99 = np.array([a["rpo_p99_s"] or np.nan for a in rows])
        ok = np.array([a["within_half"] == a["cycles"] for a in rows])
        line, = ax.plot(links * 8 / 1e6, np.where(ok, p99, np.nan), lw=2, label=f"every {fmt_interval(r.interval)}")
        ax.plot(links * 8 / 1e6, p99, ls=":", color=line.get_color())
    ax.axvline(link * 8 / 1e6, color="grey", ls="--", lw=1)
    ax.text(link * 8 / 1e6, 0.02, " chosen link", color="grey", transform=ax.get_xaxis_transform())
    ax.set(xscale="log", yscale="log", xlabel="link bandwidth (Mbit/s)", ylabel="p99 RPO (seconds)",
           title="Recovery point objective vs link bandwidth\n(solid: every cycle within half its interval)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    names = [fmt_interval(r.interval) for r in runs]
    shipped = [analyze(r, link)["bytes_shipped_per_hour"] / MiB for r in runs]
    need = [(min_link(r) or np.nan) * 8 / 1e6 for r in runs]
    bars = bx.bar(names, shipped, color="tab:blue", alpha=0.7)
    bx.bar_label(bars, labels=[f"needs {n:.3g} Mbit/s" if n == n else "cannot" for n in need], fontsize=8)
    bx.set(xlabel="copy frequency", ylabel="MiB shipped per hour of workload",
           title="Data shipped, and the least link\nthat keeps cycles within half their interval")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(wl: Workload, runs: list[Run], link: float, meta: dict, png: str | None) -> str:
    rows = [analyze(r, link) for r in runs]
    rec = recommend(runs, link)
    hours = wl.duration / 3600
    wall = sum(r.wall_seconds for r in runs)
    out = [f"# Copy frequency: {wl.name} workload on a {fmt_rate(link)} link", "",
           "How often should the primary ship its changes to the replica? Shipping more often loses less data "
           "in a disaster (a smaller recovery point objective, RPO) but sends more bytes, because a block "
           "rewritten several times between two copies travels once per copy. This report replays one "
           "workload through the real replication code at each candidate frequency and measures the cost.", "",
           "## What was simulated", "",
           f"- **Workload**: {wl.description}.",
           f"- **Disk**: {fmt_bytes(wl.disk_size)} virtual disk (VHDX); {fmt_bytes(wl.bytes_written)} written "
           f"in {len(wl.t)} writes over {wl.duration / 60:g} minutes of virtual time "
           f"({fmt_bytes(wl.bytes_written / wl.duration)}/s on average).",
           f"- **Time compression**: the {wl.duration / 60:g} virtual minutes per frequency took "
           f"{wall / len(runs):.0f} s of real time on average ({wl.duration * len(runs) / wall:.0f}x faster).",
           f"- **Host**: {meta.get('host', '')}. Command: `{meta.get('command', '')}`.", "",
           "Each write goes through the tracked disk's real write path (the disk, the active change log, "
           "the dirty-region map). At each cycle boundary a real replication cycle seals the log, encodes "
           "it into a compressed delta stream and applies it to a replica store on this host. The bytes, "
           "compression ratio and CPU seconds are measured. Only the network is modelled: a cycle's "
           "transfer takes stream bytes / link bandwidth.", "",
           "- *RPO of a cycle* = the time its data is durable on the replica - the time of the oldest write "
           "it carries (the data a disaster just before that moment would lose). A cycle is cut on schedule, "
           "waits if the previous one is still on the link, then takes its measured processing time plus "
           "its transfer time.",
           "- *Within half*: a cycle finished (processing + transfer, plus any wait) within half its interval, "
           "leaving headroom for bursts, retries and catching up after an outage.",
           f"- *Log growth*: the largest change log at a cut, as a share of the resync threshold "
           f"({runs[0].max_log_share:.0%} of the disk). At 100 % tracking stops and the disk must be resynchronized.",
           "- *CPU*: primary = cut + read log + encode; replica = receive + verify + apply "
           "(process CPU seconds; the TLS cost of a real network link is not included, see `replicator bench cpu`).",
           "", "## Results", "",
           "| copy every | cycles | shipped | shipped / h | compression | CPU primary | CPU replica | RPO median "
           "| RPO p99 | RPO max | within half | log growth | least link for half |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in rows:
        need = a["min_link_for_half"]
        out.append(f"| {fmt_interval(a['interval'])} | {a['cycles']} | {fmt_bytes(a['bytes_shipped'])} | "
                   f"{fmt_bytes(a['bytes_shipped_per_hour'])} | {a['compression_ratio'] or 0:.2f}x | "
                   f"{a['cpu_primary_s']:.1f} s | {a['cpu_replica_s']:.1f} s | {fmt_s(a['rpo_median_s'])} | "
                   f"{fmt_s(a['rpo_p99_s'])} | {fmt_s(a['rpo_max_s'])} | {a['within_half']}/{a['cycles']} | "
                   f"{a['log_peak_share_of_threshold']:.0%}{' (resync)' if a['resyncs'] else ''} | "
                   f"{fmt_rate(need) if need else 'none suffices'} |")
    out += ["", f"Shipped and CPU columns are totals over the {hours * 60:g}-minute workload. Compression = "
            "changed bytes / stream bytes, where changed bytes are what remains after rewrites of the same "
            "block within a cycle are merged (the last one wins).", ""]
    if png:
        out += [f"![RPO vs link bandwidth]({os.path.basename(png)})", "",
                "Left: p99 RPO against link bandwidth for each frequency, recomputed from the measured cycles "
                "(solid where every cycle finishes within half its interval, dotted where some overrun). "
                "Right: data shipped per hour and the least link bandwidth each frequency needs.", ""]
    out += ["## Recommendation", "", f"**{_headline(rec)}** {rec['text']}", ""]
    out += [f"- {r}" for r in rec["reasons"]]
    out += ["", "The same measurements on other links:", "", "| link | recommendation |", "|---|---|"]
    for f in (0.01, 0.1, 1, 10, 100):
        other = recommend(runs, link * f)
        out.append(f"| {fmt_rate(link * f)} | {_headline(other)} |")
    return "\n".join(out) + "\n"


def _headline(rec: dict) -> str:
    return f"copy every {fmt_interval(rec['frequency'])}" if rec["frequency"] else "no frequency fits"


def write_reports(wl: Workload, runs: list[Run], link: float, out_dir: str, meta: dict) -> dict:
    """Markdown, JSON and PNG under out_dir, named after the workload; returns their paths."""
    import json
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"copy-frequency-{wl.name}")
    png = stem + ".png"
    with output_path(png, replace=True) as tmp:
        plot(runs, link, tmp)
    with output_file(stem + ".md", "w", replace=True) as f:
        f.write(markdown(wl, runs, link, meta, png))
    doc = {"workload": {"name": wl.name, "description": wl.description, "disk_size": wl.disk_size,
                        "duration": wl.duration, "writes": len(wl.t), "bytes_written": wl.bytes_written},
           "link_bytes_per_second": link, "meta": meta, "model": __doc__,
           "results": [analyze(r, link) for r in runs], "recommendation": recommend(runs, link),
           "runs": [as_dict(r) for r in runs]}
    with output_file(stem + ".json", "w", replace=True) as f:
        json.dump(doc, f, indent=1)
    return {"markdown": stem + ".md", "json": stem + ".json", "png": png}

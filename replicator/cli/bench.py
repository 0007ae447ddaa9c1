"""`replicator bench cpu | copy-frequency`."""
from __future__ import annotations

import os
import platform
import re
import shlex
import sys

from ..errors import UsageError
from .common import add_json

_DECIMAL = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}
_BINARY = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_rate(text: str) -> float:
    """Bytes per second: '5M' = 5 MiB/s (K, M, G binary, optional 'B', 'iB', '/s'); or bits per second
    with a 'bit' suffix: '100Mbit' = 100,000,000 bits/s."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgKMG]?)(bit|bps|i?[bB])?(?:/s)?\s*", text)
    if not m:
        raise UsageError(f"cannot read rate {text!r}: use e.g. 5M (MiB/s) or 100Mbit (Mbit/s)")
    value, unit, kind = float(m.group(1)), m.group(2).lower(), (m.group(3) or "").lower()
    rate = value * _DECIMAL[unit] / 8 if kind in ("bit", "bps") else value * _BINARY[unit]
    if rate <= 0:
        raise UsageError(f"rate {text!r} must be positive")
    return rate


def parse_duration(text: str) -> float:
    """'30s', '5m', '15min', '1h', or plain seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr)?\s*", text.lower())
    if not m:
        raise UsageError(f"cannot read duration {text!r}: use e.g. 30s, 5m, 1h")
    value = float(m.group(1)) * {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}[m.group(2) or "s"]
    if value <= 0:
        raise UsageError(f"duration {text!r} must be positive")
    return value


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks of this host: CPU throughput, copy-frequency simulation")
    cmds = p.add_subparsers(dest="command", required=True)
    c = cmds.add_parser("cpu", help="kernel, compression and TLS throughput on this host")
    c.add_argument("--size", default="256M", help="bytes per kernel/TLS measurement (default 256M)")
    c.add_argument("--runs", type=int, default=3, help="repetitions; the best is reported (default 3)")
    add_json(c, "the measurements")
    c.set_defaults(func=cmd_cpu)
    f = cmds.add_parser("copy-frequency", help="simulate a workload at several copy frequencies (time-compressed)")
    f.add_argument("--workload", default="zipf",
                   help="uniform | zipf | append | db | hrl:LOG[,LOG...] (a recorded log chain) | fio:JOBFILE "
                        "(default zipf)")
    f.add_argument("--rate", default="1M", help="write rate of the synthetic models, bytes/s (default 1M = 1 MiB/s)")
    f.add_argument("--duration", default="1h", help="virtual duration of the workload (default 1h)")
    f.add_argument("--frequencies", default="30s,5m,15m", help="copy intervals, comma separated (default 30s,5m,15m)")
    f.add_argument("--link", default="100Mbit", help="link bandwidth: 10M = 10 MiB/s, 100Mbit = 100 Mbit/s")
    f.add_argument("--disk-size", default="4G", help="virtual disk size (default 4G; hrl: the logs' extent)")
    f.add_argument("--max-log-share", type=float, default=0.5, help="resync threshold, share of the disk")
    f.add_argument("--seed", type=int, default=1, help="random seed of the synthetic workloads (default 1)")
    f.add_argument("--work", default=None, help="scratch directory for the simulated disks (default: temp)")
    f.add_argument("--out", default=".", help="directory for the Markdown, JSON and PNG reports")
    f.set_defaults(func=cmd_copy_frequency)


def cmd_cpu(args) -> int:
    from ..bench import cpu
    from .common import parse_size
    results = cpu.run_all(parse_size(args.size), runs=args.runs,
                          out=None if args.json else (lambda line: print(line, flush=True)))
    if args.json:
        import json
        print(json.dumps(results, indent=1))
    return 0


def cmd_copy_frequency(args) -> int:
    from ..bench import copyfreq, workloads
    from .common import parse_size
    copyfreq.check_workdir(args.work)
    intervals = sorted({parse_duration(x) for x in args.frequencies.split(",") if x.strip()})
    if not intervals:
        raise UsageError("give at least one frequency")
    link = parse_rate(args.link)
    disk_size = None if args.workload.startswith("hrl:") and args.disk_size == "4G" else parse_size(args.disk_size)
    try:
        wl = workloads.parse(args.workload, disk_size=disk_size, rate=parse_rate(args.rate),
                             duration=parse_duration(args.duration), seed=args.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"{wl.name}: {wl.description}; {len(wl.t)} writes, {copyfreq.fmt_bytes(wl.bytes_written)} "
          f"over {wl.duration:g} virtual seconds", flush=True)
    try:
        runs = copyfreq.run_all(wl, intervals, workdir=args.work, max_log_share=args.max_log_share,
                                progress=_progress)
        meta = {"host": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}, Python "
                        f"{platform.python_version()})",
                "command": "replicator " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
        paths = copyfreq.write_reports(wl, runs, link, args.out, meta)
        print(f"\n{copyfreq.recommend(runs, link)['text']}")
    finally:
        wl.close()
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _progress(interval: float, k: int, n: int) -> None:
    if k == n or k % max(1, n // 10) == 0:
        print(f"  every {interval:g} s: cycle {k}/{n}", flush=True)

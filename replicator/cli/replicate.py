"""`replicator replicate DISK... --to URL`: one cycle, or continuous with --every.

All disks given are one machine: every cycle cuts them at one instant. With --socket the disks are also
served over NBD (the VM's I/O path) from the same process, so continuous replication needs nothing else.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

from ..errors import UsageError
from ..replication import DiskReplicator
from ..targets.factory import open_target
from ..tracking import TrackedDisk
from ..tracking.service import ExportService
from .common import human, parse_size, require_files
from .progress import ProgressBar

FREQUENCIES = {"30s": 30, "5m": 300, "15m": 900}


def register(sub) -> None:
    p = sub.add_parser("replicate", help="replicate disks to a replica target (one cycle, or --every)")
    p.add_argument("disks", nargs="+", help="the machine's VHDX disks (cut together)")
    p.add_argument("--to", required=True, help="local:///PATH, https://HOST:8084, http://HOST:8083, azure://...")
    p.add_argument("--every", choices=sorted(FREQUENCIES), help="continuous: replication frequency")
    p.add_argument("--socket", help="also serve the disks over NBD on this Unix socket")
    p.add_argument("--cert", help="https: this host's certificate (replicator certs issue)")
    p.add_argument("--key", help="https: its private key")
    p.add_argument("--ca", help="https: the CA certificate the replica's certificate must chain to")
    p.add_argument("--kerberos", action="store_true",
                   help="http: authenticate with this host's Kerberos ticket (kinit) instead of certificates")
    p.add_argument("--no-compress", action="store_true", help="send data uncompressed")
    p.add_argument("--bandwidth-limit", help="bytes per second, e.g. 100M")
    p.add_argument("--app-consistent", action="store_true", help="mark the points application-consistent")
    p.add_argument("--json", action="store_true",
                   help="print each disk's cycle as one JSON object per line (for scripts) instead of text")
    p.set_defaults(func=cmd_replicate)


def cmd_replicate(args) -> int:
    if args.socket and not args.every:
        raise UsageError("--socket serves the disks while replicating continuously: add --every")
    require_files(args, "cert", "key", "ca")
    limit = parse_size(args.bandwidth_limit) if args.bandwidth_limit else None
    target = open_target(args.to, cert=args.cert, key=args.key, ca=args.ca, kerberos=args.kerberos,
                         bandwidth_limit=limit)
    disks = {os.path.basename(d): TrackedDisk(d) for d in args.disks}
    service = ExportService(disks, socket_path=args.socket or _private_socket()).start()
    reps = [DiskReplicator(t, target, compress=not args.no_compress, name=n) for n, t in disks.items()]
    bar = ProgressBar("replicate ")                       # on a terminal: the stream being encoded
    for rep in reps:
        rep.progress = lambda done, total, name=rep.name: bar(name, done, total)
    consistency = "application" if args.app_consistent else "crash"
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    async def machine_cycle():
        service.group.cut()                                # one instant for every disk of the machine
        return [await r.run_cycle(consistency=consistency, cut=False) for r in reps]

    try:
        if args.socket:
            for name in disks:
                print(f"serving {name} at {service.uri(name)}", flush=True)
        while True:
            results = service._call(machine_cycle(), timeout=None)
            bar.close()
            for name, res in zip(disks, results):
                print(_cycle_line(name, res, args.json), flush=True)
            if not args.every or stop.wait(FREQUENCIES[args.every]):
                break
    finally:
        service._call(target.close())          # its HTTP session lives on the export's loop
        service.stop()
    return 0


def _cycle_line(name: str, res, as_json: bool) -> str:
    if as_json:
        return json.dumps({"disk": name, "kind": res.kind, "generation": res.generation, "streams": res.streams,
                           "changed_bytes": res.plain_bytes, "stream_bytes": res.stream_bytes,
                           "sent_bytes": res.bytes_sent, "seconds": round(res.seconds, 3), "time": time.time()})
    return (f"{name}: {res.kind} cycle, generation {res.generation}, {res.streams} stream(s), "
            f"{human(res.plain_bytes)} changed, {human(res.bytes_sent)} sent, {res.seconds:.2f} s")


def _private_socket() -> str:
    import tempfile
    return os.path.join(tempfile.mkdtemp(prefix="replicator-"), "nbd.sock")

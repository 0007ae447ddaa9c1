"""`replicator track serve | status`."""
from __future__ import annotations

import json
import os
import signal
import threading

from ..errors import UsageError
from ..tracking import TrackedDisk
from ..tracking.service import ExportService
from ..tracking.state import Sidecar
from .common import add_json


def register(sub) -> None:
    p = sub.add_parser("track", help="serve disks over NBD while writing Hyper-V Replica Logs")
    cmds = p.add_subparsers(dest="command", required=True)
    s = cmds.add_parser("serve", help="export VHDX disks over NBD with change tracking (SIGUSR1 cuts the logs)")
    s.add_argument("disks", nargs="+", help="VHDX files; the export names are their file names")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="Unix socket path")
    where.add_argument("--port", type=int, help="TCP port on 127.0.0.1")
    s.add_argument("--cut-every", type=float, help="seal the logs every N seconds")
    s.add_argument("--max-log-share", type=float, default=0.5,
                   help="a log larger than this share of its disk forces a resync (default 0.5)")
    s.set_defaults(func=cmd_serve)
    t = cmds.add_parser("status", help="tracking state of a disk")
    t.add_argument("disk", help="a tracked VHDX")
    add_json(t, "the state")
    t.set_defaults(func=cmd_status)


def cmd_serve(args) -> int:
    names = [os.path.basename(d) for d in args.disks]
    if len(set(names)) != len(names):
        raise UsageError("two disks have the same file name; export names must differ")
    disks = {}
    try:
        for name, path in zip(names, args.disks):
            disks[name] = TrackedDisk(path, max_log_share=args.max_log_share)
    except BaseException:
        for d in disks.values():
            d.close()
        raise
    service = ExportService(disks, socket_path=args.socket, port=args.port).start()
    for name, d in disks.items():
        state = f"RESYNC REQUIRED: {d.reason}" if d.resync_required else "tracking"
        print(f"{name}: {state}", flush=True)
    for name in names:
        print(f"serving {name} at {service.uri(name)}", flush=True)
    stop = threading.Event()
    cut_now = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: cut_now.set())
    try:
        while not stop.is_set():
            due = cut_now.wait(args.cut_every) if args.cut_every else cut_now.wait(0.5)
            if stop.is_set():
                break
            if due or args.cut_every:
                cut_now.clear()
                for sealed in service.cut():
                    if sealed is not None:
                        print(f"sealed {sealed.path} ({sealed.data_bytes} bytes)", flush=True)
    finally:
        service.stop()
    print("stopped cleanly", flush=True)
    return 0


def cmd_status(args) -> int:
    sc = Sidecar(args.disk)
    if not sc.exists():
        raise UsageError(f"{args.disk} has never been tracked")
    st = sc.load()
    info = {"state": st.state, "reason": st.reason, "clean": st.clean, "active_log": st.active_log,
            "pending_logs": [r.name for r in st.sealed_logs], "data_write_guid": st.data_write_guid}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:16} {v}")
    return 0

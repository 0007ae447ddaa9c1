"""`replicator seed export | import | verify`: offline initial replication."""
from __future__ import annotations

import asyncio
import os
import signal
import threading

from ..errors import UsageError
from ..seed import export_machine, import_seed, verify_seed
from ..targets import LocalTarget
from ..tracking import TrackedDisk
from .common import human, parse_size
from .progress import ProgressBar


def register(sub) -> None:
    p = sub.add_parser("seed", help="offline initial replication: export to removable media, import on the replica")
    cmds = p.add_subparsers(dest="command", required=True)
    e = cmds.add_parser("export", help="write the initial copy of a machine's disks; tracking starts at the cut")
    e.add_argument("machine", help="the machine's name (the folder under --to)")
    e.add_argument("disks", nargs="+", help="the machine's VHDX disks")
    e.add_argument("--to", required=True, help="folder on the seed media")
    e.add_argument("--volume-size", default="500G", help="split into volumes of this size (default 500G)")
    e.add_argument("--no-compress", action="store_true", help="store data uncompressed")
    e.set_defaults(func=cmd_export)
    i = cmds.add_parser("import", help="verify a seed and build the replica disks from it")
    i.add_argument("dir", nargs="?", help="the seed's machine folder (DIR/MACHINE)")
    i.add_argument("--replica-root", required=True, help="the replica store to build the disks in")
    i.add_argument("--machine", help="refuse a seed of any other machine")
    i.add_argument("--from-existing", metavar="DISK",
                   help="use a disk already on the replica host as the seed (a checksum resync levels it)")
    i.add_argument("--disk-id", help="with --from-existing: the primary disk's VirtualDiskId")
    i.set_defaults(func=cmd_import)
    v = cmds.add_parser("verify", help="check every volume of a seed")
    v.add_argument("dir", help="the seed's machine folder (DIR/MACHINE)")
    v.set_defaults(func=cmd_verify)


def cmd_export(args) -> int:
    disks = {os.path.basename(d): TrackedDisk(d) for d in args.disks}
    cancel = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: cancel.set())
    bar = ProgressBar("export ")
    try:
        m = export_machine(args.machine, disks, args.to, volume_size=parse_size(args.volume_size),
                           compress=not args.no_compress, cancel=cancel, progress=bar)
    finally:
        bar.close()
        for d in disks.values():
            d.close()
    vols = sum(len(d.volumes) for d in m.disks)
    size = sum(v.bytes for d in m.disks for v in d.volumes)
    print(f"exported {len(m.disks)} disk(s) of {args.machine} to {os.path.join(args.to, args.machine)}: "
          f"{vols} volume(s), {human(size)}; tracking continues from the cut")
    return 0


def cmd_import(args) -> int:
    if args.from_existing:
        if not args.disk_id:
            raise UsageError("--from-existing needs --disk-id (the primary's VirtualDiskId: replicator vhdx info)")
        from ..replica import ReplicaStore
        rd = ReplicaStore(args.replica_root).adopt(args.disk_id, args.from_existing,
                                                   name=os.path.basename(args.from_existing),
                                                   machine=args.machine or "")
        print(f"{args.from_existing} adopted as the replica of {args.disk_id} ({human(rd.state.size)}); the "
              "next replication cycle sends only the blocks that differ")
        return 0
    if not args.dir:
        raise UsageError("give the seed folder, or --from-existing DISK")
    bar = ProgressBar("import ")
    try:
        m = asyncio.run(import_seed(args.dir, LocalTarget(args.replica_root), machine=args.machine, progress=bar))
    finally:
        bar.close()
    print(f"imported {m.machine}: {len(m.disks)} disk(s) ready for delta replication")
    return 0


def cmd_verify(args) -> int:
    m = verify_seed(args.dir)
    print(f"seed of {m.machine}: {sum(len(d.volumes) for d in m.disks)} volume(s) verified")
    return 0

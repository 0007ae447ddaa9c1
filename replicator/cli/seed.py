"""`replicator seed export | import | verify`: offline initial replication."""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import uuid

from ..errors import UsageError
from ..seed import export_machine, import_seed, verify_seed
from ..targets import LocalTarget
from ..tracking import TrackedDisk
from .common import add_config, human, parse_size
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
    i.add_argument("--trust-group",
                   help="the trust group whose primaries may continue the imported disks (a [[replica.allow]] "
                        "trust_group, or an --allow pattern of replica serve); default: the one group --config "
                        "maps to --replica-root, else the one group owning disks there")
    add_config(i)
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
    group = _trust_group(args)
    claim = _claimer(args.replica_root, group) if group is not None else None
    owned = f" for trust group {group!r}" if group is not None else ""
    if args.from_existing:
        if not args.disk_id:
            raise UsageError("--from-existing needs --disk-id (the primary's VirtualDiskId: replicator vhdx info)")
        try:
            disk_id = uuid.UUID(args.disk_id)
        except ValueError:
            raise UsageError(f"--disk-id {args.disk_id!r} is not a VirtualDiskId (a UUID)") from None
        from ..replica import ReplicaStore
        if claim is not None:
            claim([disk_id])
        rd = ReplicaStore(args.replica_root).adopt(disk_id, args.from_existing,
                                                   name=os.path.basename(args.from_existing),
                                                   machine=args.machine or "")
        print(f"{args.from_existing} adopted as the replica of {disk_id}{owned} ({human(rd.state.size)}); the "
              "next replication cycle sends only the blocks that differ")
        return 0
    if not args.dir:
        raise UsageError("give the seed folder, or --from-existing DISK")
    bar = ProgressBar("import ")
    try:
        m = asyncio.run(import_seed(args.dir, LocalTarget(args.replica_root), machine=args.machine, progress=bar,
                                    claim=claim))
    finally:
        bar.close()
    print(f"imported {m.machine}{owned}: {len(m.disks)} disk(s) ready for delta replication")
    return 0


def _trust_group(args) -> str | None:
    """Whose disks an import makes: --trust-group; else the one trust group the replicatord configuration
    maps to the root; else the one group owning disks there. None: nothing says the root is shared (a
    store no replica server knows yet). Several: refused, so the disks are never left to whichever
    primary of the root asks first."""
    if args.trust_group is not None:
        if not args.trust_group:
            raise UsageError("--trust-group must not be empty")
        return args.trust_group
    from ..transport.auth import AuthorizationEntry, Ownership
    root = os.path.realpath(args.replica_root)
    groups, source = set(), ""
    if os.path.isfile(args.config):
        from ..orchestration.settings import ConfigError, load_config
        try:
            replica = load_config(args.config).replica
        except ConfigError as e:
            raise UsageError(f"{args.config} has {len(e.problems)} problem(s) (replicatord --check-config shows "
                             "them): give --trust-group, or fix it") from None
        groups = {AuthorizationEntry(a.principal, a.storage, a.trust_group).group for a in
                  (replica.allow if replica else ()) if os.path.realpath(a.storage) == root}
        source = f"in {args.config}"
    if not groups:
        groups, source = set(Ownership(root)._load().values()), f"owning disks in {root}"
    if len(groups) > 1:
        raise UsageError(f"--replica-root {root} serves trust groups {', '.join(sorted(groups))} ({source}): "
                         "give --trust-group to say whose disks these are")
    return groups.pop() if groups else None


def _claimer(root: str, group: str):
    """Record `group` as the owner of disk ids before anything of them is created, so no other group's
    primary can claim them first; refused whole when any of them belongs to another group."""
    from ..transport.auth import AuthorizationEntry, AuthorizationError, Ownership
    owners = Ownership(os.path.abspath(root))

    def claim(disk_ids) -> None:
        for disk_id in disk_ids:
            owner = owners.owner(str(disk_id))
            if owner is not None and owner != group:
                raise AuthorizationError(f"disk {disk_id} in {os.path.abspath(root)} belongs to trust group "
                                         f"{owner!r}, not {group!r}")
        os.makedirs(root, exist_ok=True)
        for disk_id in disk_ids:
            owners.claim(str(disk_id), AuthorizationEntry(group, os.path.abspath(root), group))
    return claim


def cmd_verify(args) -> int:
    m = verify_seed(args.dir)
    print(f"seed of {m.machine}: {sum(len(d.volumes) for d in m.disks)} volume(s) verified")
    return 0

"""`replicator points list | export | test-failover | cleanup`: recovery points of a replica store."""
from __future__ import annotations

import json
import os
import time

from ..durable import output_path
from ..errors import UsageError
from ..replica import ReplicaStore
from .common import add_json


def register(sub) -> None:
    p = sub.add_parser("points", help="recovery points held by a replica store")
    cmds = p.add_subparsers(dest="command", required=True)
    ls = cmds.add_parser("list", help="disks and their recovery points (--to azure://...: machines' points)")
    ls.add_argument("--root", help="replica store root")
    ls.add_argument("--to", metavar="azure://ACCOUNT/CONTAINER[/PREFIX]", help="an Azure target instead: "
                    "its machine points (see `replicator azure machine-points`)")
    ls.add_argument("--machine", help="with --to: only this machine")
    add_json(ls, "the disks and points")
    ls.set_defaults(func=cmd_list)
    for name, func, hlp in (("export", cmd_export, "write a recovery point as a standalone VHDX (failover)"),
                            ("test-failover", cmd_test, "a differencing disk of a point; replication continues")):
        c = cmds.add_parser(name, help=hlp)
        c.add_argument("--root", required=name != "export", help="replica store root")
        c.add_argument("disk", help="disk id (points list shows them); with --to, the machine")
        c.add_argument("--generation", type=int, help="recovery point (default: the latest)")
        if name == "export":
            c.add_argument("--to", metavar="azure://ACCOUNT/CONTAINER[/PREFIX][?SAS][&key_file=PATH]",
                           help="an Azure target instead: export a machine point, NAME.vhd per disk into --out")
            c.add_argument("--point", type=int, help="with --to: the machine point (default: the latest)")
            c.add_argument("--out", required=True,
                           help="VHDX to create (written under a temporary name, renamed when complete); with "
                                "--to, an existing folder")
        c.set_defaults(func=func)
    cl = cmds.add_parser("cleanup", help="remove a test-failover disk")
    cl.add_argument("--root", required=True, help="replica store root")
    cl.add_argument("disk", help="disk id")
    cl.add_argument("test_disk", help="the test-failover disk test-failover printed")
    cl.set_defaults(func=cmd_cleanup)


def open_store(root: str) -> ReplicaStore:
    """An existing replica store; a wrong --root is said so (ReplicaStore would create an empty one)."""
    if not os.path.isdir(root):
        raise UsageError(f"replica store {root} does not exist")
    if not os.path.isdir(os.path.join(root, "disks")):
        raise UsageError(f"{root} is not a replica store (it has no disks/ folder)")
    return ReplicaStore(root)


def _point(rd, generation):
    return generation if generation is not None else rd.generation


def _azure(args) -> bool:
    """--to (an Azure target) or --root (a replica store), exactly one."""
    if bool(getattr(args, "to", None)) == bool(args.root):
        raise UsageError("give either --root (a replica store) or --to (an azure:// target)")
    return bool(getattr(args, "to", None))


def cmd_list(args) -> int:
    if _azure(args):
        from .azure import cmd_machine_points
        return cmd_machine_points(args)
    store = open_store(args.root)
    out = []
    for disk_id in store.disk_ids():
        rd = store.disk(disk_id)
        out.append({"disk": disk_id, "name": rd.state.name, "size": rd.state.size, "generation": rd.generation,
                    "additional_points": rd.state.additional_points, "tests": rd.state.tests,
                    "points": [{"generation": p.generation, "time": p.time, "consistency": p.consistency}
                               for p in rd.points]})
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for d in out:
        print(f"{d['disk']} {d['name']} generation {d['generation']}")
        for p in d["points"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(p["time"]))
            print(f"   point {p['generation']:>6}  {when} UTC  {p['consistency']}")
    return 0


def cmd_export(args) -> int:
    if _azure(args):
        from .azure import cmd_export as azure_export
        args.machine = args.disk
        return azure_export(args)
    rd = open_store(args.root).disk(args.disk)
    point = _point(rd, args.generation)
    if point not in {p.generation for p in rd.points}:     # said before a whole disk is copied for nothing
        raise UsageError(f"{args.disk} has no recovery point at generation {point} (have "
                         f"{[p.generation for p in rd.points]})")
    with output_path(args.out) as tmp:
        rd.materialize(point, tmp)
    print(f"exported point {point} of {args.disk} to {args.out}")
    return 0


def cmd_test(args) -> int:
    rd = open_store(args.root).disk(args.disk)
    path = rd.test_failover(_point(rd, args.generation))
    print(f"test failover disk: {path}")
    return 0


def cmd_cleanup(args) -> int:
    open_store(args.root).disk(args.disk).cleanup_test_failover(args.test_disk)
    print(f"removed {args.test_disk}")
    return 0

"""`replicator azure points | failover | test-failover | cleanup --to azure://ACCOUNT/CONTAINER[/PREFIX]`:
recovery points of disks replicated to Azure page blobs, and failover from them."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time

from ..errors import UsageError
from .common import add_json


def register(sub) -> None:
    p = sub.add_parser("azure", help="recovery points and failover of disks replicated to Azure page blobs")
    cmds = p.add_subparsers(dest="command", required=True)
    for name, func, hlp in (("points", cmd_points, "list a disk's recovery points (blob snapshots)"),
                            ("failover", cmd_failover, "copy a point to a new page blob (a fixed VHD) and verify it"),
                            ("test-failover", cmd_test, "copy a point to a test blob; replication carries on"),
                            ("cleanup", cmd_cleanup, "delete test-failover blobs (and optionally break a lease)")):
        c = cmds.add_parser(name, help=hlp)
        c.add_argument("--to", required=True, metavar="azure://ACCOUNT/CONTAINER[/PREFIX][?SAS]",
                       help="where the replica blobs are (credentials: SAS in the URL, or the environment, e.g. "
                            "AZURE_STORAGE_CONNECTION_STRING)")
        c.add_argument("disk", help="disk id")
        if name in ("failover", "test-failover"):
            c.add_argument("--generation", type=int, help="recovery point (default: the latest)")
            c.add_argument("--no-verify", action="store_true", help="skip comparing the copy's digest")
        if name == "failover":
            c.add_argument("--dest", help="destination blob name (default DISK-failover-gN.vhd)")
        if name == "cleanup":
            c.add_argument("--blob", help="only this test-failover blob")
            c.add_argument("--break-lease", action="store_true",
                           help="also free the replica blob from a writer that is certainly gone")
        add_json(c)
        c.set_defaults(func=func)


def _run(args, work):
    from ..azure import open_target

    async def go():
        target = open_target(args.to)
        try:
            return await work(target)
        finally:
            await target.close()
    try:
        return asyncio.run(go())
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_points(args) -> int:
    from ..azure.failover import list_points
    pts = _run(args, lambda t: list_points(t, args.disk))
    if args.json:
        print(json.dumps([dataclasses.asdict(p) for p in pts], indent=2))
        return 0
    for p in pts:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(p.time))
        print(f"point {p.generation:>6}  {when} UTC  {p.consistency:<11}  snapshot {p.snapshot}")
    return 0


def _print_result(args, r) -> None:
    if args.json:
        print(json.dumps(dataclasses.asdict(r), indent=2))
    else:
        kind = "test failover" if r.test else "failover"
        print(f"{kind}: point {r.generation} copied to {r.url} ({r.size} bytes, digest {r.digest}, "
              f"{r.seconds:.1f} s)")


def cmd_failover(args) -> int:
    from ..azure.failover import failover
    r = _run(args, lambda t: failover(t, args.disk, generation=args.generation, dest=args.dest,
                                      verify=not args.no_verify))
    _print_result(args, r)
    return 0


def cmd_test(args) -> int:
    from ..azure.failover import test_failover
    r = _run(args, lambda t: test_failover(t, args.disk, generation=args.generation, verify=not args.no_verify))
    _print_result(args, r)
    return 0


def cmd_cleanup(args) -> int:
    from ..azure.failover import cleanup
    gone = _run(args, lambda t: cleanup(t, args.disk, blob=args.blob, break_lease=args.break_lease))
    if args.json:
        print(json.dumps({"deleted": gone, "lease_broken": args.break_lease}))
    else:
        for name in gone:
            print(f"deleted {name}")
        if args.break_lease:
            print(f"lease on the replica of {args.disk} broken")
    return 0

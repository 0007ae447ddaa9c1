"""`replicator azure points | failover | test-failover | cleanup | machine-points | export | keygen`:
recovery points of disks and machines replicated to Azure page blobs (--to azure://ACCOUNT/CONTAINER[/PREFIX]),
failover from them, and the key file of encrypted replicas."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time

from ..errors import UsageError
from .common import add_config, add_json


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
    mp = cmds.add_parser("machine-points", help="recovery points of each machine (one cut across its disks)")
    mp.add_argument("--to", required=True, metavar="azure://ACCOUNT/CONTAINER[/PREFIX][?SAS]",
                    help="the Azure container (and prefix) the machine replicates to")
    mp.add_argument("--machine", help="only this machine")
    add_json(mp)
    mp.set_defaults(func=cmd_machine_points)
    ex = cmds.add_parser("export", help="write a machine point's disks as fixed VHD files (decrypted)")
    ex.add_argument("--to", required=True, metavar="azure://ACCOUNT/CONTAINER[/PREFIX][?SAS][&key_file=PATH]",
                    help="the Azure container (and prefix) the machine replicates to; key_file= decrypts an "
                         "encrypted replica")
    ex.add_argument("machine", help="the protected machine whose point is exported")
    ex.add_argument("--point", type=int, help="machine point (default: the latest)")
    ex.add_argument("--out", required=True, help="existing folder; NAME.vhd per disk is written there")
    ex.set_defaults(func=cmd_export)
    fm = cmds.add_parser("failover-machine", help="a machine point to fixed-VHD blobs plus the ARM template of its "
                         "VM (deploy: az deployment group create -g RG --template-file FILE "
                         "--parameters storageAccountId=ID)")
    fm.add_argument("--to", metavar="azure://ACCOUNT/CONTAINER[/PREFIX][?SAS][&key_file=PATH]",
                    help="the Azure container (and prefix) the machine replicates to; key_file= decrypts an "
                         "encrypted replica (default: the machine's target and encryption_key_file in --config)")
    add_config(fm)
    fm.add_argument("machine", help="the protected machine to fail over")
    fm.add_argument("--point", type=int, help="machine point (default: the latest)")
    fm.add_argument("--test", action="store_true", help="test failover: test blobs, NICs on the test VNet")
    fm.add_argument("--vm", help="VM spec (JSON: name, size, os_disk, nics, network_map, vnets, test_vnet; see "
                    "docs/operations.md); default: the machine's [machine.azure_vm] in --config")
    fm.add_argument("--template", required=True, help="ARM template to write")
    fm.set_defaults(func=cmd_failover_machine)
    fb = cmds.add_parser("failback", help="bring an Azure VM's disk (a failover blob) back into the on-premises "
                         "disk: a pass while it runs, a final pass (--base) after it stops, or --full")
    fb.add_argument("--to", required=True, metavar="azure://ACCOUNT/CONTAINER[/PREFIX][?SAS]",
                    help="the Azure container (and prefix) the machine replicates to")
    fb.add_argument("blob", help="the Azure VM's disk blob (failover printed it)")
    fb.add_argument("--disk", required=True, help="the on-premises disk to bring level (VHDX, VHD or raw)")
    fb.add_argument("--base", metavar="SNAPSHOT", help="the previous pass's snapshot: read only what changed since")
    fb.add_argument("--full", action="store_true", help="full download: write every block")
    fb.add_argument("--done", action="store_true", help="the final pass: drop its snapshot afterwards")
    add_json(fb)
    fb.set_defaults(func=cmd_failback)
    kg = cmds.add_parser("keygen", help="write a new key file for encrypted replicas (key_file= in the URL)")
    kg.add_argument("--out", required=True, help="key file to create (mode 0600)")
    kg.add_argument("--rotate", metavar="OLD", help="start from this key file: the new key first, the old "
                    "keys kept after it (older points stay readable)")
    kg.set_defaults(func=cmd_keygen)


def _run(args, work):
    from ..azure import open_target

    async def go():
        target = open_target(args.to, key_file=getattr(args, "key_file", None))
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


def cmd_machine_points(args) -> int:
    from ..azure.points import machine_points
    found = _run(args, lambda t: machine_points(t, args.machine))
    if args.json:
        print(json.dumps({m: [dataclasses.asdict(p) for p in pts] for m, pts in found.items()}, indent=2))
        return 0
    for machine, pts in sorted(found.items()):
        print(f"machine {machine}")
        for p in pts:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(p.time))
            gens = ", ".join(f"{d.name or d.disk_id}@{d.generation}" for d in p.disks.values())
            print(f"   point {p.point:>6}  {when} UTC  {p.consistency:<11}  {p.kind:<6}  {gens}")
    return 0


def cmd_export(args) -> int:
    from ..azure.export import export_point
    mp, paths = _run(args, lambda t: export_point(t, args.machine, args.point, args.out))
    print(f"exported point {mp.point} of {args.machine}: {', '.join(paths)}")
    return 0


def cmd_keygen(args) -> int:
    import os

    from ..azure.crypto import KeyRing, key_id, new_key_line
    from ..durable import output_path
    old = KeyRing.load(args.rotate).keys if args.rotate else []
    line = new_key_line()
    with output_path(args.out) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("# replicator Azure encryption keys: the first is current. Keep a copy in escrow.\n")
            f.write("\n".join([line] + [k.hex() for k in old]) + "\n")
    print(f"key {key_id(bytes.fromhex(line))} written to {args.out}" + (f" ({len(old)} older kept)" if old else ""))
    return 0


def cmd_failover_machine(args) -> int:
    from ..azure.deploy import VmSpec, arm_template, failover_machine, write_template
    spec = _machine_settings(args)
    try:
        if args.vm:
            with open(args.vm) as f:
                spec = VmSpec.from_json(json.load(f))
    except OSError as e:
        raise UsageError(f"cannot read the VM spec {args.vm}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{args.vm}: not JSON ({e.msg} at line {e.lineno})") from None
    if spec is None:
        raise UsageError(f"{args.machine} has no [machine.azure_vm] in {args.config}: add it, or give --vm SPEC.json")
    fo = _run(args, lambda t: failover_machine(t, args.machine, args.point, test=args.test, spec=spec))
    write_template(args.template, arm_template(fo, spec))
    for disk, r in fo.disks.items():
        print(f"disk {fo.point.disks[disk].name or disk}: {r.url}")
    print(f"template {args.template}: az deployment group create -g RG --template-file {args.template} "
          "--parameters storageAccountId=ID")
    return 0


def _machine_settings(args):
    """The machine's [machine.azure_vm] from --config, filling --to and the key file from its protection
    when they are not given; None when the configuration is not needed or has no VM for it."""
    import os

    from ..orchestration import load_config
    if args.to and args.vm:
        return None
    if not os.path.exists(args.config):
        raise UsageError(f"no replicatord configuration at {args.config}: give --to and --vm, or --config FILE")
    m = load_config(args.config).machine(args.machine)
    if not args.to:
        if not (m.protection.target or "").startswith("azure://"):
            raise UsageError(f"{args.machine} replicates to {m.protection.target}, not to Azure: give --to")
        args.to, args.key_file = m.protection.target, m.protection.encryption_key_file
    return m.azure_vm


def cmd_failback(args) -> int:
    from ..azure import failback as fb
    import os

    from ..disk.probe import open_disk
    if not os.path.isfile(args.disk):
        raise UsageError(f"{args.disk}: no such disk file")
    disk = open_disk(args.disk, read_only=False)
    try:
        async def work(t):
            r = await fb.sync_pass(t, args.blob, disk, base=args.base, full=args.full)
            if args.done:
                await fb.finish(t, args.blob, r.snapshot)
            return r
        r = _run(args, work)
    finally:
        disk.close()
    if args.json:
        print(json.dumps(dataclasses.asdict(r), indent=2))
    else:
        print(f"failback pass: {r.blocks_written} of {r.blocks_compared} blocks differed, {r.bytes_written} bytes "
              f"written to {args.disk}, {r.bytes_read} read from Azure ({r.seconds:.1f} s); "
              + ("done" if args.done else f"next pass: --base {r.snapshot}"))
    return 0

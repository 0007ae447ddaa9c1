"""`replicator hrl dump | verify | apply`."""
from __future__ import annotations

import json

from ..disk.probe import open_disk
from ..hrl import HrlReader, apply_chain, open_chain
from ..hrl.format import EPOCH_2000
from .common import add_json, human


def register(sub) -> None:
    p = sub.add_parser("hrl", help="Hyper-V Replica Logs (.hrl): inspect, verify, apply")
    cmds = p.add_subparsers(dest="command", required=True)
    d = cmds.add_parser("dump", help="print a log's header, metadata blocks and writes")
    d.add_argument("log", help="an .hrl file")
    add_json(d, "the log")
    d.add_argument("--extents", action="store_true", help="also print the coalesced extent map")
    d.set_defaults(func=cmd_dump)
    v = cmds.add_parser("verify", help="verify logs and the chain between them (every checksum)")
    v.add_argument("logs", nargs="+", help=".hrl files, oldest first")
    v.set_defaults(func=cmd_verify)
    a = cmds.add_parser("apply", help="apply a log chain to a disk (verified completely first)")
    a.add_argument("disk", help="the disk to apply them to (written)")
    a.add_argument("logs", nargs="+", help=".hrl files, oldest first")
    a.set_defaults(func=cmd_apply)


def _header_dict(h) -> dict:
    return {
        "version": f"{h.version >> 16}.{h.version & 0xFFFF}", "timestamp": h.timestamp + EPOCH_2000,
        "creator_application": h.creator_application.rstrip(b"\0").decode("latin-1"),
        "current_size": h.current_size, "eol_location": h.eol_location, "metadata_size": h.metadata_size,
        "unique_id": str(h.unique_id), "previous_unique_id": str(h.previous_unique_id),
        "total_metadata_entries": h.total_metadata_entries, "vhd2_data_write_guid": str(h.vhd2_data_write_guid),
    }


def cmd_dump(args) -> int:
    with HrlReader(args.log) as r:
        out = {"header": _header_dict(r.header),
               "metadata_blocks": [{"location": b.location, "previous_location": b.previous_location,
                                    "entries": len(b.entries)} for b in r.blocks],
               "writes": [{"offset": w.offset, "length": w.length, "data_location": w.data_location,
                           "data_checksum": w.data_checksum} for w in r.writes]}
        if args.extents:
            out["extents"] = [{"offset": e.offset, "length": e.length} for e in r.extents()]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for k, v in out["header"].items():
        print(f"{k:24} {v}")
    print(f"{'metadata blocks':24} {len(out['metadata_blocks'])}")
    for w in out["writes"]:
        print(f"write {w['offset']:>14} +{w['length']:<10} (log @{w['data_location']})")
    for e in out.get("extents", []):
        print(f"extent {e['offset']:>13} +{e['length']}")
    return 0


def cmd_verify(args) -> int:
    readers = open_chain(args.logs)
    total = sum(sum(w.length for w in r.writes) for r in readers)
    for r in readers:
        r.close()
    print(f"{len(readers)} log(s) verified: chain intact, {human(total)} of write data, all checksums match")
    return 0


def cmd_apply(args) -> int:
    with open_disk(args.disk, read_only=False) as disk:
        stats = apply_chain(disk, args.logs)
    print(f"applied {stats.logs} log(s), {stats.writes} writes: {human(stats.log_data_bytes)} logged, "
          f"{human(stats.applied_bytes)} written after coalescing")
    return 0

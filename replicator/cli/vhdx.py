"""`replicator vhdx create | info | check | convert | cat`."""
from __future__ import annotations

import json
import os
import sys

from ..disk.copy import copy_disk
from ..disk.probe import FORMATS, create_disk, detect_format, open_disk
from ..durable import output_path
from ..errors import ConsistencyError, UsageError
from .common import add_json, human, parse_size


def register(sub) -> None:
    p = sub.add_parser("vhdx", help="create, inspect, check and convert disk images")
    cmds = p.add_subparsers(dest="command", required=True)

    c = cmds.add_parser("create", help="create a VHDX (dynamic by default)")
    c.add_argument("path", help="the VHDX file to create")
    c.add_argument("size", nargs="?", help="virtual size, e.g. 10G (not with --parent)")
    kind = c.add_mutually_exclusive_group()
    kind.add_argument("--fixed", action="store_true", help="allocate every block now")
    kind.add_argument("--parent", help="make a differencing disk over this VHDX")
    c.add_argument("--block-size", default="32M", help="block size, 1M-256M (default 32M)")
    c.add_argument("--logical-sector-size", type=int, default=512, choices=(512, 4096),
                   help="sector size the guest sees (default 512)")
    c.add_argument("--physical-sector-size", type=int, default=4096, choices=(512, 4096),
                   help="sector size reported as physical (default 4096)")
    c.set_defaults(func=cmd_create)

    i = cmds.add_parser("info", help="describe a disk image")
    i.add_argument("path", help="a VHDX, VHD or raw disk image")
    add_json(i, "the description")
    i.set_defaults(func=cmd_info)

    k = cmds.add_parser("check", help="verify every structure; exit non-zero on any inconsistency")
    k.add_argument("path", help="the VHDX file to check (never written to)")
    k.set_defaults(func=cmd_check)

    v = cmds.add_parser("convert", help="convert between raw, vhdx and vhd")
    v.add_argument("source", help="the disk image to read")
    v.add_argument("target", help="the image to create (must not exist; renamed into place when complete)")
    v.add_argument("-f", "--source-format", choices=FORMATS, help="format of SOURCE (default: detected)")
    v.add_argument("-O", "--target-format", choices=FORMATS, required=True, help="format of TARGET")
    v.add_argument("--subformat", choices=("dynamic", "fixed"), default="dynamic",
                   help="vhdx target: dynamic or fixed (vhd targets are always fixed)")
    v.add_argument("--block-size", default="32M", help="vhdx target: block size (default 32M)")
    v.set_defaults(func=cmd_convert)

    t = cmds.add_parser("cat", help="write the virtual disk's bytes to stdout")
    t.add_argument("path", help="a VHDX, VHD or raw disk image")
    t.add_argument("--offset", default="0", help="first byte, e.g. 1M (default 0)")
    t.add_argument("--length", help="how many bytes, e.g. 4K (default: to the end)")
    t.set_defaults(func=cmd_cat)


def cmd_create(args) -> int:
    from ..vhdx import create_vhdx
    if args.parent and args.size:
        raise UsageError("a differencing disk takes its size from the parent; drop SIZE")
    if not args.parent and not args.size:
        raise UsageError("SIZE is required")
    disk = create_vhdx(args.path, parse_size(args.size) if args.size else 0, block_size=parse_size(args.block_size),
                       logical_sector_size=args.logical_sector_size, physical_sector_size=args.physical_sector_size,
                       fixed=args.fixed, parent=args.parent)
    with disk:
        print(f"created {args.path}: {disk.subformat} VHDX, {human(disk.size)} virtual, "
              f"{human(disk.geometry.block_size)} blocks")
    return 0


def cmd_info(args) -> int:
    with open_disk(args.path) as disk:
        info = disk.info() if hasattr(disk, "info") else {"path": args.path, "format": disk.format_name,
                                                          "virtual_size": disk.size}
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        print(f"{key:22} {value}")
    return 0


def cmd_check(args) -> int:
    from ..vhdx.check import check_vhdx
    fmt = detect_format(args.path)
    if fmt != "vhdx":
        raise UsageError(f"{args.path} is not a VHDX file (looks like {fmt})")
    problems = check_vhdx(args.path)
    if problems:
        for p in problems:
            print(p)
        raise ConsistencyError(f"{args.path}: {len(problems)} problem(s) found")
    print(f"{args.path}: no errors found")
    return 0


def cmd_convert(args) -> int:
    if os.path.exists(args.target):
        raise UsageError(f"{args.target} already exists")
    with open_disk(args.source, args.source_format) as src:
        opts = {}
        if args.target_format == "vhdx":
            opts = dict(block_size=parse_size(args.block_size), fixed=args.subformat == "fixed",
                        logical_sector_size=src.logical_sector_size)
        with output_path(args.target) as tmp, create_disk(tmp, args.target_format, src.size, **opts) as dst:
            stats = copy_disk(src, dst)
    print(f"converted {args.source} -> {args.target} ({args.target_format}): {human(stats.data_bytes)} of data, "
          f"{human(stats.zero_bytes)} zero")
    return 0


def cmd_cat(args) -> int:
    out = sys.stdout.buffer
    with open_disk(args.path) as disk:
        offset = parse_size(args.offset)
        length = parse_size(args.length) if args.length else disk.size - offset
        pos, buf = offset, bytearray(4 << 20)
        while pos < offset + length:
            n = min(len(buf), offset + length - pos)
            view = memoryview(buf)[:n]
            disk.readinto(pos, view)
            out.write(view)
            pos += n
    out.flush()
    return 0

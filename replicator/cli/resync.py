"""`replicator resync SOURCE TARGET` and `replicator scan DISK`."""
from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time

from ..disk.probe import open_disk
from ..resync import (DEFAULT_BLOCK_SIZE, ResyncPaths, ResyncStats, checkpoint_path_for, manifest_path_for, resync,
                      scan)
from .common import add_json, human, parse_size


def register(sub) -> None:
    r = sub.add_parser("resync", help="make TARGET equal SOURCE, copying only the blocks whose digests differ")
    r.add_argument("source", help="the disk to copy from (read only)")
    r.add_argument("target", help="the disk to make equal to SOURCE")
    r.add_argument("--block-size", default="64K", help="comparison block size (default 64K)")
    r.add_argument("--manifest-dir", help="keep digest manifests here (default: DISK.digests next to each disk)")
    r.add_argument("--no-manifest", action="store_true", help="neither use nor save digest manifests")
    r.add_argument("--dry-run", action="store_true", help="compare and report; write nothing")
    r.add_argument("--json", action="store_true", help="print the statistics and change set as JSON")
    r.set_defaults(func=cmd_resync)
    s = sub.add_parser("scan", help="change set of a disk since its last digest manifest")
    s.add_argument("disk", help="the disk to scan")
    s.add_argument("--manifest", help="manifest path (default: DISK.digests)")
    s.add_argument("--block-size", help="block size for a new baseline (default 64K, or the manifest's)")
    s.add_argument("--no-save", action="store_true", help="do not replace the manifest with the new digests")
    add_json(s, "the change set")
    s.set_defaults(func=cmd_scan)


def resync_paths(source: str, target: str, manifest_dir: str | None, use_manifests: bool) -> ResyncPaths:
    target_manifest = manifest_path_for(target, manifest_dir)
    return ResyncPaths(source_manifest=manifest_path_for(source, manifest_dir) if use_manifests else None,
                       target_manifest=target_manifest if use_manifests else None,
                       checkpoint=checkpoint_path_for(target_manifest))


def resync_files(source: str, target: str, *, block_size: int = DEFAULT_BLOCK_SIZE, manifest_dir: str | None = None,
                 use_manifests: bool = True, dry_run: bool = False, cancel=None, progress=None) -> ResyncStats:
    """Open both disks (the target read-write unless dry_run) and resync them."""
    paths = resync_paths(source, target, manifest_dir, use_manifests)
    with open_disk(source) as src, open_disk(target, read_only=dry_run) as dst:
        return resync(src, dst, block_size=block_size, paths=paths, dry_run=dry_run, cancel=cancel,
                      progress=progress)


class Progress:
    """One self-overwriting stderr line, at most a few times a second."""

    def __init__(self, total_blocks_of):
        self.total_blocks_of = total_blocks_of
        self.t0 = self.last = time.monotonic()
        self.shown = False

    def __call__(self, st: ResyncStats) -> None:
        now = time.monotonic()
        if now - self.last < 0.25:
            return
        self.last, self.shown = now, True
        total = max(1, self.total_blocks_of(st))
        done = st.blocks_compared + st.resumed_blocks
        rate = (st.source_bytes_read + st.target_bytes_read) / max(now - self.t0, 1e-9)
        print(f"\rresync {100 * done / total:5.1f}%  {done}/{total} blocks, {st.blocks_differing} differ, "
              f"{human(st.bytes_copied)} copied, {human(int(rate))}/s read ", end="", file=sys.stderr, flush=True)

    def end(self) -> None:
        if self.shown:
            print(file=sys.stderr)


@contextlib.contextmanager
def cancel_on_sigint():
    """Ctrl-C sets an event the engine checks between windows, so it stops at a checkpoint."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    def handler(*_):
        if event.is_set():          # a second Ctrl-C: stop now, without the checkpoint
            raise KeyboardInterrupt
        event.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_resync(args) -> int:
    block_size = parse_size(args.block_size)
    progress = Progress(lambda st: -(-st.disk_size // st.block_size)) if sys.stderr.isatty() else None
    try:
        with cancel_on_sigint() as cancel:
            st = resync_files(args.source, args.target, block_size=block_size, manifest_dir=args.manifest_dir,
                              use_manifests=not args.no_manifest, dry_run=args.dry_run, cancel=cancel,
                              progress=progress)
    finally:
        if progress:
            progress.end()
    for w in st.warnings:
        print(f"replicator: warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(st.to_json(), indent=2))
        return 0
    print_stats(st)
    return 0


def print_stats(st: ResyncStats) -> None:
    def side(read: int, known: bool) -> str:
        return "from manifest (not read)" if known and not read else human(read)

    verb = "would copy" if st.dry_run else "copied"
    print(f"blocks compared   {st.blocks_compared} x {human(st.block_size)}"
          + (f" (+{st.resumed_blocks} done before resuming)" if st.resumed_blocks else ""))
    print(f"blocks differing  {st.blocks_differing} in {len(st.changes.extents)} extents")
    print(f"source read       {side(st.source_bytes_read, st.source_from_manifest)}")
    print(f"target read       {side(st.target_bytes_read, st.target_from_manifest)}")
    print(f"{verb:<17} {human(st.bytes_copied)} of data, {human(st.bytes_zeroed)} zeroed")
    print(f"time              {st.seconds:.2f} s")


def cmd_scan(args) -> int:
    block_size = parse_size(args.block_size) if args.block_size else None
    path = args.manifest or manifest_path_for(args.disk)
    with cancel_on_sigint() as cancel, open_disk(args.disk) as disk:
        result = scan(disk, path, block_size=block_size, save=not args.no_save, cancel=cancel)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    cs = result.changes
    state = ("no earlier manifest: listing every block that does not read as zeros" if result.baseline else
             "unchanged since the manifest (not read)" if result.read_skipped else
             f"compared with {path}")
    print(f"{args.disk}: {state}")
    print(f"{len(cs.block_indices())} changed blocks of {human(cs.block_size)}, {human(cs.bytes)} in "
          f"{len(cs.extents)} extents, {human(result.bytes_read)} read in {result.seconds:.2f} s")
    if result.changed_during_scan:
        print("note: the disk was written during the scan; the next scan will look again")
    for off, n in cs.extents:
        print(f"extent {off:>14} +{n}")
    return 0


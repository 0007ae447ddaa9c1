"""Issue 7's check on the 3 GiB corpus: export a seed while the primary keeps writing, import it,
continue replication; the replica ends identical and the bytes sent after the import are only the changes
made since the cut. Then one corrupted volume: the import names it and builds nothing.

    python bench/seed_corpus.py [--corpus var/bench/corpus.vhdx] [--volume-size 256M]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from replicator.cli.common import parse_size
from replicator.errors import FormatError, ResyncCancelled
from replicator.replica import ReplicaStore
from replicator.replication import DiskReplicator
from replicator.seed import export_machine, import_seed
from replicator.targets import LocalTarget
from replicator.tracking import TrackedDisk
from replicator.tracking.service import ExportService
from replicator.vhdx import VhdxDisk

BLOCK = 64 << 10


def mutate(svc, tracker, rng, pct: float) -> int:
    """Overwrite pct % of the 64 KiB blocks through the tracked disk (the export's write path)."""
    n = int(tracker.size // BLOCK * pct / 100)
    picks = rng.sample(range(tracker.size // BLOCK), n)

    async def write():
        for b in picks:
            tracker.write(b * BLOCK, rng.randbytes(BLOCK))
        tracker.flush()
    svc._call(write(), timeout=600)
    return n * BLOCK


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default="var/bench/corpus.vhdx")
    ap.add_argument("--volume-size", default="256M")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="seed-bench-", dir="var/bench")
    primary = os.path.join(work, "vm.vhdx")
    shutil.copy(args.corpus, primary)
    rng = random.Random(7)
    tracker = TrackedDisk(primary)
    svc = ExportService({"vm": tracker}, socket_path=os.path.join(os.path.abspath(work), "nbd.sock")).start()
    media, root = os.path.join(work, "media"), os.path.join(work, "replica")
    cancel = threading.Event()
    out = {"disk_size": tracker.size}

    def export(stop_after_first):
        def progress(name, pos, size):
            if stop_after_first:
                cancel.set()

        async def run():
            return export_machine("vm01", {"vm": tracker}, media, volume_size=parse_size(args.volume_size),
                                  cancel=cancel, progress=progress)
        return svc._call(run(), timeout=3600)

    try:
        t0 = time.monotonic()
        try:
            export(True)
        except ResyncCancelled:
            pass
        during = mutate(svc, tracker, rng, 0.5)           # writes while the export is under way
        cancel.clear()
        manifest = export(False)
        out["export_s"] = round(time.monotonic() - t0, 2)
        out["volumes"] = len(manifest.disks[0].volumes)
        out["seed_bytes"] = sum(v.bytes for v in manifest.disks[0].volumes)
        after = mutate(svc, tracker, rng, 0.5)            # writes after the export
        out["changed_since_cut"] = during + after
        t0 = time.monotonic()
        asyncio.run(import_seed(os.path.join(media, "vm01"), LocalTarget(root)))
        out["import_s"] = round(time.monotonic() - t0, 2)
        rep = DiskReplicator(tracker, LocalTarget(root))

        async def cycle():
            return await rep.run_cycle()
        res = svc._call(cycle(), timeout=3600)
        out.update(cycle_kind=res.kind, sent_after_import=res.bytes_sent, plain_after_import=res.plain_bytes)
        snap = os.path.join(work, "at-cut.vhdx")

        async def copy():
            tracker.disk.flush()
            shutil.copy(primary, snap)
        svc._call(copy())
        disk_id = tracker.disk.virtual_disk_id
    finally:
        svc.stop()
    VhdxDisk.open(snap, read_only=False).close()
    rd = ReplicaStore(root).disk(disk_id)
    cmp = subprocess.run(["qemu-img", "compare", "-f", "vhdx", "-F", "vhdx", rd.image_path, snap],
                         capture_output=True, text=True)
    out["replica_identical"] = cmp.returncode == 0
    vol = manifest.disks[0].volumes[len(manifest.disks[0].volumes) // 2]
    path = os.path.join(media, "vm01", vol.file)
    with open(path, "r+b") as f:
        f.seek(vol.bytes // 3)
        b = f.read(1)
        f.seek(vol.bytes // 3)
        f.write(bytes([b[0] ^ 0x55]))
    root2 = os.path.join(work, "replica2")
    try:
        asyncio.run(import_seed(os.path.join(media, "vm01"), LocalTarget(root2)))
        out["corrupt_volume"] = "NOT DETECTED"
    except FormatError as e:
        out["corrupt_volume"] = e.message
        out["corrupt_import_built_disks"] = len(ReplicaStore(root2).disk_ids())
    shutil.rmtree(work)
    print(json.dumps(out, indent=2))
    return 0 if out["replica_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())

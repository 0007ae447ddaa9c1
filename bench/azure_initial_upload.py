"""Initial upload of an 8 GiB disk holding 1 GiB of real data to a page blob: the Azure target vs the plain
SDK (targets: >= 3x faster, and <= 1.05x the data's bytes on the wire).

The disk is a sparse 8 GiB raw file. Real data comes from the shared corpus (an ext4 image of real files):
its allocated extents are copied at offset 0, then again from 4 GiB on until the disk holds 1 GiB of
non-zero bytes. Both contenders upload to the same Azurite (blob service on 127.0.0.1, workspace on disk
under --work so the blobs need no RAM), each to its own blob:

  ours  initial replication as a primary does it: encode_disk (only the disk's data extents) into a delta
        stream file, then AzureTarget.ensure_disk + send + commit (the stream is verified, its non-zero
        512-byte ranges Put in <= 4 MiB requests, up to --concurrency at once, then snapshotted).
  sdk   BlobClient.upload_blob(file, blob_type="PageBlob", length=8 GiB) with the SDK's defaults (it reads
        the whole disk and skips 4 MiB chunks that are all zeros); also with max_concurrency=--concurrency.

Bytes on the wire are request bodies counted by a raw_request_hook on each client (every attempt). The
blob we wrote is checked against the disk (page ranges + content of every range) unless --no-verify.

    python bench/azure_initial_upload.py [--work var/bench/azure] [--corpus var/bench/corpus.raw]
                                         [--concurrency 8] [--runs 1] [--keep-disk] [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
import uuid

import numpy as np

from benchcorpus import ensure
from replicator import delta, kernels
from replicator.azure import AzureTarget
from replicator.azure.azurite import Azurite, RequestCounter
from replicator.disk.raw import file_extents, open_raw

GiB, MiB = 1 << 30, 1 << 20
DISK_SIZE = 8 * GiB
REAL_DATA = 1 * GiB
SECOND_COPY_AT = 4 * GiB


def build_disk(corpus: str, path: str) -> int:
    """The 8 GiB sparse disk with REAL_DATA non-zero bytes of corpus data; returns its non-zero bytes."""
    stamp = path + ".stamp"
    want = f"{os.stat(corpus).st_mtime_ns} {DISK_SIZE} {REAL_DATA}"
    if os.path.exists(path) and os.path.exists(stamp) and open(stamp).read().split("|")[0] == want:
        return int(open(stamp).read().split("|")[1])
    src = os.open(corpus, os.O_RDONLY)
    dst = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(dst, DISK_SIZE)
        extents = [e for e in file_extents(src, 0, os.fstat(src).st_size) if e.kind.name == "DATA"]
        nonzero = 0
        for base in (0, SECOND_COPY_AT):
            nonzero = _copy_extents(src, dst, extents, base, nonzero)
        os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)
    with open(stamp, "w") as f:
        f.write(f"{want}|{nonzero}")
    return nonzero


def _copy_extents(src: int, dst: int, extents, base: int, nonzero: int) -> int:
    """Copy corpus extents to base + their offset until the disk holds REAL_DATA non-zero bytes."""
    for e in extents:
        pos = e.offset
        while pos < e.end and nonzero < REAL_DATA:
            data = os.pread(src, min(4 * MiB, e.end - pos), pos)
            filled = np.cumsum(~kernels.zero_blocks(data, 512)) * 512     # non-zero bytes up to each sector
            cut = int(np.searchsorted(filled, REAL_DATA - nonzero))       # the sector reaching the budget
            if cut < len(filled):
                data = data[:(cut + 1) * 512]
            os.pwrite(dst, data, base + pos)
            nonzero += int(filled[min(cut, len(filled) - 1)])
            pos += len(data)
    return nonzero


async def run_ours(az: Azurite, disk_path: str, work: str, concurrency: int) -> dict:
    counter = RequestCounter()
    from azure.storage.blob.aio import ContainerClient
    container = ContainerClient.from_connection_string(az.connection_string, "ours", raw_request_hook=counter)
    await container.create_container()
    target = AzureTarget(container, concurrency=concurrency)
    disk_id = uuid.uuid4()
    stream = os.path.join(work, "initial.delta")
    t0 = time.perf_counter()
    with open_raw(disk_path) as disk:
        header = delta.StreamHeader(disk_id=disk_id, disk_size=disk.size, generation=1, base_generation=0,
                                    created=time.time(), kind="full")
        with open(stream, "wb") as sink:
            stats = await asyncio.to_thread(delta.encode_disk, disk, header, sink)
    t1 = time.perf_counter()
    await target.ensure_disk(disk_id, DISK_SIZE, "bench")
    sent = await target.send(disk_id, "0" * 31 + "1", stream)
    await target.commit(disk_id, "0" * 31 + "1")
    t2 = time.perf_counter()
    os.unlink(stream)
    out = {"seconds": t2 - t0, "encode_seconds": t1 - t0, "upload_seconds": t2 - t1, "wire_bytes": counter.body_bytes,
           "requests": counter.requests, "page_bytes": sent, "stream_bytes": stats.stream_bytes,
           "send": vars(target.last_send), "blob": target.blob_name(disk_id)}
    await container.close()
    return out


async def run_sdk(az: Azurite, disk_path: str, concurrency: int | None) -> dict:
    counter = RequestCounter()
    from azure.storage.blob.aio import ContainerClient
    name = f"sdk{concurrency or 1}"
    container = ContainerClient.from_connection_string(az.connection_string, name, raw_request_hook=counter)
    await container.create_container()
    kw = {"max_concurrency": concurrency} if concurrency else {}
    t0 = time.perf_counter()
    with open(disk_path, "rb") as f:
        await container.get_blob_client("disk.vhd").upload_blob(f, blob_type="PageBlob", length=DISK_SIZE, **kw)
    t1 = time.perf_counter()
    await container.close()
    return {"seconds": t1 - t0, "wire_bytes": counter.body_bytes, "requests": counter.requests,
            "max_concurrency": concurrency or 1}


async def verify(az: Azurite, blob: str, disk_path: str) -> None:
    """The blob's disk area equals the disk: its page ranges (merged across small gaps) hold the disk's
    bytes, and every non-zero sector of the disk lies inside them (the rest of the blob reads as zeros)."""
    from azure.storage.blob.aio import ContainerClient
    async with ContainerClient.from_connection_string(az.connection_string, "ours") as c:
        b = c.get_blob_client(blob)
        covered = np.zeros(DISK_SIZE // 512, dtype=bool)
        spans: list[list[int]] = []
        async for r in b.list_page_ranges():
            start, end = r.start, min(r.end + 1, DISK_SIZE)
            covered[start // 512:end // 512] = True
            if spans and start - spans[-1][1] < MiB and end - spans[-1][0] <= 64 * MiB:
                spans[-1][1] = end
            elif start < end:
                spans.append([start, end])
        fd = os.open(disk_path, os.O_RDONLY)
        try:
            for start, end in spans:
                got = await (await b.download_blob(offset=start, length=end - start)).readall()
                if got != os.pread(fd, end - start, start):
                    raise SystemExit(f"verify: blob differs from the disk in [{start}, {end})")
            for e in file_extents(fd, 0, DISK_SIZE):
                for pos in range(e.offset, e.end, 64 * MiB) if e.kind.name == "DATA" else ():
                    n = min(64 * MiB, e.end - pos)
                    nonzero = ~kernels.zero_blocks(os.pread(fd, n, pos), 512)
                    if (nonzero & ~covered[pos // 512:pos // 512 + len(nonzero)]).any():
                        raise SystemExit(f"verify: non-zero disk data near {pos} is not in the blob")
        finally:
            os.close(fd)


async def main_async(args) -> dict:
    os.makedirs(args.work, exist_ok=True)
    disk_path = os.path.join(args.work, "disk8g.raw")
    nonzero = build_disk(args.corpus, disk_path)
    results: dict = {"disk_bytes": DISK_SIZE, "nonzero_bytes": nonzero, "runs": []}
    for run in range(args.runs):
        workspace = os.path.join(args.work, f"azurite-{os.getpid()}")
        shutil.rmtree(workspace, ignore_errors=True)
        os.makedirs(workspace)
        az = Azurite(workspace=workspace).start()
        try:
            ours = await run_ours(az, disk_path, args.work, args.concurrency)
            if not args.no_verify and run == 0:
                await verify(az, ours["blob"], disk_path)
            sdk = await run_sdk(az, disk_path, None)
            sdk_par = await run_sdk(az, disk_path, args.concurrency)
        finally:
            az.stop()
            shutil.rmtree(workspace, ignore_errors=True)
        results["runs"].append({"ours": ours, "sdk": sdk, "sdk_parallel": sdk_par})
    if not args.keep_disk:
        for p in (disk_path, disk_path + ".stamp"):
            if os.path.exists(p):
                os.unlink(p)
    return results


def report(res: dict) -> None:
    nz = res["nonzero_bytes"]
    print(f"disk 8 GiB, non-zero data {nz / MiB:.0f} MiB")
    for i, r in enumerate(res["runs"]):
        o, s, p = r["ours"], r["sdk"], r["sdk_parallel"]
        print(f"run {i + 1}:")
        print(f"  ours        {o['seconds']:7.1f} s (encode {o['encode_seconds']:.1f} s + upload "
              f"{o['upload_seconds']:.1f} s)  {o['wire_bytes'] / MiB:8.1f} MiB on the wire in {o['requests']} "
              f"requests  ({o['wire_bytes'] / nz:.3f}x the data)")
        for label, x in (("sdk", s), (f"sdk conc={p['max_concurrency']}", p)):
            print(f"  {label:<11} {x['seconds']:7.1f} s{'':34}{x['wire_bytes'] / MiB:8.1f} MiB on the wire in "
                  f"{x['requests']} requests  ({x['wire_bytes'] / nz:.3f}x the data)")
        print(f"  speed-up vs sdk {s['seconds'] / o['seconds']:.2f}x (target >= 3), vs sdk conc="
              f"{p['max_concurrency']} {p['seconds'] / o['seconds']:.2f}x; bytes ours/data "
              f"{o['wire_bytes'] / nz:.3f} (target <= 1.05), ours/sdk {o['wire_bytes'] / s['wire_bytes']:.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="var/bench/azure")
    ap.add_argument("--corpus", default="var/bench/corpus.raw")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--keep-disk", action="store_true", help="keep the 8 GiB sparse disk for the next run")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ensure(args.corpus)
    res = asyncio.run(main_async(args))
    print(json.dumps(res, indent=1)) if args.json else report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Demo: the VHDX engine end to end, verified by qemu-img. Run through ./tools/demo."""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time

from replicator import kernels
from replicator.disk.copy import copy_disk
from replicator.disk.raw import create_raw
from replicator.vhdx import VhdxDisk, create_vhdx
from replicator.vhdx.check import check_vhdx

MiB = 1 << 20


def real_files(limit: int) -> bytes:
    """A tar stream of this machine's documentation: real, mixed, partly compressible data."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for root, _, files in os.walk("/usr/share/doc"):
            for name in sorted(files):
                path = os.path.join(root, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    tar.add(path)
                if buf.tell() > limit:
                    return buf.getvalue()[:limit]
    return buf.getvalue()


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def qemu(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True)


def step(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def replication_stage(work: str, payload: bytes):
    """A primary served over NBD, written by qemu-io, replicated in cycles to a replica store on this host;
    after each cycle the replica must equal the primary at the cut; then a test failover of an hour ago."""
    from replicator.replica import ReplicaStore
    from replicator.replication import DiskReplicator
    from replicator.targets.factory import open_target
    from replicator.tracking import TrackedDisk
    from replicator.tracking.service import ExportService

    from replicator.transport import AuthorizationEntry, certs
    from replicator.transport.server import ReplicaServer, ServerThread

    step("replica host on loopback: a private CA, host certificates, HTTPS with mutual TLS")
    pki = os.path.join(work, "pki")
    certs.init_ca(pki)
    certs.issue(pki, "replica", dns=["localhost"])
    certs.issue(pki, "primary")
    root = os.path.join(work, "replica-root")
    server_thread = ServerThread(ReplicaServer([AuthorizationEntry("primary", root)], mode="cert", port=0,
                                               certfile=f"{pki}/replica.pem", keyfile=f"{pki}/replica.key",
                                               cafile=f"{pki}/ca.pem"))
    server = server_thread.start()
    url = f"https://localhost:{server.port}"
    print(f"   replica listening at {url}")

    step("primary: serve a VM disk over NBD, write with qemu-io, replicate cycles over mutual TLS")
    primary = os.path.join(work, "vm-disk.vhdx")
    with create_vhdx(primary, 256 * MiB, block_size=2 * MiB) as d:
        d.write(0, payload[:64 * MiB])
    tracker = TrackedDisk(primary)
    target = open_target(url, cert=f"{pki}/primary.pem", key=f"{pki}/primary.key", ca=f"{pki}/ca.pem")
    rep = DiskReplicator(tracker, target, name="vm-disk")
    disk_id = tracker.disk.virtual_disk_id
    svc = ExportService({"vm-disk": tracker}, socket_path=os.path.join(work, "nbd.sock")).start()
    lines, ok = [], True
    try:
        for k, cmds in enumerate([[], ["write -P 0x11 1M 4M"], ["write -P 0x22 100M 8M", "discard 2M 1M"],
                                  ["write -z 10M 2M", "write -P 0x33 200M 1M"]]):
            if cmds:
                args = ["qemu-io", "-f", "raw"] + [x for c in cmds for x in ("-c", c)] + [svc.uri("vm-disk")]
                subprocess.run(args, check=True, capture_output=True)

            async def cycle():
                return await rep.run_cycle()
            res = svc._call(cycle(), timeout=600)
            snap = os.path.join(work, f"cut-{k}.vhdx")

            async def copy():
                tracker.disk.flush()
                shutil.copy(primary, snap)
            svc._call(copy())
            VhdxDisk.open(snap, read_only=False).close()
            rd = ReplicaStore(root).disk(disk_id)
            same = qemu("compare", "-f", "vhdx", "-F", "vhdx", rd.image_path, snap).returncode == 0
            ok = ok and same
            lines.append(f"cycle {k}      {res.kind:8} generation {res.generation:3}  {res.plain_bytes / MiB:7.1f} MiB "
                         f"changed, {res.bytes_sent / MiB:7.2f} MiB sent; replica == primary at the cut: {same}")
    finally:
        svc._call(target.close())     # its HTTP session lives on the export's loop
        svc.stop()
        server_thread.stop()          # the thread's loop awaits the server's stop
    rd = ReplicaStore(root).disk(disk_id)
    latest = rd.points[-1].generation
    test = rd.test_failover(latest)
    with VhdxDisk.open(test) as t, VhdxDisk.open(snap) as c:     # qemu cannot open differencing VHDX
        same = all(t.read(o, 16 * MiB) == c.read(o, 16 * MiB) for o in range(0, t.size, 16 * MiB))
    rd.cleanup_test_failover(test)
    lines.append(f"test failover of point {latest} (a differencing disk; the replica untouched) equals the "
                 f"primary at that cut: {same}")
    return ok and same, lines


def azure_stage(work: str, payload: bytes):
    """The same VM-disk cycle against Azure page blobs, on Azurite (the embedded default)."""
    from azure.storage.blob.aio import ContainerClient

    from replicator.azure import AzureTarget
    from replicator.azure.azurite import Azurite
    from replicator.replication import DiskReplicator
    from replicator.targets import Retry
    from replicator.tracking import TrackedDisk
    from replicator.tracking.service import ExportService

    step("Azure: replicate a VM disk into a page blob (fixed-VHD layout) on Azurite, snapshots as points")
    primary = os.path.join(work, "vm-azure.vhdx")
    with create_vhdx(primary, 64 * MiB, block_size=2 * MiB) as d:
        d.write(0, payload[:16 * MiB])
    lines, ok = [], True
    os.makedirs(os.path.join(work, "azurite"), exist_ok=True)
    with Azurite(workspace=os.path.join(work, "azurite")) as azurite:      # stopped whatever happens
        tracker = TrackedDisk(primary)
        container = ContainerClient.from_connection_string(azurite.connection_string, "replicas")
        target = AzureTarget(container, retention=4, concurrency=4)
        rep = DiskReplicator(tracker, Retry(target), name="vm-azure")
        svc = ExportService({"vm-azure": tracker}, socket_path=os.path.join(work, "nbd-azure.sock")).start()
        name = target.blob_name(tracker.disk.virtual_disk_id)
        try:
            svc._call(container.create_container())
            for k, cmds in enumerate([[], ["write -P 0x51 2M 3M", "write -z 20M 1M"], ["write -P 0x52 40M 8M"]]):
                if cmds:
                    args = ["qemu-io", "-f", "raw"] + [x for c in cmds for x in ("-c", c)] + [svc.uri("vm-azure")]
                    subprocess.run(args, check=True, capture_output=True)

                async def cycle():
                    return await rep.run_cycle()
                res = svc._call(cycle(), timeout=600)

                async def compare():
                    tracker.disk.flush()
                    blob = await (await container.get_blob_client(name).download_blob()).readall()
                    return blob[:tracker.size] == tracker.disk.read(0, tracker.size)
                same = svc._call(compare())
                ok = ok and same
                lines.append(f"azure {k}      {res.kind:8} generation {res.generation:3}  "
                             f"{res.bytes_sent / MiB:7.2f} MiB sent; page blob == primary: {same}")
            svc._call(target.close())
            svc._call(container.close())
        finally:
            svc.stop()
    return ok, lines


def main() -> int:
    for sig in (signal.SIGTERM, signal.SIGHUP):        # unwind (stop Azurite, the servers) as on Ctrl-C
        signal.signal(sig, lambda signum, _: sys.exit(128 + signum))
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default=os.path.join(os.path.dirname(__file__), "..", "var", "demo"))
    ap.add_argument("--size", type=int, default=512, help="virtual size in MiB")
    args = ap.parse_args()
    work = os.path.abspath(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    size = args.size * MiB
    base, child, shadow_path = (os.path.join(work, n) for n in ("base.vhdx", "child.vhdx", "shadow.raw"))
    print(f"replicator demo in {work} (kernels: {kernels.implementation})")

    step(f"create a {args.size} MiB dynamic VHDX and write real files into it")
    payload = real_files(min(size // 2, 128 * MiB))
    shadow = bytearray(size)
    rng = random.Random(7)
    t0 = time.perf_counter()
    with create_vhdx(base, size, block_size=2 * MiB) as disk:
        disk.write(MiB, payload)
        shadow[MiB:MiB + len(payload)] = payload
        for _ in range(200):                          # small scattered guest writes, unaligned
            off, n = rng.randrange(size - 65536), rng.randrange(1, 65536)
            chunk = rng.randbytes(n)
            disk.write(off, chunk)
            shadow[off:off + n] = chunk
        disk.trim(MiB + 8 * MiB, 4 * MiB)             # a discard in the middle of the files
        shadow[9 * MiB:13 * MiB] = bytes(4 * MiB)
    written = time.perf_counter() - t0

    step("verify with qemu-img: check, and compare against a raw shadow of what was written")
    with open(shadow_path, "wb") as f:
        f.write(shadow)
    check = qemu("check", "-f", "vhdx", base)
    compare = qemu("compare", "-f", "vhdx", "-F", "raw", base, shadow_path)
    print("   qemu-img check:  ", check.stdout.strip() or check.stderr.strip())
    print("   qemu-img compare:", compare.stdout.strip() or compare.stderr.strip())

    step("differencing child: write on top, the parent stays untouched")
    parent_digest = file_digest(base)
    with create_vhdx(child, 0, parent=base, block_size=2 * MiB) as disk:
        for _ in range(50):
            off, n = rng.randrange(size - 8192), rng.randrange(1, 8192)
            chunk = rng.randbytes(n)
            disk.write(off, chunk)
            shadow[off:off + n] = chunk
    with VhdxDisk.open(child) as disk:
        chain_ok = disk.read(0, size) == shadow
    parent_ok = file_digest(base) == parent_digest
    problems = check_vhdx(child)
    print(f"   chain reads equal shadow: {chain_ok}; parent unchanged: {parent_ok}; check: "
          f"{'no errors' if not problems else problems}")

    step("flatten the chain to raw and let qemu compare it with the shadow")
    flat = os.path.join(work, "flat.raw")
    t0 = time.perf_counter()
    with VhdxDisk.open(child) as src, create_raw(flat, size) as dst:
        stats = copy_disk(src, dst)
    flatten = time.perf_counter() - t0
    with open(shadow_path, "wb") as f:
        f.write(shadow)
    compare2 = qemu("compare", "-f", "raw", "-F", "raw", flat, shadow_path)
    print("   qemu-img compare:", compare2.stdout.strip() or compare2.stderr.strip())

    with VhdxDisk.open(base) as disk:
        info = disk.info()
    ok = (check.returncode == 0 and compare.returncode == 0 and chain_ok and parent_ok and not problems
          and compare2.returncode == 0)
    rep_ok, rep_lines = replication_stage(work, payload)
    az_ok, az_lines = azure_stage(work, payload)
    ok = ok and rep_ok and az_ok
    rep_lines += az_lines
    print("\nsummary")
    print(f"   base.vhdx    {info['virtual_size'] // MiB} MiB virtual, {info['file_size'] / MiB:.1f} MiB file, "
          f"blocks {info['block_states']}")
    print(f"   wrote        {len(payload) / MiB:.1f} MiB of real files + 200 scattered writes in {written:.2f} s")
    print(f"   flattened    {stats.data_bytes / MiB:.1f} MiB data, {stats.zero_bytes / MiB:.1f} MiB skipped as zero, "
          f"{flatten:.2f} s")
    for line in rep_lines:
        print(f"   {line}")
    print(f"   result       {'OK: qemu-img agrees byte for byte' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Property: random writes, trims and write-zeroes (any alignment, crossing VHDX blocks and tracking
regions) sent by libnbd through the export, with cuts in between. Then
(a) the sealed logs record exactly the bytes the requests touched, so they cover every 512-byte sector
    that changed (and the dirty bitmap covers every changed region);
(b) applying the chain to a copy of the old image reproduces the new one (qemu-img compare);
(c) the disk holds what a byte-array model of the requests says.
The same with the export process's threads for log appends and metadata commits."""
from __future__ import annotations

import hashlib
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.hrl import apply_chain
from replicator.vhdx import VhdxDisk

from ..externals import qemu_compare
from .helpers import (KiB, LibnbdClient, MiB, copy_file, differing, extents_as_ranges, log_ranges, make_vhdx,
                      merge, pattern, read_vhdx, sealed_log_paths, serving, tracked, uncovered)

SIZE = 8 * MiB
BLOCK = 1 * MiB                  # VHDX block size
REGION = 64 * KiB                # tracking region size
PREFILL = [(BLOCK - 3000, pattern(100, 2 * BLOCK + 8000)), (6 * MiB, pattern(101, MiB))]


@st.composite
def ranges(draw):
    off = draw(st.one_of(
        st.builds(lambda k, d: k * BLOCK + d, st.integers(1, SIZE // BLOCK - 1), st.integers(-1500, 1500)),
        st.builds(lambda k, d: k * REGION + d, st.integers(1, SIZE // REGION - 1), st.integers(-600, 600)),
        st.integers(0, SIZE - 1)))
    length = draw(st.one_of(st.integers(1, 2000), st.integers(1, 3 * BLOCK // 2),
                            st.sampled_from([511, 512, 4096, BLOCK, BLOCK + 1])))
    return off, max(1, min(length, SIZE - off))


@st.composite
def operation(draw):
    kind = draw(st.sampled_from(["pwrite", "pwrite", "pwrite", "zero", "trim", "cut"]))
    if kind == "cut":
        return ("cut",)
    off, length = draw(ranges())
    if kind == "pwrite":
        return ("pwrite", off, length, draw(st.integers(0, 2**40)), draw(st.booleans()))
    return (kind, off, length)


@pytest.fixture(scope="module")
def client():
    c = LibnbdClient()
    yield c
    c.close()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(operation(), min_size=1, max_size=20), export_threads=st.booleans())
def test_logs_cover_and_replay_every_change(client, ops, export_threads):
    """export_threads: as the export process runs its disks, log appends and metadata commits on threads
    of their own (HrlWriter background, VhdxDisk.background_commits)."""
    with tempfile.TemporaryDirectory(prefix="track-prop-") as tmp:
        path = make_vhdx(os.path.join(tmp, "disk.vhdx"), SIZE, block_size=BLOCK, fill=PREFILL)
        old = copy_file(path, os.path.join(tmp, "old.vhdx"))
        model = bytearray(read_vhdx(old))
        old_image = bytes(model)
        t = tracked(path, region_size=REGION, max_log_share=1000.0,    # no size trigger: every log is kept
                    log_thread=export_threads)
        if export_threads:
            t.disk.background_commits()
        touched = []
        with serving({"d": t}, os.path.join(tmp, "nbd.sock")) as svc:
            assert client.ok("connect", uri=svc.uri("d"))["size"] == SIZE
            try:
                for op in ops:
                    if op[0] == "cut":
                        svc.cut()
                        continue
                    _, off, length = op[:3]
                    if op[0] == "pwrite":
                        client.ok("pwrite", off=off, len=length, seed=op[3], fua=op[4])
                        model[off:off + length] = pattern(op[3], length)
                    else:
                        client.ok(op[0], off=off, len=length)
                        model[off:off + length] = bytes(length)
                    touched.append((off, off + length))
                client.ok("flush")
                got = client.ok("pread", off=0, len=SIZE)["sha256"]
                assert got == hashlib.sha256(model).hexdigest(), "reads through the export disagree with the model"
            finally:
                client.call("close")
            svc.cut()
            assert not t.resync_required, t.reason
            dirty = extents_as_ranges(t.dirty_extents())
        new_image = read_vhdx(path)
        assert new_image == bytes(model), "the disk does not hold what the requests wrote"
        changed = differing(old_image, new_image, 512)
        assert uncovered(changed, dirty) == [], "a changed region is not in the dirty bitmap"
        assert uncovered(touched, dirty) == []

        logs = sealed_log_paths(path)
        recorded = merge(log_ranges(logs, SIZE))
        assert recorded == merge(touched), "the logs do not record exactly the bytes the requests touched"
        sectors = [(a // 512 * 512, -(-b // 512) * 512) for a, b in recorded]
        assert uncovered(changed, sectors) == [], "a changed sector is in no log"

        with VhdxDisk.open(old, read_only=False) as d:
            apply_chain(d, logs)
        r = qemu_compare(path, old, "vhdx", "vhdx")
        assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()

"""The native apply (kernels.FrameApplier behind delta.apply_stream) against the Python loop: the same
image bytes for every kind of stream, the same one-line error for every damaged stream, a bounded zip
bomb, a failed write named as such, and a VHDX that stays valid for qemu-img."""
from __future__ import annotations

import io
import os
import subprocess
import uuid

import pytest

from replicator import delta, kernels
from replicator.delta import DeltaFormatError, apply_stream
from replicator.delta.format import TRAILER, FrameKind
from replicator.errors import DiskIOError
from replicator.vhdx import VhdxDisk, create_vhdx
from replicator.vhdx.fileio import DirectWriteIO, FileIO

from . import test_corruption as damaged
from .helpers import MemDisk, records, refix, run_with_bounded_memory, small_stream
from .test_lanes import changes

pytestmark = pytest.mark.skipif(kernels.FrameApplier is None, reason="the native kernels are not active")

MiB = 1 << 20
SIZE = 64 * MiB


class PythonIO(FileIO):
    """A FileIO the native apply does not write through (planned_write_fds refuses it): the Python loop."""


def stream_of(ops, lanes: int, block_size: int = MiB, size: int = SIZE) -> bytes:
    header = delta.StreamHeader(uuid.UUID(int=7), size, block_size=block_size, generation=1, zstd_lanes=lanes)
    sink = io.BytesIO()
    with delta.DeltaEncoder(header, sink) as enc:
        for op, off, arg in ops:
            {"data": enc.add_data, "zero": enc.add_zero, "trim": enc.add_trim}[op](off, arg)
        enc.finish()
    return sink.getvalue()


def mixed_ops(seed: int):
    """test_lanes' changes (RAW, shared and whole zstd frames, ZERO, overlapping ranges) plus trims and a
    rewrite of an earlier range inside the same batch."""
    ops = [("zero", off, n) if data is None else ("data", off, data) for off, n, data in changes(seed)]
    first = next(op for op in ops if op[0] == "data")
    ops.insert(len(ops) // 2, ("trim", 5 * MiB + 512, 3 * MiB))
    ops.append(("data", first[1] + 4096, bytes(range(256)) * 64))
    return ops


def applied(path: str, stream: bytes, io_factory) -> delta.ApplyStats:
    with VhdxDisk.open(path, read_only=False, io_factory=io_factory) as disk:
        stats = apply_stream(io.BytesIO(stream), disk)
        disk.flush()
    return stats


def image_bytes(path: str) -> bytes:
    with VhdxDisk.open(path) as disk:
        return disk.read(0, disk.size)


@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_native_and_python_apply_write_the_same_bytes(tmp_path, lanes):
    stream = stream_of(mixed_ops(lanes), lanes)
    kinds = {f.kind for f in delta.DeltaDecoder(io.BytesIO(stream))}
    assert kinds >= {FrameKind.RAW, FrameKind.ZSTD, FrameKind.ZERO, FrameKind.TRIM}
    shadow = MemDisk(SIZE, os.urandom(SIZE))          # what was there before: the apply must replace it
    paths = {}
    for name, factory in (("native", DirectWriteIO), ("plain", FileIO), ("python", PythonIO)):
        paths[name] = str(tmp_path / f"{name}.vhdx")
        create_vhdx(paths[name], SIZE, block_size=2 * MiB).close()
        with VhdxDisk.open(paths[name], read_only=False) as disk:
            disk.write(0, shadow.buf)
        stats = applied(paths[name], stream, factory)
        assert stats.native == (name != "python")
    apply_stream(io.BytesIO(stream), shadow)
    expected = bytes(shadow.buf)
    for name, path in paths.items():
        assert image_bytes(path) == expected, name
        subprocess.run(["qemu-img", "check", "-f", "vhdx", path], check=True, capture_output=True)
    r = subprocess.run(["qemu-img", "compare", "-f", "vhdx", "-F", "vhdx", paths["native"], paths["python"]],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_large_aligned_frames_written_with_an_o_direct_descriptor_open_land_right(tmp_path):
    data = b"".join(os.urandom(64) * 1024 for _ in range(8))          # 512 KiB, compressible
    stream = stream_of([("data", 2 * MiB, data), ("data", 8 * MiB + 4096, data[:256 << 10])], 2)
    path = str(tmp_path / "d.vhdx")
    create_vhdx(path, SIZE).close()
    with VhdxDisk.open(path, read_only=False, io_factory=DirectWriteIO) as disk:
        if disk.io.direct_fd < 0:
            pytest.skip("this filesystem refuses O_DIRECT")
        apply_stream(io.BytesIO(stream), disk)
    got = image_bytes(path)
    assert got[2 * MiB:2 * MiB + len(data)] == data
    assert got[8 * MiB + 4096:8 * MiB + 4096 + (256 << 10)] == data[:256 << 10]


def python_error(stream: bytes) -> tuple:
    with pytest.raises(DeltaFormatError) as e:
        apply_stream(io.BytesIO(stream), MemDisk(damaged.H.disk_size))
    return where(e.value)


def native_error(disk, stream: bytes) -> tuple:
    with pytest.raises(DeltaFormatError) as e:
        apply_stream(io.BytesIO(stream), disk)
    return where(e.value)


def where(e: DeltaFormatError) -> tuple:
    """The record and offset named, and the kind of fault. A hostile payload may show its fault in more
    than one way (zstd sees a corrupt block, or it expands too far, or the digest differs), depending on
    how much output a reader lets zstd produce at once, so payload faults compare as one kind."""
    assert "\n" not in str(e)
    payload = ("XXH3-128", "ZSTD payload")
    kind = "payload" if e.problem.startswith(payload) else e.problem
    return e.structure, e.offset, kind


@pytest.fixture
def small_vhdx(tmp_path):
    path = str(tmp_path / "small.vhdx")
    create_vhdx(path, damaged.H.disk_size, block_size=MiB).close()
    with VhdxDisk.open(path, read_only=False) as disk:
        assert disk.planned_write_fds() is not None
        yield disk


STREAM_DIGEST = ("delta trailer", len(damaged.STREAM) - TRAILER.size, "payload")


@pytest.mark.parametrize("mask", [0x01, 0xFF])
def test_every_damaged_stream_fails_as_the_python_loop_does(small_vhdx, mask):
    """The same record named, except where the system's libzstd decodes a damaged payload to the right
    plain bytes (the frame's digest holds) where python-zstandard's newer bundled zstd calls it corrupt:
    then the stream's own digest refuses it at the trailer (what was written is verified plain bytes)."""
    stream = damaged.STREAM
    for pos in range(len(stream)):
        bad = bytearray(stream)
        bad[pos] ^= mask
        native, python = native_error(small_vhdx, bytes(bad)), python_error(bytes(bad))
        assert native == python or (native == STREAM_DIGEST and python[2] == "payload"), (pos, native, python)
    for n in range(0, len(stream), 7):
        assert native_error(small_vhdx, stream[:n]) == python_error(stream[:n]), n


def verified_error(stream: bytes) -> tuple:
    with pytest.raises(DeltaFormatError) as e:
        for _ in delta.verified(delta.checking_decoder(io.BytesIO(stream))):
            pass
    return where(e.value)


def test_verified_frames_are_the_decoders_frames():
    stream = stream_of(mixed_ops(2), 2)
    dec = delta.checking_decoder(io.BytesIO(stream))
    assert not dec.inflate
    got = [(f.offset, f.length, f.kind) for f in delta.verified(dec)]
    assert got == [(f.offset, f.length, f.kind) for f in delta.DeltaDecoder(io.BytesIO(stream))]
    assert dec.trailer is not None


def test_every_damaged_stream_fails_verification_as_the_python_decoder_does():
    stream = damaged.STREAM
    for pos in range(len(stream)):
        bad = bytearray(stream)
        bad[pos] ^= 0xFF
        native, python = verified_error(bytes(bad)), python_error(bytes(bad))
        assert native == python or (native == STREAM_DIGEST and python[2] == "payload"), (pos, native, python)


@pytest.mark.parametrize("index,fields", [
    (0, dict(digest=b"\1" * 16)), (1, dict(length=4095)), (1, dict(kind=FrameKind.RAW)),
    (-1, dict(digest=b"\2" * 16)), (0, dict(plen=699))])
def test_payload_faults_behind_a_good_crc_fail_as_the_python_loop_does(small_vhdx, index, fields):
    bad = damaged.mutate_frame(index, **fields)
    assert native_error(small_vhdx, bad) == python_error(bad)


def test_nothing_but_verified_bytes_is_written(tmp_path):
    """A stream whose last data frame lies about its digest: what the native apply wrote before stopping
    is the stream's own data, never the lying frame's."""
    h, ops, _ = small_stream()
    stream = damaged.mutate_frame(-1, digest=b"\3" * 16)
    path = str(tmp_path / "d.vhdx")
    create_vhdx(path, h.disk_size, block_size=MiB).close()
    with VhdxDisk.open(path, read_only=False) as disk:
        with pytest.raises(DeltaFormatError, match=r"delta frame \d+ .*XXH3-128"):
            apply_stream(io.BytesIO(stream), disk)
    got = image_bytes(path)
    start = ops[-1][1]
    assert got[start:start + len(ops[-1][2])] == bytes(len(ops[-1][2]))     # the lying frame: not written


def test_a_zip_bomb_is_refused_within_bounded_memory(tmp_path):
    path = tmp_path / "bomb.delta"
    path.write_bytes(damaged.bomb_stream())
    image = str(tmp_path / "bomb.vhdx")
    create_vhdx(image, 64 * MiB).close()
    r = run_with_bounded_memory(f"""
import sys
from replicator.delta import apply_stream, DeltaFormatError
from replicator.vhdx import VhdxDisk
with VhdxDisk.open({image!r}, read_only=False) as disk:
    try:
        stats = apply_stream(open({str(path)!r}, 'rb'), disk)
    except DeltaFormatError as e:
        print(e); sys.exit(0)
sys.exit(3)
""")
    assert r.returncode == 0, r.stderr
    assert "expands beyond the declared 1048576 bytes" in r.stdout


def test_a_write_that_fails_is_a_disk_error_naming_the_image(tmp_path):
    path = str(tmp_path / "d.vhdx")
    create_vhdx(path, SIZE).close()
    stream = stream_of([("data", 0, os.urandom(MiB))], 2)
    with VhdxDisk.open(path, read_only=False) as disk:
        apply_stream(io.BytesIO(stream), disk)          # the header's first update is behind us
        fd, _ = disk.planned_write_fds()
        ro = os.open(path, os.O_RDONLY)
        os.dup2(ro, fd)                  # the image's descriptor now refuses writes (EBADF)
        os.close(ro)
        with pytest.raises(DiskIOError, match=rf"^{path}: pwrite: Bad file descriptor$"):
            apply_stream(io.BytesIO(stream), disk)
        rw = os.open(path, os.O_RDWR)
        os.dup2(rw, fd)                  # writable again, so the disk closes as usual
        os.close(rw)


def test_the_applier_refuses_a_bad_plan_and_everything_after_a_failure():
    data = os.urandom(8192)
    frame = kernels.ApplyFrame(FrameKind.RAW, 0, data, len(data), kernels.xxh3_128(data),
                               [(0, 4096, 8192)])
    applier = kernels.FrameApplier(1, 1 << 20, 8 << 20)
    r, w = os.pipe()
    try:
        with pytest.raises(kernels.ApplyFailure, match="write plan does not fit"):
            applier.apply([frame], w)
        good = kernels.ApplyFrame(FrameKind.RAW, 0, data, len(data), kernels.xxh3_128(data), [])
        with pytest.raises(kernels.ApplyFailure, match="an earlier batch failed"):
            applier.apply([good], w)
    finally:
        os.close(r)
        os.close(w)


def with_bad_digests(stream: bytes, indexes) -> bytes:
    """The stream with the digests of the given frames changed (their header CRCs recomputed)."""
    frames = [r for r in records(stream) if r[0] == "frame"]
    for i in indexes:
        _, start, size = frames[i]
        raw = bytearray(stream[start:start + size])
        raw[24:40] = bytes(16)                  # FRAME: tag, kind, reserved, offset, length, plen, digest, crc
        stream = refix(stream[:start] + bytes(raw) + stream[start + size:], start, size)
    return stream


def test_two_faults_in_two_lanes_report_the_earlier_and_apply_what_comes_before(tmp_path):
    words = [os.urandom(8) for _ in range(64)]
    ops = [("data", i * 2 * MiB, b"".join(words[(i + k) % 64] for k in range(MiB // 8))) for i in range(12)]
    stream = stream_of(ops, 2)
    kinds = [f.kind for f in delta.DeltaDecoder(io.BytesIO(stream))]
    assert kinds == [FrameKind.ZSTD] * 12
    bad = with_bad_digests(stream, [8, 9])      # lanes 0 and 1
    path = str(tmp_path / "d.vhdx")
    create_vhdx(path, SIZE).close()
    for _ in range(10):
        with VhdxDisk.open(path, read_only=False, io_factory=DirectWriteIO) as disk:
            with pytest.raises(DeltaFormatError, match=r"^delta frame 9 at offset \d+ .*XXH3-128"):
                apply_stream(io.BytesIO(bad), disk)
    got = image_bytes(path)
    for _, off, data in ops[:8]:                # every frame before the first fault is applied
        assert got[off:off + len(data)] == data
    for _, off, data in ops[8:10]:
        assert got[off:off + len(data)] == bytes(len(data))

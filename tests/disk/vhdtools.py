"""Test helpers: an independent dynamic-VHD writer (so the reader is not only checked against itself)
and thin wrappers around qemu-img / qemu-io."""
from __future__ import annotations

import shutil
import struct
import subprocess
from dataclasses import dataclass, field

import pytest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
needs_qemu = pytest.mark.skipif(not (QEMU_IMG and QEMU_IO), reason="qemu-img/qemu-io not installed")

UNALLOC = 0xFFFFFFFF


def checksum(raw: bytes, at: int) -> int:
    return ~(sum(raw[:at]) + sum(raw[at + 4:])) & 0xFFFFFFFF


def with_checksum(raw: bytes, at: int) -> bytes:
    return raw[:at] + struct.pack(">I", checksum(raw, at)) + raw[at + 4:]


def footer_bytes(size: int, disk_type: int, data_offset: int, creator: bytes = b"test",
                 version: int = 0x00010000) -> bytes:
    raw = struct.pack(">8sIIQI4sI4sQQHBBII16sB", b"conectix", 2, version, data_offset, 12345,
                      creator, 0x10000, b"Wi2k", size, size, 100, 16, 63, disk_type, 0,
                      bytes(range(16)), 0)
    return with_checksum(raw.ljust(512, b"\0"), 64)


def dyn_header_bytes(table_offset: int, entries: int, block_size: int) -> bytes:
    raw = struct.pack(">8sQQIIII", b"cxsparse", 0xFFFFFFFFFFFFFFFF, table_offset, 0x00010000,
                      entries, block_size, 0)
    return with_checksum(raw.ljust(1024, b"\0"), 36)


@dataclass
class DynLayout:
    """Where a built dynamic VHD keeps its structures, for tests that corrupt them."""

    data: bytearray
    size: int
    block_size: int
    bitmap_size: int
    header_offset: int = 512
    bat_offset: int = 1536
    block_offsets: dict = field(default_factory=dict)

    @property
    def footer_offset(self) -> int:
        return len(self.data) - 512


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def build_dynamic(size: int, block_size: int = 4096, blocks: dict | None = None) -> DynLayout:
    """A dynamic VHD image in memory. blocks: {index: data} or {index: (data, bitmap)}; data is
    padded to block_size, bitmap defaults to all sectors present."""
    blocks = blocks or {}
    n = ceil_div(size, block_size)
    bitmap_size = ceil_div(ceil_div(block_size // 512, 8), 512) * 512
    bat_len = ceil_div(4 * n, 512) * 512
    pos = 1536 + bat_len
    bat = [UNALLOC] * n
    body = bytearray()
    offsets = {}
    for i in sorted(blocks):
        data, bitmap = blocks[i] if isinstance(blocks[i], tuple) else (blocks[i], None)
        bitmap = (bitmap if bitmap is not None else b"\xff" * (block_size // 4096 or 1))
        bat[i] = pos // 512
        offsets[i] = pos
        body += bitmap.ljust(bitmap_size, b"\0") + bytes(data).ljust(block_size, b"\0")
        pos += bitmap_size + block_size
    footer = footer_bytes(size, 3, 512)
    bat_raw = struct.pack(f">{n}I", *bat).ljust(bat_len, b"\xff")
    image = bytearray(footer + dyn_header_bytes(1536, n, block_size) + bat_raw + body + footer)
    return DynLayout(image, size, block_size, bitmap_size, block_offsets=offsets)


def vpc_spec(path, current_size: bool = True) -> str:
    """--image-opts spec for a VHD; current_size makes qemu trust the footer's Current Size."""
    opt = "force_size_calc=current_size," if current_size else ""
    return f"driver=vpc,{opt}file.filename={path}"


def run(*args, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=check,
                          timeout=120)


def qemu_to_raw(path, out, current_size: bool = True) -> bytes:
    """What qemu reads from a VHD, via `qemu-img convert -O raw`."""
    run(QEMU_IMG, "convert", "--image-opts", vpc_spec(path, current_size), "-O", "raw", out)
    with open(out, "rb") as f:
        return f.read()


def qemu_virtual_size(path, current_size: bool = False) -> int:
    import json
    if current_size:
        res = run(QEMU_IMG, "info", "--output=json", "--image-opts", vpc_spec(path, True))
    else:
        res = run(QEMU_IMG, "info", "--output=json", "-f", "vpc", path)
    return json.loads(res.stdout)["virtual-size"]


def qemu_io(path, *commands: str, spec: bool = False) -> None:
    args = []
    for c in commands:
        args += ["-c", c]
    target = ["--image-opts", vpc_spec(path)] if spec else ["-f", "vpc", path]
    run(QEMU_IO, *target, *args)

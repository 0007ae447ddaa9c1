"""Open or create any supported disk by format name or by probing its signature."""
from __future__ import annotations

import os

from ..errors import DiskIOError, UsageError

FORMATS = ("raw", "vhdx", "vhd")


def detect_format(path: str) -> str:
    """vhdx: 'vhdxfile' at 0; vhd: 'conectix' at 0 (dynamic) or in the last 512 bytes (fixed); else raw."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = f.seek(0, os.SEEK_END)
            tail = b""
            if size >= 512:
                f.seek(size - 512)
                tail = f.read(8)
    except OSError as e:
        raise DiskIOError(f"{path}: cannot open: {e.strerror}") from None
    if head == b"vhdxfile":
        return "vhdx"
    if head == b"conectix" or tail == b"conectix":
        return "vhd"
    return "raw"


def open_disk(path: str, fmt: str | None = None, read_only: bool = True):
    fmt = fmt or detect_format(path)
    if fmt == "vhdx":
        from ..vhdx import open_vhdx
        return open_vhdx(path, read_only=read_only)
    if fmt == "vhd":
        from .vhd import open_vhd
        return open_vhd(path, read_only=read_only)
    if fmt == "raw":
        from .raw import open_raw
        return open_raw(path, read_only=read_only)
    raise UsageError(f"unknown disk format {fmt!r} (known: {', '.join(FORMATS)})")


def create_disk(path: str, fmt: str, size: int, **options):
    """Create a disk of `fmt` and return it open read-write. Options are the format's own."""
    if fmt == "vhdx":
        from ..vhdx import create_vhdx
        return create_vhdx(path, size, **options)
    if fmt == "vhd":
        from .vhd import create_vhd
        return create_vhd(path, size, **options)
    if fmt == "raw":
        from .raw import create_raw
        return create_raw(path, size)
    raise UsageError(f"unknown disk format {fmt!r} (known: {', '.join(FORMATS)})")

"""VHDX engine (MS-VHDX): open, validate, replay, read, write, trim, create and check VHDX files."""
from .create import create_vhdx
from .image import VhdxDisk


def open_vhdx(path: str, read_only: bool = True) -> VhdxDisk:
    return VhdxDisk.open(path, read_only=read_only)


__all__ = ["VhdxDisk", "create_vhdx", "open_vhdx"]

"""Disk drivers behind one interface: raw images, VHD (fixed and dynamic) and VHDX."""
from .base import BlockDevice, Extent, ExtentKind

__all__ = ["BlockDevice", "Extent", "ExtentKind"]

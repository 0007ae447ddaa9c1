"""Fixtures of the real-guest tests: the guest's boot files (built once per run, cached across runs) and a
Guest that is killed at teardown whatever the test did."""
from __future__ import annotations

import pytest

from . import image
from .harness import Guest, qemu_available

requires_qemu = pytest.mark.skipif(
    not qemu_available(),
    reason="qemu-system-x86_64 is not installed (./tools/bootstrap installs qemu-system-x86)")


@pytest.fixture(scope="session")
def guest_image() -> image.GuestImage:
    if not qemu_available():
        pytest.skip("qemu-system-x86_64 is not installed (./tools/bootstrap installs qemu-system-x86)")
    return image.build()


@pytest.fixture
def guest(tmp_path, guest_image):
    g = Guest(tmp_path / "guest", image=guest_image)
    try:
        yield g
    finally:
        g.kill()

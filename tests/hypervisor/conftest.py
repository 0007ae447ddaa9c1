"""Fixtures of the hypervisor tests: one private libvirtd per test session (tests/hypervisor/libvirtd.py),
the Hypervisor connected to it, the real guest's boot files (tests/guest/image.py) with the NIC driver
appended, and a short working directory per test (Unix socket paths must stay under 108 bytes)."""
from __future__ import annotations

import glob
import gzip
import os
import shutil
import tempfile
import time

import pytest

from ..guest import image
from . import libvirtd

NET_MODULES = ["failover", "net_failover", "virtio_net"]     # dependencies first


def log(msg: str) -> None:
    print(f"[hv {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@pytest.fixture(scope="session")
def private_libvirtd():
    why = libvirtd.available()
    if why:
        pytest.skip(why)
    work = tempfile.mkdtemp(prefix="rlv-", dir="/tmp")
    t = time.monotonic()
    d = libvirtd.PrivateLibvirtd(work).start()
    log(f"private libvirtd pid {d.proc.pid} up in {time.monotonic() - t:.1f} s: {d.uri}")
    try:
        yield d
    finally:
        t = time.monotonic()
        d.stop()
        log(f"private libvirtd stopped in {time.monotonic() - t:.1f} s")
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def hv(private_libvirtd):
    from replicator.hypervisor import Hypervisor
    h = Hypervisor.open(private_libvirtd.uri)
    t = time.monotonic()
    h.conn.getCapabilities()              # the first hypervisor call probes QEMU (~8 s with a cold cache)
    log(f"QEMU capabilities in {time.monotonic() - t:.1f} s")
    try:
        yield h
    finally:
        h.close()


@pytest.fixture(scope="session")
def site_b_libvirtd(private_libvirtd, hv):
    """A second private libvirtd: the recovery site's own hypervisor (a failover's domain is defined under
    the machine's name there while the primary site's definition stays). It starts with a copy of the first
    daemon's QEMU capability cache (the same CPU pinning), so it does not probe QEMU again."""
    work = tempfile.mkdtemp(prefix="rlv-", dir="/tmp")
    cache = os.path.join(private_libvirtd.root, "cache", "qemu")
    if os.path.isdir(cache):
        shutil.copytree(cache, os.path.join(work, "root", "cache", "qemu"))
    d = libvirtd.PrivateLibvirtd(work, cpu=private_libvirtd.cpu).start()
    log(f"site B's libvirtd pid {d.proc.pid} up: {d.uri}")
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def hv_b(site_b_libvirtd):
    from replicator.hypervisor import Hypervisor
    h = Hypervisor.open(site_b_libvirtd.uri)
    t = time.monotonic()
    h.conn.getCapabilities()
    log(f"site B's QEMU capabilities in {time.monotonic() - t:.1f} s")
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def workdir():
    """A short folder for the test; any export process a daemon of the test left running (it outlives
    replicatord while a guest holds it, and writes its state when it ends) is stopped before the folder goes."""
    from replicator.tracking.remote import shutdown_all_under
    d = tempfile.mkdtemp(prefix="hv-", dir="/tmp")
    try:
        yield d
    finally:
        shutdown_all_under(d)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def guest_boot(tmp_path_factory):
    """(kernel, initramfs) of tests/guest's image, the initramfs with virtio_net and its dependencies
    appended as a second cpio under /netmods (the guest's init loads only its disk modules; a test loads
    these through the agent: `insmod /netmods/NAME.ko`). Copied out of tests/guest, not changing it."""
    img = image.build()
    moddirs = glob.glob(os.path.join(image.cache_root(), "x", "*", "lib", "modules", img.kernel_version))
    if not moddirs:
        pytest.skip(f"the kernel's modules ({img.kernel_version}) are not in the guest image cache")
    files = {}
    for dirpath, _, names in os.walk(moddirs[0]):
        for n in names:
            if ".ko" in n:
                files[n.split(".ko")[0].replace("-", "_")] = os.path.join(dirpath, n)
    cpio = image._Cpio()
    cpio.dir("netmods")
    for m in NET_MODULES:
        cpio.file(f"netmods/{m}.ko", image._read_module(files[m]))
    out = tmp_path_factory.mktemp("boot") / "initramfs-net.cpio.gz"
    with open(img.initramfs, "rb") as f:
        base = f.read()
    with open(out, "wb") as f:
        f.write(base)
        with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=1, mtime=0) as gz:
            gz.write(cpio.finish())
    return img.kernel, str(out)

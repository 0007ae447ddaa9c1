"""The fixture's own promise: a private libvirtd leaves nothing on the host. In the host's network namespace
(host_network=True) libvirt adds its global LIBVIRT_* iptables chains and a bridge when a network starts;
stop() removes both. Skipped when the host already has such chains (someone else's libvirt: not ours to
remove)."""
from __future__ import annotations

import shutil
import subprocess
import tempfile

import pytest

from replicator.hypervisor import Hypervisor

from . import libvirtd


def _libvirt_chains() -> list[str]:
    out = []
    for table in ("filter", "nat", "mangle"):
        rules = subprocess.run(["iptables", "-w", "-t", table, "-S"], capture_output=True, text=True).stdout
        out += [f"{table}: {r}" for r in rules.splitlines() if "LIBVIRT_" in r]
    return out


def _links() -> str:
    return subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout


def test_a_host_network_daemon_removes_its_bridge_and_iptables_chains(private_libvirtd):
    if shutil.which("iptables") is None:
        pytest.skip("iptables is not installed")
    if _libvirt_chains():
        pytest.skip("the host already has libvirt's iptables chains: another libvirt uses them")
    work = tempfile.mkdtemp(prefix="rlvh-", dir="/tmp")
    d = libvirtd.PrivateLibvirtd(work, host_network=True).start()
    try:
        with Hypervisor.open(d.uri) as hv:
            bridge = hv.create_isolated_network("hosttest")
            assert _libvirt_chains(), "libvirt added no chains: this test would prove nothing"
            assert f"{bridge} " in _links()
    finally:
        d.stop()
        shutil.rmtree(work, ignore_errors=True)
    assert _libvirt_chains() == []
    assert f"{bridge} " not in _links()
    # and the session's daemon (own network namespace) put nothing on the host
    with Hypervisor.open(private_libvirtd.uri) as hv:
        hv.create_isolated_network("nshost")
        try:
            assert _libvirt_chains() == []
        finally:
            hv.delete_network("nshost")

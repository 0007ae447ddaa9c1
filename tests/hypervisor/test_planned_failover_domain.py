"""Planned failover and failback of a libvirt domain, on two loopback sites (mutual TLS), each with its own
private libvirtd, and a real TCG guest that writes and fsyncs files with a manifest of their checksums:

- site A protects `vm` and the guest runs there, writing;
- `planned-failover` on A shuts the guest down cleanly through its agent (its writer loop syncs and
  unmounts), then the final cycle ships everything; `failover --planned` on B defines `vm` on B's libvirtd on
  the mapped network and starts it: the guest there carries on from the round after A's last one and every
  file in its manifest has its checksum (nothing it had synced is lost);
- the way back: A accepts reverse replication, B protects the running domain back to A (its disks on B's
  export; the domain is part of the reverse machine), B's `planned-failover` shuts it down, `failover
  --planned` on A starts A's own definition again, whose guest again finds every file; B accepts reverse
  replication and A protects the machine again.
"""
from __future__ import annotations

import os
import pathlib
import time
import xml.etree.ElementTree as ET

import pytest

from ..daemon.two_sites import free_port, make_pki
from ..guest.harness import MiB, make_disk_image
from .conftest import log
from .helpers import Site, all_files_there, console_of, first_round, machine_toml, primary_domain_xml, wait_state

pytestmark = pytest.mark.timeout(300)
FILES = 4
MAC = "52:54:00:50:00:01"


def test_planned_failover_and_failback_of_a_domain_lose_nothing(hv, hv_b, workdir, guest_boot, private_libvirtd,
                                                                site_b_libvirtd):
    kernel, initrd = guest_boot
    pki = make_pki(pathlib.Path(workdir))
    tls = lambda n: f'cert = "{pki}/{n}.pem"\nkey = "{pki}/{n}.key"\nca = "{pki}/ca.pem"\n'   # noqa: E731
    a_dir, b_dir = f"{workdir}/a", f"{workdir}/b"
    os.makedirs(a_dir)
    a_port, b_port = free_port(), free_port()

    def replica(site: str, port: int, peer: str, peer_port: int, uri: str, nmap: str) -> str:
        return f'''[replica]
listen = "127.0.0.1"
port = {port}
{tls(site)}failover_dir = "failover"
test_failover_dir = "tf"
libvirt = "{uri}"
network_map = {nmap}

[[replica.allow]]
principal = "{peer}"
storage = "replica"

[replica.reverse]
target = "https://127.0.0.1:{peer_port}"
{tls(site)}frequency = "30s"
'''
    b = Site(b_dir, "site-b", replica("site-b", b_port, "site-a", a_port, site_b_libvirtd.uri, '{ lan = "lan-b" }'))
    a = Site(a_dir, "site-a", machine_toml("vm", private_libvirtd.uri, f"https://127.0.0.1:{b_port}", tls("site-a"))
             + replica("site-a", a_port, "site-b", b_port, private_libvirtd.uri, "{ }"))
    original = f"{a_dir}/vm.raw"
    with open(original, "wb") as f:
        f.truncate(64 * MiB)
    os.utime(original, (time.time() - 60, time.time() - 60))
    make_disk_image(f"{a_dir}/vm.vhdx", 64 * MiB)
    hv.create_isolated_network("lan")
    hv_b.create_isolated_network("lan-b")
    hv.conn.defineXML(primary_domain_xml("vm", kernel, initrd, f"{a_dir}/console.log",
                                         disks=[("vda", original, "raw")], nics=[(MAC, "lan")], memory_mib=192,
                                         files=FILES, pause=0.3))
    t0 = time.monotonic()
    b.start()
    a.start()
    try:
        a.wait(lambda: a.machine()["state"] == "Replicating", "initial replication", 90)
        hv.start("vm")
        con = console_of(hv, "vm", f"{a_dir}/console.log")
        con.wait_for("GUEST_MOUNTED", 120)
        hv.wait_agent("vm", 120)
        con.wait_rounds(3, 120)
        a.op("/v1/machines/vm/cycle")

        # ---- planned failover: the guest shuts down cleanly, the final cycle ships all it wrote
        t = time.monotonic()
        a.op("/v1/machines/vm/planned-failover")
        assert hv.state("vm").state == "shutoff" and a.machine()["state"] == "PreparedForFailover"
        umount = con.wait_for("GUEST_UMOUNT_OK", 1)
        rounds = con.rounds()
        assert f"rounds={rounds}" in umount and con.errors() == [], con.tail()
        assert "domain 'vm' shut down cleanly in" in a.text() and "(guest agent)" in a.text(), a.text()
        view = b.op("/v1/replica/machines/vm/failover", {"planned": True})
        assert view["failover"]["kind"] == "planned" and view["failover"]["domain"]["name"] == "vm", view
        assert hv_b.domain_config("vm").uuid == hv.domain_config("vm").uuid         # the same machine
        nic = next(ET.fromstring(hv_b.conn.lookupByName("vm").XMLDesc(0)).iter("interface"))
        assert nic.find("source").get("network") == "lan-b"
        con_b = console_of(hv_b, "vm", f"{b_dir}/failover/vm/vm.console.log")
        con_b.wait_for("GUEST_MOUNTED", 120)
        assert first_round(con_b) == rounds + 1, con_b.tail()
        hv_b.wait_agent("vm", 120)
        assert all_files_there(hv_b, "vm", FILES * rounds) == FILES * rounds
        con_b.wait_rounds(rounds + 2, 120)
        log(f"planned failover: {rounds} rounds on A, all there on B ({time.monotonic() - t:.1f} s)")

        # ---- the way back: reverse replication from B (the running domain is protected there), failback
        t = time.monotonic()
        a.op("/v1/replica/machines/vm/accept-reverse")
        b.op("/v1/replica/machines/vm/reverse")
        m = b.wait(lambda: (x := b.machine())["state"] == "Replicating" and x, "reverse replication", 120)
        assert m["domain"]["name"] == "vm" and m["domain"]["disks_pointed"] == "now", m
        wait_state(hv_b, "vm", lambda s: s.state == "running", 60, "running on B's own export")
        con_b.wait_rounds(con_b.rounds() + 2, 120)          # the guest writes on through the reverse export
        assert con_b.errors() == [], con_b.tail()
        b.op("/v1/machines/vm/planned-failover")
        assert hv_b.state("vm").state == "shutoff" and b.machine()["state"] == "FailbackComplete"
        con_b.wait_for("GUEST_UMOUNT_OK", 1)
        rounds_b = con_b.rounds()
        view = a.op("/v1/replica/machines/vm/failover", {"planned": True})
        assert view["failover"]["domain"].get("existing"), view             # A's own definition, started
        hv.wait_agent("vm", 120)
        assert all_files_there(hv, "vm", FILES * rounds_b) == FILES * rounds_b
        vda = hv.domain_config("vm").disk("vda").source
        assert (vda.kind, vda.socket) == ("nbd", f"{a_dir}/state/nbd/vm.sock"), vda
        log(f"failback: {rounds_b} rounds in all, all there on A again ({time.monotonic() - t:.1f} s)")

        b.op("/v1/replica/machines/vm/accept-reverse")
        a.op("/v1/replica/machines/vm/reverse")
        a.wait(lambda: a.machine()["state"] == "Replicating", "A protecting vm again", 120)
        # the domain paused on the I/O error of the export's handover (failover export -> protected export)
        # is resumed by the daemon; B keeps its definition, shut off
        wait_state(hv, "vm", lambda s: s.state == "running", 60, "running on A's protected export")
        # a guest resumed there may pause once more on a request that failed in the handover (the daemon
        # resumes it again at its next look): guest-exec waits for the agent rather than the first "running"
        hv.wait_agent("vm", 120)
        assert hv_b.state("vm").state == "shutoff"
        assert all_files_there(hv, "vm", FILES * rounds_b) == FILES * rounds_b
        log(f"{time.monotonic() - t0:.1f} s in all")
    finally:
        a.stop()
        b.stop()
        for h in (hv, hv_b):
            if h.exists("vm"):
                h.destroy("vm")
                h.undefine("vm")
        hv.delete_network("lan")
        hv_b.delete_network("lan-b")

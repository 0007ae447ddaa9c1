"""A test failover's machine: `NAME - Test` defined from the primary's replicated configuration (through
JSON) on another disk, its NIC on an isolated network created on demand and the unmapped one left
disconnected; it boots, its guest agent answers; quiesce freezes and always thaws (on exception, on the
watchdog's timeout); an IP address set through the agent is read back; destroy + undefine + the network
deleted leave nothing behind."""
from __future__ import annotations

import subprocess
import time
import xml.etree.ElementTree as ET

import pytest

from replicator.errors import DomainNotFound, GuestAgentError, QuiesceExpired
from replicator.hypervisor import DomainConfig

from .conftest import NET_MODULES, log
from .helpers import console_of, primary_domain_xml

pytestmark = pytest.mark.timeout(300)
MiB = 1 << 20
LAN_MAC, DMZ_MAC = "52:54:00:20:00:01", "52:54:00:20:00:02"


def _ext4_raw(path: str, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=0,lazy_journal_init=0", path],
                   check=True, capture_output=True)
    return path


def test_test_failover_domain_on_an_isolated_network(hv, workdir, guest_boot):
    kernel, initrd = guest_boot
    primary = "web2"
    hv.conn.defineXML(primary_domain_xml(primary, kernel, initrd, f"{workdir}/primary-console.log",
                                         disks=[("vda", f"{workdir}/primary.raw", "raw")],
                                         nics=[(LAN_MAC, "lan"), (DMZ_MAC, "dmz")], pause=0.3))
    replicated = hv.domain_config(primary).to_json()       # what every cycle ships to the replica site
    config = DomainConfig.from_json(replicated)
    copy = _ext4_raw(f"{workdir}/failover.raw", 96 * MiB)   # the failed-over disk
    name, net = f"{primary} - Test", "replicator-test"
    console = f"{workdir}/test-console.log"

    bridge = hv.create_isolated_network(net)
    assert bridge and hv.create_isolated_network(net) == bridge          # already there: the same one
    netxml = ET.fromstring(hv.conn.networkLookupByName(net).XMLDesc(0))
    assert netxml.find("forward") is None and netxml.find("ip") is None   # isolated: no forwarding, no host IP

    defined = hv.define(config, name, {"vda": copy}, {"lan": net}, console_path=console)
    assert defined.name == name and defined.uuid != config.uuid
    assert any("'dmz' is not mapped" in n for n in defined.notes), defined.notes
    try:
        t0 = time.monotonic()
        hv.start(name)
        con = console_of(hv, name, console)
        con.wait_for("GUEST_MOUNTED", 180)
        took = hv.wait_agent(name, 120)
        log(f"{name!r} mounted {time.monotonic() - t0 - took:.1f} s after start, agent answered "
            f"{took:.1f} s later")
        assert hv.agent_ping(name)
        live = ET.fromstring(hv.conn.lookupByName(name).XMLDesc(0))
        ifaces = {i.find("mac").get("address"): i for i in live.iter("interface")}
        assert ifaces[LAN_MAC].find("source").get("network") == net
        assert ifaces[LAN_MAC].find("source").get("bridge") == bridge
        assert ifaces[DMZ_MAC].get("type") == "ethernet" and ifaces[DMZ_MAC].find("link").get("state") == "down"

        # ---- quiesce: frozen inside, thawed after; thawed when the block raises; the watchdog thaws
        con.wait_rounds(2, 120)
        t = time.monotonic()
        with hv.quiesce(name, timeout=30) as q:
            froze = time.monotonic() - t
            assert q.frozen == 1 and not q.expired
            assert hv.agent_command(name, "guest-fsfreeze-status") == "frozen"
            at = con.rounds()
            time.sleep(2)
            assert con.rounds() <= at + 1, "the guest went on writing while frozen"
        log(f"froze in {froze:.2f} s; frozen for 2 s at round {at}")
        assert hv.agent_command(name, "guest-fsfreeze-status") == "thawed"
        con.wait_rounds(at + 2, 60)

        with pytest.raises(ZeroDivisionError):
            with hv.quiesce(name):
                assert hv.agent_command(name, "guest-fsfreeze-status") == "frozen"
                1 / 0
        assert hv.agent_command(name, "guest-fsfreeze-status") == "thawed"

        with pytest.raises(QuiesceExpired):
            with hv.quiesce(name, timeout=1) as q:
                time.sleep(2.5)
                assert q.expired
                assert hv.agent_command(name, "guest-fsfreeze-status") == "thawed"
        assert hv.agent_command(name, "guest-fsfreeze-status") == "thawed"
        at = con.rounds()
        con.wait_rounds(at + 1, 60)                          # the guest writes again

        # ---- a target IP through the agent (the guest's init loads no NIC driver: the test does)
        for m in NET_MODULES:
            code, out, err = hv.guest_exec(name, ["/bin/insmod", f"/netmods/{m}.ko"])
            assert code == 0, (m, out, err)
        deadline = time.monotonic() + 20
        while not any(i.mac == LAN_MAC for i in hv.guest_interfaces(name)):
            assert time.monotonic() < deadline, hv.guest_interfaces(name)
            time.sleep(0.2)
        hv.set_guest_ip(name, LAN_MAC, "192.168.77.5/24", gateway="192.168.77.1")
        hv.set_guest_ip(name, DMZ_MAC, "10.9.0.7/16")
        by_mac = {i.mac: i for i in hv.guest_interfaces(name)}
        assert "192.168.77.5/24" in by_mac[LAN_MAC].addresses, by_mac
        assert "10.9.0.7/16" in by_mac[DMZ_MAC].addresses, by_mac
        raw = hv.agent_command(name, "guest-network-get-interfaces")
        lan = [i for i in raw if i.get("hardware-address") == LAN_MAC][0]
        assert {"ip-address": "192.168.77.5", "ip-address-type": "ipv4", "prefix": 24} in lan["ip-addresses"]
        code, routes, _ = hv.guest_exec(name, ["/bin/ip", "route"])
        assert code == 0 and f"default via 192.168.77.1 dev {lan['name']}" in routes, routes
        log(f"guest IPs set and read back: {[(i.name, i.addresses) for i in by_mac.values()]}")
        with pytest.raises(GuestAgentError, match="no interface with MAC"):
            hv.set_guest_ip(name, "52:54:00:99:99:99", "10.0.0.1/8")
        assert con.errors() == [], con.tail()
    finally:
        hv.destroy(name)
        hv.undefine(name)
        hv.delete_network(net)
    assert not hv.exists(name) and not hv.network_exists(net)
    assert hv.exists(primary)                               # the primary's definition untouched
    with pytest.raises(DomainNotFound):
        hv.state(name)
    hv.undefine(primary)

"""A recovery plan of two domain machines on two loopback sites (mutual TLS), the private libvirtd and two
real TCG guests:

- site A protects the shut-off domains `vm1` and `vm2` (never started there), each with a failover IP
  (`failover_ip`: vm1's NIC by its place, with a gateway; vm2's by its MAC address); their configuration,
  failover IPs included, reaches site B with the cycles;
- site A is lost; on site B the plan (group 1: vm1, group 2: vm2) runs an unplanned failover: each group's
  domain is defined on its mapped network and started, and group 2 starts only once group 1's guest runs
  and its agent answered guest-ping (seen in the plan's log and in when each domain was started);
- in each guest the agent set the failover IP on the NIC (read back with guest-network-get-interfaces),
  and the plan's scripts had every member's address in their environment (REPLICATOR_IP_<MACHINE>_NET<k>);
- cancel-failover removes both domains; a test failover chosen with its NICs on no network ("none") boots
  `vm1 - Test` with its NIC unplugged (no isolated network made), and cleanup removes it.
"""
from __future__ import annotations

import os
import pathlib
import time
import xml.etree.ElementTree as ET

import pytest

from ..daemon.two_sites import free_port, make_pki
from ..guest.harness import MiB, make_disk_image
from .conftest import NET_MODULES, log
from .helpers import Site, machine_toml, primary_domain_xml

pytestmark = pytest.mark.timeout(300)
MACS = {"vm1": "52:54:00:40:00:01", "vm2": "52:54:00:40:00:02"}


def _entry(log_entries: list[dict], text: str) -> dict:
    found = [e for e in log_entries if text in e["text"]]
    assert found, (text, [e["text"] for e in log_entries])
    return found[0]


def test_a_plan_boots_its_groups_in_order_with_their_failover_ips(hv, workdir, guest_boot, private_libvirtd):
    kernel, initrd = guest_boot
    uri = private_libvirtd.uri
    pki = make_pki(pathlib.Path(workdir))
    tls = lambda n: f'cert = "{pki}/{n}.pem"\nkey = "{pki}/{n}.key"\nca = "{pki}/ca.pem"\n'   # noqa: E731
    a_dir, b_dir = f"{workdir}/a", f"{workdir}/b"
    os.makedirs(a_dir)
    b_port = free_port()
    script = f'["/bin/sh", "-c", "env | grep ^REPLICATOR_ | sort > {b_dir}/$REPLICATOR_ACTION.env"]'
    b = Site(b_dir, "site-b", f'''[replica]
listen = "127.0.0.1"
port = {b_port}
{tls("site-b")}failover_dir = "failover"
test_failover_dir = "tf"
libvirt = "{uri}"
network_map = {{ lan = "lan-b" }}
boot_timeout = 200

[[replica.allow]]
principal = "site-a"
storage = "replica"

[[plan]]
name = "p"
[[plan.group]]
members = ["vm1"]
post = [{{ script = {script} }}]
[[plan.group]]
members = ["vm2"]
pre = [{{ script = {script} }}]
''')
    ips = {"vm1": 'failover_ip = { net0 = { address = "10.20.0.5/24", gateway = "10.20.0.1" } }',
           "vm2": f'failover_ip = {{ "{MACS["vm2"]}" = "10.20.0.6/24" }}'}
    a = Site(a_dir, "site-a", "".join(machine_toml(n, uri, f"https://127.0.0.1:{b_port}", tls("site-a") + ips[n])
                                      for n in ("vm1", "vm2")))
    hv.create_isolated_network("lan")                       # site A's network
    hv.create_isolated_network("lan-b")                     # site B's, where the plan's machines go
    for name in ("vm1", "vm2"):
        original = f"{a_dir}/{name}.raw"
        with open(original, "wb") as f:
            f.truncate(64 * MiB)
        os.utime(original, (time.time() - 60, time.time() - 60))
        make_disk_image(f"{a_dir}/{name}.vhdx", 64 * MiB)
        hv.conn.defineXML(primary_domain_xml(name, kernel, initrd, f"{a_dir}/{name}.console.log",
                                             disks=[("vda", original, "raw")], nics=[(MACS[name], "lan")],
                                             memory_mib=192, files=2, pause=0.5,
                                             extra="guest.netmods=" + ",".join(NET_MODULES)))
    t0 = time.monotonic()
    b.start()
    a.start()
    try:
        # ---- both machines replicated, their configuration (failover IPs with it) on site B
        def replicating():
            ms = a.api("GET", "/v1/status")[1]["machines"]
            return len(ms) == 2 and all(m["state"] == "Replicating" for m in ms)
        a.wait(replicating, "both machines replicating", 120)
        for name in ("vm1", "vm2"):
            a.op(f"/v1/machines/{name}/cycle")
        a.stop()                                            # site A is lost, its domains with it
        for name in ("vm1", "vm2"):
            hv.undefine(name)
        log(f"two machines replicated in {time.monotonic() - t0:.1f} s; site A stopped")

        # ---- the plan: group 2 starts once group 1's guest runs and answers guest-ping
        t = time.monotonic()
        code, started = b.api("POST", "/v1/plans/p/unplanned", {})
        assert code == 200 and started["run"]["state"] == "running", started
        run = b.wait(lambda: (r := b.api("GET", "/v1/plans/p")[1]["run"])["state"] != "running" and r,
                     "the plan's end", 260)
        entries = run["log"]
        assert run["state"] == "succeeded", [e["text"] for e in entries]
        log(f"plan ran in {time.monotonic() - t:.1f} s: " + " | ".join(e["text"] for e in entries))
        up1 = _entry(entries, "vm1: ok: running after")
        assert "guest agent answered guest-ping" in up1["text"] and "net0 10.20.0.5/24" in up1["text"], up1
        start2 = _entry(entries, "vm2: unplanned failover started")
        assert up1["time"] < _entry(entries, "group 2: started")["time"] <= start2["time"]
        up2 = _entry(entries, "vm2: ok: running after")
        assert "guest agent answered guest-ping" in up2["text"] and "net0 10.20.0.6/24" in up2["text"], up2
        doms = {n: b.replica(n)["failover"]["domain"] for n in ("vm1", "vm2")}
        assert doms["vm2"]["started"] > up1["time"] > doms["vm1"]["started"], (doms, up1)
        assert doms["vm1"]["settled"]["ips"] == {"net0": "10.20.0.5/24"}, doms["vm1"]
        for name in ("vm1", "vm2"):                          # on the mapped network
            nic = next(ET.fromstring(hv.conn.lookupByName(name).XMLDesc(0)).iter("interface"))
            assert nic.find("source").get("network") == "lan-b", ET.tostring(nic)

        # ---- the failover IPs, in the guests (the agent's view) and in the plan scripts' environment
        for name, address in (("vm1", "10.20.0.5"), ("vm2", "10.20.0.6")):
            raw = hv.agent_command(name, "guest-network-get-interfaces")
            nic = [i for i in raw if i.get("hardware-address") == MACS[name]]
            assert nic and {"ip-address": address, "ip-address-type": "ipv4", "prefix": 24} in \
                nic[0].get("ip-addresses", []), raw
        code, routes, _ = hv.guest_exec("vm1", ["/bin/ip", "route"])
        assert code == 0 and "default via 10.20.0.1" in routes, routes
        for action in ("g1.post1", "g2.pre1"):
            with open(f"{b_dir}/{action}.env") as f:
                env = dict(line.split("=", 1) for line in f.read().splitlines())
            assert env["REPLICATOR_IP_VM1_NET0"] == "10.20.0.5/24" and env["REPLICATOR_IP_VM2_NET0"] == \
                "10.20.0.6/24" and env["REPLICATOR_PLAN"] == "p" and env["REPLICATOR_FAILOVER"] == "unplanned", env

        for name in ("vm1", "vm2"):
            b.op(f"/v1/replica/machines/{name}/cancel-failover")
            assert not hv.exists(name) and b.replica(name)["state"] == "Replicating"

        # ---- a test failover whose NICs are connected to nothing (chosen per run, instead of the isolated network)
        code, refused = b.api("POST", "/v1/replica/machines/vm1/test-failover", {"network": "lan-b"})
        assert code == 409 and "must be \"isolated\" or \"none\"" in refused["error"], refused
        view = b.op("/v1/replica/machines/vm1/test-failover", {"network": "none"})
        assert view["test_failover"]["domain"]["network"] is None, view
        nic = next(ET.fromstring(hv.conn.lookupByName("vm1 - Test").XMLDesc(0)).iter("interface"))
        assert nic.get("type") == "ethernet" and nic.find("link").get("state") == "down", ET.tostring(nic)
        assert not hv.network_exists("replicator-test")
        b.op("/v1/replica/machines/vm1/cleanup-test-failover")
        assert not hv.exists("vm1 - Test") and b.replica("vm1")["test_failover"] is None
        log(f"{time.monotonic() - t0:.1f} s in all")
    finally:
        a.stop()
        b.stop()
        for name in ("vm1", "vm2"):
            if hv.exists(name):
                hv.destroy(name)
                hv.undefine(name)
        for net in ("lan", "lan-b"):
            hv.delete_network(net)

"""replicatord protecting a libvirt domain end to end, on two loopback sites (mutual TLS) and the private
libvirtd, with a real TCG guest:

- site A protects the shut-off domain `vm` (`domain = "vm"`, `disks = { vda = "vm.vhdx" }`): its disk is
  pointed at A's export (NBD over the export's socket, error_policy='stop'), status says so; the domain
  starts on it, the guest writes; the initial replication and cycles run to site B, which keeps the domain's
  configuration beside the replica (PUT /v1/disks/ID/domain);
- replicatord restarts (the guest keeps its disk) with its clock at the end of an hour: the hourly tick
  quiesces the guest through libvirt's guest agent around the cut, and site B labels that point
  "application"; the guest was frozen for the cut (its writer loop stopped meanwhile);
- the export process is killed (SIGKILL): the domain pauses on the I/O error and replicatord resumes it once
  it restarted the export; the guest sees no I/O error;
- a test failover at the application-consistent point on site B boots `vm - Test` on an isolated network
  (created on demand) from the test disk B serves, while A goes on replicating; cleanup destroys and
  undefines it and deletes the network;
- the guest shuts down cleanly, a last cycle, and B's replica equals A's disk byte for byte, with a clean
  filesystem holding every file the guest wrote.
"""
from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import time
import xml.etree.ElementTree as ET

import pytest

from replicator.errors import QuiesceExpired
from replicator.orchestration.quiesce import LibvirtQuiesce, QuiesceFailed
from replicator.vhdx import VhdxDisk

from ..daemon.two_sites import free_port, make_pki, same
from ..guest.harness import MiB, make_disk_image, verify_image
from .conftest import log
from .helpers import Site, console_of, machine_toml, primary_domain_xml, wait_state

pytestmark = pytest.mark.timeout(420)
FILES = 4
MAC = "52:54:00:30:00:01"
HOUR = 3600


def _vhdx_bytes(path: str, copy: str) -> bytes:
    """A VHDX a process may still hold: a copy, its log replayed, read whole."""
    with open(path, "rb") as src, open(copy, "wb") as dst:
        dst.write(src.read())
    with VhdxDisk.open(copy, read_only=False) as d:
        return d.read(0, d.size)


async def _quiesce_provider(uri: str, hv) -> None:
    q = LibvirtQuiesce(uri, "vm", timeout=4)
    async with q:
        assert q.frozen >= 1 and await asyncio.to_thread(hv.agent_command, "vm", "guest-fsfreeze-status") == "frozen"
    assert not q.expired and hv.agent_command("vm", "guest-fsfreeze-status") == "thawed"
    with pytest.raises(QuiesceExpired):
        async with q:
            await asyncio.sleep(6)
            assert await asyncio.to_thread(hv.agent_command, "vm", "guest-fsfreeze-status") == "thawed"
    assert q.expired and hv.agent_command("vm", "guest-fsfreeze-status") == "thawed"
    assert not issubclass(QuiesceExpired, QuiesceFailed)
    with pytest.raises(QuiesceFailed):                      # no such domain: the freeze fails, cleanly
        async with LibvirtQuiesce(uri, "no-such-vm", timeout=5):
            pass


def _replica_image(site: Site, disk_id: str) -> bytes:
    folder = os.path.join(site.dir, "replica", "disks", disk_id)
    with open(os.path.join(folder, "state.json")) as f:
        chain = json.load(f)["chain"]
    with VhdxDisk.open(os.path.join(folder, "chain", chain[-1]), read_only=True) as d:
        return d.read(0, d.size)


def test_replicatord_protects_a_domain_quiesces_it_and_boots_its_test_failover(hv, workdir, guest_boot,
                                                                               private_libvirtd):
    kernel, initrd = guest_boot
    uri = private_libvirtd.uri
    pki = make_pki(pathlib.Path(workdir))
    tls = lambda n: f'cert = "{pki}/{n}.pem"\nkey = "{pki}/{n}.key"\nca = "{pki}/ca.pem"\n'   # noqa: E731
    a_dir, b_dir = f"{workdir}/a", f"{workdir}/b"
    os.makedirs(a_dir)
    b_port = free_port()
    b = Site(b_dir, "site-b", f'''[replica]
listen = "127.0.0.1"
port = {b_port}
{tls("site-b")}failover_dir = "failover"
test_failover_dir = "tf"
libvirt = "{uri}"
test_network = "rtest"

[[replica.allow]]
principal = "site-a"
storage = "replica"
''')
    a = Site(a_dir, "site-a", machine_toml("vm", uri, f"https://127.0.0.1:{b_port}", tls("site-a") +
                                           'additional_points = 2\napp_consistent_hours = 1\n'
                                           'quiesce = { provider = "libvirt", timeout = 20 }'))
    # the operator's domain, on its own raw disk; its VHDX made from it once (here: a fresh filesystem)
    original = f"{a_dir}/vm.raw"
    with open(original, "wb") as f:
        f.truncate(96 * MiB)
    os.utime(original, (time.time() - 60, time.time() - 60))
    disk = make_disk_image(f"{a_dir}/vm.vhdx", 96 * MiB)
    console = f"{a_dir}/console.log"
    hv.create_isolated_network("lan")                       # the primary's network
    hv.conn.defineXML(primary_domain_xml("vm", kernel, initrd, console, disks=[("vda", original, "raw")],
                                         nics=[(MAC, "lan")], files=FILES, pause=0.2))
    t0 = time.monotonic()
    b.start()
    a.start()
    try:
        # ---- protection: the shut-off domain's disk is the export, at once; the initial replication runs
        m = a.wait(lambda: (x := a.machine()).get("domain", {}).get("disks_pointed") and x, "domain status")
        sock = f"{a_dir}/state/nbd/vm.sock"
        assert m["domain"]["name"] == "vm" and m["domain"]["disks_pointed"] == "now", m
        vda = hv.domain_config("vm").disk("vda")
        assert (vda.source.kind, vda.source.socket, vda.source.export) == ("nbd", sock, "vm.vhdx"), vda
        assert vda.driver.get("error_policy") == "stop"
        state = json.load(open(f"{a_dir}/state/machines/vm.json"))["data"]
        assert original in state["domain"]["originals"]["vda"] and "originals" in state["protection"]["domain"]
        a.wait(lambda: a.machine()["state"] == "Replicating", "initial replication", 90)
        log(f"protected and initially replicated in {time.monotonic() - t0:.1f} s")

        t = time.monotonic()
        hv.start("vm")
        con = console_of(hv, "vm", console)
        con.wait_for("GUEST_MOUNTED", 180)
        hv.wait_agent("vm", 120)
        log(f"vm booted on the export, agent up in {time.monotonic() - t:.1f} s")
        con.wait_rounds(2, 120)
        a.wait(lambda: (a.machine()["domain"]["state"] or "").startswith("running"), "domain running in status")

        # ---- the configuration reached the replica site with a cycle
        a.op("/v1/machines/vm/cycle")
        disk_id = a.machine()["disks"]["vm.vhdx"]["disk_id"]
        kept = json.load(open(f"{b_dir}/replica/disks/{disk_id}/domain.json"))
        assert kept["targets"] == {"vda": disk_id} and kept["domain"]["name"] == "vm"
        assert kept["domain"]["nics"][0]["source"] == "lan" and kept["domain"]["guest_agent"]

        # ---- an application-consistent point: the daemon restarted with its clock at the hour's last tick
        a.stop()
        assert hv.state("vm").state == "running"            # the export outlived the daemon, the guest runs
        shift = (HOUR - 18) - time.time() % HOUR
        at = con.rounds()
        t = time.monotonic()
        a.start(clock_shift=shift % HOUR)
        points = a.wait(lambda: [p for p in b.replica()["points"] if p["consistency"] == "application"],
                        "an application-consistent point", 60)
        app_point = points[-1]["point"]
        log(f"application-consistent point {app_point} {time.monotonic() - t:.1f} s after the restart "
            f"(guest at round {con.rounds()})")
        assert "thawed by the watchdog" not in a.text()
        assert hv.agent_command("vm", "guest-fsfreeze-status") == "thawed"
        con.wait_rounds(at + 2, 120)
        # the provider itself: frozen inside, thawed after; a block outliving the timeout is thawed by the
        # watchdog and raises QuiesceExpired (not QuiesceFailed: the scheduler labels no such cut "application")
        asyncio.run(_quiesce_provider(uri, hv))

        # ---- the export killed: the domain pauses on the I/O error, replicatord resumes it
        pid = a.machine()["export"]["pid"]
        os.kill(pid, signal.SIGKILL)
        t = time.monotonic()
        a.wait(lambda: a.machine()["export"]["pid"] != pid and a.machine()["export"]["serving"], "export restart")
        wait_state(hv, "vm", lambda s: s.state == "running", 90, "resume")
        at = con.rounds()
        con.wait_rounds(at + 2, 120)
        assert con.errors() == [], con.tail()
        log(f"export killed: domain running again {time.monotonic() - t:.1f} s later, rounds go on; "
            f"daemon: {'resumed' if 'was paused on an I/O error; resumed' in a.text() else 'never paused'}")
        a.wait(lambda: a.machine()["state"] == "Replicating", "the resynchronization after the restart", 120)

        # ---- test failover at the application-consistent point: `vm - Test` on an isolated network
        t = time.monotonic()
        view = b.op("/v1/replica/machines/vm/test-failover", {"point": app_point})
        dom = view["test_failover"]["domain"]
        assert dom["name"] == "vm - Test" and dom["network"] == "rtest", dom
        assert hv.state("vm - Test").state == "running" and hv.network_exists("rtest")
        live = ET.fromstring(hv.conn.lookupByName("vm - Test").XMLDesc(0))
        nic = next(live.iter("interface"))
        assert nic.find("source").get("network") == "rtest" and nic.find("mac").get("address") == MAC
        src = next(live.iter("disk")).find("source")
        assert src.get("protocol") == "nbd" and src.find("host").get("socket") == f"{b_dir}/state/nbd/vm.test.sock"
        test_con = console_of(hv, "vm - Test", f"{b_dir}/tf/vm/console.log")
        test_con.wait_for("GUEST_MOUNTED", 180)
        hv.wait_agent("vm - Test", 120)
        log(f"'vm - Test' booted from point {app_point} in {time.monotonic() - t:.1f} s")
        # site B restarts: the test VM's disk goes away with it (paused on the I/O error) and comes back
        test_con.wait_rounds(test_con.rounds() + 1, 120)
        b.stop()
        time.sleep(1)
        b.start()
        t = time.monotonic()
        test_con.wait_rounds(test_con.rounds() + 2, 120)
        assert hv.state("vm - Test").state == "running" and test_con.errors() == [], test_con.tail()
        log(f"site B restarted under 'vm - Test': writing again within {time.monotonic() - t:.1f} s; daemon: "
            f"{'resumed it' if 'was paused on an I/O error; resumed' in b.text() else 'never paused'}")
        # replication goes on meanwhile
        before = b.replica()["latest_point"]
        a.op("/v1/machines/vm/cycle")
        assert b.replica()["latest_point"] > before
        test_con.wait_rounds(test_con.rounds() + 1, 120)
        assert test_con.errors() == [], test_con.tail()

        b.op("/v1/replica/machines/vm/cleanup-test-failover")
        assert not hv.exists("vm - Test") and not hv.network_exists("rtest")
        assert b.replica()["test_failover"] is None and not os.path.exists(f"{b_dir}/tf/vm")

        # ---- the guest stops cleanly; a last cycle; the replica is the primary's disk
        con.wait_rounds(con.rounds() + 1, 120)
        hv.shutdown("vm", timeout=120, agent=True)
        con.wait_for("GUEST_UMOUNT_OK", 10)
        rounds = con.rounds()
        assert con.errors() == [], con.tail()
        a.op("/v1/machines/vm/cycle")
        a.stop()
        replica = _replica_image(b, disk_id)
        primary = _vhdx_bytes(disk, f"{workdir}/copy.vhdx")
        same(replica, primary, "the replica against the primary")
        raw = f"{workdir}/replica.raw"
        with open(raw, "wb") as f:
            f.write(replica)
        assert verify_image(raw) == FILES * rounds
        log(f"replica equals the primary after {rounds} rounds; {time.monotonic() - t0:.1f} s in all")

        # ---- protection removed (the machine taken out of the configuration): the shut-off domain gets its
        # own disk back, holding what the guest wrote while protected
        with open(a.config, "w") as f:
            f.write(f'[daemon]\nstate_dir = "state"\nadmin_listen = "127.0.0.1:{a.admin}"\n\n[replica]\n'
                    f'listen = "127.0.0.1"\nport = {free_port()}\n{tls("site-a")}'
                    '[[replica.allow]]\nprincipal = "nobody"\nstorage = "r"\n')
        a.start()
        a.stop()
        assert "uses its own disks again" in a.text(), a.text()
        vda = hv.domain_config("vm").disk("vda")
        assert (vda.source.kind, vda.source.path, vda.source.format) == ("file", original, "raw"), vda
        with open(original, "rb") as f:
            same(f.read(), primary, "the domain's own disk after protection was removed")
        assert not os.path.exists(f"{a_dir}/state/machines/vm.json")

        # ---- site A lost: an unplanned failover on site B boots `vm` there from the latest point; its NIC's
        # network is not mapped: left unplugged, said in the failover job's log; cancel-failover removes it
        hv.undefine("vm")                                   # gone with the primary site
        t = time.monotonic()
        view = b.op("/v1/replica/machines/vm/failover", {})
        assert view["failover"]["domain"]["name"] == "vm" and hv.state("vm").state == "running", view
        job = next(j for j in b.api("GET", "/v1/jobs")[1]["jobs"] if j["kind"] == "failover")
        notes = " | ".join(e["text"] for e in b.api("GET", f"/v1/jobs/{job['id']}")[1]["log"])
        assert "network 'lan' is not mapped, left disconnected" in notes, notes
        nic = next(ET.fromstring(hv.conn.lookupByName("vm").XMLDesc(0)).iter("interface"))
        assert nic.get("type") == "ethernet" and nic.find("link").get("state") == "down"
        fo_con = console_of(hv, "vm", f"{b_dir}/failover/vm/vm.console.log")
        fo_con.wait_for("GUEST_MOUNTED", 180)
        fo_con.wait_rounds(rounds + 1, 120)                 # its files from before, and it writes on
        assert fo_con.errors() == [], fo_con.tail()
        log(f"unplanned failover: 'vm' runs on site B, round {fo_con.rounds()}, {time.monotonic() - t:.1f} s")
        b.op("/v1/replica/machines/vm/cancel-failover")
        assert not hv.exists("vm") and b.replica()["state"] == "Replicating"
    finally:
        a.stop()
        b.stop()
        for name in ("vm - Test", "vm"):
            if hv.exists(name):
                hv.destroy(name)
                hv.undefine(name)
        for net in ("rtest", "lan"):
            hv.delete_network(net)


def _config(folder, machine: str) -> str:
    return f'[daemon]\nstate_dir = "state"\n\n[[machine]]\nname = "vm"\ntarget = "local://{folder}/r"\n{machine}'


def test_domain_machine_settings_are_checked_with_their_field(tmp_path):
    from replicator.orchestration import ConfigError, parse_config
    (tmp_path / "os.vhdx").write_bytes(b"")
    good = parse_config(_config(tmp_path, 'domain = "web 1"\ndisks = { vda = "os.vhdx" }\nexclude = ["vdb"]\n'
                                          'additional_points = 2\napp_consistent_hours = 1\n'), base_dir=str(tmp_path))
    m = good.machines[0]
    assert (m.domain, m.libvirt, m.targets, m.excluded) == ("web 1", "qemu:///system",
                                                            (("vda", str(tmp_path / "os.vhdx")),), ("vdb",))
    assert m.disks == (str(tmp_path / "os.vhdx"),)
    ips = parse_config(_config(tmp_path, 'domain = "vm"\ndisks = { vda = "os.vhdx" }\nfailover_ip = { net1 = '
                                         '"10.0.0.5/24", "52:54:00:AA:00:01" = { address = "fd00::5/64", gateway = '
                                         '"fd00::1" } }\n'), base_dir=str(tmp_path)).machines[0].failover_ips
    assert [(i.nic, i.address, i.gateway) for i in ips] == [("net1", "10.0.0.5/24", None),
                                                            ("52:54:00:aa:00:01", "fd00::5/64", "fd00::1")]
    q = m.protection.quiesce                                # a domain is quiesced through libvirt
    assert (q.provider, q.domain, q.uri) == ("libvirt", "web 1", "qemu:///system")
    cases = [
        ('domain = "vm"\ndisks = ["os.vhdx"]\n', "machine[vm].disks", "maps its disk targets to VHDX files"),
        ('domain = "vm"\ndisks = { vda = "os.raw" }\n', "machine[vm].disks.vda", "replicator vhdx convert"),
        ('domain = "vm"\ndisks = { "Vd A" = "os.vhdx" }\n', "machine[vm].disks.Vd A", "not a disk target"),
        ('domain = "vm"\ndisks = { vda = "os.vhdx" }\nexclude = ["vda"]\n', "machine[vm].exclude[0]",
         "protected or excluded, not both"),
        ('domain = "vm"\nlibvirt = "nowhere"\ndisks = { vda = "os.vhdx" }\n', "machine[vm].libvirt", "libvirt URI"),
        ('domain = "vm"\ndisks = { vda = "os.vhdx" }\nadditional_points = 2\napp_consistent_hours = 1\n'
         'quiesce = { provider = "script", pre_freeze = "/x" }\n', "machine[vm].quiesce", "through libvirt"),
        ('disks = { vda = "os.vhdx" }\n', "machine[vm].disks", "needs domain"),
        ('disks = ["os.vhdx"]\nlibvirt = "qemu:///system"\n', "machine[vm].libvirt", "only applies"),
        ('disks = ["os.vhdx"]\nquiesce = { provider = "libvirt" }\napp_consistent_hours = 1\nadditional_points = 2\n',
         "machine[vm].quiesce", "set domain"),
        ('domain = "vm"\ndisks = { vda = "os.vhdx" }\nfailover_ip = { eth0 = "10.0.0.5/24" }\n',
         "machine[vm].failover_ip.eth0", "not a NIC"),
        ('domain = "vm"\ndisks = { vda = "os.vhdx" }\nfailover_ip = { net0 = "10.0.0.5" }\n',
         "machine[vm].failover_ip.net0", "prefix length"),
        ('domain = "vm"\ndisks = { vda = "os.vhdx" }\nfailover_ip = { net0 = "10.0.0.500/24" }\n',
         "machine[vm].failover_ip.net0", "does not appear to be an IPv4 or IPv6 interface"),
        ('domain = "vm"\ndisks = { vda = "os.vhdx" }\nfailover_ip = { net0 = { address = "10.0.0.5/24", '
         'gateway = "fe80::1" } }\n', "machine[vm].failover_ip.net0", "IP version"),
        ('domain = "vm"\ndisks = { vda = "os.vhdx" }\nfailover_ip = { net0 = { addr = "10.0.0.5/24" } }\n',
         "machine[vm].failover_ip.net0", "must be"),
        ('disks = ["os.vhdx"]\nfailover_ip = { net0 = "10.0.0.5/24" }\n', "machine[vm].failover_ip",
         "only applies to a domain machine"),
        ('disks = ["os.vhdx"]\nlive_switch = false\n', "machine[vm].live_switch", "only applies to a domain machine"),
        ('domain = "vm"\ndisks = { vda = "os.vhdx" }\nlive_switch = "no"\n', "machine[vm].live_switch",
         "must be true or false"),
    ]
    for text, field, reason in cases:
        with pytest.raises(ConfigError) as e:
            parse_config(_config(tmp_path, text), base_dir=str(tmp_path))
        problems = dict(e.value.problems)
        assert field in problems and reason in problems[field], (text, e.value.message)
    replica = ('[replica]\ncert = "c"\nkey = "k"\nca = "a"\nallow = [{ principal = "x", storage = "s" }]\n'
               'network_map = { lan = "lan-b", dmz = "none" }\n')
    with pytest.raises(ConfigError) as e:
        parse_config(f'[daemon]\nstate_dir = "s"\n{replica}', base_dir=str(tmp_path))
    assert "replica.libvirt" in dict(e.value.problems)
    c = parse_config(f'[daemon]\nstate_dir = "s"\n{replica}libvirt = "qemu:///system"\n', base_dir=str(tmp_path))
    assert c.replica.network_map == {"lan": "lan-b", "dmz": None} and c.replica.test_network == "replicator-test"
    assert c.replica.boot_timeout == 300
    with pytest.raises(ConfigError) as e:
        parse_config(f'[daemon]\nstate_dir = "s"\n{replica}libvirt = "qemu:///system"\nboot_timeout = 5\n',
                     base_dir=str(tmp_path))
    assert "between 10 and 3600" in dict(e.value.problems)["replica.boot_timeout"]


def test_protection_refuses_a_domain_it_cannot_protect_with_the_reason(hv, workdir, guest_boot):
    """Before the export takes the disks: a missing VHDX (with the conversion step), a disk neither mapped nor
    excluded, a disk unknown to the domain, an original disk written after its VHDX was made; a domain running
    on its own disk is protected from its next boot (pending), its VHDX made again once it is shut off."""
    from replicator.daemon.domains import DomainProtection
    from replicator.errors import ReplicatorError
    from replicator.orchestration import MachineState, parse_config
    kernel, initrd = guest_boot
    raw = [f"{workdir}/os.raw", f"{workdir}/data.raw"]
    for p in raw:
        with open(p, "wb") as f:
            f.truncate(MiB)
    hv.conn.defineXML(primary_domain_xml("refused", kernel, initrd, f"{workdir}/c.log",
                                         disks=[("vda", raw[0], "raw"), ("vdb", raw[1], "raw")]))
    uri = hv.uri

    def check(machine: str):
        c = parse_config(_config(workdir, f'domain = "refused"\nlibvirt = "{uri}"\n{machine}'), base_dir=workdir)
        dp = DomainProtection(c.machines[0], MachineState("vm"))
        with pytest.raises(ReplicatorError) as e:
            dp.check(f"{workdir}/vm.sock")
        return e.value.message
    try:
        assert "replicator vhdx convert" in check('disks = { vda = "os.vhdx" }\nexclude = ["vdb"]\n')
        for made in ("os.vhdx", "x.vhdx"):                   # the VHDX files, made after the raw ones
            with open(f"{workdir}/{made}", "wb") as f:
                f.write(b"a VHDX")
        assert "vdb of domain 'refused' is neither protected" in check('disks = { vda = "os.vhdx" }\n')
        assert "has no disk vdc" in check('disks = { vda = "os.vhdx", vdc = "x.vhdx" }\nexclude = ["vdb"]\n')
        os.utime(raw[0], (time.time() + 30, time.time() + 30))
        assert "was written after" in check('disks = { vda = "os.vhdx" }\nexclude = ["vdb"]\n')
        # running on its own disk (firmware looking for a bootable disk, for ever): not refused, protected from
        # its next boot: its persistent definition is the export now, the running domain keeps its own disk
        root = ET.fromstring(hv.conn.lookupByName("refused").XMLDesc(0))
        os_el = root.find("os")
        for tag in ("kernel", "initrd", "cmdline"):
            os_el.remove(os_el.find(tag))
        ET.SubElement(os_el, "boot", dev="hd")
        hv.conn.defineXML(ET.tostring(root, encoding="unicode"))
        data = os.urandom(64 << 10)
        with open(raw[0], "r+b") as f:                       # what it holds (past its boot sector)
            f.seek(4096)
            f.write(data)
        os.utime(raw[0], (time.time() - 60, time.time() - 60))
        c = parse_config(_config(workdir, f'domain = "refused"\nlibvirt = "{uri}"\ndisks = {{ vda = "os.vhdx" }}\n'
                                          'exclude = ["vdb"]\nlive_switch = false\n'), base_dir=workdir)
        state = MachineState("vm")
        hv.start("refused")
        try:
            for _ in range(2):                               # and again at the next look while it runs
                with pytest.raises(ReplicatorError) as e:
                    DomainProtection(c.machines[0], state).check(f"{workdir}/vm.sock")
                assert e.value.message.startswith("protection: pending next boot: domain 'refused' is running"), \
                    e.value.message
                assert state.data["domain"]["disks_pointed"] == "next-boot" and state.data["domain"]["pending"] == ["vda"]
            vda = hv.domain_config("refused").disk("vda").source
            assert (vda.kind, vda.socket, vda.export) == ("nbd", f"{workdir}/vm.sock", "os.vhdx"), vda
            live = next(ET.fromstring(hv.conn.lookupByName("refused").XMLDesc(0)).iter("disk")).find("source")
            assert live.get("file") == raw[0]
            assert raw[0] in state.data["domain"]["originals"]["vda"]
            # what a failover waits for after the boot (domains.settle): without an agent channel, running is all;
            # with one that never answers (this firmware runs no guest), the wait ends in a one-line error
            from replicator.daemon.domains import settle
            from replicator.errors import GuestAgentError
            config = hv.domain_config("refused").to_dict()
            payload = {"domain": {**config, "guest_agent": False}, "targets": {"vda": "x"},
                       "failover_ips": {"net0": "10.0.0.5/24"}}
            out = settle(uri, "refused", payload, timeout=10)
            assert out["running"] is not None and out["agent"] is None and out["ips"] == {}, out
            assert any("no guest agent channel" in n for n in out["notes"]), out["notes"]
            assert any("has no NIC net0" in n for n in out["notes"]), out["notes"]
            t = time.monotonic()
            with pytest.raises(GuestAgentError, match="the guest agent did not answer within"):
                settle(uri, "refused", {**payload, "domain": config}, timeout=3)
            assert time.monotonic() - t < 15
        finally:
            hv.destroy("refused")
        # shut off: the VHDX is made again from the disk it ran on, and protection may start
        DomainProtection(c.machines[0], state).check(f"{workdir}/vm.sock")
        assert "pending" not in state.data["domain"] and state.data["domain"]["disks_pointed"] == "now"
        from replicator.vhdx import VhdxDisk
        with VhdxDisk.open(f"{workdir}/os.vhdx", read_only=True) as d:
            assert d.size == MiB and d.read(4096, len(data)) == data
    finally:
        hv.undefine("refused")


def test_the_local_target_keeps_the_configuration_beside_each_replica_disk(tmp_path):
    """What a local:// target keeps per cycle, and what the replica site reads back: the newest copy among the
    machine's disks; a malformed one is refused before anything is written."""
    import uuid

    from replicator.daemon.domains import CONFIG_FILE, replicated_domain
    from replicator.errors import ReplicatorError
    from replicator.hypervisor import Boot, DomainConfig
    from replicator.targets.local import LocalTarget
    config = DomainConfig(name="vm", uuid=str(uuid.uuid4()), vcpus=2, memory_kib=262144, boot=Boot(), disks=(),
                          nics=(), guest_agent=True)
    ids = [str(uuid.uuid4()), str(uuid.uuid4())]
    target = LocalTarget(str(tmp_path))

    async def run():
        for i in ids:
            await target.ensure_disk(uuid.UUID(i), MiB, name=f"{i}.vhdx", machine="vm")
        payload = {"version": 1, "machine": "vm", "time": 1.0, "domain": config.to_dict(),
                   "targets": {"vda": ids[0], "vdb": ids[1]}}
        assert await target.put_config("vm", payload, ids)
        assert await target.put_config("vm", {**payload, "time": 2.0}, ids[1:])
        with pytest.raises(ReplicatorError):
            await target.put_config("vm", {**payload, "domain": {"version": 1, "name": "x"}}, ids)
        with pytest.raises(ReplicatorError):
            await target.put_config("vm", {**payload, "version": 7}, ids)
    asyncio.run(run())
    dirs = [str(tmp_path / "disks" / i) for i in ids]
    assert all(os.path.exists(os.path.join(d, CONFIG_FILE)) for d in dirs)
    got = replicated_domain(dirs)
    assert got["time"] == 2.0 and DomainConfig.from_dict(got["domain"]) == config
    assert replicated_domain([str(tmp_path)]) is None


def test_the_peer_route_keeps_the_configuration_for_the_disk_owner_only(tmp_path):
    """PUT /v1/disks/ID/domain: the primary whose trust group owns the disk keeps its configuration there;
    another group's primary is refused (403), a malformed or oversized one too, nothing written."""
    import uuid

    from replicator.daemon.domains import replicated_domain
    from replicator.errors import ReplicatorError
    from replicator.hypervisor import Boot, DomainConfig
    from replicator.targets.peer import PeerTarget
    from replicator.transport import AuthorizationEntry, certs
    from replicator.transport.auth import AuthorizationError, ReplicaRefused
    from replicator.transport.server import ReplicaServer, ServerThread
    pki = str(tmp_path / "pki")
    certs.init_ca(pki)
    certs.issue(pki, "replica1", dns=["localhost"])
    for n in ("primary1", "intruder"):
        certs.issue(pki, n)
    root = str(tmp_path / "root")
    thread = ServerThread(ReplicaServer([AuthorizationEntry("primary1", root, "a"),
                                         AuthorizationEntry("intruder", root, "b")], mode="cert", port=0,
                                        cafile=f"{pki}/ca.pem", certfile=f"{pki}/replica1.pem",
                                        keyfile=f"{pki}/replica1.key"))
    server = thread.start()
    disk = uuid.uuid4()
    config = DomainConfig(name="vm", uuid=str(uuid.uuid4()), vcpus=1, memory_kib=131072, boot=Boot(), disks=(),
                          nics=(), guest_agent=False)
    payload = {"version": 1, "machine": "vm", "time": 1.0, "domain": config.to_dict(), "targets": {"vda": str(disk)}}

    def target(name: str) -> PeerTarget:
        return PeerTarget(server.url, cert=f"{pki}/{name}.pem", key=f"{pki}/{name}.key", ca=f"{pki}/ca.pem",
                          retries=0)

    async def go():
        owner, other = target("primary1"), target("intruder")
        try:
            await owner.ensure_disk(disk, 16 * MiB, name="vm.vhdx", machine="vm")
            assert await owner.put_config("vm", payload, [str(disk)])
            with pytest.raises(AuthorizationError, match="trust group"):
                await other.put_config("vm", {**payload, "time": 9.0}, [str(disk)])
            with pytest.raises(ReplicaRefused):
                await owner.put_config("vm", {**payload, "version": 7, "time": 9.0}, [str(disk)])
            with pytest.raises(ReplicatorError):
                await owner.put_config("vm", {**payload, "time": 9.0, "pad": "x" * (2 << 20)}, [str(disk)])
        finally:
            await owner.close()
            await other.close()
    try:
        asyncio.run(go())
    finally:
        thread.stop()
    got = replicated_domain([os.path.join(root, "disks", str(disk))])
    assert got["time"] == 1.0 and DomainConfig.from_dict(got["domain"]) == config

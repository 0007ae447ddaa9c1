"""Reading a domain's definition into a DomainConfig (disks, NICs, networks, vCPUs, memory, boot, agent),
its JSON round trip, and pointing a shut-off domain's disks at an NBD export and back, against a private
libvirtd (no guest booted here)."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from replicator.errors import DomainExists, DomainNotFound, HypervisorError
from replicator.hypervisor import NEXT_BOOT, NOW, DomainConfig, DiskSource
from replicator.hypervisor.libvirt import parse_domain

from .helpers import primary_domain_xml

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def two_disk_domain(hv, workdir, guest_boot):
    kernel, initrd = guest_boot
    for net in ("lan", "dmz"):
        hv.create_isolated_network(net)
    xml = primary_domain_xml("db1", kernel, initrd, f"{workdir}/console.log",
                             disks=[("vda", f"{workdir}/sys.qcow2", "qcow2"), ("vdb", f"{workdir}/data.raw", "raw")],
                             nics=[("52:54:00:10:00:01", "lan"), ("52:54:00:10:00:02", "dmz"),
                                   ("52:54:00:10:00:03", "lan")], vcpus=2, memory_mib=384)
    hv.conn.defineXML(xml)
    try:
        yield "db1"
    finally:
        if hv.exists("db1"):
            hv.undefine("db1")
        for net in ("lan", "dmz"):
            hv.delete_network(net)


def test_reads_a_domain_and_round_trips_it_through_json(hv, two_disk_domain, guest_boot, workdir):
    c = hv.domain_config(two_disk_domain)
    assert (c.name, c.vcpus, c.memory_kib, c.domain_type, c.hypervisor) == ("db1", 2, 384 * 1024, "qemu", "libvirt")
    assert len(c.uuid) == 36 and c.guest_agent
    assert c.boot.kernel == guest_boot[0] and c.boot.initrd == guest_boot[1] and "guest.files=4" in c.boot.cmdline
    assert c.boot.arch == "x86_64" and c.boot.machine.startswith("pc-q35")   # libvirt expands the alias
    assert [(d.target, d.bus, d.device, d.source) for d in c.disks] == [
        ("vda", "virtio", "disk", DiskSource.file(f"{workdir}/sys.qcow2", "qcow2")),
        ("vdb", "virtio", "disk", DiskSource.file(f"{workdir}/data.raw", "raw"))]
    assert c.disk("vda").driver == {"name": "qemu", "type": "qcow2", "discard": "unmap"}
    assert [(n.mac, n.model, n.kind, n.source) for n in c.nics] == [
        ("52:54:00:10:00:01", "virtio", "network", "lan"), ("52:54:00:10:00:02", "virtio", "network", "dmz"),
        ("52:54:00:10:00:03", "virtio", "network", "lan")]
    assert c.networks == ["lan", "dmz"]

    text = c.to_json()
    assert json.loads(text)["version"] == 1
    back = DomainConfig.from_json(text)
    assert back == c                                   # every field, the definition included
    assert parse_domain(back.definition) == c

    for bad in ("not json", "[]", json.dumps({**json.loads(text), "version": 99}),
                json.dumps({k: v for k, v in json.loads(text).items() if k != "disks"})):
        with pytest.raises(HypervisorError):
            DomainConfig.from_json(bad)
    with pytest.raises(DomainNotFound):
        hv.domain_config("no-such-domain")


def test_points_a_shut_off_domains_disk_at_the_export_and_back(hv, two_disk_domain, workdir):
    name = two_disk_domain
    before = hv.domain_config(name)
    sock = f"{workdir}/nbd/db1.sock"
    mode, originals = hv.point_disks_at_export(name, {"vda": (sock, "sys.vhdx")})
    assert mode == NOW and set(originals) == {"vda"}

    after = hv.domain_config(name)
    vda = after.disk("vda")
    assert vda.source == DiskSource("nbd", socket=sock, export="sys.vhdx", format="raw")
    assert vda.driver == {"name": "qemu", "type": "raw", "cache": "none", "discard": "unmap",
                          "error_policy": "stop", "rerror_policy": "stop"}
    assert (vda.target, vda.bus) == ("vda", "virtio")
    assert after.disk("vdb") == before.disk("vdb")     # not asked: untouched
    assert after.uuid == before.uuid and after.nics == before.nics
    # libvirt's own view of the disk, as docs/operations.md shows it
    disk = [d for d in ET.fromstring(hv.conn.lookupByName(name).XMLDesc(0)).iter("disk")
            if d.find("target").get("dev") == "vda"][0]
    assert disk.get("type") == "network"
    assert disk.find("source").attrib == {"protocol": "nbd", "name": "sys.vhdx"}
    assert disk.find("source/host").attrib == {"transport": "unix", "socket": sock}

    again = hv.point_disks_at_export(name, {"vda": (sock, "sys.vhdx")})
    assert again == (NOW, {})                          # already there: nothing to restore from this call

    with pytest.raises(HypervisorError, match="no disk 'vdz'"):
        hv.point_disks_at_export(name, {"vdz": (sock, "x")})

    assert hv.restore_disks(name, originals) == NOW
    assert hv.domain_config(name).disks == before.disks

    with pytest.raises(HypervisorError, match="not that disk's"):
        hv.restore_disks(name, {"vdb": originals["vda"]})


def test_define_maps_networks_and_refuses_a_taken_name(hv, two_disk_domain, workdir):
    c = hv.domain_config(two_disk_domain)
    hv.create_isolated_network("iso1")
    try:
        with pytest.raises(HypervisorError, match="no 'vhdx' disk format"):
            hv.define(c, "db1 - Test", {"vda": f"{workdir}/copy.vhdx"})   # libvirt 9.0: serve VHDX over NBD
        d = hv.define(c, "db1 - Test", {"vda": f"{workdir}/copy.qcow2", "vdb": (f"{workdir}/x.sock", "data.raw")},
                      {"lan": "iso1"})
        t = hv.domain_config("db1 - Test")
        assert t.uuid != c.uuid and d.uuid == t.uuid and d.name == "db1 - Test"
        assert t.disk("vda").source == DiskSource.file(f"{workdir}/copy.qcow2", "qcow2")
        assert t.disk("vdb").source.kind == "nbd" and t.disk("vdb").driver["error_policy"] == "stop"
        assert [(n.mac, n.kind, n.source) for n in t.nics] == [
            ("52:54:00:10:00:01", "network", "iso1"), ("52:54:00:10:00:02", "ethernet", ""),
            ("52:54:00:10:00:03", "network", "iso1")]
        assert any("'dmz' is not mapped" in n for n in d.notes), d.notes
        assert (t.vcpus, t.memory_kib, t.boot.kernel, t.guest_agent) == (c.vcpus, c.memory_kib, c.boot.kernel, True)
        with pytest.raises(DomainExists):
            hv.define(c, "db1 - Test", {"vda": f"{workdir}/copy.qcow2"})

        # only vda replicated: vdb left out and said so; the same name keeps the machine's uuid
        hv.undefine(two_disk_domain)
        d2 = hv.define(c, disks={"vda": f"{workdir}/copy.qcow2"}, network_map={"lan": "iso1", "dmz": None})
        assert d2.uuid == c.uuid and any("vdb: not replicated" in n for n in d2.notes)
        assert [x.target for x in hv.domain_config("db1").disks] == ["vda"]
    finally:
        for n in ("db1 - Test",):
            if hv.exists(n):
                hv.undefine(n)
        hv.delete_network("iso1")
    assert not hv.network_exists("iso1")


def test_defines_from_the_fields_alone(hv, two_disk_domain, workdir):
    """A configuration without libvirt's definition (written by another manager) is defined from its
    fields: the same vCPUs, memory, boot, disks (pointed at their new sources), NICs and agent."""
    c = hv.domain_config(two_disk_domain)
    bare = DomainConfig.from_dict({**c.to_dict(), "definition": "", "name": "db9"})
    hv.create_isolated_network("iso9")
    try:
        d = hv.define(bare, disks={"vda": f"{workdir}/a.qcow2", "vdb": f"{workdir}/b.raw"},
                      network_map={"lan": "iso9", "dmz": "iso9"}, keep_uuid=False)   # db1 has that one
        t = hv.domain_config("db9")
        assert d.notes == () and t.uuid != c.uuid
        assert (t.vcpus, t.memory_kib, t.domain_type, t.guest_agent) == (2, 384 * 1024, "qemu", True)
        assert (t.boot.kernel, t.boot.initrd, t.boot.cmdline) == (c.boot.kernel, c.boot.initrd, c.boot.cmdline)
        assert [(x.target, x.bus, x.source) for x in t.disks] == [
            ("vda", "virtio", DiskSource.file(f"{workdir}/a.qcow2", "qcow2")),
            ("vdb", "virtio", DiskSource.file(f"{workdir}/b.raw", "raw"))]
        assert [(n.mac, n.model, n.source) for n in t.nics] == [(n.mac, n.model, "iso9") for n in c.nics]
    finally:
        if hv.exists("db9"):
            hv.undefine("db9")
        hv.delete_network("iso9")


def test_an_unreachable_hypervisor_is_one_error(workdir):
    from replicator.hypervisor import Hypervisor
    with pytest.raises(HypervisorError, match="connect to") as e:
        Hypervisor.open(f"qemu+unix:///system?socket={workdir}/no-such-sock")
    assert e.value.exit_code == 17

"""Protecting a domain that runs on its own disk, with replicatord and a real TCG guest (private libvirtd).

At its next boot (`live_switch = false`):
- the guest runs on its raw disk and writes; its VHDX was made from that disk before (so it is stale now);
- replicatord is not refused: it points the domain's persistent definition at the export (the running guest
  keeps its disk) and status says `protection: pending next boot`;
- the guest shuts down cleanly; replicatord makes the VHDX again from the disk the guest ran on, and protection
  starts (initial replication to a local target);
- the domain starts on the export, and the guest finds every file it wrote on its own disk (carrying on at
  the next round, every manifest entry with its checksum).

While it runs (the default): the VHDX made from a disk of random bytes (stale in every block), replicatord
copies the running guest's disk into the export and switches the guest onto it (libvirt block copy + pivot),
status shows `disks_pointed: live` and the error policy the disk keeps until its next boot; the guest writes
on without an error, cycles replicate it; after a clean shutdown the replica holds every file the guest
wrote, before and after the switch, and its next boot (on the export) finds them all.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import xml.etree.ElementTree as ET

import pytest

from ..daemon.two_sites import BIN
from ..guest.harness import MiB, verify_image
from .conftest import log
from .helpers import Site, all_files_there, console_of, first_round, machine_toml, primary_domain_xml

pytestmark = pytest.mark.timeout(300)
FILES = 4


def _guest_on_its_own_disk(hv, a_dir: str, kernel: str, initrd: str, vhdx_from: str | None = None) -> tuple:
    """The domain `vm` defined on its own raw ext4 disk, its VHDX made before (from `vhdx_from`, default that
    disk), started, its guest writing (round 2 done). Returns (its disk, its console, the start time)."""
    os.makedirs(a_dir, exist_ok=True)
    original = f"{a_dir}/vm.raw"
    with open(original, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=0,lazy_journal_init=0", original],
                   check=True, capture_output=True)
    if vhdx_from is not None:
        with open(f"{a_dir}/{vhdx_from}", "wb") as f:
            f.write(os.urandom(64 * MiB))
    subprocess.run([os.path.join(BIN, "replicator"), "vhdx", "convert", "-O", "vhdx",
                    f"{a_dir}/{vhdx_from}" if vhdx_from else original, f"{a_dir}/vm.vhdx"], check=True,
                   capture_output=True)
    console = f"{a_dir}/console.log"
    hv.conn.defineXML(primary_domain_xml("vm", kernel, initrd, console, disks=[("vda", original, "raw")],
                                         memory_mib=192, files=FILES, pause=0.3))
    t0 = time.monotonic()
    hv.start("vm")
    con = console_of(hv, "vm", console)
    con.wait_for("GUEST_MOUNTED", 120)
    hv.wait_agent("vm", 120)
    con.wait_rounds(2, 120)
    return original, con, t0


def test_a_running_domain_is_protected_from_its_next_boot(hv, workdir, guest_boot, private_libvirtd):
    kernel, initrd = guest_boot
    a_dir = f"{workdir}/a"
    a = Site(a_dir, "site-a", machine_toml("vm", private_libvirtd.uri, f"local://{a_dir}/replica", "live_switch = false"))
    try:
        original, con, t0 = _guest_on_its_own_disk(hv, a_dir, kernel, initrd)
        console = f"{a_dir}/console.log"

        # ---- running on its own disk: pending next boot, its persistent definition on the export
        a.start()
        m = a.wait(lambda: "pending next boot" in ((x := a.machine()).get("reason") or "") and x, "pending", 30)
        assert m["reason"].startswith("protection: pending next boot: domain 'vm' is running"), m
        shown = subprocess.run([os.path.join(BIN, "replicator"), "status", "--config", a.config], capture_output=True,
                               text=True, cwd=a_dir).stdout
        assert m["state"] == "ReadyForInitialReplication" and m["stats"]["health"] == "Warning", m   # not broken
        assert ("vm: ReadyForInitialReplication (protection: pending next boot: domain 'vm' is running on its own "
                "disks (vda)") in shown, shown
        vda = hv.domain_config("vm").disk("vda").source
        assert (vda.kind, vda.socket) == ("nbd", f"{a_dir}/state/nbd/vm.sock"), vda
        live = next(ET.fromstring(hv.conn.lookupByName("vm").XMLDesc(0)).iter("disk")).find("source")
        assert live.get("file") == original and hv.state("vm").state == "running"
        con.wait_rounds(con.rounds() + 2, 120)               # the guest writes on, on its own disk

        # ---- shut off: the VHDX is made again from its disk, protection starts
        hv.shutdown("vm", timeout=60, agent=True)
        con.wait_for("GUEST_UMOUNT_OK", 5)
        rounds = con.rounds()
        t = time.monotonic()
        m = a.wait(lambda: (x := a.machine())["state"] == "Replicating" and x, "protection", 75)
        assert m["domain"]["disks_pointed"] == "now", m
        assert "making" in a.text() and "again from" in a.text(), a.text()
        log(f"shut off after {rounds} rounds; protected {time.monotonic() - t:.1f} s later")

        # ---- its next boot is on the export, with everything it wrote on its own disk
        hv.start("vm")
        con = console_of(hv, "vm", console)
        con.wait_for("GUEST_MOUNTED", 120)
        assert first_round(con) == rounds + 1, con.tail()
        hv.wait_agent("vm", 120)
        assert all_files_there(hv, "vm", FILES * rounds) == FILES * rounds
        live = next(ET.fromstring(hv.conn.lookupByName("vm").XMLDesc(0)).iter("disk")).find("source")
        assert live.get("protocol") == "nbd", ET.tostring(live)
        con.wait_rounds(rounds + 2, 120)
        a.op("/v1/machines/vm/cycle")
        assert con.errors() == [], con.tail()
        log(f"{time.monotonic() - t0:.1f} s in all")
    finally:
        a.stop()
        if hv.exists("vm"):
            hv.destroy("vm")
            hv.undefine("vm")


def _replica_raw(folder: str, out: str) -> None:
    """The newest replica generation of the machine's one disk (local target) as a raw image."""
    disk = next(os.scandir(f"{folder}/disks"))
    with open(f"{disk.path}/state.json") as f:
        chain = json.load(f)["chain"]
    subprocess.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", f"{disk.path}/chain/{chain[-1]}", out], check=True,
                   capture_output=True)


def test_a_running_domain_is_switched_onto_the_export_while_it_runs(hv, workdir, guest_boot, private_libvirtd):
    kernel, initrd = guest_boot
    a_dir = f"{workdir}/a"
    a = Site(a_dir, "site-a", machine_toml("vm", private_libvirtd.uri, f"local://{a_dir}/replica"))
    try:                                                    # its VHDX: wrong in every block, zeros included
        _, con, t0 = _guest_on_its_own_disk(hv, a_dir, kernel, initrd, vhdx_from="stale.raw")
        console = f"{a_dir}/console.log"
        at = con.rounds()
        a.start()
        m = a.wait(lambda: (x := a.machine())["state"] == "Replicating" and x, "protection", 90)
        assert m["domain"]["disks_pointed"] == "live" and m["domain"]["live"]["error_policy"] == {"vda": "report"}, m
        assert "switched onto the export while it runs" in a.text(), a.text()
        shown = subprocess.run([os.path.join(BIN, "replicator"), "status", "--config", a.config], capture_output=True,
                               text=True, cwd=a_dir)
        assert "domain vm: running; protection: its disks were switched onto the export while it ran (vda keep " \
               "error policy report until its next boot)" in shown.stdout, (shown.stdout, shown.stderr)
        live = next(ET.fromstring(hv.conn.lookupByName("vm").XMLDesc(0)).iter("disk")).find("source")
        assert live.get("protocol") == "nbd" and live.find("host").get("socket") == f"{a_dir}/state/nbd/vm.sock"
        assert hv.state("vm").state == "running" and con.rounds() >= at     # it never stopped
        vda = hv.domain_config("vm").disk("vda")
        assert vda.source.kind == "nbd" and vda.driver.get("error_policy") == "stop"    # from its next boot
        log(f"switched live and replicated {time.monotonic() - t0:.1f} s after the start (guest at round "
            f"{con.rounds()}, from round {at})")
        con.wait_rounds(con.rounds() + 3, 120)
        a.op("/v1/machines/vm/cycle")
        assert con.errors() == [], con.tail()

        hv.shutdown("vm", timeout=60, agent=True)
        con.wait_for("GUEST_UMOUNT_OK", 5)
        rounds = con.rounds()
        a.op("/v1/machines/vm/cycle")
        _replica_raw(f"{a_dir}/replica", f"{workdir}/replica.raw")
        assert verify_image(f"{workdir}/replica.raw") == FILES * rounds   # clean fs, every file, both sides of it
        hv.start("vm")
        con = console_of(hv, "vm", console)
        con.wait_for("GUEST_MOUNTED", 120)
        assert first_round(con) == rounds + 1, con.tail()
        log(f"{rounds} rounds, all in the replica; {time.monotonic() - t0:.1f} s in all")
    finally:
        a.stop()
        if hv.exists("vm"):
            hv.destroy("vm")
            hv.undefine("vm")

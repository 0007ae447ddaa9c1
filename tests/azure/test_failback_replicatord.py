"""Failover to Azure and failback through replicatord, as an operator runs them: `replicator machine vm01
azure-failover` (the machine point's blobs and the ARM template of [machine.azure_vm]), the Azure VM writes
to its disk blobs (simulated with the plain SDK), `failback --mode minimize-downtime` (a pass while it runs)
and `failback --final` (after it stops): the on-premises disks end byte-identical to the blobs, only the
differing blocks are written, and replication to Azure resumes with a checksum resync that sends only
what Azure lacks; the next cycle lands on Azure."""
from __future__ import annotations

import json
import os
import re
import subprocess

from replicator.azure.digests import BLOCK
from replicator.azure.export import export_point

from ..daemon.test_replicatord import BIN
from .test_replicatord_azure import MiB, Site, _fresh, azure
from .test_settings_azure import VM

KiB = 1 << 10


def machine_data(site) -> dict:
    with open(site.dir / "state" / "machines" / "vm01.json") as f:
        return json.load(f)


def blob_bytes(site, blob: str, size: int) -> bytes:
    async def read(t):
        return await (await t.container.get_blob_client(blob).download_blob(offset=0, length=size)).readall()
    return azure(site, read)


def vm_writes(site, blob: str, *writes: tuple[int, bytes]) -> None:
    """The Azure VM writes to its disk (the failover blob)."""
    async def put(t):
        c = t.container.get_blob_client(blob)
        for at, data in writes:
            await c.upload_page(data, offset=at, length=len(data))
    azure(site, put)


async def _exists(t, blob: str) -> bool:
    return await t.container.get_blob_client(blob).exists()


def sent_since(site, mark: int) -> float:
    with open(site.dir / "daemon.log") as f:
        f.seek(mark)
        return sum(float(x) for x in re.findall(r"([0-9.]+) MiB sent", f.read())) * MiB


def test_failover_to_azure_and_failback_minimize_downtime_through_replicatord(azurite, tmp_path):
    site = Site(tmp_path, azurite)
    site.url = site.url.replace("/replicas?", "/failback?")        # Azurite is shared: a container of its own
    with open(site.config) as f:
        text = f.read().replace("/replicas?", "/failback?")
    with open(site.config, "w") as f:
        f.write(text + VM)
    site.start()
    try:
        site.qemu_io("d0.vhdx", "write -P 0x31 2M 3M")
        site.cli("machine", "vm01", "cycle")

        # a test failover: test blobs and a template on the isolated VNet; replication goes on meanwhile
        site.cli("machine", "vm01", "azure-test-failover")
        test = machine_data(site)["data"]["azure_test_failover"]
        with open(test["template"]) as f:
            assert "virtualNetworks/iso" in f.read()
        assert blob_bytes(site, test["blobs"]["d0.vhdx"], 64 * MiB) == site.disk_bytes("d0.vhdx")
        site.qemu_io("d1.vhdx", "write -P 0x12 8M 64k")
        site.cli("machine", "vm01", "cycle")
        st = site.status()["machines"][0]
        assert st["state"] == "Replicating" and st["stats"], st
        site.cli("machine", "vm01", "azure-cleanup-test-failover")
        assert "azure_test_failover" not in machine_data(site)["data"] and not os.path.exists(test["template"])
        assert machine_data(site)["test_failover"] is None
        assert not azure(site, lambda t: _exists(t, test["blobs"]["d0.vhdx"]))

        out = site.cli("machine", "vm01", "azure-failover")
        assert "FailedOverWaitingCompletion" in out, out
        rec = machine_data(site)["data"]["azure_failover"]
        blobs = rec["blobs"]
        assert set(blobs) == {"d0.vhdx", "d1.vhdx"}
        with open(rec["template"]) as f:
            template = json.load(f)
        uris = json.dumps(template)
        assert all(blob in uris for blob in blobs.values())

        # the on-premises copy diverges after the failover (the primary wrote before it went down) ...
        site.qemu_io("d0.vhdx", "write -P 0x44 40M 64k")
        # ... and the Azure VM runs and writes: 3 blocks on d0, 1 on d1
        vm_writes(site, blobs["d0.vhdx"], (1 * MiB, os.urandom(128 * KiB)), (30 * MiB, os.urandom(4 * KiB)))
        vm_writes(site, blobs["d1.vhdx"], (5 * MiB, os.urandom(512)))
        refused = subprocess.run([os.path.join(BIN, "replicator"), "machine", "vm01", "failback", "--mode",
                                  "sideways", "--config", site.config], capture_output=True, text=True)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr

        out = site.cli("machine", "vm01", "failback", "--mode", "minimize-downtime")
        assert "FailbackInProgress" in out and "--final" in out, out
        first = machine_data(site)["data"]["azure_failover"]["failback"]["last"]
        assert first["blocks_written"] == 2 + 1 + 1 + 1, first        # the VM's 4 blocks and the diverged one

        # the VM keeps running (one more block), then it is stopped: the final pass
        vm_writes(site, blobs["d0.vhdx"], (50 * MiB, os.urandom(8 * KiB)))
        mark = os.path.getsize(tmp_path / "daemon.log")
        out = site.cli("machine", "vm01", "failback", "--final")
        st = site.status()["machines"][0]
        assert st["state"] == "Replicating", (out, st)
        done = machine_data(site)["data"]["azure_failback"]
        assert done["blocks_written"] == 1 and done["passes"] == 2, done
        for disk, size in (("d0.vhdx", 64 * MiB), ("d1.vhdx", 16 * MiB)):
            assert site.disk_bytes(disk) == blob_bytes(site, blobs[disk], size), disk

        # replication to Azure resumed from here with a checksum resync: only what the VM wrote went
        sent = sent_since(site, mark)
        vm_wrote = (2 + 1 + 1 + 1) * BLOCK          # blocks the Azure VM wrote (the diverged one is Azure's again)
        assert vm_wrote - BLOCK < sent <= vm_wrote + 0.02 * MiB, sent      # the log rounds to 0.01 MiB
        history = [h["event"] for h in machine_data(site)["history"]]
        assert history[-7:] == ["failover", "failover_done", "failback_start", "failback_done", "resync_needed",
                                "resync_start", "resync_done"], history
        print(f"failback: first pass wrote {first['blocks_written']} blocks, final pass {done['blocks_written']}; "
              f"the resync after it sent {sent / MiB:.2f} MiB")

        # the next cycle lands on Azure
        site.qemu_io("d1.vhdx", "write -P 0x77 1M 256k")
        site.cli("machine", "vm01", "cycle")
        _, _ = azure(site, lambda t: export_point(t, "vm01", None, str(_fresh(tmp_path / "after"))))
        for disk in ("d0.vhdx", "d1.vhdx"):
            with open(tmp_path / "after" / f"{disk}.vhd", "rb") as f:
                want = site.disk_bytes(disk)
                assert f.read(len(want)) == want, disk

        # the CLI takes the target, the key and the VM from the machine's settings: a test failover
        out = site.cli("azure", "failover-machine", "vm01", "--test", "--template", str(tmp_path / "test.json"))
        assert "disk d0.vhdx: http" in out and "disk d1.vhdx: http" in out, out
        with open(tmp_path / "test.json") as f:
            assert "virtualNetworks/iso" in f.read()          # the test failover's NICs: the isolated VNet
    finally:
        if site.proc.poll() is None:
            site.stop()


def test_failback_full_download_and_refusals_through_replicatord(azurite, tmp_path):
    site = Site(tmp_path, azurite)
    site.url = site.url.replace("/replicas?", "/fullback?")
    with open(site.config) as f:
        text = f.read().replace("/replicas?", "/fullback?")
    with open(site.config, "w") as f:
        f.write(text)                           # no [machine.azure_vm]: blobs without a template
    site.start()
    try:
        def refused(*args) -> str:
            r = subprocess.run([os.path.join(BIN, "replicator"), "machine", "vm01", *args, "--config", site.config],
                               capture_output=True, text=True)
            assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r
            return r.stderr
        assert "needs a failover to Azure first" in refused("failback", "--mode", "full")
        assert "has no recovery point 7" in refused("azure-failover", "--point", "7")
        assert site.status()["machines"][0]["state"] == "Replicating"       # a refusal moves nothing

        site.cli("machine", "vm01", "azure-failover")
        rec = machine_data(site)["data"]["azure_failover"]
        assert rec["template"] == ""
        vm_writes(site, rec["blobs"]["d1.vhdx"], (3 * MiB, os.urandom(64 * KiB)))
        assert "already failed over to Azure" in refused("azure-failover")     # its VM may run from the blobs
        site.cli("machine", "vm01", "failback", "--mode", "full")
        assert site.status()["machines"][0]["state"] == "Replicating"
        done = machine_data(site)["data"]["azure_failback"]
        assert done["blocks_written"] == (64 + 16) * MiB // BLOCK and done["passes"] == 1   # every block
        for disk, size in (("d0.vhdx", 64 * MiB), ("d1.vhdx", 16 * MiB)):
            assert site.disk_bytes(disk) == blob_bytes(site, rec["blobs"][disk], size), disk
        jobs = json.loads(site.cli("jobs", "--machine", "vm01", "--json"))
        fb = [j for j in jobs if j["kind"] == "failback"]
        assert len(fb) == 1 and fb[0]["state"] == "succeeded" and fb[0]["bytes_done"] == fb[0]["bytes_total"] \
            == 80 * MiB, fb
    finally:
        if site.proc.poll() is None:
            site.stop()

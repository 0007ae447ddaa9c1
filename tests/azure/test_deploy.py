"""Failover of a machine to a deployable VM: a machine point becomes one fixed-VHD blob per disk (equal
to the primary at the cut), and the ARM template names those blobs, the OS disk, the NICs capped at the
size's limit on the mapped VNet's subnets with the target IPs; a test failover targets the isolated VNet.
Azure's deploy-time rules are refused in one line before any blob is written. No network to Azure: the
template's structure and references are checked."""
from __future__ import annotations

import argparse
import copy
import json

import pytest

from replicator.azure.azurite import DEV_ACCOUNT
from replicator.azure.deploy import VmSpec, arm_template, failover_machine
from replicator.azure.meta import disk_area
from replicator.cli import azure as azure_cli
from replicator.disk.vhd import FIXED, parse_footer
from replicator.errors import UsageError

from .helpers import MiB, Primary, blob_bytes, new_container, run, target

PROD = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/prod"
ISO = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/dr-test"
SPEC = {"name": "vm01", "size": "Standard_D2s_v3", "os_disk": "sys",
        "nics": [{"network": "lan", "subnet": "backend", "ip": "10.1.1.10"},
                 {"network": "dmz", "subnet": "gone"},
                 {"network": "lan", "subnet": "frontend", "ip": "10.1.0.9"}],
        "network_map": {"lan": "prod", "dmz": "prod"},
        "vnets": {"prod": {"id": PROD, "subnets": {"frontend": "10.1.0.0/24", "backend": "10.1.1.0/24"}},
                  "iso": {"id": ISO, "subnets": {"isolated": "10.9.0.0/24", "backend": "10.1.1.0/24"}}},
        "test_vnet": "iso"}


def res(template, kind):
    return [r for r in template["resources"] if r["type"] == kind]


def check_references(template) -> None:
    names = {(r["type"], r["name"]) for r in template["resources"]}
    vm = res(template, "Microsoft.Compute/virtualMachines")[0]
    refs = vm["dependsOn"] + [vm["properties"]["storageProfile"]["osDisk"]["managedDisk"]["id"]] + \
        [d["managedDisk"]["id"] for d in vm["properties"]["storageProfile"]["dataDisks"]] + \
        [n["id"] for n in vm["properties"]["networkProfile"]["networkInterfaces"]]
    for ref in refs:
        kind, name = ref[len("[resourceId('"):-len("')]")].split("', '")
        assert (kind, name) in names, ref


def test_machine_failover_to_blobs_and_an_arm_template(azurite, tmp_path, capsys):
    async def setup():
        c = await new_container(azurite)
        t = target(c)
        disks = [Primary(tmp_path, 3 * MiB, seed=61), Primary(tmp_path, 2 * MiB + 512, seed=62)]
        now = [1_767_225_600.0]
        for p, name in zip(disks, ("sys", "data")):
            p.clock = lambda: now[0]                     # an hour apart: both points are kept
            p.scatter(8)
            await t.ensure_disk(p.disk_id, p.size, name, "vm01")
        for k in (1, 2):
            now[0] += 3600
            for p in disks:
                sid, path = p.initial() if p.generation == 0 else p.cycle()
                await t.send(p.disk_id, sid, path)
                await t.commit(p.disk_id, sid)
            for p in disks:
                await t.checkpoint(p.disk_id, p.generation, k, False, 1)
        return c, t, disks

    async def go():
        c, t, (sys_d, data_d) = await setup()
        before = sorted([b.name async for b in c.list_blobs()])
        spec = VmSpec.from_json(SPEC)
        for change, why in ((lambda s: s["network_map"].update(dmz="iso"), "one VNet"),
                            (lambda s: s["nics"][0].update(ip="10.1.2.10"), "not in its subnet"),
                            (lambda s: s["nics"][0].update(ip="10.1.1.1"), "reserves"),
                            (lambda s: s.update(size="Standard_Z9"), "max_nics"),
                            (lambda s: s.update(os_disk="nope"), "os_disk"),
                            (lambda s: s["network_map"].pop("dmz"), "not in network_map")):
            bad = copy.deepcopy(SPEC)
            change(bad)
            with pytest.raises(UsageError, match=why):
                await failover_machine(t, "vm01", spec=VmSpec.from_json(bad))
        assert sorted([b.name async for b in c.list_blobs()]) == before          # refused before writing

        fo = await failover_machine(t, "vm01", 1, spec=spec)
        assert fo.point.point == 1 and set(fo.disks) == {str(sys_d.disk_id), str(data_d.disk_id)}
        for p in (sys_d, data_d):
            r = fo.disks[str(p.disk_id)]
            data = await blob_bytes(c, r.blob)
            assert data[:p.size] == p.history[1] and r.blob.endswith("-failover-p1.vhd")
            assert parse_footer(data[disk_area(p.size):], disk_area(p.size), r.blob).disk_type == FIXED
        tpl = arm_template(fo, spec)
        check_references(tpl)
        disks = res(tpl, "Microsoft.Compute/disks")
        assert [d["properties"]["creationData"]["sourceUri"] for d in disks] == \
            [fo.disks[str(sys_d.disk_id)].url, fo.disks[str(data_d.disk_id)].url]
        assert disks[0]["properties"]["osType"] == "Linux" and "osType" not in disks[1]["properties"]
        assert all(d["properties"]["creationData"]["createOption"] == "Import" for d in disks)
        nics = res(tpl, "Microsoft.Network/networkInterfaces")
        assert len(nics) == 2                                       # three source NICs, the size takes two
        conf = [n["properties"]["ipConfigurations"][0]["properties"] for n in nics]
        assert conf[0] == {"subnet": {"id": f"{PROD}/subnets/backend"}, "privateIPAllocationMethod": "Static",
                           "privateIPAddress": "10.1.1.10"}
        assert conf[1] == {"subnet": {"id": f"{PROD}/subnets/frontend"}, "privateIPAllocationMethod": "Dynamic"}
        vm = res(tpl, "Microsoft.Compute/virtualMachines")[0]
        assert vm["properties"]["hardwareProfile"]["vmSize"] == "Standard_D2s_v3"
        assert [n["properties"]["primary"] for n in vm["properties"]["networkProfile"]["networkInterfaces"]] == \
            [True, False]
        assert [d["lun"] for d in vm["properties"]["storageProfile"]["dataDisks"]] == [0]

        test = await failover_machine(t, "vm01", test=True, spec=spec)          # the latest point, isolated
        assert test.point.point == 2
        ttpl = arm_template(test, spec)
        check_references(ttpl)
        tconf = [n["properties"]["ipConfigurations"][0]["properties"]
                 for n in res(ttpl, "Microsoft.Network/networkInterfaces")]
        assert [x["subnet"]["id"] for x in tconf] == [f"{ISO}/subnets/backend", f"{ISO}/subnets/isolated"]
        assert tconf[0].get("privateIPAddress") == "10.1.1.10"
        assert res(ttpl, "Microsoft.Compute/virtualMachines")[0]["name"] == "vm01-test"
        for p in (sys_d, data_d):
            assert (await blob_bytes(c, test.disks[str(p.disk_id)].blob))[:p.size] == p.history[2]
        await t.close()
        await c.close()
        return c.container_name

    name = run(go())
    spec_path = tmp_path / "vm01.json"
    spec_path.write_text(json.dumps(SPEC))
    parser = argparse.ArgumentParser()
    azure_cli.register(parser.add_subparsers(dest="area"))
    url = f"azure://{DEV_ACCOUNT}/{name}?endpoint={azurite.account_url}"
    args = parser.parse_args(["azure", "failover-machine", "--to", url, "vm01", "--point", "2", "--vm",
                              str(spec_path), "--template", str(tmp_path / "vm01-arm.json")])
    assert args.func(args) == 0
    assert "az deployment group create" in capsys.readouterr().out
    check_references(json.loads((tmp_path / "vm01-arm.json").read_text()))

"""Failover of a machine to a deployable Azure VM: every disk of a machine point becomes a fixed-VHD page
blob (decrypted if the replica is encrypted), and an ARM template creates managed disks from those blobs
and the VM: its size, its NICs (the source's, capped at what the size allows), each on the mapped VNet's
subnet of the source subnet's name (or else the first), with the target IP where one is set. A test
failover's template puts the NICs on the isolated test VNet instead. The operator deploys it:

    az deployment group create -g RG --template-file vm01.json --parameters storageAccountId=ID

Azure rules checked before the template is written (each refusal is one line): all NICs of a VM in one
VNet, at most the size's NIC count, a static IP inside its subnet and not one of the five addresses Azure
reserves in every subnet.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import re
from dataclasses import dataclass, field

from ..errors import UsageError
from .failover import FailoverResult, failover
from .points import MachinePoint, pick

# Most NICs a VM size takes (Azure's published limits for common sizes); other sizes need `max_nics`.
MAX_NICS = {
    "Standard_B1s": 2, "Standard_B1ms": 2, "Standard_B2s": 3, "Standard_B2ms": 3, "Standard_B4ms": 4,
    "Standard_D2s_v3": 2, "Standard_D4s_v3": 2, "Standard_D8s_v3": 4, "Standard_D16s_v3": 8,
    "Standard_D2s_v5": 2, "Standard_D4s_v5": 2, "Standard_D8s_v5": 4, "Standard_D16s_v5": 8,
    "Standard_DS1_v2": 2, "Standard_DS2_v2": 2, "Standard_DS3_v2": 4, "Standard_DS4_v2": 8,
    "Standard_E2s_v3": 2, "Standard_E4s_v3": 2, "Standard_E8s_v3": 4, "Standard_E16s_v3": 8,
    "Standard_F2s_v2": 2, "Standard_F4s_v2": 2, "Standard_F8s_v2": 4, "Standard_F16s_v2": 4,
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass
class Nic:
    network: str                  # the source network (network_map's key)
    subnet: str = ""              # the source subnet's name
    ip: str = ""                  # the target IP ("" = dynamic)


@dataclass
class Vnet:
    id: str                       # resource id
    subnets: dict[str, str]       # name -> prefix (CIDR), in the VNet's order


@dataclass
class VmSpec:
    """What the template needs beyond the disks (a JSON file for the CLI: see from_json)."""
    name: str
    size: str
    os_disk: str                  # the name (or id) of the disk that boots
    nics: list[Nic]
    network_map: dict[str, str]   # source network -> target VNet name (a key of vnets)
    vnets: dict[str, Vnet]
    test_vnet: str = ""           # the isolated VNet of test failovers (a key of vnets)
    os_type: str = "Linux"
    max_nics: int | None = None
    disk_sku: str = "Standard_LRS"

    @classmethod
    def from_json(cls, raw: dict) -> "VmSpec":
        try:
            vnets = {k: Vnet(v["id"], dict(v["subnets"])) for k, v in raw.get("vnets", {}).items()}
            spec = cls(raw["name"], raw["size"], raw["os_disk"], [Nic(**n) for n in raw.get("nics", [])],
                       dict(raw.get("network_map", {})), vnets, raw.get("test_vnet", ""),
                       raw.get("os_type", "Linux"), raw.get("max_nics"), raw.get("disk_sku", "Standard_LRS"))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UsageError(f"VM spec: missing or malformed field ({e})") from None
        if not _NAME.match(spec.name):
            raise UsageError(f"VM spec: {spec.name!r} is not a usable VM name")
        if spec.os_type not in ("Linux", "Windows"):
            raise UsageError(f"VM spec: os_type must be Linux or Windows, not {spec.os_type!r}")
        return spec


@dataclass
class MachineFailover:
    machine: str
    point: MachinePoint
    test: bool
    disks: dict[str, FailoverResult] = field(default_factory=dict)   # disk id -> its new blob


async def failover_machine(target, machine: str, point: int | None = None, *, test: bool = False,
                           verify: bool = True, spec: VmSpec | None = None) -> MachineFailover:
    """Every disk of the machine at one point, each to its own verified fixed-VHD blob; all or none (the
    blobs made before a failure are deleted). A wrong key, or a VM spec the template would refuse, is
    refused before any blob exists."""
    mp = await pick(target, machine, point)
    target.check_keys(mp)
    if spec is not None:
        _os_disk(mp, spec)
        plan_nics(spec, test)
    out = MachineFailover(machine, mp, test)
    try:
        for part in mp.disks.values():
            snap = next((p for p in await target.points(part.disk_id) if p.snapshot == part.snapshot), None)
            if snap is None:
                raise UsageError(f"point {mp.point} of {machine}: the snapshot of disk {part.disk_id} is gone")
            dest = None if test else f"{target.prefix}{part.disk_id}-failover-p{mp.point}.vhd"
            out.disks[part.disk_id] = await failover(target, part.disk_id, point=snap, test=test, dest=dest,
                                                     verify=verify)
    except BaseException:
        for r in out.disks.values():
            with contextlib.suppress(Exception):
                await target.container.get_blob_client(r.blob).delete_blob()
        raise
    return out


def _os_disk(mp: MachinePoint, spec: VmSpec) -> str:
    found = [d for d, p in mp.disks.items() if spec.os_disk in (p.name, d)]
    if len(found) != 1:
        raise UsageError(f"VM spec: os_disk {spec.os_disk!r} names no disk of {mp.machine} (have "
                         f"{sorted(p.name or d for d, p in mp.disks.items())})")
    return found[0]


def max_nics(spec: VmSpec) -> int:
    if spec.max_nics is not None:
        return spec.max_nics
    if spec.size not in MAX_NICS:
        raise UsageError(f"VM size {spec.size}: its NIC limit is not known here; set max_nics in the VM spec")
    return MAX_NICS[spec.size]


def _subnet(vnet: Vnet, name: str) -> str:
    if not vnet.subnets:
        raise UsageError(f"VNet {vnet.id} has no subnet")
    return name if name in vnet.subnets else next(iter(vnet.subnets))


def _check_ip(ip: str, prefix: str, where: str) -> None:
    try:
        addr, net = ipaddress.ip_address(ip), ipaddress.ip_network(prefix, strict=False)
    except ValueError as e:
        raise UsageError(f"{where}: {e}") from None
    if addr not in net:
        raise UsageError(f"{where}: target IP {ip} is not in its subnet {prefix}")
    reserved = {net.network_address + i for i in range(4)} | {net.broadcast_address}
    if addr in reserved:
        raise UsageError(f"{where}: target IP {ip} is one of the addresses Azure reserves in {prefix}")


def plan_nics(spec: VmSpec, test: bool) -> list[dict]:
    """Per NIC kept: vnet, subnet, ip ("" = dynamic). The seed's rule: the source's NICs, capped at what
    the size allows; all on one VNet (an Azure rule)."""
    keep = spec.nics[:max_nics(spec)]
    if not keep:
        raise UsageError(f"VM {spec.name}: the source has no NIC to carry over")
    out = []
    for i, nic in enumerate(keep):
        where = f"VM {spec.name} NIC {i}"
        name = spec.test_vnet if test else spec.network_map.get(nic.network)
        if not name:
            raise UsageError(f"{where}: " + ("no test_vnet in the VM spec" if test else
                                              f"source network {nic.network!r} is not in network_map"))
        if name not in spec.vnets:
            raise UsageError(f"{where}: VNet {name!r} is not described under vnets")
        vnet = spec.vnets[name]
        subnet = _subnet(vnet, nic.subnet)
        ip = nic.ip
        if ip and test:                 # the isolated network may reuse the address if it fits its subnet
            with contextlib.suppress(UsageError):
                _check_ip(ip, vnet.subnets[subnet], where)
                out.append({"vnet": vnet.id, "subnet": subnet, "ip": ip})
                continue
            ip = ""
        elif ip:
            _check_ip(ip, vnet.subnets[subnet], where)
        out.append({"vnet": vnet.id, "subnet": subnet, "ip": ip})
    if len({n["vnet"] for n in out}) > 1:
        vnets = ", ".join(sorted({n["vnet"] for n in out}))
        raise UsageError(f"VM {spec.name}: its NICs map to different VNets ({vnets}"
                         "); Azure puts every NIC of a VM in one VNet: map the source networks to one")
    return out


def arm_template(fo: MachineFailover, spec: VmSpec) -> dict:
    """The ARM deployment template (parameters: location, storageAccountId of the blobs' account)."""
    parts = fo.point.disks
    names = {d: (p.name or d) for d, p in parts.items()}
    os_disks = [_os_disk(fo.point, spec)]
    nics = plan_nics(spec, fo.test)
    vm = spec.name + ("-test" if fo.test else "")
    loc = "[parameters('location')]"
    disk_res, nic_res = {}, []
    resources = []
    for d in sorted(parts, key=lambda d: (d != os_disks[0], names[d])):
        rname = f"{vm}-{names[d]}"[:80]
        disk_res[d] = rname
        props = {"creationData": {"createOption": "Import", "storageAccountId": "[parameters('storageAccountId')]",
                                  "sourceUri": fo.disks[d].url}}
        if d == os_disks[0]:
            props["osType"] = spec.os_type
        resources.append({"type": "Microsoft.Compute/disks", "apiVersion": "2023-04-02", "name": rname,
                          "location": loc, "sku": {"name": spec.disk_sku}, "properties": props})
    for i, n in enumerate(nics):
        ipconf = {"subnet": {"id": f"{n['vnet']}/subnets/{n['subnet']}"},
                  "privateIPAllocationMethod": "Static" if n["ip"] else "Dynamic"}
        if n["ip"]:
            ipconf["privateIPAddress"] = n["ip"]
        name = f"{vm}-nic{i}"
        nic_res.append(name)
        resources.append({"type": "Microsoft.Network/networkInterfaces", "apiVersion": "2023-09-01", "name": name,
                          "location": loc, "properties": {"ipConfigurations": [{"name": "ipconfig1",
                                                                               "properties": ipconf}]}})
    order = list(disk_res)
    resources.append({
        "type": "Microsoft.Compute/virtualMachines", "apiVersion": "2023-09-01", "name": vm, "location": loc,
        "dependsOn": [f"[resourceId('Microsoft.Compute/disks', '{disk_res[d]}')]" for d in order]
        + [f"[resourceId('Microsoft.Network/networkInterfaces', '{n}')]" for n in nic_res],
        "properties": {
            "hardwareProfile": {"vmSize": spec.size},
            "storageProfile": {
                "osDisk": {"osType": spec.os_type, "createOption": "Attach",
                           "managedDisk": {"id": f"[resourceId('Microsoft.Compute/disks', '{disk_res[order[0]]}')]"}},
                "dataDisks": [{"lun": i, "createOption": "Attach",
                               "managedDisk": {"id": f"[resourceId('Microsoft.Compute/disks', '{disk_res[d]}')]"}}
                              for i, d in enumerate(order[1:])]},
            "networkProfile": {"networkInterfaces": [
                {"id": f"[resourceId('Microsoft.Network/networkInterfaces', '{n}')]",
                 "properties": {"primary": i == 0}} for i, n in enumerate(nic_res)]}}})
    return {"$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
            "contentVersion": "1.0.0.0",
            "parameters": {"location": {"type": "string", "defaultValue": "[resourceGroup().location]"},
                           "storageAccountId": {"type": "string"}},
            "resources": resources,
            "outputs": {"vm": {"type": "string",
                               "value": f"[resourceId('Microsoft.Compute/virtualMachines', '{vm}')]"}}}


def write_template(path: str, template: dict) -> None:
    from ..durable import output_path
    with output_path(path) as tmp, open(tmp, "w") as f:
        json.dump(template, f, indent=2)
        f.write("\n")

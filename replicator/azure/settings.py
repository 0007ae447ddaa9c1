"""The Azure parts of a machine's protection settings in replicatord.toml, checked field by field when the
configuration is read (orchestration/settings.py calls these): `encryption_key_file` (the customer's key,
ASR's "Encrypt stored data") and the `[machine.azure_vm]` table, the VM a failover to Azure deploys:

    [machine.azure_vm]
    size = "Standard_D2s_v3"
    os_disk = "d0.vhdx"
    nics = [{ network = "lan", subnet = "app", ip = "10.1.0.10" }]
    network_map = { lan = "prod" }
    test_vnet = "isolated"
    vnets.prod = { id = "/subscriptions/.../virtualNetworks/prod", subnets = { app = "10.1.0.0/24" } }

Each problem is (dotted key, one-line reason), the shape every other setting reports."""
from __future__ import annotations

import ipaddress
import os

from ..errors import UsageError

VM_KEYS = frozenset({"name", "size", "os_disk", "os_type", "max_nics", "disk_sku", "nics", "network_map", "vnets",
                     "test_vnet"})
NIC_KEYS = frozenset({"network", "subnet", "ip"})
DISK_SKUS = ("Standard_LRS", "StandardSSD_LRS", "StandardSSD_ZRS", "Premium_LRS", "Premium_ZRS")


def key_file_problem(path: str) -> str | None:
    """Why the key file cannot be used (None: fine, or not there yet: the caller warns about that)."""
    from .crypto import KeyRing
    if not os.path.isfile(path):
        return None
    try:
        KeyRing.load(path)
    except UsageError as e:
        return e.message
    return None


def parse_vm(raw, disk_names: tuple[str, ...], machine: str) -> tuple[object | None, list[tuple[str, str]]]:
    """The VmSpec of `[machine.azure_vm]`, or None with the problems (key relative to azure_vm)."""
    from .deploy import _NAME, Nic, VmSpec, Vnet, plan_nics
    if not isinstance(raw, dict):
        return None, [("", f"must be a table ([machine.azure_vm]), not {type(raw).__name__}")]
    problems: list[tuple[str, str]] = [(k, f"unknown key (known: {', '.join(sorted(VM_KEYS))})")
                                       for k in raw if k not in VM_KEYS]

    def text(key, required=False, default=""):
        v = raw.get(key, default)
        if key not in raw and required:
            problems.append((key, "missing"))
        elif not isinstance(v, str) or (key in raw and not v):
            problems.append((key, "must be a non-empty string"))
            return default
        return v

    name, size, os_disk = text("name", default=machine), text("size", True), text("os_disk", True)
    os_type, sku, test_vnet = text("os_type", default="Linux"), text("disk_sku", default="Standard_LRS"), \
        text("test_vnet")
    if name and not _NAME.match(name):
        problems.append(("name", f"{name!r} is not a usable Azure VM name"))
    if os_disk and disk_names and os_disk not in disk_names:
        problems.append(("os_disk", f"{os_disk!r} is not one of the machine's disks ({', '.join(disk_names)})"))
    if os_type not in ("Linux", "Windows"):
        problems.append(("os_type", f"must be \"Linux\" or \"Windows\", not {os_type!r}"))
    if sku not in DISK_SKUS:
        problems.append(("disk_sku", f"must be one of {', '.join(DISK_SKUS)}, not {sku!r}"))
    most = raw.get("max_nics")
    if most is not None and (not isinstance(most, int) or isinstance(most, bool) or not 1 <= most <= 8):
        problems.append(("max_nics", f"must be an integer between 1 and 8, not {most!r}"))
        most = None
    vnets = _vnets(raw.get("vnets", {}), problems)
    nmap = raw.get("network_map", {})
    if not isinstance(nmap, dict) or not all(isinstance(v, str) for v in nmap.values()):
        problems.append(("network_map", "must be a table of source network = \"VNet name\""))
        nmap = {}
    for src, dst in nmap.items():
        if dst not in vnets:
            problems.append((f"network_map.{src}", f"VNet {dst!r} is not described under vnets"))
    if test_vnet and test_vnet not in vnets:
        problems.append(("test_vnet", f"VNet {test_vnet!r} is not described under vnets"))
    nics = _nics(raw.get("nics", []), problems)
    if problems:
        return None, problems
    spec = VmSpec(name, size, os_disk, nics, dict(nmap), vnets, test_vnet, os_type, most, sku)
    for test in (False, True) if test_vnet else (False,):
        try:                                    # the rules a template is refused for, checked now
            plan_nics(spec, test)
        except UsageError as e:
            problems.append(("nics", e.message))
    return (None if problems else spec), problems


def _vnets(raw, problems) -> dict:
    from .deploy import Vnet
    if not isinstance(raw, dict):
        problems.append(("vnets", "must be a table of VNet name = { id, subnets }"))
        return {}
    out = {}
    for name, v in raw.items():
        where = f"vnets.{name}"
        if not isinstance(v, dict) or set(v) - {"id", "subnets"}:
            problems.append((where, "must be a table { id = \"resource id\", subnets = { NAME = \"CIDR\" } }"))
            continue
        if not isinstance(v.get("id"), str) or not v["id"].startswith("/subscriptions/"):
            problems.append((f"{where}.id", "must be the VNet's resource id (/subscriptions/...)"))
            continue
        subnets = v.get("subnets")
        if not isinstance(subnets, dict) or not subnets:
            problems.append((f"{where}.subnets", "must be a table of subnet name = \"CIDR\" (at least one)"))
            continue
        good = True
        for sub, cidr in subnets.items():
            try:
                ipaddress.ip_network(cidr, strict=False)
            except (TypeError, ValueError):
                problems.append((f"{where}.subnets.{sub}", f"{cidr!r} is not an address prefix (10.1.0.0/24)"))
                good = False
        if good:
            out[name] = Vnet(v["id"], dict(subnets))
    return out


def _nics(raw, problems) -> list:
    from .deploy import Nic
    if not isinstance(raw, list) or not raw:
        problems.append(("nics", "must be an array of { network, subnet, ip } (at least one NIC)"))
        return []
    out = []
    for i, n in enumerate(raw):
        where = f"nics[{i}]"
        if not isinstance(n, dict) or set(n) - NIC_KEYS or not isinstance(n.get("network"), str) \
                or not all(isinstance(n.get(k, ""), str) for k in NIC_KEYS):
            problems.append((where, "must be { network = \"source network\", subnet = \"NAME\", ip = \"ADDRESS\" } "
                             "(network required)"))
            continue
        if n.get("ip"):
            try:
                ipaddress.ip_address(n["ip"])
            except ValueError:
                problems.append((f"{where}.ip", f"{n['ip']!r} is not an IP address"))
                continue
        out.append(Nic(n["network"], n.get("subnet", ""), n.get("ip", "")))
    return out

"""Target IP addresses per NIC for failover (a domain machine's `failover_ip`), as Hyper-V Replica's
"Failover TCP/IP" and ASR's target IP: set in the guest through its agent once the failed-over machine runs,
and given to recovery-plan scripts as REPLICATOR_IP_<MACHINE>_NET<k> (a DNS-update script needs them even
when the guest has no agent).

    failover_ip = { net0 = "10.0.0.5/24", "52:54:00:12:34:56" = { address = "10.1.0.5/16", gateway = "10.1.0.1" } }

A NIC is named by its MAC address or as `netK`, its place (from 0) among the domain's NICs in its definition.
The settings travel with the domain's replicated configuration, so the recovery site has them when the
primary site is gone.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
NET = re.compile(r"^net(\d{1,2})$")


@dataclass(frozen=True)
class FailoverIp:
    nic: str                    # "net0" or a MAC address (lower case)
    address: str                # "10.0.0.5/24"
    gateway: str | None = None

    def to_dict(self) -> dict:
        return {"address": self.address, **({"gateway": self.gateway} if self.gateway else {})}


def parse(raw) -> tuple[tuple[FailoverIp, ...], list[tuple[str, str]]]:
    """The settings' table -> (addresses, problems as (sub-key, reason)); a value is "ADDRESS/PREFIX" or
    { address = "ADDRESS/PREFIX", gateway = "ADDRESS" }."""
    if not isinstance(raw, dict):
        return (), [("", "must be a table of NIC (netK or MAC address) = \"ADDRESS/PREFIX\" or "
                         "{ address = \"ADDRESS/PREFIX\", gateway = \"ADDRESS\" }")]
    out, problems = [], []
    for nic, value in raw.items():
        if not (NET.match(nic) or MAC.match(nic)):
            problems.append((nic, f"{nic!r} is not a NIC: netK (its place among the domain's NICs, from 0) or its "
                                  "MAC address"))
            continue
        if isinstance(value, str):
            value = {"address": value}
        if not isinstance(value, dict) or set(value) - {"address", "gateway"} or \
                not isinstance(value.get("address"), str) or not isinstance(value.get("gateway", ""), str):
            problems.append((nic, "must be \"ADDRESS/PREFIX\" or { address = \"ADDRESS/PREFIX\", gateway = \"ADDRESS\" }"))
            continue
        address, gateway = value["address"], value.get("gateway") or None
        try:
            iface = ipaddress.ip_interface(address)
            gw = ipaddress.ip_address(gateway) if gateway else None
        except ValueError as e:
            problems.append((nic, str(e)))
            continue
        if "/" not in address:
            problems.append((nic, f"{address!r} needs its prefix length (e.g. 10.0.0.5/24)"))
        elif gw is not None and gw.version != iface.version:
            problems.append((nic, f"gateway {gateway} is not of the address's IP version"))
        else:
            out.append(FailoverIp(nic.lower(), iface.with_prefixlen, str(gw) if gw else None))
    macs = [ip.nic for ip in out]
    if len(set(macs)) != len(macs):
        problems.append(("", "names a NIC twice"))
    return tuple(out), problems


def to_payload(ips) -> dict:
    return {ip.nic: ip.to_dict() for ip in ips}


def from_payload(raw) -> tuple[FailoverIp, ...]:
    """What a replicated configuration carries (checked as the settings are; unusable entries dropped)."""
    ips, _ = parse(raw or {})
    return ips


def resolve(ips, nics) -> tuple[list[tuple[int, str, FailoverIp]], list[str]]:
    """Each address with its NIC's place and MAC among `nics` (the domain configuration's); a NIC the
    domain does not have is left out, said in the notes."""
    found, notes = [], []
    for ip in ips:
        m = NET.match(ip.nic)
        k = int(m.group(1)) if m else next((i for i, n in enumerate(nics) if n.mac.lower() == ip.nic), None)
        if k is None or k >= len(nics):
            notes.append(f"failover IP {ip.address}: the domain has no NIC {ip.nic}")
            continue
        found.append((k, nics[k].mac.lower(), ip))
    return found, notes


def env_name(machine: str, index: int) -> str:
    """REPLICATOR_IP_<MACHINE>_NET<k>: the machine's name upper-cased, every other character than a letter
    or digit as '_'."""
    return f"REPLICATOR_IP_{re.sub(r'[^A-Za-z0-9]', '_', machine).upper()}_NET{index}"

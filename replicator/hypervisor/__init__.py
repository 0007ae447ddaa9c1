"""The hypervisor behind one small interface (base.Hypervisor); libvirt's driver in .libvirt.

    with Hypervisor.open("qemu:///system") as hv:
        config = hv.domain_config("web1")                 # DomainConfig: plain data, to_json()/from_json()
        mode, originals = hv.point_disks_at_export("web1", {"vda": (sock, "web1.vhdx")})
        ...
        hv.define(config, "web1 - Test", {"vda": failover_path}, {"lan": "replicator-test"})
"""
from .base import (LIVE, NEXT_BOOT, NOW, Boot, Defined, Disk, DiskSource, DomainConfig, DomainState, GuestInterface,
                   Hypervisor, Nic, Quiesced)

__all__ = ["Hypervisor", "DomainConfig", "DomainState", "Disk", "DiskSource", "Nic", "Boot", "Defined",
           "GuestInterface", "Quiesced", "NOW", "NEXT_BOOT", "LIVE"]

"""The hypervisor behind one small interface: what replicator needs of a virtual machine manager to protect
machines (not disk files), fail them over, boot them on the recovery site and quiesce them.

Names follow the managers' own terms (libvirt's and QEMU's): a *domain* is a defined virtual machine,
*define* makes a persistent definition, *start* boots it, *destroy* stops it hard, *undefine* removes the
definition; `state` is libvirt's (running, paused, shutoff ...) with its reason (ioerror, user ...).

A domain's configuration (`DomainConfig`) is plain data: it serializes to JSON (`to_json`/`from_json`) so the
daemon can replicate it with every cycle, as Hyper-V Replica replicates a VM's configuration, and the
recovery site can define the machine from it (`Hypervisor.define`). It keeps the manager's own definition
(`definition`, libvirt's domain XML) next to the fields replicator reasons about (disks, NICs, networks,
vCPUs, memory, boot), so nothing the manager knows is lost on the way.

The guest's disks, when protected, are served by the machine's export process (NBD over a Unix socket);
`point_disks_at_export` rewrites the domain's definition to use it, set up so that an export that goes
away only pauses the guest (libvirt: error_policy='stop'); `resume` carries it on once the export is back.

Implementations: `replicator.hypervisor.libvirt.LibvirtHypervisor` (QEMU/KVM through libvirt).
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from typing import Iterator, Mapping

CONFIG_VERSION = 1

# Domain states (libvirt's names) and the reasons that matter to replicator.
RUNNING, PAUSED, SHUTOFF, CRASHED, BLOCKED, SHUTDOWN, PMSUSPENDED, NOSTATE = (
    "running", "paused", "shutoff", "crashed", "blocked", "shutdown", "pmsuspended", "nostate")
REASON_IOERROR = "ioerror"

# How point_disks_at_export applied the change.
NOW = "now"                  # the domain was shut off: its next start uses the export
NEXT_BOOT = "next-boot"      # the domain runs: its persistent definition uses the export from its next boot
LIVE = "live"                # the domain runs: it was switched onto the export while running (copy_to_export)


@dataclass(frozen=True)
class DiskSource:
    """Where a disk's data comes from: a file or block device (`path`, `format` as the hypervisor names it:
    raw, qcow2, vpc, vhdx ...), or an NBD export over a Unix socket (`socket`, `export`)."""
    kind: str                          # "file" | "block" | "nbd" | "other"
    path: str = ""
    format: str = ""
    socket: str = ""
    export: str = ""

    @staticmethod
    def file(path: str, format: str = "raw") -> "DiskSource":
        return DiskSource("file", path=str(path), format=format)

    @staticmethod
    def nbd(socket: str, export: str = "") -> "DiskSource":
        return DiskSource("nbd", socket=str(socket), export=export)

    @staticmethod
    def coerce(value) -> "DiskSource":
        """A DiskSource from what callers naturally have: a DiskSource, a path (a file; its format from
        the name: .qcow2, .vhdx, .vhd/.vpc, else raw), or a (socket, export) pair (NBD)."""
        if isinstance(value, DiskSource):
            return value
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return DiskSource.nbd(str(value[0]), str(value[1]))
        path = str(value)
        ext = path.rsplit(".", 1)[-1].lower() if "." in path else ""
        fmt = {"qcow2": "qcow2", "vhdx": "vhdx", "vhd": "vpc", "vpc": "vpc"}.get(ext, "raw")
        return DiskSource.file(path, fmt)


@dataclass(frozen=True)
class Disk:
    target: str                        # the guest-facing name: vda, sda ...
    bus: str                           # virtio, scsi, sata, ide ...
    device: str                        # disk, cdrom, floppy, lun
    source: DiskSource | None          # None: an empty drive (a cdrom without media)
    driver: dict = field(default_factory=dict)     # driver attributes: type, cache, io, discard, error_policy ...
    readonly: bool = False


@dataclass(frozen=True)
class Nic:
    mac: str
    model: str                         # virtio, e1000e ...
    kind: str                          # network, bridge, direct, user, ethernet ...
    source: str                        # the network's or bridge's name ("" when none)


@dataclass(frozen=True)
class Boot:
    type: str = "hvm"
    arch: str = ""
    machine: str = ""
    firmware: str = ""                 # "efi", "bios" or "" (the manager's default)
    loader: str = ""
    kernel: str = ""                   # direct kernel boot
    initrd: str = ""
    cmdline: str = ""
    devices: tuple[str, ...] = ()      # boot order: hd, cdrom, network ...


@dataclass(frozen=True)
class DomainConfig:
    name: str
    uuid: str
    vcpus: int
    memory_kib: int
    boot: Boot
    disks: tuple[Disk, ...]
    nics: tuple[Nic, ...]
    guest_agent: bool                  # a QEMU guest agent channel is defined
    hypervisor: str = ""               # which implementation read it ("libvirt")
    domain_type: str = ""              # kvm, qemu ...
    definition: str = ""               # the manager's own definition (libvirt: inactive domain XML)

    @property
    def networks(self) -> list[str]:
        """The networks the NICs are connected to, in order, once each."""
        seen: list[str] = []
        for n in self.nics:
            if n.kind == "network" and n.source and n.source not in seen:
                seen.append(n.source)
        return seen

    def disk(self, target: str) -> Disk:
        for d in self.disks:
            if d.target == target:
                return d
        raise KeyError(target)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["version"] = CONFIG_VERSION
        d["boot"]["devices"] = list(self.boot.devices)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @staticmethod
    def from_dict(d: Mapping) -> "DomainConfig":
        from ..errors import HypervisorError
        if d.get("version") != CONFIG_VERSION:
            raise HypervisorError(f"domain configuration version {d.get('version')!r}, "
                                  f"this replicator reads {CONFIG_VERSION}")
        try:
            boot = dict(d["boot"])
            boot["devices"] = tuple(boot.get("devices", ()))
            disks = tuple(Disk(**{**x, "source": DiskSource(**x["source"]) if x.get("source") else None})
                          for x in d["disks"])
            return DomainConfig(
                name=d["name"], uuid=d["uuid"], vcpus=int(d["vcpus"]), memory_kib=int(d["memory_kib"]),
                boot=Boot(**boot), disks=disks, nics=tuple(Nic(**x) for x in d["nics"]),
                guest_agent=bool(d["guest_agent"]), hypervisor=d.get("hypervisor", ""),
                domain_type=d.get("domain_type", ""), definition=d.get("definition", ""))
        except (KeyError, TypeError, ValueError) as e:
            raise HypervisorError(f"domain configuration is malformed: {type(e).__name__}: {e}") from None

    @staticmethod
    def from_json(text: str) -> "DomainConfig":
        from ..errors import HypervisorError
        try:
            d = json.loads(text)
        except ValueError as e:
            raise HypervisorError(f"domain configuration is not JSON: {e}") from None
        if not isinstance(d, dict):
            raise HypervisorError("domain configuration is not a JSON object")
        return DomainConfig.from_dict(d)


@dataclass(frozen=True)
class DomainState:
    state: str                         # running, paused, shutoff ...
    reason: str                        # libvirt's reason: ioerror, user, booted, destroyed ...

    @property
    def paused_on_io_error(self) -> bool:
        return self.state == PAUSED and self.reason == REASON_IOERROR


@dataclass(frozen=True)
class Defined:
    """What `define` did: the domain's name and uuid, and what it could not carry over (an unmapped network
    leaves its NIC disconnected, a disk without a source is dropped ...), one sentence each."""
    name: str
    uuid: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class GuestInterface:
    name: str
    mac: str
    addresses: tuple[str, ...]         # "10.0.0.5/24"


class Quiesced:
    """Yielded by `Hypervisor.quiesce`: `frozen` is how many filesystems the agent froze; `expired` turns
    true when the watchdog thawed the guest because the block outlived the timeout (a point cut then is
    not application-consistent, and leaving the block raises QuiesceExpired)."""

    def __init__(self, frozen: int):
        self.frozen = frozen
        self.expired = False


class Hypervisor:
    """One connection to a virtual machine manager. Every method names the domain by its name and raises a
    HypervisorError subclass (replicator.errors) on failure: DomainNotFound, DomainExists, DomainStateError,
    GuestAgentError, QuiesceExpired, NetworkError, or HypervisorError itself."""

    @classmethod
    def open(cls, uri: str | None = None) -> "Hypervisor":
        """The implementation for `uri`: libvirt URIs (qemu:///system, qemu+unix:///system?socket=...,
        qemu+ssh://host/system ...). Default: qemu:///system."""
        uri = uri or "qemu:///system"
        from .libvirt import LibvirtHypervisor
        return LibvirtHypervisor.connect(uri)

    # ------------------------------------------------------------- reading
    def domain_config(self, name: str) -> DomainConfig: raise NotImplementedError
    def state(self, name: str) -> DomainState: raise NotImplementedError
    def exists(self, name: str) -> bool: raise NotImplementedError
    def list_domains(self) -> list[str]: raise NotImplementedError

    # ------------------------------------------------------------- protection (the primary site)
    def point_disks_at_export(self, name: str, exports: Mapping[str, tuple[str, str]]) -> tuple[str, dict[str, str]]:
        """Rewrite the persistent definition so each disk in `exports` ({target dev: (nbd socket path,
        export name)}) is the NBD export over that Unix socket, raw, cache none, error_policy and
        rerror_policy 'stop' (the guest pauses while the export is away, and `resume` carries it on).
        Returns (NOW or NEXT_BOOT, {target dev: the disk's previous definition}), the latter for
        `restore_disks`. A running domain keeps its current disks until it is shut off and started again."""
        raise NotImplementedError

    def copy_to_export(self, name: str, target: str, socket: str, export: str, progress=None,
                       timeout: float | None = None) -> dict:
        """Move a running domain's disk onto the export without stopping it: every block (zeros too) is
        copied into the NBD export while the guest runs, its new writes mirrored, and the guest's disk is
        switched onto the export once both are in sync (libvirt: block copy and pivot; QEMU: blockdev-mirror
        and block-job-complete). A copy already under way (a restarted daemon) is waited for; a disk already
        on the export is left as it is. `progress(done, total)` is called as it goes. Returns the driver
        attributes of the running disk afterwards (the device keeps its error policy until the next boot)."""
        raise NotImplementedError

    def restore_disks(self, name: str, originals: Mapping[str, str]) -> str:
        """Put back the disks' definitions that point_disks_at_export returned (unprotecting). NOW or
        NEXT_BOOT as above."""
        raise NotImplementedError

    # ------------------------------------------------------------- the recovery site
    def define(self, config: DomainConfig, name: str | None = None,
               disks: Mapping[str, object] | None = None,
               network_map: Mapping[str, str | None] | None = None, *,
               console_path: str | None = None, keep_uuid: bool | None = None) -> Defined:
        """Define a domain from a replicated configuration: named `name` (default config.name; `NAME - Test`
        for a test failover), each disk in `disks` ({target dev: DiskSource, path or (socket, export)})
        pointed at its failed-over data (disks not listed are left out, said so in the notes), each NIC's
        network mapped through `network_map` ({source network: target network, or None / "none" for not
        connected}; an unmapped network leaves the NIC disconnected, said so). keep_uuid: default True
        when the name is config.name (the same machine, failed over), False otherwise (a copy). A file
        console moves to `console_path` (or becomes a pty)."""
        raise NotImplementedError

    def start(self, name: str) -> None: raise NotImplementedError
    def destroy(self, name: str) -> None: raise NotImplementedError
    def undefine(self, name: str) -> None: raise NotImplementedError
    def shutdown(self, name: str, timeout: float = 60, agent: bool = True) -> None: raise NotImplementedError

    def resume(self, name: str, timeout: float = 0.0, settle: float = 0.5) -> bool:
        """Resume a paused domain (after the export is back: paused by error_policy=stop, QEMU retries the
        failed requests). QEMU's NBD client reconnects in the background, so the first retried requests
        may fail again and pause it again: resume is repeated until the domain has run for `settle`
        seconds, or `timeout` passed. True when it runs; False when it was not paused, or paused again."""
        raise NotImplementedError

    def create_isolated_network(self, name: str) -> str:
        """A network with no forwarding and no address on the host (the guests on it see only each
        other): for a test failover. Returns its bridge's name. Already existing: returned as it is."""
        raise NotImplementedError

    def delete_network(self, name: str) -> None: raise NotImplementedError
    def network_exists(self, name: str) -> bool: raise NotImplementedError

    def wait_running(self, name: str, timeout: float = 60) -> float:
        """Wait until the domain runs; returns the seconds it took. DomainStateError when it shut off or
        crashed meanwhile, or after `timeout` seconds."""
        raise NotImplementedError

    # ------------------------------------------------------------- the guest agent
    def guest_ping(self, name: str, timeout: float = 120) -> float:
        """Wait until the guest agent answers `guest-ping` (a freshly started guest's agent answers once the
        guest runs it); returns the seconds it took. GuestAgentError after `timeout` seconds, or when the
        domain stopped meanwhile."""
        raise NotImplementedError

    def guest_exec(self, name: str, argv: list[str], timeout: float = 30) -> tuple[int, str, str]:
        """Run a program in the guest through the agent; (exit code, stdout, stderr)."""
        raise NotImplementedError

    def agent_ping(self, name: str, timeout: float = 10) -> bool:
        """True when the guest agent answers guest-ping within `timeout` seconds, False otherwise."""
        raise NotImplementedError

    def agent_command(self, name: str, command: str, timeout: float = 30, **arguments): raise NotImplementedError

    @contextlib.contextmanager
    def quiesce(self, name: str, timeout: float = 30) -> Iterator[Quiesced]:
        """guest-fsfreeze-freeze for the block, guest-fsfreeze-thaw on every way out. A watchdog thaws the
        guest when the block takes longer than `timeout` seconds; the block's end then raises
        QuiesceExpired. Raises GuestAgentError when the guest cannot be frozen."""
        raise NotImplementedError
        yield

    def set_guest_ip(self, name: str, mac: str, address: str, gateway: str | None = None,
                     timeout: float = 30) -> None:
        """Give the guest's NIC with this MAC the address ("10.0.0.5/24") and, optionally, the default
        route, through the guest agent."""
        raise NotImplementedError

    def guest_interfaces(self, name: str, timeout: float = 10) -> list[GuestInterface]:
        raise NotImplementedError

    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

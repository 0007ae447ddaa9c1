"""The hypervisor interface on libvirt (QEMU/KVM domains), through libvirt-python.

Domain and network definitions are read and rewritten as XML trees (xml.etree), never as strings: the
persistent (inactive) definition is what protection rewrites and what a failover defines from. Guest agent
commands go through libvirt (virDomainFSFreeze/Thaw, virDomainInterfaceAddresses, and
virDomainQemuAgentCommand for the rest: guest-ping, guest-exec), so no second client ever talks to the
agent's channel behind libvirt's back.
"""
from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import re
import threading
import time
import xml.etree.ElementTree as ET
from typing import Iterator

import libvirt
import libvirt_qemu

from ..errors import (DomainExists, DomainNotFound, DomainStateError, GuestAgentError, HypervisorError,
                      NetworkError, QuiesceExpired)
from ..priority import guest_placement
from .base import (NEXT_BOOT, NOW, Boot, Defined, Disk, DiskSource, DomainConfig, DomainState, GuestInterface,
                   Hypervisor, Nic, Quiesced)

AGENT_CHANNEL = "org.qemu.guest_agent.0"
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# driver attributes of a disk that still mean something once its data comes from the export
KEPT_DRIVER_ATTRS = ("discard", "detect_zeroes", "iothread", "queues", "queue_size")

_STATES = {libvirt.VIR_DOMAIN_NOSTATE: "nostate", libvirt.VIR_DOMAIN_RUNNING: "running",
           libvirt.VIR_DOMAIN_BLOCKED: "blocked", libvirt.VIR_DOMAIN_PAUSED: "paused",
           libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown", libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
           libvirt.VIR_DOMAIN_CRASHED: "crashed", libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended"}


def _reasons(prefix: str, names: str) -> dict[int, str]:
    out = {}
    for n in names.split():
        value = getattr(libvirt, f"{prefix}_{n}", None)
        if value is not None:
            out[value] = n.lower().replace("_", "-")
    return out


_REASONS = {
    libvirt.VIR_DOMAIN_RUNNING: _reasons("VIR_DOMAIN_RUNNING", "UNKNOWN BOOTED MIGRATED RESTORED FROM_SNAPSHOT "
                                         "UNPAUSED MIGRATION_CANCELED SAVE_CANCELED WAKEUP CRASHED POSTCOPY"),
    libvirt.VIR_DOMAIN_PAUSED: _reasons("VIR_DOMAIN_PAUSED", "UNKNOWN USER MIGRATION SAVE DUMP IOERROR WATCHDOG "
                                        "FROM_SNAPSHOT SHUTTING_DOWN SNAPSHOT CRASHED STARTING_UP POSTCOPY "
                                        "POSTCOPY_FAILED"),
    libvirt.VIR_DOMAIN_SHUTOFF: _reasons("VIR_DOMAIN_SHUTOFF", "UNKNOWN SHUTDOWN DESTROYED CRASHED MIGRATED "
                                         "SAVED FAILED FROM_SNAPSHOT DAEMON"),
    libvirt.VIR_DOMAIN_CRASHED: _reasons("VIR_DOMAIN_CRASHED", "UNKNOWN PANICKED"),
}


def _ignore_libvirt_errors(_ctx, _err) -> None:
    """libvirt prints every error on stderr by default; they are raised as exceptions here instead."""


libvirt.registerErrorHandler(_ignore_libvirt_errors, None)


def _error(e: libvirt.libvirtError, what: str) -> HypervisorError:
    code = e.get_error_code()
    msg = f"{what}: {e.get_error_message() or e}"

    def is_(*names):
        return any(code == getattr(libvirt, n, object()) for n in names)
    if is_("VIR_ERR_NO_DOMAIN"):
        return DomainNotFound(msg)
    if is_("VIR_ERR_DOM_EXIST"):
        return DomainExists(msg)
    if is_("VIR_ERR_NO_NETWORK", "VIR_ERR_NETWORK_EXIST"):
        return NetworkError(msg)
    if is_("VIR_ERR_AGENT_UNRESPONSIVE", "VIR_ERR_AGENT_UNSYNCED", "VIR_ERR_AGENT_COMMAND_TIMEOUT",
           "VIR_ERR_AGENT_COMMAND_FAILED"):
        return GuestAgentError(msg)
    if is_("VIR_ERR_OPERATION_INVALID"):
        return DomainStateError(msg)
    return HypervisorError(msg)


@contextlib.contextmanager
def _mapped(what: str, agent: bool = False):
    """libvirt errors raised as replicator's (agent=True: any failure is the agent's)."""
    try:
        yield
    except libvirt.libvirtError as e:
        err = _error(e, what)
        if agent and not isinstance(err, (GuestAgentError, DomainNotFound, DomainStateError)):
            err = GuestAgentError(err.message)
        raise err from None


def _text(el: ET.Element | None, path: str, default: str = "") -> str:
    if el is None:
        return default
    found = el.find(path)
    return (found.text or "").strip() if found is not None and found.text else default


def _kib(el: ET.Element | None) -> int:
    if el is None or not el.text:
        return 0
    units = {"b": 1 / 1024, "bytes": 1 / 1024, "k": 1, "kib": 1, "kb": 1000 / 1024, "m": 1024, "mib": 1024,
             "mb": 1e6 / 1024, "g": 1 << 20, "gib": 1 << 20, "gb": 1e9 / 1024, "t": 1 << 30, "tib": 1 << 30}
    return int(int(el.text.strip()) * units.get(el.get("unit", "KiB").lower(), 1))


def _xml(el: ET.Element) -> str:
    return ET.tostring(el, encoding="unicode")


# ----------------------------------------------------------------------------- reading a definition
def _disk_source(disk: ET.Element) -> DiskSource | None:
    kind = disk.get("type", "file")
    src = disk.find("source")
    fmt = disk.find("driver").get("type", "") if disk.find("driver") is not None else ""
    if src is None:
        return None
    if kind == "file" and src.get("file"):
        return DiskSource("file", path=src.get("file"), format=fmt)
    if kind == "block" and src.get("dev"):
        return DiskSource("block", path=src.get("dev"), format=fmt)
    if kind == "network" and src.get("protocol") == "nbd":
        host = src.find("host")
        if host is not None and host.get("transport") == "unix":
            return DiskSource("nbd", socket=host.get("socket", ""), export=src.get("name", ""), format=fmt)
        where = f"{host.get('name', '')}:{host.get('port', '')}" if host is not None else ""
        return DiskSource("other", path=f"nbd://{where}/{src.get('name', '')}", format=fmt)
    return DiskSource("other", path=_xml(src).strip(), format=fmt)


def parse_domain(xml: str, hypervisor: str = "libvirt") -> DomainConfig:
    root = ET.fromstring(xml)
    os_el = root.find("os")
    type_el = os_el.find("type") if os_el is not None else None
    loader = os_el.find("loader") if os_el is not None else None
    boot = Boot(type=(type_el.text or "hvm").strip() if type_el is not None else "hvm",
                arch=type_el.get("arch", "") if type_el is not None else "",
                machine=type_el.get("machine", "") if type_el is not None else "",
                firmware=(os_el.get("firmware", "") if os_el is not None else "") or
                         ("efi" if loader is not None and loader.get("type") == "pflash" else ""),
                loader=(loader.text or "").strip() if loader is not None and loader.text else "",
                kernel=_text(os_el, "kernel"), initrd=_text(os_el, "initrd"), cmdline=_text(os_el, "cmdline"),
                devices=tuple(b.get("dev", "") for b in os_el.findall("boot")) if os_el is not None else ())
    devices = root.find("devices")
    disks, nics, agent = [], [], False
    if devices is not None:
        for d in devices.findall("disk"):
            target = d.find("target")
            driver = d.find("driver")
            disks.append(Disk(target=target.get("dev", "") if target is not None else "",
                              bus=target.get("bus", "") if target is not None else "",
                              device=d.get("device", "disk"), source=_disk_source(d),
                              driver=dict(driver.attrib) if driver is not None else {},
                              readonly=d.find("readonly") is not None))
        for i in devices.findall("interface"):
            src = i.find("source")
            mac, model = i.find("mac"), i.find("model")
            source = ""
            if src is not None:
                source = src.get("network") or src.get("bridge") or src.get("dev") or ""
            nics.append(Nic(mac=(mac.get("address", "") if mac is not None else "").lower(),
                            model=model.get("type", "") if model is not None else "",
                            kind=i.get("type", ""), source=source))
        for c in devices.findall("channel"):
            t = c.find("target")
            if t is not None and t.get("type") == "virtio" and t.get("name") == AGENT_CHANNEL:
                agent = True
    vcpu = root.find("vcpu")
    return DomainConfig(name=_text(root, "name"), uuid=_text(root, "uuid"),
                        vcpus=int(vcpu.text.strip()) if vcpu is not None and vcpu.text else 1,
                        memory_kib=_kib(root.find("memory")), boot=boot, disks=tuple(disks), nics=tuple(nics),
                        guest_agent=agent, hypervisor=hypervisor, domain_type=root.get("type", ""),
                        definition=xml)


# ----------------------------------------------------------------------------- writing definitions
def _set_source(disk: ET.Element, source: DiskSource, nbd_policy: bool) -> None:
    """Point a <disk> element at `source`, keeping its target, address, boot order, serial and the like."""
    old_driver = disk.find("driver")
    keep = {k: v for k, v in (old_driver.attrib.items() if old_driver is not None else ())}
    for tag in ("source", "driver", "backingStore", "mirror", "auth", "encryption", "reservations"):
        for el in disk.findall(tag):
            disk.remove(el)
    driver = ET.Element("driver", {"name": "qemu"})
    if source.kind == "nbd":
        disk.set("type", "network")
        driver.set("type", "raw")
        for k in KEPT_DRIVER_ATTRS:
            if k in keep:
                driver.set(k, keep[k])
        driver.set("cache", "none")
        if nbd_policy:
            driver.set("error_policy", "stop")
            driver.set("rerror_policy", "stop")
        src = ET.Element("source", {"protocol": "nbd", "name": source.export})
        ET.SubElement(src, "host", {"transport": "unix", "socket": source.socket})
    elif source.kind in ("file", "block"):
        if source.format == "vhdx":
            raise HypervisorError(f"{source.path}: libvirt (9.0) has no 'vhdx' disk format although QEMU reads "
                                  "VHDX: serve the disk through an export (NBD) or convert it")
        disk.set("type", source.kind)
        for k, v in keep.items():
            if k not in ("name", "type"):
                driver.set(k, v)
        driver.set("type", source.format or "raw")
        src = ET.Element("source", {"file" if source.kind == "file" else "dev": source.path})
    else:
        raise HypervisorError(f"cannot point a disk at a source of kind {source.kind!r}")
    disk.insert(0, src)
    disk.insert(0, driver)


def _find_disk(root: ET.Element, dev: str) -> ET.Element | None:
    for d in root.iter("disk"):
        t = d.find("target")
        if t is not None and t.get("dev") == dev:
            return d
    return None


def _is_export(disk: ET.Element, socket: str, export: str) -> bool:
    src, host = disk.find("source"), disk.find("source/host")
    return (disk.get("type") == "network" and src is not None and src.get("protocol") == "nbd"
            and src.get("name", "") == export and host is not None and host.get("socket") == socket)


def _el(parent: ET.Element, tag: str, text: str | None = None, **attrs) -> ET.Element:
    e = ET.SubElement(parent, tag, {k: str(v) for k, v in attrs.items()})
    if text is not None:
        e.text = str(text)
    return e


def domain_xml_from_fields(config: DomainConfig) -> ET.Element:
    """A domain definition made from the configuration's fields alone (a configuration another manager
    wrote, without libvirt's definition): type, vCPUs, memory, boot, disks, NICs, agent channel."""
    root = ET.Element("domain", {"type": config.domain_type or "kvm"})
    _el(root, "name", config.name)
    if config.uuid:
        _el(root, "uuid", config.uuid)
    _el(root, "memory", config.memory_kib, unit="KiB")
    _el(root, "vcpu", config.vcpus)
    os_el = _el(root, "os", **({"firmware": config.boot.firmware} if config.boot.firmware == "efi" else {}))
    t = _el(os_el, "type", config.boot.type or "hvm")
    if config.boot.arch:
        t.set("arch", config.boot.arch)
    for tag in ("kernel", "initrd", "cmdline"):
        if getattr(config.boot, tag):
            _el(os_el, tag, getattr(config.boot, tag))
    for dev in config.boot.devices:
        _el(os_el, "boot", dev=dev)
    feats = _el(root, "features")
    _el(feats, "acpi")
    devices = _el(root, "devices")
    for d in config.disks:
        disk = _el(devices, "disk", type="file", device=d.device)
        _el(disk, "target", dev=d.target, bus=d.bus or "virtio")
        if d.readonly:
            _el(disk, "readonly")
        if d.source is not None and d.source.kind in ("file", "block", "nbd"):
            _set_source(disk, d.source, nbd_policy=True)
    for n in config.nics:
        iface = _el(devices, "interface", type=n.kind or "network")
        if n.mac:
            _el(iface, "mac", address=n.mac)
        if n.source and n.kind in ("network", "bridge"):
            _el(iface, "source", **{n.kind: n.source})
        _el(iface, "model", type=n.model or "virtio")
    if config.guest_agent:
        ch = _el(devices, "channel", type="unix")
        _el(ch, "target", type="virtio", name=AGENT_CHANNEL)
    return root


def _disconnect(iface: ET.Element) -> None:
    """A NIC attached to nothing: a tap device on no bridge, link down (the guest sees its NIC, unplugged)."""
    for tag in ("source", "target", "virtualport", "bandwidth", "vlan", "ip", "route", "portForward"):
        for el in iface.findall(tag):
            iface.remove(el)
    iface.set("type", "ethernet")
    for el in iface.findall("link"):
        iface.remove(el)
    _el(iface, "link", state="down")


# ----------------------------------------------------------------------------- the driver
class LibvirtHypervisor(Hypervisor):
    def __init__(self, conn: "libvirt.virConnect", uri: str):
        self.conn, self.uri = conn, uri

    @classmethod
    def connect(cls, uri: str) -> "LibvirtHypervisor":
        # a per-user URI (qemu:///session) may start the user's libvirtd as a child of this thread, and the
        # guests it runs after it: they belong on the guests' CPUs, not on replication_cpus
        with _mapped(f"connect to {uri}"), guest_placement():
            return cls(libvirt.open(uri), uri)

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self.conn.close()
            self.conn = None

    # ------------------------------------------------------------- helpers
    def _dom(self, name: str) -> "libvirt.virDomain":
        with _mapped(f"domain {name!r}"):
            return self.conn.lookupByName(name)

    def _inactive_xml(self, dom) -> str:
        with _mapped(f"domain {dom.name()!r}: read its definition"):
            return dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)

    def _redefine(self, name: str, root: ET.Element) -> None:
        with _mapped(f"domain {name!r}: define the rewritten definition"):
            self.conn.defineXML(_xml(root))

    # ------------------------------------------------------------- reading
    def domain_config(self, name: str) -> DomainConfig:
        dom = self._dom(name)
        return parse_domain(self._inactive_xml(dom))

    def exists(self, name: str) -> bool:
        try:
            self._dom(name)
            return True
        except DomainNotFound:
            return False

    def list_domains(self) -> list[str]:
        with _mapped("list domains"):
            return sorted(d.name() for d in self.conn.listAllDomains())

    def state(self, name: str) -> DomainState:
        dom = self._dom(name)
        with _mapped(f"domain {name!r}: state"):
            st, reason = dom.state()
        return DomainState(_STATES.get(st, f"state-{st}"), _REASONS.get(st, {}).get(reason, str(reason)))

    # ------------------------------------------------------------- protection
    def point_disks_at_export(self, name, exports):
        dom = self._dom(name)
        with _mapped(f"domain {name!r}"):
            active = dom.isActive()
            if not dom.isPersistent():
                raise DomainStateError(f"domain {name!r} is transient: protection needs a defined domain")
        root = ET.fromstring(self._inactive_xml(dom))
        originals = {}
        for dev, (socket, export) in exports.items():
            disk = _find_disk(root, dev)
            if disk is None:
                raise HypervisorError(f"domain {name!r} has no disk {dev!r} "
                                      f"(it has {[d.target for d in parse_domain(_xml(root)).disks]})")
            if disk.get("device", "disk") not in ("disk", "lun"):
                raise HypervisorError(f"domain {name!r}: {dev} is a {disk.get('device')}, not a disk")
            if _is_export(disk, str(socket), export):
                continue                        # already there: its stored original stays the one to restore
            originals[dev] = _xml(disk).strip()
            _set_source(disk, DiskSource.nbd(str(socket), export), nbd_policy=True)
        if originals:
            self._redefine(name, root)
        return (NEXT_BOOT if active else NOW), originals

    def copy_to_export(self, name, target, socket, export, progress=None, timeout=None):
        dom = self._dom(name)
        t0 = time.monotonic()

        def live_disk():
            with _mapped(f"domain {name!r}: read its running definition"):
                disk = _find_disk(ET.fromstring(dom.XMLDesc(0)), target)
            if disk is None:
                raise HypervisorError(f"domain {name!r} has no disk {target!r}")
            return disk

        def job():
            with _mapped(f"domain {name!r}: block job of {target}"):
                return dom.blockJobInfo(target, 0)
        if not _is_export(live_disk(), str(socket), export):
            if not job():
                dest = ET.Element("disk", {"type": "network", "device": "disk"})
                _el(dest, "driver", name="qemu", type="raw")
                src = _el(dest, "source", protocol="nbd", name=export)
                _el(src, "host", transport="unix", socket=str(socket))
                with _mapped(f"domain {name!r}: copy {target} into the export {socket}"):
                    dom.blockCopy(target, _xml(dest), None, libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
                                  | libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT)
            while True:
                info = job()
                if not info:
                    raise HypervisorError(f"domain {name!r}: the copy of {target} into the export ended by itself")
                if progress is not None:
                    progress(info.get("cur", 0), info.get("end", 0))
                if info.get("end") and info.get("cur") == info.get("end"):
                    try:                                # in sync: switch the guest's disk onto the export
                        dom.blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
                        break
                    except libvirt.libvirtError:        # not ready yet (new writes to mirror): again
                        pass
                if timeout is not None and time.monotonic() - t0 > timeout:
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.blockJobAbort(target, 0)
                    raise HypervisorError(f"domain {name!r}: the copy of {target} into the export did not get in "
                                          f"sync within {timeout:g} s: cancelled")
                time.sleep(0.25)
            while job():
                time.sleep(0.1)
        disk = live_disk()
        if not _is_export(disk, str(socket), export):
            raise HypervisorError(f"domain {name!r}: {target} is not on the export after the switch")
        driver = disk.find("driver")
        return dict(driver.attrib) if driver is not None else {}

    def restore_disks(self, name, originals):
        dom = self._dom(name)
        with _mapped(f"domain {name!r}"):
            active = dom.isActive()
        root = ET.fromstring(self._inactive_xml(dom))
        for dev, original in originals.items():
            disk = _find_disk(root, dev)
            try:
                new = ET.fromstring(original)
            except ET.ParseError as e:
                raise HypervisorError(f"domain {name!r}: the stored definition of {dev} is not XML: {e}") from None
            t = new.find("target")
            if new.tag != "disk" or t is None or t.get("dev") != dev:
                raise HypervisorError(f"domain {name!r}: the stored definition for {dev} is not that disk's")
            if disk is None:
                raise HypervisorError(f"domain {name!r} has no disk {dev!r} any more")
            parent = next(p for p in root.iter() if disk in list(p))
            parent.insert(list(parent).index(disk), new)
            parent.remove(disk)
        if originals:
            self._redefine(name, root)
        return NEXT_BOOT if active else NOW

    # ------------------------------------------------------------- the recovery site
    def define(self, config, name=None, disks=None, network_map=None, *, console_path=None, keep_uuid=None):
        name = name or config.name
        if self.exists(name):
            raise DomainExists(f"a domain named {name!r} is already defined")
        keep_uuid = (name == config.name) if keep_uuid is None else keep_uuid
        disks = {k: DiskSource.coerce(v) for k, v in (disks or {}).items()}
        network_map = dict(network_map or {})
        notes: list[str] = []
        try:
            root = ET.fromstring(config.definition) if config.definition else domain_xml_from_fields(config)
        except ET.ParseError as e:
            raise HypervisorError(f"the configuration of {config.name!r} holds no valid definition: {e}") from None
        (root.find("name") if root.find("name") is not None else _el(root, "name")).text = name
        uuid = root.find("uuid")
        if uuid is not None and not keep_uuid:
            root.remove(uuid)                       # libvirt gives the copy its own
        for title in root.findall("title"):
            root.remove(title)
        devices = root.find("devices")
        if devices is None:
            devices = _el(root, "devices")
        for emulator in devices.findall("emulator"):
            devices.remove(emulator)                # libvirt picks this host's for the arch and domain type
        os_el = root.find("os")
        if os_el is not None:
            for nvram in os_el.findall("nvram"):   # NVRAM files are per domain and per host: a fresh one
                if nvram.text:
                    notes.append(f"UEFI variables are not carried over (NVRAM {nvram.text.strip()})")
                os_el.remove(nvram)

        wanted = set(disks)
        for disk in list(devices.findall("disk")):
            t = disk.find("target")
            dev = t.get("dev") if t is not None else ""
            if disk.get("device", "disk") in ("cdrom", "floppy"):
                if disk.find("source") is not None:
                    notes.append(f"{dev}: {disk.get('device')} left empty (its media is on the source site)")
                for el in disk.findall("source") + disk.findall("backingStore"):
                    disk.remove(el)
                disk.set("type", "file")
                continue
            if dev in disks:
                _set_source(disk, disks[dev], nbd_policy=True)
                wanted.discard(dev)
            else:
                notes.append(f"{dev}: not replicated, left out")
                devices.remove(disk)
        if wanted:
            raise HypervisorError(f"{config.name!r} has no disk {sorted(wanted)} to point at the failed-over data")

        for iface in devices.findall("interface"):
            mac = iface.find("mac")
            label = mac.get("address") if mac is not None else "NIC"
            src = iface.find("source")
            kind = iface.get("type", "")
            source = (src.get("network") or src.get("bridge") or "") if src is not None else ""
            for el in iface.findall("target"):
                iface.remove(el)
            if kind not in ("network", "bridge"):
                if kind != "user":
                    _disconnect(iface)
                    notes.append(f"NIC {label}: a {kind} interface is host-specific, left disconnected")
                continue
            target = network_map.get(source, ...)
            if target is ...:
                _disconnect(iface)
                notes.append(f"NIC {label}: network {source!r} is not mapped, left disconnected")
            elif target is None or target == "none":
                _disconnect(iface)
                notes.append(f"NIC {label}: not connected (mapped to none)")
            else:
                iface.set("type", "network")
                for el in iface.findall("source"):
                    iface.remove(el)
                iface.insert(0, ET.Element("source", {"network": target}))

        for tag in ("serial", "console"):
            for el in devices.findall(tag):
                if el.get("type") != "file":
                    continue
                if console_path:
                    src = el.find("source")
                    if src is None:
                        src = _el(el, "source")
                    src.attrib.clear()
                    src.set("path", str(console_path))
                else:
                    el.set("type", "pty")
                    for s in el.findall("source"):
                        el.remove(s)
        for ch in devices.findall("channel"):
            if ch.get("type") == "unix":            # the agent's socket: libvirt makes one per domain
                for s in ch.findall("source"):
                    ch.remove(s)
        with _mapped(f"define {name!r} from the configuration of {config.name!r}"):
            dom = self.conn.defineXML(_xml(root))
            return Defined(name=dom.name(), uuid=dom.UUIDString(), notes=tuple(notes))

    def start(self, name):
        dom = self._dom(name)
        with _mapped(f"start {name!r}"):
            dom.create()

    def destroy(self, name):
        """Stop the domain at once (power off); a domain already shut off is left as it is."""
        dom = self._dom(name)
        with _mapped(f"destroy {name!r}"):
            if dom.isActive():
                dom.destroy()

    def undefine(self, name):
        dom = self._dom(name)
        flags = 0
        for f in ("VIR_DOMAIN_UNDEFINE_NVRAM", "VIR_DOMAIN_UNDEFINE_MANAGED_SAVE",
                  "VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA", "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA"):
            flags |= getattr(libvirt, f, 0)
        with _mapped(f"undefine {name!r}"):
            dom.undefineFlags(flags)

    def shutdown(self, name, timeout=60, agent=True):
        """A clean shutdown (through the guest agent, else ACPI), waiting until the domain is shut off."""
        dom = self._dom(name)
        flags = libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT if agent else libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN
        with _mapped(f"shut down {name!r}", agent=agent):
            dom.shutdownFlags(flags)
        deadline = time.monotonic() + timeout
        while self.state(name).state != "shutoff":
            if time.monotonic() > deadline:
                raise DomainStateError(f"domain {name!r} did not shut off within {timeout} s")
            time.sleep(0.1)

    def resume(self, name, timeout=0.0, settle=0.5):
        dom = self._dom(name)
        if self.state(name).state != "paused":
            return False
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(DomainStateError):     # running already (resumed by someone else)
                with _mapped(f"resume {name!r}"):
                    dom.resume()
            t = time.monotonic()
            while self.state(name).state == "running":
                if time.monotonic() - t >= settle:
                    return True
                time.sleep(0.05)
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    # ------------------------------------------------------------- networks
    def create_isolated_network(self, name):
        with contextlib.suppress(NetworkError):
            net = self._net(name)
            with _mapped(f"network {name!r}"):
                if not net.isActive():
                    net.create()
                return net.bridgeName()
        root = ET.Element("network")
        _el(root, "name", name)
        _el(root, "bridge", stp="on", delay="0")   # no <forward>, no <ip>: isolated, the host not on it
        with _mapped(f"create isolated network {name!r}"):
            net = self.conn.networkDefineXML(_xml(root))
            try:
                net.create()
                net.setAutostart(True)
            except libvirt.libvirtError:
                with contextlib.suppress(libvirt.libvirtError):
                    net.undefine()
                raise
            return net.bridgeName()

    def _net(self, name):
        with _mapped(f"network {name!r}"):
            return self.conn.networkLookupByName(name)

    def network_exists(self, name):
        try:
            self._net(name)
            return True
        except NetworkError:
            return False

    def delete_network(self, name):
        """Destroy and undefine the network; one that does not exist is left as it is."""
        try:
            net = self._net(name)
        except NetworkError:
            return
        with _mapped(f"delete network {name!r}"):
            if net.isActive():
                net.destroy()
            if net.isPersistent():
                net.undefine()

    # ------------------------------------------------------------- the guest agent
    def agent_command(self, name, command, timeout=30, **arguments):
        dom = self._dom(name)
        msg = json.dumps({"execute": command, **({"arguments": arguments} if arguments else {})})
        with _mapped(f"domain {name!r}: guest agent {command}", agent=True):
            reply = libvirt_qemu.qemuAgentCommand(dom, msg, max(1, int(timeout)), 0)
        try:
            parsed = json.loads(reply) if reply else {}
        except ValueError:
            raise GuestAgentError(f"domain {name!r}: guest agent {command}: not JSON: {reply[:200]!r}") from None
        if "error" in parsed:
            raise GuestAgentError(f"domain {name!r}: guest agent {command}: {parsed['error']}")
        return parsed.get("return")

    def agent_ping(self, name, timeout=10):
        try:
            self.agent_command(name, "guest-ping", timeout=timeout)
            return True
        except GuestAgentError:
            return False

    def wait_running(self, name, timeout=60):
        t0 = time.monotonic()
        while True:
            st = self.state(name)
            if st.state == "running":
                return time.monotonic() - t0
            if st.state in ("shutoff", "crashed"):
                raise DomainStateError(f"domain {name!r} is {st.state} ({st.reason}), not running")
            if time.monotonic() - t0 > timeout:
                raise DomainStateError(f"domain {name!r} does not run after {timeout:g} s (it is {st.state} "
                                       f"({st.reason}))")
            time.sleep(0.1)

    def guest_ping(self, name, timeout=120):
        return self.wait_agent(name, timeout)

    def _agent_answers(self, name: str) -> bool:
        """A paused domain's agent cannot answer yet: not an error while waiting, since replicatord resumes
        a domain paused on an I/O error of the export's handover at its next look."""
        try:
            return self.agent_ping(name, timeout=2)
        except DomainStateError:
            return False

    def wait_agent(self, name: str, timeout: float = 120) -> float:
        """Wait until the guest agent answers (a freshly started guest's agent connects when it runs);
        returns the seconds it took, raises GuestAgentError after `timeout`."""
        t0 = time.monotonic()
        while not self._agent_answers(name):
            st = self.state(name)
            if st.state in ("shutoff", "crashed"):
                raise GuestAgentError(f"domain {name!r} is {st.state} ({st.reason}): no guest agent")
            if time.monotonic() - t0 > timeout:
                raise GuestAgentError(f"domain {name!r}: the guest agent did not answer within {timeout:.0f} s")
            time.sleep(0.25)
        return time.monotonic() - t0

    def _thaw(self, dom, name: str, tries: int = 3) -> int:
        last = None
        for i in range(tries):
            try:
                return dom.fsThaw(None, 0)
            except libvirt.libvirtError as e:
                last = e
                time.sleep(0.5 * (i + 1))
        raise GuestAgentError(f"domain {name!r}: could not thaw the guest's filesystems "
                              f"after {tries} tries: {last}")

    @contextlib.contextmanager
    def quiesce(self, name, timeout=30) -> Iterator[Quiesced]:
        dom = self._dom(name)
        try:
            frozen = dom.fsFreeze(None, 0)
        except libvirt.libvirtError as e:
            err = _error(e, f"domain {name!r}: freeze the guest's filesystems")
            # a freeze that timed out may still complete in the guest: thaw whatever was frozen
            with contextlib.suppress(libvirt.libvirtError):
                dom.fsThaw(None, 0)
            raise (err if isinstance(err, (GuestAgentError, DomainNotFound)) else GuestAgentError(err.message)) \
                from None
        q = Quiesced(frozen)
        lock = threading.Lock()
        state = {"done": False}

        def watchdog():
            with lock:
                if state["done"]:
                    return
                q.expired = True
                with contextlib.suppress(GuestAgentError):
                    self._thaw(dom, name)
        timer = threading.Timer(timeout, watchdog)
        timer.daemon = True
        timer.start()
        try:
            yield q
        finally:
            timer.cancel()
            with lock:
                state["done"] = True
                expired = q.expired
            if not expired:
                self._thaw(dom, name)
        if expired:
            raise QuiesceExpired(f"domain {name!r}: the guest was thawed by the watchdog after {timeout} s, "
                                 "before the quiesced work ended: not application-consistent")

    def guest_interfaces(self, name, timeout=10):
        dom = self._dom(name)
        with _mapped(f"domain {name!r}: guest interfaces", agent=True):
            found = dom.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT, 0)
        return [GuestInterface(name=n, mac=(v.get("hwaddr") or "").lower(),
                               addresses=tuple(f"{a['addr']}/{a['prefix']}" for a in (v.get("addrs") or [])))
                for n, v in sorted(found.items())]

    def guest_exec(self, name: str, argv: list[str], timeout: float = 30) -> tuple[int, str, str]:
        """Run a program in the guest through the agent (guest-exec, then guest-exec-status until it
        exits); returns (exit code, stdout, stderr)."""
        started = self.agent_command(name, "guest-exec", timeout=timeout, path=argv[0], arg=list(argv[1:]),
                                     **{"capture-output": True})
        pid = started["pid"]
        deadline = time.monotonic() + timeout
        while True:
            st = self.agent_command(name, "guest-exec-status", timeout=timeout, pid=pid)
            if st.get("exited"):
                out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
                err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
                return int(st.get("exitcode", -1)), out, err
            if time.monotonic() > deadline:
                raise GuestAgentError(f"domain {name!r}: {argv[0]} did not end within {timeout} s in the guest")
            time.sleep(0.1)

    def set_guest_ip(self, name, mac, address, gateway=None, timeout=30):
        """Done with `ip` in the guest (guest-exec of /bin/sh): a Linux guest with iproute2 or busybox.
        The address is set now, not written to the guest's network configuration files."""
        mac = mac.lower()
        if not MAC_RE.match(mac):
            raise HypervisorError(f"not a MAC address: {mac!r}")
        try:
            iface = ipaddress.ip_interface(address)
            gw = ipaddress.ip_address(gateway) if gateway else None
        except ValueError as e:
            raise HypervisorError(f"set_guest_ip: {e}") from None
        if "/" not in address:
            raise HypervisorError(f"set_guest_ip: {address!r} has no prefix length (e.g. 10.0.0.5/24)")
        script = (f'dev=; for i in /sys/class/net/*; do [ "$(cat $i/address)" = "{mac}" ] && dev=${{i##*/}}; '
                  f'done; [ -n "$dev" ] || {{ echo "no interface with MAC {mac}" >&2; exit 3; }}; '
                  f'ip link set "$dev" up && ip addr replace {iface.with_prefixlen} dev "$dev"')
        if gw is not None:
            script += f' && ip route replace default via {gw} dev "$dev"'
        code, out, err = self.guest_exec(name, ["/bin/sh", "-c", script], timeout=timeout)
        if code != 0:
            raise GuestAgentError(f"domain {name!r}: setting {address} on {mac} failed in the guest "
                                  f"(exit {code}): {(err or out).strip()[-500:]}")

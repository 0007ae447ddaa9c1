"""Domains as an operator defines them (libvirt XML written by hand, defined through libvirt-python
directly: the code under test only reads them), and the guest's console as tests/guest reads it."""
from __future__ import annotations

import time
import xml.etree.ElementTree as ET

from ..guest import image
from ..guest.harness import ConsoleLog


def primary_domain_xml(name: str, kernel: str, initrd: str, console: str, disks: list[tuple[str, str, str]],
                       nics: list[tuple[str, str]] = (), vcpus: int = 1, memory_mib: int = 256,
                       files: int = 4, maxkb: int = 64, pause: float = 0) -> str:
    """disks: (target dev, file, format); nics: (mac, network)."""
    root = ET.Element("domain", type="qemu")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(root, "vcpu").text = str(vcpus)
    os_el = ET.SubElement(root, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="q35").text = "hvm"
    ET.SubElement(os_el, "kernel").text = kernel
    ET.SubElement(os_el, "initrd").text = initrd
    ET.SubElement(os_el, "cmdline").text = image.kernel_cmdline(files=files, maxkb=maxkb, pause=pause)
    ET.SubElement(ET.SubElement(root, "features"), "acpi")
    ET.SubElement(root, "cpu", mode="maximum", check="none")
    for ev in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(root, ev).text = "destroy"
    dev = ET.SubElement(root, "devices")
    ET.SubElement(dev, "emulator").text = "/usr/bin/qemu-system-x86_64"
    for target, path, fmt in disks:
        d = ET.SubElement(dev, "disk", type="file", device="disk")
        ET.SubElement(d, "driver", name="qemu", type=fmt, discard="unmap")
        ET.SubElement(d, "source", file=path)
        ET.SubElement(d, "target", dev=target, bus="virtio")
    s = ET.SubElement(dev, "serial", type="file")
    ET.SubElement(s, "source", path=console)
    ET.SubElement(s, "target", port="0")
    ch = ET.SubElement(dev, "channel", type="unix")
    ET.SubElement(ch, "target", type="virtio", name="org.qemu.guest_agent.0")
    for mac, net in nics:
        i = ET.SubElement(dev, "interface", type="network")
        ET.SubElement(i, "source", network=net)
        ET.SubElement(i, "mac", address=mac)
        ET.SubElement(i, "model", type="virtio")
    ET.SubElement(dev, "controller", type="usb", model="none")
    ET.SubElement(dev, "memballoon", model="none")
    return ET.tostring(root, encoding="unicode")


def console_of(hv, name: str, path: str) -> ConsoleLog:
    """The domain's file console with the writer loop's markers; 'alive' while the domain runs or is paused."""
    def alive():
        try:
            return hv.state(name).state in ("running", "paused", "blocked")
        except Exception:  # noqa: BLE001 - gone is not alive
            return False
    return ConsoleLog(path, alive=alive, describe=lambda: f"domain {name!r}: {hv.state(name)}")


def wait_state(hv, name: str, pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        st = hv.state(name)
        if pred(st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}: no {what} within {timeout} s (state {st})")
        time.sleep(0.05)

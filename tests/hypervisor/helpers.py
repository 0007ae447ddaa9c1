"""Domains as an operator defines them (libvirt XML written by hand, defined through libvirt-python
directly: the code under test only reads them), and the guest's console as tests/guest reads it."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET

from ..daemon.two_sites import BIN, ROOT, free_port
from ..guest import image
from ..guest.harness import ConsoleLog


def primary_domain_xml(name: str, kernel: str, initrd: str, console: str, disks: list[tuple[str, str, str]],
                       nics: list[tuple[str, str]] = (), vcpus: int = 1, memory_mib: int = 256,
                       files: int = 4, maxkb: int = 64, pause: float = 0, extra: str = "") -> str:
    """disks: (target dev, file, format); nics: (mac, network)."""
    root = ET.Element("domain", type="qemu")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(root, "vcpu").text = str(vcpus)
    os_el = ET.SubElement(root, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="q35").text = "hvm"
    ET.SubElement(os_el, "kernel").text = kernel
    ET.SubElement(os_el, "initrd").text = initrd
    ET.SubElement(os_el, "cmdline").text = image.kernel_cmdline(files=files, maxkb=maxkb, pause=pause, extra=extra)
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


def machine_toml(name: str, uri: str, target: str, extra: str = "") -> str:
    """A [[machine]] table protecting domain `name` (its disk vda as NAME.vhdx) to `target`, every 30 s;
    `extra`: more keys (TLS files, failover_ip, quiesce ...)."""
    return (f'[[machine]]\nname = "{name}"\ndomain = "{name}"\nlibvirt = "{uri}"\ndisks = {{ vda = "{name}.vhdx" }}\n'
            f'target = "{target}"\nfrequency = "30s"\n{extra}\n')


def all_files_there(hv, name: str, lines: int) -> int:
    """In the guest: the first `lines` entries of its manifest, each file with its checksum."""
    script = (f"cd /mnt && n=$(head -n {lines} MANIFEST.sha256 | wc -l) && "
              f"head -n {lines} MANIFEST.sha256 | sha256sum -c -s && echo $n")
    code, out, err = hv.guest_exec(name, ["/bin/sh", "-c", script], timeout=60)
    assert code == 0, (code, out, err)
    return int(out.strip())


def first_round(con) -> int:
    line = [x for x in con.lines() if "GUEST_MOUNTED" in x][-1]
    return int(re.search(r"first_round=(\d+)", line).group(1))


class Site:
    def __init__(self, folder: str, name: str, body: str):
        self.dir, self.name = folder, name
        os.makedirs(folder, exist_ok=True)
        self.admin = free_port()
        self.config = os.path.join(folder, "replicatord.toml")
        with open(self.config, "w") as f:
            f.write(f'[daemon]\nstate_dir = "state"\nadmin_listen = "127.0.0.1:{self.admin}"\n\n{body}')
        self.proc = None

    def start(self, clock_shift: float = 0) -> None:
        self.out = open(os.path.join(self.dir, "daemon.log"), "ab")
        cmd = [sys.executable, "-m", "tests.daemon.shifted_replicatord", "--config", self.config] if clock_shift \
            else [os.path.join(BIN, "replicatord"), "--config", self.config]
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, "REPLICATOR_TEST_CLOCK_SHIFT": str(clock_shift)})
        self.wait(lambda: self.api("GET", "/v1/status")[0] == 200, "the admin API")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        if self.proc is not None:
            self.out.close()
            self.proc = None

    def text(self) -> str:
        with open(os.path.join(self.dir, "daemon.log"), errors="replace") as f:
            return f.read()[-5000:]

    def wait(self, predicate, what: str, timeout: float = 60):
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            assert self.proc is None or self.proc.poll() is None, f"{self.name} exited:\n{self.text()}"
            try:
                last = predicate()
                if last:
                    return last
            except (OSError, KeyError, ValueError, IndexError, StopIteration) as e:
                last = e
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: no {what} within {timeout} s (last: {last})\n{self.text()}")

    def api(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        with open(os.path.join(self.dir, "state", "admin.token")) as f:
            token = f.read().strip()
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=180) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def machine(self) -> dict:
        return self.api("GET", "/v1/status")[1]["machines"][0]

    def replica(self, name: str = "vm") -> dict:
        code, data = self.api("GET", f"/v1/replica/machines/{name}")
        assert code == 200, data
        return data

    def op(self, path: str, body: dict | None = None) -> dict:
        code, data = self.api("POST", path, body or {})
        assert code == 200, f"POST {path}: {code} {data}\n{self.text()}"
        return data

"""Protection removed: a machine that has a state file but is no longer in the configuration.

Its disks stop being tracked (their DISK.rpl sidecars go; the disks are the operator's and stay), and with
delete_replica_on_remove its replica and recovery points are deleted on the target, as Azure Site Recovery
does when replication is disabled. Until that succeeds (the replica may be unreachable) the state file
stays, and the next start tries again.

A machine that is a libvirt domain gets its disks back (daemon/domains.py recorded their definitions before
pointing them at the export): only once the domain is shut off (a running guest's disk is the export; the
removal waits, said in the log, and is tried again at the next start). The export is stopped, what the VHDX
holds now is written back into each disk's original file (`qemu-img convert` to its original format: the
original was left as it was when the VHDX was made, and booting it would go back in time), then the
original definitions are put back.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET

from ..errors import DiskIOError, DomainNotFound, ReplicatorError
from ..orchestration.states import state_path
from ..targets.factory import open_target

log = logging.getLogger("replicatord")


def removed_machines(state_dir: str, configured: set[str]) -> list[tuple[str, dict]]:
    """(name, protection) of the machines with a primary-role state file that the configuration no longer
    protects; `protection` is what PrimaryMachine recorded there."""
    folder = os.path.join(state_dir, "machines")
    names = sorted(n[:-5] for n in os.listdir(folder) if n.endswith(".json")) if os.path.isdir(folder) else []
    out = []
    for name in (n for n in names if n not in configured):
        try:
            with open(state_path(state_dir, name), encoding="utf-8") as f:
                data = json.load(f).get("data") or {}
        except (OSError, ValueError, AttributeError):
            continue                        # an unreadable file is not taken for a removal
        if data.get("role", "primary") == "primary" and data.get("protection"):
            out.append((name, data["protection"]))
    return out


async def remove_protection(state_dir: str, name: str, protection: dict, in_use: set[str]) -> None:
    """`in_use`: disk paths a configured machine protects now (their tracking stays)."""
    from ..tracking.remote import shutdown_running
    if protection.get("domain") and not await asyncio.to_thread(_give_back_disks, state_dir, name,
                                                                protection["domain"]):
        return
    if shutdown_running(os.path.join(state_dir, "nbd"), name):
        log.info("%s: protection removed: its export process stopped", name)
    if protection.get("delete_replica_on_remove"):
        p = protection
        target = open_target(p["target"], cert=p.get("cert"), key=p.get("key"), ca=p.get("ca"),
                             kerberos=bool(p.get("kerberos")), machine=name)
        try:
            for disk_name, d in p["disks"].items():
                deleted = await target.delete_disk(uuid.UUID(d["disk_id"]))
                log.info("%s: protection removed: replica of %s %s", name, disk_name,
                         "deleted" if deleted else "was already gone")
        except ReplicatorError as e:
            log.error("%s: protection removed, but its replica could not be deleted (tried again at the next "
                      "start): %s", name, e.message)
            return
        finally:
            await target.close()
    else:
        log.info("%s: protection removed; its replica on %s is kept", name, protection.get("target"))
    for d in protection["disks"].values():
        if os.path.abspath(d["path"]) not in in_use:
            shutil.rmtree(d["path"] + ".rpl", ignore_errors=True)   # tracking ends; the disk stays
    path = state_path(state_dir, name)
    os.replace(path, f"{path}.removed-{int(time.time())}")           # kept for the record, no longer loaded


def _give_back_disks(state_dir: str, name: str, dom: dict) -> bool:
    """The domain's disks back as they were before protection, with what the guest wrote since; False when it
    must wait (the domain runs, libvirt is unreachable, a copy failed: tried again at the next start)."""
    from ..hypervisor import Hypervisor
    from ..tracking.remote import shutdown_running
    try:
        with Hypervisor.open(dom["uri"]) as hv:
            try:
                st = hv.state(dom["name"])
            except DomainNotFound:
                log.warning("%s: protection removed: domain %r is no longer defined; its disks stay in %s", name,
                            dom["name"], ", ".join(dom["targets"].values()))
                return True
            if st.state != "shutoff":
                log.error("%s: protection removal waits: domain %r is %s and its disks are the export; shut it off "
                          "(the removal is tried again at the next start of replicatord)", name, dom["name"], st.state)
                return False
            if shutdown_running(os.path.join(state_dir, "nbd"), name):
                log.info("%s: protection removed: its export process stopped", name)
            for target, original in sorted(dom["originals"].items()):
                _write_back(name, target, dom["targets"][target], original)
            hv.restore_disks(dom["name"], dom["originals"])
    except ReplicatorError as e:
        log.error("%s: protection removal waits: the disks of domain %r could not be given back (tried again at "
                  "the next start): %s", name, dom["name"], e.message)
        return False
    log.info("%s: protection removed: domain %r uses its own disks again (%s)", name, dom["name"],
             ", ".join(sorted(dom["originals"])) or "none changed")
    return True


def original_disk(original_xml: str) -> tuple[str, str | None, str]:
    """(kind, path, format) of a disk's definition from before protection: a file or block device's path,
    None for anything else (a network disk)."""
    disk = ET.fromstring(original_xml)
    src, driver = disk.find("source"), disk.find("driver")
    fmt = (driver.get("type") if driver is not None else None) or "raw"
    kind = disk.get("type", "file")
    path = src.get("file") if kind == "file" and src is not None else src.get("dev") if kind == "block" and \
        src is not None else None
    return kind, path, fmt


def _write_back(name: str, target: str, vhdx: str, original_xml: str) -> None:
    """What the VHDX holds, into the disk the domain had before protection (a file, replaced atomically, or
    a block device, overwritten)."""
    kind, path, fmt = original_disk(original_xml)
    if not path:
        log.warning("%s: %s was not a file or block device before protection: what the guest wrote since is "
                    "in %s only", name, target, vhdx)
        return
    out = path if kind == "block" else f"{path}.replicator-{os.getpid()}"
    argv = ["qemu-img", "convert", "-f", "vhdx", "-O", fmt] + (["-n"] if kind == "block" else []) + [vhdx, out]
    t = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True)
    except OSError as e:
        raise DiskIOError(f"{target}: cannot run qemu-img to write {vhdx} back into {path}: {e}") from None
    if done.returncode != 0:
        if out != path and os.path.exists(out):
            os.unlink(out)
        raise DiskIOError(f"{target}: writing {vhdx} back into {path} failed: {done.stderr.strip()[-300:]}")
    if out != path:
        os.replace(out, path)
    log.info("%s: %s: %s written back into %s (%s) in %.1f s", name, target, vhdx, path, fmt, time.monotonic() - t)

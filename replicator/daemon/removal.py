"""Protection removed: a machine that has a state file but is no longer in the configuration.

Its disks stop being tracked (their DISK.rpl sidecars go; the disks are the operator's and stay), and with
delete_replica_on_remove its replica and recovery points are deleted on the target, as Azure Site Recovery
does when replication is disabled. Until that succeeds (the replica may be unreachable) the state file
stays, and the next start tries again.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid

from ..errors import ReplicatorError
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

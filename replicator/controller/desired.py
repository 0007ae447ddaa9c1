"""A host's desired configuration, rendered from the store: what its replicatord.toml would say if an operator
wrote it by hand, as JSON in the same schema (orchestration/settings.py), plus the fencing table.

- Machines whose primary is this host: the policy's settings (the machine's own policy, else its pair's), the
  replica host's data URL as target, this host's certificate files for the data path.
- On a replica host, `[replica]`: the listener from its data URL, an allow entry per primary host of every
  pair whose recovery cloud holds it (and of every machine placed on it), by certificate CN (the host id),
  with the storage root from the pair's storage mappings; the network map from the pair's network mappings.
  When the pair's policy says auth = "kerberos", the listener is Kerberos (HTTP with SPNEGO, the policy's
  port or 8083, the host's default keytab) and primaries are allowed by their machine principal,
  `host/HOSTNAME@REALM` (any realm).
- Extended replication (issue 17): on the replica host of each machine of a pair with an extended leg,
  `[[extended]]` for that machine (target: the data URL of the third cloud's host placed for it, the leg's
  policy, the storage root and trust group the machine's disks have here); on that third-site host,
  `[replica]` allowing every host of the pair's recovery cloud.

Paths to the agent's own files are relative: replicatord reads the document from STATE/controller/desired.json
and takes relative paths from that folder, so "host.pem" is the agent's certificate and ".." its state
directory, wherever the host keeps it.

The revision: each (revision, rendering) a host is served is an audit entry (actor "controller", action
"host.desired", target the host id, detail {revision, digest}: the SHA-256 of the rendering); when the
rendering's digest differs from the one last served under the host's desired_revision, it is raised. The audit log so also says which
configuration revision each host was given, and when. So any change that alters what a host should run (a policy edited, a machine
enabled, a mapping added, a peer's address) gives a new revision, and a change that alters nothing does not.
"""
from __future__ import annotations

import hashlib
import json
import os
from urllib.parse import urlsplit

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..replication.pacing import COPY_RATE_WHEN_BUSY
from . import failover
from .models import (AuditEntry, Cloud, CloudPair, ExtendedPair, ExtendedPlacement, Host, Machine,
                     ProtectionPolicy)

CERT_FILES = {"cert": "host.pem", "key": "host.key", "ca": "ca.pem"}
DEFAULT_ROOT = "../replica"               # a replica host's store when the pair maps no storage (STATE/replica)
KERBEROS_PORT = 8083


def _listen(url: str | None, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url or "")
    return parts.hostname or "0.0.0.0", parts.port or default_port


def copy_rate(policy: ProtectionPolicy) -> dict:
    """The policy's copy_rate_when_busy as a protection key, left out at replicatord's default so that a
    host from before the key still takes the configuration (0: full speed)."""
    if policy.copy_rate_when_busy == COPY_RATE_WHEN_BUSY:
        return {}
    return {"copy_rate_when_busy": policy.copy_rate_when_busy or "none"}


def _protection(policy: ProtectionPolicy, replica: Host, domain: bool) -> dict:
    """The [[machine]] protection keys of a policy, aimed at the replica host."""
    out: dict = {"frequency": policy.frequency, "additional_points": policy.additional_points,
                 "compression": policy.compression, "auth": policy.auth, "resync": policy.resync,
                 "delete_replica_on_remove": policy.delete_replica_on_remove,
                 "bandwidth_limit": policy.bandwidth_limit or "none", "rpo_threshold": policy.rpo_threshold,
                 **copy_rate(policy)}
    # application-consistent points need a quiesce provider: a domain machine has libvirt's; a machine of
    # plain disk files has none the controller knows of, so its points stay crash-consistent
    if policy.app_consistent_hours and domain:
        out["app_consistent_hours"] = policy.app_consistent_hours
    if policy.resync_window and policy.resync == "auto":
        out["resync_window"] = policy.resync_window
    mode = policy.initial_method
    initial = {"mode": mode}
    for key, value in (("at", policy.initial_at), ("seed_dir", policy.initial_seed_dir),
                       ("path", policy.initial_path)):
        if value and key in {"scheduled": ("at",), "offline": ("seed_dir",), "existing": ("path",)}.get(mode, ()):
            initial[key] = value
    out["initial_replication"] = initial
    if policy.target_kind == "azure":
        out["target"] = f"azure://{policy.azure_storage_account}/{policy.azure_container}"
        return out
    host, port = _listen(replica.data_url, 8084)
    if policy.port:
        port = policy.port
    if policy.auth == "kerberos":
        out["target"] = f"http://{host}:{policy.port or KERBEROS_PORT}"
    else:
        out["target"] = f"https://{host}:{port}"
        out.update(CERT_FILES)
    return out


def _machine_policy(m: Machine) -> ProtectionPolicy | None:
    if m.policy is not None:
        return m.policy
    pair = m.cloud.pair if m.cloud is not None else None
    return pair.association.policy if pair is not None and pair.association is not None else None


def _storage_root(pair: CloudPair | None, disks: list[str]) -> str:
    """The target root of the pair's storage mapping whose source root holds most of these disks (the longest
    matching prefix per disk), else the pair's first mapping, else DEFAULT_ROOT."""
    mappings = sorted(pair.storage_mappings, key=lambda s: s.id) if pair is not None else []
    votes: dict[str, int] = {}
    for d in disks:
        best = max((s for s in mappings if os.path.normpath(d).startswith(os.path.normpath(s.source_root) + os.sep)),
                   key=lambda s: len(s.source_root), default=None)
        if best is not None:
            votes[best.target_root] = votes.get(best.target_root, 0) + 1
    if votes:
        return max(votes, key=lambda r: votes[r])
    return mappings[0].target_root if mappings else DEFAULT_ROOT


def _disk_paths(m: Machine) -> list[str]:
    return list(m.disks.values()) if isinstance(m.disks, dict) else list(m.disks or [])


def _machine_entry(m: Machine, policy: ProtectionPolicy) -> dict:
    entry: dict = {"name": m.name}
    if m.domain:
        entry.update(domain=m.domain, disks=dict(m.disks))
    else:
        entry["disks"] = list(m.disks or [])
    if m.excluded:
        entry["exclude"] = list(m.excluded)
    entry.update(_protection(policy, m.replica_host, bool(m.domain)))
    return entry


def principal(h: Host, auth: str) -> str:
    """How a replica server names host `h` connecting to it: its certificate's CN (the host id), or under
    Kerberos its machine principal in any realm (the one `kinit -k host/HOSTNAME` gives)."""
    return f"host/{h.hostname}@*" if auth == "kerberos" else h.id


def _pair_auth(pair: CloudPair | None) -> str:
    policy = pair.association.policy if pair is not None and pair.association is not None else None
    return policy.auth if policy is not None and policy.target_kind == "peer" else "certificate"


def _replica_section(s: Session, host: Host, placed: list[Machine],
                     reversing: list[Machine] = ()) -> tuple[dict | None, dict[str, dict]]:
    """([replica] or None, allow entries by primary host id) for a host in a pair's recovery cloud, one that
    machines are placed on, one of a pair's third cloud (its extended replicas come from the pair's
    recovery cloud), or the primary host of machines that replicate back to it (`reversing`: reverse
    replication from their replica host, into STATE/replica)."""
    pairs = []
    if host.cloud is not None and host.cloud.pair is not None and host.cloud.pair_role == "recovery":
        pairs.append(host.cloud.pair)
    extended = s.scalars(select(ExtendedPair).where(ExtendedPair.cloud_id == host.cloud_id)).all() \
        if host.cloud_id is not None else []
    if not pairs and not placed and not extended and not reversing:
        return None, {}
    # one listener, one authentication: the pair's policy (enable and patch keep machines' own policies to it),
    # on the policy's port when it names one (the primaries' targets say the same, _protection)
    served = pairs[0] if pairs else placed[0].cloud.pair if placed else None
    if served is None and reversing:
        served = reversing[0].cloud.pair if reversing[0].cloud is not None else None
    auth = _pair_auth(served)
    policy_port = served.association.policy.port if served is not None and served.association else None
    if extended:
        auth, policy_port = extended[0].auth, None
    elif not pairs and not placed:
        policy_port = None         # only a reverse source: its data URL's port (failover._reverse_settings)
    allow: dict[str, dict] = {}
    for pair in pairs:
        primary_cloud = pair.cloud("primary")
        for h in sorted(primary_cloud.hosts if primary_cloud else [], key=lambda h: h.id):
            disks = [d for m in placed if m.primary_host_id == h.id for d in _disk_paths(m)]
            allow[h.id] = {"principal": principal(h, auth), "storage": _storage_root(pair, disks),
                           "trust_group": pair.name}
    for m in placed:
        if m.primary_host_id and m.primary_host_id not in allow:
            pair = m.cloud.pair if m.cloud is not None else None
            allow[m.primary_host_id] = {"principal": principal(m.primary_host, auth),
                                        "storage": _storage_root(pair, _disk_paths(m)),
                                        "trust_group": pair.name if pair is not None else m.primary_host_id}
    for ext in extended:
        recovery = ext.pair.cloud("recovery")
        for h in sorted(recovery.hosts if recovery else [], key=lambda h: h.id):
            allow.setdefault(h.id, {"principal": principal(h, auth), "storage": ext.storage or DEFAULT_ROOT,
                                    "trust_group": ext.pair.name})
    for m in reversing:            # reverse replication: certificates only (failover.request_reverse)
        if m.replica_host_id and m.replica_host_id not in allow:
            pair = m.cloud.pair if m.cloud is not None else None
            allow[m.replica_host_id] = {"principal": principal(m.replica_host, "certificate"),
                                        "storage": DEFAULT_ROOT,
                                        "trust_group": pair.name if pair is not None else m.replica_host_id}
    if not allow:
        return None, {}            # no primary host to serve yet (the replica server refuses to start so)
    listen, port = _listen(host.data_url, 8084)
    if auth == "kerberos":
        section: dict = {"listen": listen, "port": policy_port or KERBEROS_PORT, "auth": "kerberos",
                         "allow": list(allow.values())}
    else:
        section = {"listen": listen, "port": policy_port or port, **CERT_FILES, "allow": list(allow.values())}
    networks = {n.source_network: n.target_network for p in pairs for n in p.network_mappings}
    if networks:
        # the network map applies to domains a failover starts through libvirt (settings require the URI)
        section.update(libvirt="qemu:///system", network_map=networks)
    return section, allow


def extended_target(ext: ExtendedPair, third: Host | None) -> str | None:
    """The URL the extended leg sends to: the third-site host's data URL (certificates), or its Kerberos
    listener."""
    if third is None or not third.data_url:
        return None
    host, port = _listen(third.data_url, 8084)
    return f"http://{host}:{KERBEROS_PORT}" if ext.auth == "kerberos" else f"https://{host}:{port}"


def _extended_entry(m: Machine, ext: ExtendedPair, allowed: dict) -> dict | None:
    """[[extended]] for a machine replicated to this host, or None while its third-site host is not known or
    this host does not hold its disks under a known root."""
    target = extended_target(ext, m.extended_host)
    if target is None or allowed is None:
        return None
    entry: dict = {"machine": m.name, "target": target, "frequency": ext.frequency,
                   "additional_points": ext.additional_points, "compression": ext.compression,
                   "storage": allowed["storage"], "trust_group": allowed["trust_group"]}
    if ext.bandwidth_limit:
        entry["bandwidth_limit"] = ext.bandwidth_limit
    if ext.auth == "kerberos":
        entry["auth"] = "kerberos"
    else:
        entry.update(CERT_FILES)
    return entry


def place_extended(s: Session) -> None:
    """Give each machine of a pair with an extended leg that has no extended host yet the least loaded host
    of the third cloud (ties: by hostname). A placement is kept once made (the extended replica's disks are
    there); two controllers placing one machine at once: the second's insert is dropped."""
    waiting = s.execute(select(Machine, ExtendedPair).join(Cloud, Machine.cloud_id == Cloud.id)
                        .join(ExtendedPair, ExtendedPair.pair_id == Cloud.pair_id)
                        .outerjoin(ExtendedPlacement, ExtendedPlacement.machine_id == Machine.id)
                        .where(ExtendedPlacement.machine_id.is_(None), Machine.desired_state != "disabled")
                        .order_by(Machine.id)).all()
    for machine, ext in waiting:
        load = (select(Host, func.count(ExtendedPlacement.machine_id).label("n"))
                .outerjoin(ExtendedPlacement, ExtendedPlacement.host_id == Host.id)
                .where(Host.cloud_id == ext.cloud_id).group_by(Host.id).order_by("n", Host.hostname))
        row = s.execute(load).first()
        if row is None:
            continue               # the third cloud has no host yet: placed when one joins
        try:
            with s.begin_nested():
                machine.extended = ExtendedPlacement(host=row[0])
                s.flush()
        except IntegrityError:
            s.expire(machine, ["extended"])


def render(s: Session, host: Host) -> dict:
    """{"config": replicatord configuration, "fencing": {machine: {epoch, role}}, "operations": {machine:
    {"state": enabled|paused, "resync": N}}} for this host (operations: what the agent applies at runtime,
    as an operator's pause/resume/resync through the admin API would; a raised N asks for one resync)."""
    place_extended(s)
    admin_host, admin_port = _listen(host.admin_url, 8085)
    config: dict = {"daemon": {"state_dir": "..", "admin_listen": f"{admin_host}:{admin_port}"}}
    fencing: dict = {}
    operations: dict = {}
    machines = s.scalars(select(Machine).where(or_(Machine.primary_host_id == host.id,
                                                   Machine.replica_host_id == host.id))
                         .order_by(Machine.name)).all()
    entries = []
    for m in machines:
        if m.desired_state == "disabled":
            continue
        if m.primary_host_id == host.id:
            policy = _machine_policy(m)
            if policy is None or (m.replica_host is None and policy.target_kind != "azure"):
                continue               # not placed yet: nothing this host can run for it
            if m.domain and not isinstance(m.disks, dict):
                continue               # a domain needs its disk targets' VHDX files, which the store lacks yet
            entries.append(_machine_entry(m, policy))
            fencing[m.name] = {"epoch": failover.primary_epoch(s, m), "role": failover.roles(m)[0]}
            operations[m.name] = {"state": m.desired_state, "resync": m.resync_requested}
        else:
            fencing[m.name] = {"epoch": m.fencing_epoch, "role": failover.roles(m)[1]}
    if entries:
        config["machine"] = entries
    placed = [m for m in machines if m.replica_host_id == host.id and m.desired_state != "disabled"]
    for name, step in failover.host_operations(s, host).items():      # a failover step this host runs
        operations.setdefault(name, {}).update(step)
    reversing = [m for m in machines if m.primary_host_id == host.id and m.desired_state != "disabled"
                 and failover.reverse_source(s, m)]
    replica, allow = _replica_section(s, host, placed, reversing)
    if replica is not None:
        config["replica"] = replica
    legs = []
    for m in placed:
        ext = m.cloud.pair.extended if m.cloud is not None and m.cloud.pair is not None else None
        entry = _extended_entry(m, ext, allow.get(m.primary_host_id)) if ext is not None and replica else None
        if entry is not None:
            legs.append(entry)
    if legs:
        config["extended"] = legs
    return {"config": config, "fencing": fencing, "operations": operations}


def digest(doc: dict) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def current(s: Session, host: Host) -> dict:
    """The host's desired document with its revision, raising the revision if the rendering changed."""
    doc = render(s, host)
    d = digest(doc)
    last = s.scalars(select(AuditEntry).where(AuditEntry.action == "host.desired", AuditEntry.target == host.id)
                     .order_by(AuditEntry.id.desc()).limit(1)).first()
    # a revision names one rendering: a new one is raised when the rendering changed under the revision last
    # served (a route may also have raised it already, api/common.py bump_revision: then that one is used)
    if last is not None and last.detail.get("digest") != d and last.detail.get("revision") == host.desired_revision:
        host.desired_revision = (host.desired_revision or 0) + 1
    if last is None or last.detail.get("digest") != d or last.detail.get("revision") != host.desired_revision:
        s.add(AuditEntry(actor="controller", action="host.desired", target=host.id,
                         detail={"revision": host.desired_revision, "digest": d}))
        s.flush()
    return {"revision": host.desired_revision, **doc}

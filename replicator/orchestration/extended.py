"""`[[extended]]` in a replica host's replicatord.toml: extended replication legs (daemon/extended.py).

    [[extended]]
    machine = "vm01"                         # a machine replicated to this site
    target = "https://site-c.example.com:8084"
    frequency = "5m"                         # 5m or 15m (Hyper-V's choices for the extended leg)
    additional_points = 4                    # the extended site's own hourly points (0-24)
    compression = true
    bandwidth_limit = "20M"
    storage = "/srv/replicas/site-a"         # the storage root holding the machine (default: the only one)
    trust_group = "tenant-a"                 # whose vm01: needed when several trust groups share the root
    cert = "..."; key = "..."; ca = "..."    # default: [replica]'s own certificate; auth = "kerberos" too

The leg runs no more often than the primary leg can feed it: 5 or 15 minutes, never 30 s.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from .settings import _NAME, _checked, _Table, parse_bandwidth, parse_frequency, parse_target

FREQUENCIES = (300.0, 900.0)          # Hyper-V offers 5 and 15 minutes for the extended leg


@dataclass
class ExtendedSettings:
    """`[[extended]]` of a replica host's replicatord.toml."""
    machine: str
    target: str
    storage: str                       # the storage root holding the machine's replica disks
    frequency: float = 300.0
    additional_points: int = 0
    compression: bool = True
    bandwidth_limit: int | None = None
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    kerberos: bool = False
    seed_dir: str | None = None        # initial_replication = { mode = "offline", seed_dir = ... }
    trust_group: str | None = None     # the owner of the machine's disks in a root several groups share


KEYS = {"machine", "target", "frequency", "additional_points", "compression", "bandwidth_limit", "storage", "cert",
        "key", "ca", "auth", "initial_replication", "trust_group"}


def _target_problem(target: str, storages: list[str]) -> str | None:
    """Why `target` cannot be an extended replica (None: it can): a URL no target takes, or a storage root
    this replica server writes (the leg would forward disks into the store they come from)."""
    try:
        parse_target(target)
    except ValueError as e:
        return str(e)
    parts = urlsplit(target)
    if parts.scheme == "local" and os.path.normpath(parts.path) in {os.path.normpath(s) for s in storages}:
        return f"{parts.path} is its own storage root ([replica].allow): the extended replica is another site"
    return None


def parse_extended(root: _Table, replica) -> list[ExtendedSettings]:
    """Every [[extended]] leg, checked; problems go to the configuration's report like every other table's."""
    legs: list[ExtendedSettings] = []
    seen: set[str] = set()
    storages = sorted({a.storage for a in replica.allow}) if replica is not None else []
    for i, raw in enumerate(root.items("extended", dict)):
        name = raw.get("machine")
        t = _Table(raw, f"extended[{name if isinstance(name, str) and name else i}]", root.rep, KEYS, root.base)
        if replica is None:
            root.rep.error(t.path, "extended replication runs on a replica site: this configuration has no [replica]")
            continue
        if not isinstance(name, str) or not _NAME.match(name):
            root.rep.error(t.at("machine"), "missing or not a machine name")
            continue
        if name in seen:
            root.rep.error(t.at("machine"), f"machine {name!r} has two extended legs (Hyper-V allows one)")
            continue
        seen.add(name)
        target = t.str("target")
        if not target:
            root.rep.error(t.at("target"), "missing: the extended replica's URL (https://HOST:8084, "
                                           "http://HOST:8083 for Kerberos, or local:///PATH)")
        else:
            problem = _target_problem(target, storages)
            if problem:
                root.rep.error(t.at("target"), problem)
                target = None
        out: dict = {}
        _checked(t, "frequency", parse_frequency, out)
        frequency = float(out.get("frequency", 300))
        if "frequency" in out and frequency not in FREQUENCIES:
            root.rep.error(t.at("frequency"), "the extended leg runs every 5m or 15m (never more often than "
                                              "the primary leg)")
        _checked(t, "bandwidth_limit", parse_bandwidth, out)
        storage = t.file("storage")
        if storage is None:
            if len(storages) == 1:
                storage = storages[0]
            else:
                root.rep.error(t.at("storage"), f"missing: which storage root holds {name} "
                                                f"({', '.join(storages) or 'none is allowed'})")
        elif storage not in storages:
            root.rep.error(t.at("storage"), f"{storage} is not a storage root of [replica].allow")
        auth = t.str("auth", "cert")
        if auth not in ("cert", "certificate", "kerberos"):
            root.rep.error(t.at("auth"), f"must be cert or kerberos, not {auth!r}")
        seed_dir = None
        initial = raw.get("initial_replication", "network")
        if isinstance(initial, dict) and initial.get("mode") == "offline" and isinstance(initial.get("seed_dir"), str):
            seed_dir = _Table(initial, t.at("initial_replication"), root.rep, {"mode", "seed_dir"}, root.base
                              ).file("seed_dir")
        elif initial not in ("network", {"mode": "network"}):
            root.rep.error(t.at("initial_replication"), 'must be "network" or { mode = "offline", seed_dir = "..." }')
        if not target or storage is None:
            continue
        legs.append(ExtendedSettings(
            machine=name, target=target, storage=storage, frequency=frequency,
            additional_points=t.int("additional_points", 0, 24, 0), compression=t.get(
                "compression", (bool,), "true or false", True), bandwidth_limit=out.get("bandwidth_limit"),
            cert=t.file("cert", replica.cert), key=t.file("key", replica.key), ca=t.file("ca", replica.ca),
            kerberos=auth == "kerberos", seed_dir=seed_dir, trust_group=t.str("trust_group")))
    return legs

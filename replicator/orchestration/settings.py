"""`replicatord.toml`: the daemon's roles and the protection settings of every machine, refused at load when
anything is wrong -- every problem at once, each with its dotted field path, so one edit fixes them all.

Settings follow Hyper-V Replica and ASR: frequency 30 s / 5 min / 15 min, 0-24 additional hourly points,
application-consistent points every 1-12 h (fewer hours than additional points), compression, certificate
or Kerberos authentication, initial replication over the network, at a set time, from an offline seed or
from an existing disk. A group's settings are defaults for its machines; a machine's own keys override them.

Relative paths are taken from the directory of the configuration file. File checks: a disk file that does
not exist is a *warning*, not an error (storage can mount after the daemon starts, and one machine's missing
disk must not stop the protection of the others; that machine fails its cycles and shows Critical). A path
that exists but is not a file is an error. `strict=True` turns warnings into errors (`--check-config`).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import json
import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..errors import UsageError
from ..priority import parse_cpu_list
from ..replica.limits import LIMITS, ReplicaLimits
from ..replication.pacing import COPY_RATE_WHEN_BUSY
from ..units import scaled
from . import failover_ips
from .plans import KINDS as FAILOVER_KINDS
from .plans import MAX_GROUPS, ManualAction, PlanGroup, RecoveryPlan, ScriptAction

FREQUENCIES = (30, 300, 900)
AUTH_MODES = ("certificate", "kerberos")
DEFAULT_PORTS = {"certificate": 8084, "kerberos": 8083}
INITIAL_MODES = {"network": (), "scheduled": ("at",), "offline": ("seed_dir",), "existing": ("path",)}
RESYNC_MODES = ("auto", "manual")
QUIESCE_PROVIDERS = {"script": ("pre_freeze", "post_thaw"), "qga": ("socket",), "libvirt": ()}
DEFAULT_ADMIN = "127.0.0.1:8085"
PROTECTION_KEYS = frozenset({
    "frequency", "additional_points", "app_consistent_hours", "compression", "auth", "port", "cert", "key",
    "ca", "initial_replication", "delete_replica_on_remove", "bandwidth_limit", "copy_rate_when_busy", "resync",
    "resync_window", "target", "quiesce", "encryption_key_file", "rpo_threshold"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_FREQ = re.compile(r"^\s*(\d+)\s*(s|sec|m|min)?\s*$", re.I)
_SPAN = re.compile(r"^\s*(\d+)\s*(s|m|h)?\s*$", re.I)
RPO_THRESHOLD = (30, 86400)          # seconds: what rpo_threshold may be (default an hour, Hyper-V's rule)
_BW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?(/s)?\s*$", re.I)
_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")


class ConfigError(UsageError):
    """The configuration is refused; `problems` holds (field path, reason) for every problem found."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "replicatord.toml"):
        lines = "\n".join(f"  {path}: {reason}" for path, reason in problems)
        super().__init__(f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''}:\n{lines}")
        self.problems = list(problems)


# ---------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class InitialReplication:
    mode: str = "network"
    at: dt.datetime | dt.time | None = None     # scheduled: a moment, or a time of day (the next one)
    seed_dir: str | None = None                 # offline: where the seed is written
    path: str | None = None                     # existing: the disk (or a folder of disks) on the replica


@dataclass(frozen=True)
class QuiesceSettings:
    provider: str                               # "script" or "qga"
    pre_freeze: str | None = None
    post_thaw: str | None = None
    socket: str | None = None
    timeout: float = 30.0
    domain: str | None = None                   # libvirt: the domain frozen through its guest agent
    uri: str | None = None                      # libvirt: the connection URI


@dataclass(frozen=True)
class Protection:
    frequency: int = 300
    additional_points: int = 0
    app_consistent_hours: int = 0               # 0: crash-consistent points only
    compression: bool = True
    auth: str = "certificate"
    port: int | None = None                     # None: the target URL's, else the auth mode's default
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    initial_replication: InitialReplication = InitialReplication()
    delete_replica_on_remove: bool = False
    bandwidth_limit: int | None = None          # bytes per second; None = unlimited
    copy_rate_when_busy: int | None = COPY_RATE_WHEN_BUSY   # an initial copy or resync while the guest writes
    resync: str = "auto"
    resync_window: tuple[dt.time, dt.time] | None = None
    target: str | None = None
    quiesce: QuiesceSettings | None = None
    encryption_key_file: str | None = None      # azure:// only: the customer's key (azure/crypto.py)
    rpo_threshold: int = 3600                   # seconds without a replicated cycle before health is Warning

    @property
    def replica_port(self) -> int | None:
        """The port the replica listens on, for http(s) targets."""
        if not self.target or urlsplit(self.target).scheme not in ("http", "https"):
            return None
        return urlsplit(self.target).port or self.port or DEFAULT_PORTS[self.auth]


@dataclass(frozen=True)
class Machine:
    name: str
    disks: tuple[str, ...]                      # the protected disks (listed minus excluded)
    excluded: tuple[str, ...] = ()              # disk paths; a domain machine's: disk targets (vdb ...)
    group: str | None = None
    protection: Protection = Protection()
    domain: str | None = None                   # a libvirt domain whose disks these are (daemon/domains.py)
    libvirt: str = "qemu:///system"             # the domain's libvirt connection URI
    targets: tuple[tuple[str, str], ...] = ()   # a domain machine's (disk target, VHDX path), as disks
    failover_ips: tuple = ()                    # a domain machine's FailoverIp per NIC (failover_ips.py)
    live_switch: bool = True                    # a running domain is switched onto the export while it runs
    azure_vm: object = None                     # [machine.azure_vm]: the VM a failover to Azure deploys (VmSpec)


@dataclass(frozen=True)
class DaemonSettings:
    state_dir: str
    admin_host: str = "127.0.0.1"
    admin_port: int = 8085
    admin_token_file: str = ""
    metrics_host: str | None = None       # metrics_listen: GET /metrics for scrapers on other hosts (off: None)
    metrics_port: int = 9185
    metrics_token_file: str = ""
    replication_cpus: frozenset | None = None   # replicatord's threads on these CPUs; its exports on every CPU
    memory_logs: int | None = None        # the host's budget for logs in memory (tracking/memlogs.py); None: auto


@dataclass(frozen=True)
class AllowEntry:
    principal: str
    storage: str
    trust_group: str | None = None


@dataclass(frozen=True)
class ReplicaSettings:
    listen: str = "0.0.0.0"
    port: int = 8084
    auth: str = "certificate"
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    keytab: str | None = None
    allow: tuple[AllowEntry, ...] = ()
    failover_dir: str = ""                      # failed-over machines' disks: FAILOVER_DIR/MACHINE/DISK
    test_failover_dir: str = ""                 # test-failover disks: TEST_FAILOVER_DIR/MACHINE/DISK
    reverse: dict = field(default_factory=dict)  # protection keys for reverse replication (raw, paths absolute)
    limits: ReplicaLimits = ReplicaLimits()     # what primaries can make the replica server hold
    libvirt: str | None = None                  # failovers define and start replicated domains here
    network_map: dict = field(default_factory=dict)   # source network -> this site's network (None: unplugged)
    test_network: str = "replicator-test"       # the isolated network test failovers create on demand
    boot_timeout: int = 300                     # seconds a booted domain has to run and answer guest-ping


@dataclass
class Config:
    daemon: DaemonSettings
    replica: ReplicaSettings | None = None
    groups: dict[str, Protection] = field(default_factory=dict)
    machines: list[Machine] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    path: str | None = None
    plans: dict[str, RecoveryPlan] = field(default_factory=dict)
    extended: list = field(default_factory=list)            # [[extended]] legs (orchestration/extended.py)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(r for r, on in (("primary", bool(self.machines)), ("replica", self.replica is not None)) if on)

    def machine(self, name: str) -> Machine:
        for m in self.machines:
            if m.name == name:
                return m
        raise UsageError(f"no machine {name!r} in the configuration")


# ---------------------------------------------------------------------------------------------- reading
class _Report:
    def __init__(self):
        self.errors: list[tuple[str, str]] = []
        self.warnings: list[tuple[str, str]] = []
        self.error = lambda path, reason: self.errors.append((path, reason))
        self.warn = lambda path, reason: self.warnings.append((path, reason))


def _kind(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(v), type(v).__name__)


class _Table:
    """One TOML table being read: refuses unknown keys and wrong types, naming the dotted path."""

    def __init__(self, data: dict, path: str, rep: _Report, allowed, base: str):
        self.data, self.path, self.rep, self.base = data, path, rep, base
        for k in data:
            if k not in allowed:
                rep.error(self.at(k), f"unknown key (known: {', '.join(sorted(allowed))})")

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, types: tuple, what: str, default=None):
        v = self.data.get(key, default)
        if key in self.data and (not isinstance(v, types) or (isinstance(v, bool) and bool not in types)):
            self.rep.error(self.at(key), f"must be {what}, not {_kind(v)}")
            return default
        return v

    def str(self, key: str, default=None):
        v = self.get(key, (str,), "a string", default)
        if key in self.data and v == "":
            self.rep.error(self.at(key), "must not be empty")
            return default
        return v

    def int(self, key: str, lo: int, hi: int, default=None):
        v = self.get(key, (int,), "an integer", default)
        if key in self.data and v is not None and not lo <= v <= hi:
            self.rep.error(self.at(key), f"must be between {lo} and {hi}, not {v}")
            return default
        return v

    def file(self, key: str, default=None, check: bool = False):
        v = self.str(key, default)
        v = None if v is None else os.path.normpath(os.path.join(self.base, os.path.expanduser(v)))
        if check and v and not os.path.isfile(v):
            self.rep.warn(self.at(key), f"{v} does not exist (yet)")
        return v

    def table(self, key: str) -> dict | None:
        return self.get(key, (dict,), "a table", None)

    def items(self, key: str, kind: type) -> list:
        """An array's good items; each bad one reported as KEY[i]."""
        good, name = [], {dict: "table", str: "string"}[kind]
        for i, item in enumerate(self.get(key, (list,), f"an array of {name}s", []) or []):
            if isinstance(item, kind) and item != "":
                good.append(item)
            else:
                self.rep.error(f"{self.at(key)}[{i}]", f"must be a non-empty {name}, not {_kind(item)}")
        return good


# ---------------------------------------------------------------------------------------------- values
def parse_frequency(v) -> int:
    """30s / 5m / 15m, or 30 / 300 / 900 seconds: the only cadences Hyper-V Replica offers."""
    m = _FREQ.match(v) if isinstance(v, str) else None
    seconds = v if isinstance(v, int) and not isinstance(v, bool) else None
    if m:
        seconds = int(m.group(1)) * (60 if (m.group(2) or "s").lower() in ("m", "min") else 1)
    if seconds not in FREQUENCIES:
        raise ValueError(f"must be 30s, 5m or 15m (30, 300 or 900 seconds), not {v!r}")
    return seconds


def parse_rpo_threshold(v) -> int:
    """ASR's RPO threshold: how old the newest replicated data may get before health turns Warning; 90s, 15m,
    1h, or seconds; 30 s to 24 h."""
    m = _SPAN.match(v) if isinstance(v, str) else None
    seconds = v if isinstance(v, int) and not isinstance(v, bool) else None
    if m:
        seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[(m.group(2) or "s").lower()]
    lo, hi = RPO_THRESHOLD
    if seconds is None or not lo <= seconds <= hi:
        raise ValueError(f"must be a duration from 30s to 24h (like \"15m\" or \"1h\"), not {v!r}")
    return seconds


def parse_bandwidth(v) -> int | None:
    """Bytes per second: 100M = 100 MiB/s (K, M, G, T are powers of 1024); 0, "0" or "none" = unlimited."""
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError(f"must be bytes per second like \"100M\", or \"none\", not {_kind(v)}")
    if isinstance(v, str) and v.strip().lower() in ("none", "unlimited", "off"):
        return None
    m = _BW.match(v) if isinstance(v, str) else None
    try:
        rate = v if isinstance(v, int) else int(scaled(m.group(1), m.group(2)))    # a part of a byte: down
    except (AttributeError, ValueError):    # no match, or digits scaled refuses (not ASCII, too many)
        raise ValueError(f"must be bytes per second like \"100M\" or \"512K\", or \"none\", not {v!r}") from None
    if rate < 0:
        raise ValueError(f"must not be negative, not {v!r}")
    return rate or None


MIN_COPY_RATE = 1 << 20     # bytes/s: a copy slower than this would hold a stop for long (one chunk per sleep)


def parse_copy_rate(v) -> int | None:
    """copy_rate_when_busy: bytes per second as parse_bandwidth, at least 1M; 0 or "none" = full speed."""
    rate = parse_bandwidth(v)
    if rate is not None and rate < MIN_COPY_RATE:
        raise ValueError(f"must be at least 1M (a copy sleeps a chunk of 1 MiB at a time), or \"none\", not {v!r}")
    return rate


def parse_window(v: str) -> tuple[dt.time, dt.time]:
    m = _WINDOW.match(v)
    if not m or int(m.group(1)) > 23 or int(m.group(3)) > 23 or int(m.group(2)) > 59 or int(m.group(4)) > 59:
        raise ValueError(f"must be \"HH:MM-HH:MM\" (e.g. \"22:00-06:00\"), not {v!r}")
    start, end = dt.time(int(m.group(1)), int(m.group(2))), dt.time(int(m.group(3)), int(m.group(4)))
    if start == end:
        raise ValueError("is empty: start and end are the same")
    return start, end


def parse_target(v: str) -> str:
    """https://HOST[:PORT] (certificates), http://HOST[:PORT] (Kerberos), local:///PATH, azure://ACCOUNT/CONTAINER."""
    parts = urlsplit(v)
    if parts.scheme in ("http", "https"):
        try:
            parts.port
        except ValueError:
            raise ValueError(f"has a bad port: {v!r}") from None
        if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"must be {parts.scheme}://HOST[:PORT], not {v!r}")
    elif parts.scheme == "local":
        if parts.netloc or not parts.path.startswith("/"):
            raise ValueError(f"must be local:///ABSOLUTE/PATH, not {v!r}")
    elif parts.scheme == "azure":
        if not parts.netloc or not parts.path.strip("/"):
            raise ValueError(f"must be azure://ACCOUNT/CONTAINER[/PREFIX], not {v!r}")
    else:
        raise ValueError(f"must be https://HOST:8084, http://HOST:8083, local:///PATH or azure://ACCOUNT/"
                         f"CONTAINER, not {v!r}")
    return v


def _moment(v):
    if isinstance(v, str):
        for parse in (dt.datetime.fromisoformat, dt.time.fromisoformat):
            try:
                return parse(v)
            except ValueError:
                pass
    if isinstance(v, (dt.datetime, dt.time)):
        return v
    raise ValueError(f"must be a date-time (2025-06-01T22:00:00) or a time of day (22:00:00), not {v!r}")


# ---------------------------------------------------------------------------------------------- sections
def _checked(t: _Table, key: str, parse, out: dict) -> None:
    if key in t.data:
        try:
            out[key] = parse(t.data[key])
        except ValueError as e:
            t.rep.error(t.at(key), str(e))


def _initial(v, path: str, rep: _Report, base: str) -> InitialReplication | None:
    if isinstance(v, str):
        v = {"mode": v}
    if not isinstance(v, dict):
        rep.error(path, f"must be a mode string or a table, not {_kind(v)}")
        return None
    t = _Table(v, path, rep, {"mode", "at", "seed_dir", "path"}, base)
    mode = t.str("mode")
    if mode not in INITIAL_MODES:
        rep.error(t.at("mode"), f"must be one of {', '.join(INITIAL_MODES)}, not {mode!r}")
        return None
    for k in ("at", "seed_dir", "path"):
        if k in v and k not in INITIAL_MODES[mode]:
            rep.error(t.at(k), f"only applies to mode {[m for m, ks in INITIAL_MODES.items() if k in ks][0]!r}")
        elif k not in v and k in INITIAL_MODES[mode]:
            rep.error(t.at(k), f"missing: mode {mode!r} needs it")
    out: dict = {}
    _checked(t, "at", _moment, out)
    if isinstance(out.get("at"), dt.datetime) and out["at"].tzinfo is None and out["at"] < dt.datetime.now():
        rep.warn(t.at("at"), "is in the past: initial replication starts at once")
    return InitialReplication(mode, out.get("at"), t.file("seed_dir"), t.file("path"))


def _quiesce(v, path: str, rep: _Report, base: str) -> QuiesceSettings | None:
    if not isinstance(v, dict):
        rep.error(path, f"must be a table, not {_kind(v)}")
        return None
    t = _Table(v, path, rep, {"provider", "pre_freeze", "post_thaw", "socket", "timeout"}, base)
    provider = t.str("provider")
    if provider not in QUIESCE_PROVIDERS:
        rep.error(t.at("provider"), f"must be \"script\", \"qga\" or \"libvirt\" (a domain machine), not {provider!r}")
        return None
    for k in ("pre_freeze", "post_thaw", "socket"):
        if k in v and k not in QUIESCE_PROVIDERS[provider]:
            rep.error(t.at(k), f"does not apply to provider {provider!r}")
    if provider == "qga" and "socket" not in v:
        rep.error(t.at("socket"), "missing: the QEMU guest agent's Unix socket")
    if provider == "script" and not ({"pre_freeze", "post_thaw"} & set(v)):
        rep.error(path, "a script provider needs pre_freeze, post_thaw or both")
    timeout = t.get("timeout", (int, float), "a number of seconds", 30.0)
    if timeout is not None and not 0 < timeout <= 3600:
        rep.error(t.at("timeout"), f"must be between 0 and 3600 seconds, not {timeout}")
    return QuiesceSettings(provider, t.str("pre_freeze"), t.str("post_thaw"), t.file("socket"), float(timeout or 30))


def _protection(t: _Table) -> dict:
    """The protection keys present in a group or a machine, each parsed (bad ones reported and left out)."""
    out: dict = {}
    _checked(t, "frequency", parse_frequency, out)
    _checked(t, "bandwidth_limit", parse_bandwidth, out)
    _checked(t, "copy_rate_when_busy", parse_copy_rate, out)
    _checked(t, "rpo_threshold", parse_rpo_threshold, out)
    for key, lo, hi in (("additional_points", 0, 24), ("app_consistent_hours", 1, 12), ("port", 1, 65535)):
        if key in t.data and t.int(key, lo, hi) is not None:
            out[key] = t.data[key]
    for key in ("compression", "delete_replica_on_remove"):
        if t.get(key, (bool,), "true or false") is not None:
            out[key] = t.data[key]
    for key, allowed in (("auth", AUTH_MODES), ("resync", RESYNC_MODES)):
        v = t.str(key)
        if v is not None and v not in allowed:
            t.rep.error(t.at(key), f"must be {' or '.join(repr(a) for a in allowed)}, not {v!r}")
        elif v is not None:
            out[key] = v
    for key in ("cert", "key", "ca"):
        if t.str(key) is not None:
            out[key] = t.file(key, check=True)
    if t.str("encryption_key_file") is not None:
        from ..azure.settings import key_file_problem
        out["encryption_key_file"] = t.file("encryption_key_file", check=True)
        if why := key_file_problem(out["encryption_key_file"]):
            t.rep.error(t.at("encryption_key_file"), why)
    if t.str("resync_window") is not None:
        _checked(t, "resync_window", parse_window, out)
    if t.str("target") is not None:
        _checked(t, "target", parse_target, out)
    if "initial_replication" in t.data:
        out["initial_replication"] = _initial(t.data["initial_replication"], t.at("initial_replication"), t.rep,
                                              t.base) or InitialReplication()
    if "quiesce" in t.data and (q := _quiesce(t.data["quiesce"], t.at("quiesce"), t.rep, t.base)):
        out["quiesce"] = q
    return out


def _contradictions(p: Protection, final: bool) -> list[tuple[str, str]]:
    """Problems between fields; `final` adds those that only a machine's complete settings can show."""
    found = []
    if p.app_consistent_hours and not p.additional_points:
        found.append(("app_consistent_hours", "needs additional_points >= 1: application-consistent points are "
                      "kept among the additional recovery points"))
    elif p.app_consistent_hours and p.app_consistent_hours >= p.additional_points:
        found.append(("app_consistent_hours", f"must be less than additional_points ({p.additional_points})"))
    if p.auth == "kerberos" and (p.cert or p.key or p.ca):
        found.append(("auth", "kerberos authentication uses no certificate files: remove cert, key and ca"))
    if p.resync == "manual" and p.resync_window:
        found.append(("resync_window", "only applies to resync = \"auto\""))
    parts = urlsplit(p.target or "")
    if parts.scheme in ("http", "https") and (parts.scheme == "https") != (p.auth == "certificate"):
        found.append(("target", f"auth {p.auth!r} needs {'https' if p.auth == 'certificate' else 'http'}://"))
    if parts.scheme in ("http", "https") and p.port and parts.port and parts.port != p.port:
        found.append(("port", f"contradicts the target URL's port {parts.port}"))
    if parts.scheme == "azure":                 # a page blob keeps at most 100 snapshots (azure/points.py)
        from urllib.parse import parse_qsl

        from ..azure.points import budget_problem
        if why := budget_problem(dict(parse_qsl(parts.query)).get("retention", 8), p.additional_points):
            found.append(("target", why))
        if p.encryption_key_file and "key_file" in dict(parse_qsl(parts.query)):
            found.append(("encryption_key_file", "the target URL names a key_file= too: keep one of them"))
    elif p.encryption_key_file and p.target:
        found.append(("encryption_key_file", "only applies to an azure:// target (data stored in Azure page blobs)"))
    if final and p.app_consistent_hours and p.quiesce is None:
        found.append(("quiesce", "missing: application-consistent points need a quiesce provider"))
    if final and p.target is None:
        found.append(("target", "missing: where to replicate (https://HOST:8084, http://HOST:8083, "
                      "local:///PATH or azure://ACCOUNT/CONTAINER)"))
    if final and p.auth == "certificate" and parts.scheme == "https" and not (p.cert and p.key and p.ca):
        found.append(("cert", "certificate authentication needs cert, key and ca"))
    return found


def _daemon(t: _Table) -> DaemonSettings:
    state_dir = t.file("state_dir", "/var/lib/replicator")
    listen = t.str("admin_listen", DEFAULT_ADMIN)
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        if not 1 <= (port := int(port)) <= 65535:
            raise ValueError(port)
    except ValueError:
        t.rep.error(t.at("admin_listen"), f"must be HOST:PORT on loopback (e.g. {DEFAULT_ADMIN}), not {listen!r}")
        host, port, loopback = "127.0.0.1", 8085, True
    if not loopback:
        t.rep.error(t.at("admin_listen"), f"the admin API listens on loopback only (127.0.0.1, ::1), not {host}")
    token = t.file("admin_token_file") or os.path.join(state_dir, "admin.token")
    metrics_host, metrics_port = None, 9185
    if "metrics_listen" in t.data:          # any address: its own token, and nothing but GET /metrics
        raw = t.str("metrics_listen", "")
        mhost, _, mport = (raw or "").rpartition(":")
        mhost = mhost.strip("[]")
        try:
            if mhost != "localhost":
                ipaddress.ip_address(mhost)     # an address, not a name to resolve
            if not 1 <= (mport := int(mport)) <= 65535:
                raise ValueError(mport)
            metrics_host, metrics_port = mhost, mport
        except ValueError:
            t.rep.error(t.at("metrics_listen"), f"must be ADDRESS:PORT (e.g. 0.0.0.0:9185), not {raw!r}")
        if metrics_host is not None and (metrics_host, metrics_port) == (host, port):
            t.rep.error(t.at("metrics_listen"), "must differ from admin_listen")
    metrics_token = t.file("metrics_token_file") or os.path.join(state_dir, "metrics.token")
    return DaemonSettings(state_dir, host, port, token, metrics_host, metrics_port, metrics_token,
                          _replication_cpus(t), _memory_logs(t))


def _memory_logs(t: _Table) -> int | None:
    """memory_logs = "auto" (an eighth of the host's memory, at most half its tmpfs), "none" (logs on disk
    only) or a size ("2G"): the budget for the active logs the exports write to memory."""
    from ..tracking.memlogs import parse_setting
    raw = t.str("memory_logs")
    if raw is None:
        return None
    try:
        return parse_setting(raw)
    except ValueError:
        t.rep.error(t.at("memory_logs"), f"must be \"auto\", \"none\" or a size like \"2G\", not {raw!r}")
        return None


def _replication_cpus(t: _Table) -> frozenset | None:
    """replication_cpus = "1": a CPU list. Which CPUs replicatord may run on only replicatord knows (a shell
    running the CLI may have fewer): the daemon checks that (daemon/main.py, load_daemon_config)."""
    raw = t.str("replication_cpus")
    if raw is None:
        return None
    try:
        return parse_cpu_list(raw)
    except ValueError as e:
        t.rep.error(t.at("replication_cpus"), str(e))
        return None


def _allow(t: _Table) -> tuple[AllowEntry, ...]:
    entries, seen = [], set()
    for i, raw in enumerate(t.items("allow", dict)):
        a = _Table(raw, f"{t.at('allow')}[{i}]", t.rep, {"principal", "storage", "trust_group"}, t.base)
        principal, storage = a.str("principal"), a.file("storage")
        for key, value in (("principal", principal), ("storage", storage)):
            if value is None and key not in raw:
                t.rep.error(a.at(key), "missing")
        if principal and principal.count("*") > 1:
            t.rep.error(a.at("principal"), f"has more than one '*': {principal!r}")
        elif principal in seen:
            t.rep.error(a.at("principal"), f"{principal!r} is listed twice")
        elif principal and storage:
            seen.add(principal)
            entries.append(AllowEntry(principal, storage, a.str("trust_group")))
    return tuple(entries)


def _reverse(t: _Table) -> dict:
    """[replica.reverse]: protection settings for replicating failed-over machines back (checked as a group's
    are; the target usually comes with the operator's `reverse`). Kept raw, paths made absolute, because
    each reverse machine is validated whole (parse_machine) when it is created and after every restart."""
    raw = t.table("reverse")
    if raw is None:
        return {}
    sub = _Table(raw, t.at("reverse"), t.rep, PROTECTION_KEYS, t.base)
    for key, reason in _contradictions(Protection(**_protection(sub)), final=False):
        t.rep.error(sub.at(key), reason)
    return {k: (sub.file(k) if k in ("cert", "key", "ca") and isinstance(v, str) and v else v) for k, v in raw.items()}


def _replica(t: _Table, state_dir: str) -> ReplicaSettings:
    auth = t.str("auth", "certificate")
    if auth not in AUTH_MODES:
        t.rep.error(t.at("auth"), f"must be 'certificate' or 'kerberos', not {auth!r}")
        auth = "certificate"
    listen = t.str("listen", "0.0.0.0")
    try:
        ipaddress.ip_address(listen.strip("[]"))
    except ValueError:
        if not _HOST.match(listen):
            t.rep.error(t.at("listen"), f"must be an address or a host name, not {listen!r}")
    files = {k: t.file(k, check=True) for k in ("cert", "key", "ca", "keytab")}
    if auth == "kerberos" and (files["cert"] or files["key"] or files["ca"]):
        t.rep.error(t.at("auth"), "kerberos authentication uses no certificate files: remove cert, key and ca")
    if auth == "certificate" and files["keytab"]:
        t.rep.error(t.at("keytab"), "only applies to auth = \"kerberos\"")
    if auth == "certificate":
        for k in ("cert", "key", "ca"):
            if not files[k]:
                t.rep.error(t.at(k), "missing: certificate authentication needs cert, key and ca")
    allow = _allow(t)
    if not allow and "allow" not in t.data:
        t.rep.error(t.at("allow"), "missing: without [[replica.allow]] entries no primary may replicate here")
    dirs = {k: t.file(k, os.path.join(state_dir, default)) for k, default in (
        ("failover_dir", "failover"), ("test_failover_dir", "test-failover"))}
    for k, v in dirs.items():
        if os.path.exists(v) and not os.path.isdir(v):
            t.rep.error(t.at(k), f"{v} is not a directory")
    limits, problems = ReplicaLimits.read({k.name: t.data[k.name] for k in LIMITS if k.name in t.data})
    for key, reason in problems:
        t.rep.error(t.at(key), reason)
    return ReplicaSettings(listen, t.int("port", 1, 65535, None) or DEFAULT_PORTS[auth], auth, allow=allow,
                           reverse=_reverse(t), limits=limits, **dirs, **files, **_replica_domains(t))


def _replica_domains(t: _Table) -> dict:
    """[replica] libvirt = URI (failovers boot replicated domains there), network_map = { "src" = "dst" or
    "none" }, test_network = NAME (the isolated network of test failovers)."""
    out: dict = {}
    uri = t.str("libvirt")
    if uri is not None and (not urlsplit(uri).scheme or not uri.isprintable()):
        t.rep.error(t.at("libvirt"), f"must be a libvirt URI (qemu:///system ...), not {uri!r}")
    elif uri is not None:
        out["libvirt"] = uri
    nmap = t.table("network_map") or {}
    for src, dst in nmap.items():
        if not src or not isinstance(dst, str) or not dst or not dst.isprintable() or len(dst) > 64:
            t.rep.error(f"{t.at('network_map')}.{src}", f"must be this site's network name, or \"none\" (NICs "
                        f"left unplugged), not {dst!r}")
    out["network_map"] = {k: (None if v == "none" else v) for k, v in nmap.items() if isinstance(v, str) and v}
    net = t.str("test_network")
    if net is not None and (len(net) > 64 or not _NAME.match(net)):
        t.rep.error(t.at("test_network"), f"must be a network name (letters, digits, '.', '_', '-'), not {net!r}")
    elif net is not None:
        out["test_network"] = net
    timeout = t.int("boot_timeout", 10, 3600)
    if timeout is not None:
        out["boot_timeout"] = timeout
    if (nmap or net) and uri is None:
        t.rep.error(t.at("libvirt"), "missing: network_map and test_network apply to domains a failover starts "
                    "through libvirt")
    return out


def _groups(root: _Table) -> tuple[dict[str, Protection], dict[str, dict]]:
    groups, partials = {}, {}
    for i, raw in enumerate(root.items("group", dict)):
        name = raw.get("name")
        t = _Table(raw, f"group[{name if isinstance(name, str) and name else i}]", root.rep,
                   PROTECTION_KEYS | {"name"}, root.base)
        if not isinstance(name, str) or not _NAME.match(name):
            root.rep.error(t.at("name"), "missing or not a name (letters, digits, '.', '_', '-'; at most 64)")
            continue
        if name in partials:
            root.rep.error(t.at("name"), f"group {name!r} is defined twice")
            continue
        partials[name] = _protection(t)
        groups[name] = Protection(**partials[name])
        for key, reason in _contradictions(groups[name], final=False):
            root.rep.error(t.at(key), reason)
    return groups, partials


def _disks(t: _Table, owners: dict[str, str], name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    listed = [os.path.normpath(os.path.join(t.base, d)) for d in t.items("disks", str)]
    if "disks" not in t.data:
        t.rep.error(t.at("disks"), "missing: the machine's disk files")
    excluded = [os.path.normpath(os.path.join(t.base, d)) for d in t.items("exclude", str)]
    for i, d in enumerate(listed):
        where = f"{t.at('disks')}[{i}]"
        real = os.path.realpath(d)
        if listed.index(d) != i:
            t.rep.error(where, f"{d} is listed twice")
        elif real in owners and owners[real] != name:
            t.rep.error(where, f"{d} is also a disk of machine {owners[real]!r}")
        elif os.path.exists(d) and not os.path.isfile(d):
            t.rep.error(where, f"{d} is not a file")
        elif not os.path.exists(d):
            t.rep.warn(where, f"{d} does not exist (yet): the machine cannot replicate until it does")
        owners.setdefault(real, name)
    for i, d in enumerate(excluded):
        if d not in listed:
            t.rep.error(f"{t.at('exclude')}[{i}]", f"{d} is not one of the machine's disks")
    disks = tuple(d for d in dict.fromkeys(listed) if d not in excluded)
    if listed and not disks:
        t.rep.error(t.at("exclude"), "excludes every disk: nothing left to protect")
    return disks, tuple(excluded)


_TARGET = re.compile(r"^[a-z][a-z0-9]{1,15}$")          # a domain's disk target: vda, sdb, hdc, xvda ...
CONVERT_HINT = ("make it once from the domain's disk while the domain is shut off: "
                "`replicator vhdx convert -O vhdx SOURCE {path}` (docs/operations.md, \"Protecting a libvirt domain\")")


def _domain_disks(t: _Table, owners: dict[str, str], name: str):
    """A domain machine's disks: `domain = NAME`, `libvirt = URI`, `disks = { TARGET = "VHDX" }` (the domain's
    disk targets and the VHDX files that are the protected disks), `exclude = [TARGET]` (targets not
    protected). Returns (domain, uri, ((target, path) ...), excluded targets)."""
    domain = t.str("domain")
    if domain is not None and (len(domain) > 200 or not domain.isprintable() or "/" in domain):
        t.rep.error(t.at("domain"), f"must be a libvirt domain name (printable, no '/', at most 200), not {domain!r}")
    uri = t.str("libvirt", "qemu:///system")
    if not isinstance(uri, str) or not urlsplit(uri).scheme or not uri.isprintable():
        t.rep.error(t.at("libvirt"), f"must be a libvirt URI (qemu:///system, qemu+unix:///system?socket=PATH, "
                    f"qemu+ssh://HOST/system), not {uri!r}")
        uri = "qemu:///system"
    raw = t.data.get("disks")
    targets: list[tuple[str, str]] = []
    if "disks" not in t.data:
        t.rep.error(t.at("disks"), "missing: the domain's disk targets and their VHDX files, "
                    "e.g. disks = { vda = \"/srv/vms/web1.vhdx\" }")
    elif not isinstance(raw, dict):
        t.rep.error(t.at("disks"), "a domain machine maps its disk targets to VHDX files: "
                    f"disks = {{ vda = \"/srv/vms/web1.vhdx\" }}, not {_kind(raw)}")
        raw = {}
    for target, value in (raw or {}).items():
        where = f"{t.at('disks')}.{target}"
        if not _TARGET.match(target):
            t.rep.error(where, f"{target!r} is not a disk target (vda, sdb, hdc ...)")
            continue
        if not isinstance(value, str) or not value:
            t.rep.error(where, f"must be the path of a VHDX file, not {_kind(value)}")
            continue
        path = os.path.normpath(os.path.join(t.base, os.path.expanduser(value)))
        real = os.path.realpath(path)
        same_file = [x for x, p in targets if os.path.basename(p) == os.path.basename(path)]
        if not path.lower().endswith(".vhdx"):
            t.rep.error(where, f"{path} must be a VHDX file (.vhdx): the protected disk is a VHDX the export "
                        f"serves to the domain; {CONVERT_HINT.format(path=os.path.splitext(path)[0] + '.vhdx')}")
        elif same_file:
            t.rep.error(where, f"{path} has the file name of disks.{same_file[0]}'s (the export names disks "
                        "by file name)")
        elif real in owners and owners[real] != name:
            t.rep.error(where, f"{path} is also a disk of machine {owners[real]!r}")
        elif os.path.exists(path) and not os.path.isfile(path):
            t.rep.error(where, f"{path} is not a file")
        else:
            if not os.path.exists(path):
                t.rep.warn(where, f"{path} does not exist (yet): the machine is not protected until it does; "
                           + CONVERT_HINT.format(path=path))
            owners.setdefault(real, name)
            targets.append((target, path))
    excluded = []
    for i, x in enumerate(t.items("exclude", str)):
        where = f"{t.at('exclude')}[{i}]"
        if not _TARGET.match(x):
            t.rep.error(where, f"{x!r} is not a disk target (a domain machine excludes targets: vdb, sdc ...)")
        elif x in dict(targets) or x in (raw or {}):
            t.rep.error(where, f"{x} is mapped in disks: a target is protected or excluded, not both")
        else:
            excluded.append(x)
    if isinstance(t.data.get("disks"), dict) and not t.data["disks"]:
        t.rep.error(t.at("disks"), "maps no disk: nothing to protect")
    return domain, uri, tuple(targets), tuple(excluded)


def _domain_quiesce(p: Protection, t: _Table, domain: str, uri: str) -> Protection:
    """A domain machine is quiesced through libvirt (the guest agent's fsfreeze), never by scripts: its
    application-consistent points need no quiesce table; one given must say provider = "libvirt"."""
    q = p.quiesce
    if q is not None and q.provider != "libvirt":
        t.rep.error(t.at("quiesce"), f"a domain machine is quiesced through libvirt (its guest agent), not by "
                    f"provider {q.provider!r}: quiesce = {{ provider = \"libvirt\", timeout = 30 }}, or leave it out")
        q = None
    if q is None and not p.app_consistent_hours:
        return p
    q = q or QuiesceSettings("libvirt")
    return dataclasses.replace(p, quiesce=dataclasses.replace(q, domain=domain, uri=uri))


def _machines(root: _Table, groups: dict[str, Protection], partials: dict[str, dict]) -> list[Machine]:
    machines, names, owners = [], set(), {}
    for i, raw in enumerate(root.items("machine", dict)):
        name = raw.get("name")
        t = _Table(raw, f"machine[{name if isinstance(name, str) and name else i}]", root.rep,
                   PROTECTION_KEYS | {"name", "disks", "exclude", "group", "domain", "libvirt", "failover_ip",
                                     "live_switch", "azure_vm"},
                   root.base)
        if not isinstance(name, str) or not _NAME.match(name):
            root.rep.error(t.at("name"), "missing or not a name (letters, digits, '.', '_', '-'; at most 64)")
        elif name in names:
            root.rep.error(t.at("name"), f"machine {name!r} is defined twice")
        names.add(name)
        group = t.str("group")
        if group is not None and group not in partials:
            root.rep.error(t.at("group"), f"no group named {group!r}")
        domain = uri = None
        targets: tuple = ()
        if "domain" in raw:
            domain, uri, targets, excluded = _domain_disks(t, owners, name)
            disks = tuple(path for _, path in targets)
        else:
            if isinstance(raw.get("disks"), dict):
                root.rep.error(t.at("disks"), "a table of disk targets needs domain = \"NAME\" (a libvirt domain); "
                               "a machine of disk files lists them: disks = [\"os.vhdx\"]")
            if "libvirt" in raw:
                root.rep.error(t.at("libvirt"), "only applies to a domain machine (domain = \"NAME\")")
            disks, excluded = _disks(t, owners, name) if not isinstance(raw.get("disks"), dict) else ((), ())
        ips: tuple = ()
        if "failover_ip" in raw:
            ips, problems = failover_ips.parse(raw["failover_ip"])
            for key, reason in problems:
                root.rep.error(f"{t.at('failover_ip')}{'.' + key if key else ''}", reason)
            if domain is None:
                root.rep.error(t.at("failover_ip"), "only applies to a domain machine (domain = \"NAME\"): it is set "
                               "in the guest through its agent")
        live = t.get("live_switch", (bool,), "true or false", True)
        if "live_switch" in raw and domain is None:
            root.rep.error(t.at("live_switch"), "only applies to a domain machine (domain = \"NAME\")")
        own = _protection(t)
        p = Protection(**{**partials.get(group, {}), **own})
        if domain is not None:
            p = _domain_quiesce(p, t, domain, uri)
        elif p.quiesce is not None and p.quiesce.provider == "libvirt":
            root.rep.error(t.at("quiesce"), "provider \"libvirt\" quiesces a domain machine's guest: set domain")
        inherited = set(_contradictions(groups[group], final=False)) if group in groups else set()
        for key, reason in _contradictions(p, final=True):
            if (key, reason) not in inherited:
                root.rep.error(t.at(key), reason)
        if p.quiesce and not p.app_consistent_hours:
            root.rep.warn(t.at("quiesce"), "is never used: app_consistent_hours is not set")
        vm = None
        if "azure_vm" in raw:
            from ..azure.settings import parse_vm
            vm, problems = parse_vm(raw["azure_vm"], tuple(os.path.basename(d) for d in disks), str(name))
            for key, reason in problems:
                root.rep.error(f"{t.at('azure_vm')}{'.' + key if key else ''}", reason)
            if urlsplit(p.target or "").scheme != "azure":
                root.rep.error(t.at("azure_vm"), "only applies to an azure:// target")
        machines.append(Machine(str(name), disks, excluded, group, p, domain, uri or "qemu:///system", targets,
                                ips, live, vm))
    return machines


def _action(raw, path: str, rep: _Report, base: str):
    """A pre- or post-action: {script = "CMD" or [ARGV], timeout, kinds} or {manual = "TEXT", timeout, kinds}."""
    if not isinstance(raw, dict):
        rep.error(path, f"must be a table ({{ script = ... }} or {{ manual = ... }}), not {_kind(raw)}")
        return None
    t = _Table(raw, path, rep, {"script", "manual", "timeout", "kinds"}, base)
    if ("script" in raw) == ("manual" in raw):
        rep.error(path, "needs exactly one of script (a command) or manual (a step an operator confirms)")
        return None
    timeout = t.get("timeout", (int, float), "a number of seconds")
    if timeout is not None and not 0 < timeout <= 7 * 86400:
        rep.error(t.at("timeout"), f"must be between 0 and {7 * 86400} seconds (a week), not {timeout}")
        timeout = None
    kinds = t.items("kinds", str) if "kinds" in raw else None
    for i, k in enumerate(kinds or []):
        if k not in FAILOVER_KINDS:
            rep.error(f"{t.at('kinds')}[{i}]", f"must be one of {', '.join(FAILOVER_KINDS)}, not {k!r}")
    kinds = tuple(kinds) if kinds else None
    if "manual" in raw:
        text = t.str("manual")
        return ManualAction(text, float(timeout) if timeout else None, kinds) if text else None
    cmd = raw["script"]
    try:
        argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd) if isinstance(cmd, list) else []
    except ValueError as e:
        argv, cmd = [], f"{cmd!r} ({e})"
    if not argv or not all(isinstance(a, str) and a for a in argv):
        rep.error(t.at("script"), f"must be a command line or an array of arguments, not {cmd!r}")
        return None
    if "/" in argv[0] and not os.path.isabs(argv[0]):
        argv[0] = os.path.normpath(os.path.join(base, argv[0]))      # a script next to the config file
    return ScriptAction(argv, float(timeout) if timeout else 300.0, kinds)


def _plan_group(raw: dict, path: str, rep: _Report, base: str, seen: dict[str, str]) -> PlanGroup:
    t = _Table(raw, path, rep, {"members", "pre", "post"}, base)
    members = []
    for i, m in enumerate(t.items("members", str)):
        where = f"{t.at('members')}[{i}]"
        if not _NAME.match(m):
            rep.error(where, f"{m!r} is not a machine name (letters, digits, '.', '_', '-'; at most 64)")
        elif m in seen:
            rep.error(where, f"{m!r} is already a member of {seen[m]}")
        else:
            seen[m] = path
            members.append(m)
    actions = {k: [a for i, raw_a in enumerate(t.get(k, (list,), "an array of actions", []) or [])
                   if (a := _action(raw_a, f"{t.at(k)}[{i}]", rep, base)) is not None] for k in ("pre", "post")}
    if not members and not actions["pre"] and not actions["post"]:
        rep.error(path, "is empty: give members, pre or post actions")
    return PlanGroup(members, actions["pre"], actions["post"])


def _plans(root: _Table, replica: ReplicaSettings | None) -> dict[str, RecoveryPlan]:
    """[[plan]]: recovery plans, run on the replica site (ordered groups, members failed over in parallel)."""
    plans = {}
    for i, raw in enumerate(root.items("plan", dict)):
        name = raw.get("name")
        t = _Table(raw, f"plan[{name if isinstance(name, str) and name else i}]", root.rep, {"name", "group"},
                   root.base)
        if not isinstance(name, str) or not _NAME.match(name):
            root.rep.error(t.at("name"), "missing or not a name (letters, digits, '.', '_', '-'; at most 64)")
            continue
        if name in plans:
            root.rep.error(t.at("name"), f"plan {name!r} is defined twice")
            continue
        if replica is None:
            root.rep.error(t.path, "recovery plans run on the replica site: this configuration has no [replica]")
        raw_groups = t.items("group", dict)
        if "group" not in raw:
            root.rep.error(t.at("group"), "missing: at least one [[plan.group]]")
        elif len(raw_groups) > MAX_GROUPS:
            root.rep.error(t.at("group"), f"has {len(raw_groups)} groups; a recovery plan has at most {MAX_GROUPS}")
        seen: dict[str, str] = {}
        groups = [_plan_group(g, f"{t.at('group')}[{k}]", root.rep, root.base, seen)
                  for k, g in enumerate(raw_groups[:MAX_GROUPS])]
        if groups:
            plans[name] = RecoveryPlan(name, groups)
    return plans


# ---------------------------------------------------------------------------------------------- entry points
def parse_config(text: str, *, base_dir: str = ".", source: str = "replicatord.toml", strict: bool = False) -> Config:
    """Parse and validate; ConfigError lists every problem. Warnings are kept in Config.warnings."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([("(syntax)", str(e))], source) from None
    return parse_config_data(data, base_dir=base_dir, source=source, strict=strict)


def parse_config_data(data: dict, *, base_dir: str = ".", source: str = "replicatord.toml", strict: bool = False,
                      allow_empty: bool = False) -> Config:
    """The configuration's tables as data (TOML read, or the JSON a controller renders: same schema).
    allow_empty: a host a controller has given nothing to do yet runs idle instead of being refused."""
    rep = _Report()
    root = _Table(data, "", rep, {"daemon", "replica", "group", "machine", "plan", "extended"},
                  os.path.abspath(base_dir))
    sub = {k: _Table(root.table(k) or {}, k, rep, keys, root.base) for k, keys in (
        ("daemon", {"state_dir", "admin_listen", "admin_token_file", "metrics_listen", "metrics_token_file",
                    "replication_cpus", "memory_logs"}),
        ("replica", {"listen", "port", "auth", "cert", "key", "ca", "keytab", "allow", "failover_dir",
                     "test_failover_dir", "reverse", "libvirt", "network_map", "test_network", "boot_timeout",
                     *(k.name for k in LIMITS)}))}
    daemon = _daemon(sub["daemon"])
    replica = _replica(sub["replica"], daemon.state_dir) if isinstance(data.get("replica"), dict) else None
    groups, partials = _groups(root)
    machines = _machines(root, groups, partials)
    plans = _plans(root, replica)
    from .extended import parse_extended      # [[extended]]: its own module (it imports this one)
    extended = parse_extended(root, replica)
    if replica is None and not machines and not rep.errors and not allow_empty:
        rep.error("(top)", "nothing to run: add [[machine]] entries (primary role), a [replica] table, or both")
    problems = rep.errors + (rep.warnings if strict else [])
    if problems:
        raise ConfigError(problems, source)
    return Config(daemon, replica, groups, machines, [f"{p}: {r}" for p, r in rep.warnings], source, plans,
                  extended)


def parse_machine(raw: dict, *, base_dir: str, source: str = "machine") -> Machine:
    """One machine from a table like a [[machine]] entry, checked as the configuration's are (a reverse
    machine the replica site generates after a failover); ConfigError lists every problem."""
    rep = _Report()
    machines = _machines(_Table({"machine": [raw]}, "", rep, {"machine"}, os.path.abspath(base_dir)), {}, {})
    if rep.errors:
        raise ConfigError(rep.errors, source)
    return machines[0]


def load_config(path: str, *, strict: bool = False) -> Config:
    """replicatord.toml, or a controller's desired document (.json: its "config", same schema; relative
    paths are taken from the document's folder, the agent's STATE/controller)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([("(file)", f"cannot read {path}: {e}")], path) from None
    base = os.path.dirname(os.path.abspath(path))
    if not path.endswith(".json"):
        return parse_config(text, base_dir=base, source=path, strict=strict)
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ConfigError([("(syntax)", f"not JSON: {e}")], path) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        raise ConfigError([("config", "missing: a desired document holds the configuration in \"config\"")], path)
    return parse_config_data(doc["config"], base_dir=base, source=path, strict=strict, allow_empty=True)

"""Who a peer is (client certificate CN, Kerberos initiator) and whether it may replicate here, and
where: the transport's errors, authentication helpers, and authorization entries as in Hyper-V Replica.

An entry names primaries by a pattern with at most one `*` (e.g. `*.contoso.com`, `primary1@EXAMPLE.ORG`)
and maps them to a storage location (the ReplicaStore root their disks live in). Its trust group says
which primaries may continue each other's disks: a disk belongs to the group of the entry that created
it, and a primary matching another group's entry is refused on it (a VM moves between the nodes of one
cluster, not between strangers who share a storage root).

The principal of a certificate client is its subject's commonName (the host name `replicator certs
issue` writes there, matched case-insensitively like DNS names); a Kerberos client's principal is the
initiator name as the KDC vouches for it (`name@REALM`, matched case-sensitively like Kerberos does).
"""
from __future__ import annotations

import fcntl
import json
import os
import ssl
import threading
from dataclasses import dataclass

from ..durable import write_json_atomic
from ..errors import ReplicatorError, UsageError


class TransportError(ReplicatorError):
    """The replica could not be reached or the connection failed past the retries."""

    exit_code = 20


class AuthenticationError(TransportError):
    """A peer could not prove who it is (certificate refused, no or bad Kerberos ticket, mutual auth failed)."""

    exit_code = 21


class AuthorizationError(TransportError):
    """The peer is authenticated but no authorization entry lets it replicate here (or into this disk)."""

    exit_code = 22


class ResumeTokenError(TransportError):
    """The replica's report of what it holds does not match what was sent: resuming would corrupt the cycle."""

    exit_code = 23


class ReplicaRefused(TransportError):
    """The replica refused a request for a reason of its own (bad stream, out of sequence, disk full)."""

    exit_code = 24

    def __init__(self, message: str, *, status: int = 0, code: str = "refused"):
        super().__init__(message)
        self.status = status
        self.code = code


# Fencing (docs/management-plane.md): a primary sends its machine's epoch with every request about the
# machine's disks; the replica refuses an older one than it knows (409, code "fenced").
EPOCH_HEADER = "X-Replicator-Epoch"
MAX_EPOCH = (1 << 63) - 1


class Fenced(ReplicaRefused):
    """The replica refused our fencing epoch as stale: this machine was failed over (or taken over by a
    newer primary); `epoch` is the one the replica knows, `failed_over` whether its own failover set it."""

    exit_code = 25

    def __init__(self, message: str, *, epoch: int | None = None, failed_over: bool = False):
        super().__init__(message, status=409, code="fenced")
        self.epoch, self.failed_over = epoch, failed_over


def parse_epoch(values: list[str]) -> int | None:
    """The epoch of a request from its X-Replicator-Epoch header values (none: no epoch, a standalone
    primary); anything but one decimal integer from 0 to 2^63-1 is refused in one line (UsageError)."""
    if not values:
        return None
    raw = values[0].strip()
    if len(values) > 1 or not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) > MAX_EPOCH:
        shown = ", ".join(repr(v[:40]) for v in values[:3])
        raise UsageError(f"{EPOCH_HEADER} must be one integer from 0 to {MAX_EPOCH}, not {shown}")
    return int(raw)


@dataclass(frozen=True)
class AuthorizationEntry:
    principal_pattern: str
    storage_root: str
    trust_group: str | None = None

    def __post_init__(self):
        if self.principal_pattern.count("*") > 1:
            raise UsageError(f"authorization pattern {self.principal_pattern!r} has more than one '*'")
        if not self.principal_pattern:
            raise UsageError("empty authorization pattern")

    @property
    def group(self) -> str:
        """The owner key of disks this entry creates: its trust group, or the pattern itself."""
        return self.trust_group or self.principal_pattern

    def matches(self, principal: str, ignore_case: bool = False) -> bool:
        pattern = self.principal_pattern
        if ignore_case:
            pattern, principal = pattern.lower(), principal.lower()
        if "*" not in pattern:
            return principal == pattern
        prefix, suffix = pattern.split("*")
        return (len(principal) >= len(prefix) + len(suffix) and principal.startswith(prefix)
                and principal.endswith(suffix))

    @property
    def specificity(self) -> tuple[int, int]:
        """Exact entries beat wildcards; among wildcards, the one with more literal characters wins."""
        return (0 if "*" in self.principal_pattern else 1, len(self.principal_pattern.replace("*", "")))


def authorize(entries: list[AuthorizationEntry], principal: str, ignore_case: bool = False) \
        -> AuthorizationEntry:
    """The most specific entry matching the principal (first listed on a tie), or AuthorizationError."""
    best = None
    for e in entries:
        if e.matches(principal, ignore_case) and (best is None or e.specificity > best.specificity):
            best = e
    if best is None:
        raise AuthorizationError(f"primary {principal!r} is not authorized to replicate to this server")
    return best


def counting_sslobject(on_refused):
    """An SSLObject class that counts failed handshakes (asyncio and uvloop drop them silently) and makes
    sure the peer hears why: the loop discards the pending TLS alert when do_handshake fails, so the first
    failure is reported as "want read", which makes the loop send what OpenSSL queued (the alert), and
    the real error is raised on the next call (the peer's next bytes or its close)."""

    class CountingSSLObject(ssl.SSLObject):
        _refusal: ssl.SSLError | None = None

        def do_handshake(self):
            if self._refusal is not None:
                raise self._refusal
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError as e:
                on_refused(e)
                self._refusal = e
                raise ssl.SSLWantReadError("send the alert, then fail") from None

    return CountingSSLObject


def certificate_principal(peercert: dict | None) -> str:
    """The commonName of a verified client certificate (ssl.SSLObject.getpeercert())."""
    for rdn in (peercert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    raise AuthenticationError("the client certificate names no commonName")


def acceptor_credentials(keytab: str | None, service: str | None):
    """Kerberos acceptor credentials from the keytab (any key in it, or the one service, e.g. HTTP@host)."""
    import gssapi
    name = gssapi.Name(service, gssapi.NameType.hostbased_service) if service else None
    try:
        return gssapi.Credentials(name=name, usage="accept", store={"keytab": keytab} if keytab else None)
    except gssapi.exceptions.GSSError as e:
        raise AuthenticationError(f"cannot use the Kerberos keytab {keytab or '(default)'}: {e}") from None


def kerberos_accept(creds, token: bytes) -> tuple[str, bytes | None]:
    """Accept one SPNEGO/Kerberos token: (initiator principal, the token proving us to the client)."""
    import gssapi
    ctx = gssapi.SecurityContext(creds=creds, usage="accept")
    try:
        out = ctx.step(token)
        complete = ctx.complete          # gssapi keeps an error that came with a token until here
    except gssapi.exceptions.GSSError as e:
        raise AuthenticationError(f"Kerberos ticket refused: {e.gen_message()}") from None
    if not complete:
        raise AuthenticationError("Negotiate needs more than one round trip: only Kerberos is accepted")
    return str(ctx.initiator_name), out


def parse_allow(spec: str, default_root: str | None) -> AuthorizationEntry:
    """`PATTERN[=ROOT]` from the command line."""
    pattern, _, root = spec.partition("=")
    root = root or default_root
    if not root:
        raise UsageError(f"--allow {spec}: no storage root (give PATTERN=ROOT or --root)")
    return AuthorizationEntry(pattern, os.path.abspath(root))


class Ownership:
    """ROOT/owners.json: which trust group each disk in a storage root belongs to."""

    def __init__(self, root: str):
        self.path = os.path.join(root, "owners.json")
        self._lock = threading.Lock()

    def _load(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def owner(self, disk_id: str) -> str | None:
        return self._load().get(disk_id)

    def count(self, group: str) -> int:
        """Disks of this root the trust group owns."""
        return sum(1 for g in self._load().values() if g == group)

    def check(self, disk_id: str, entry: AuthorizationEntry, principal: str) -> None:
        """Refuse a principal whose trust group does not own the disk (an unowned disk is refused nobody)."""
        owner = self.owner(disk_id)
        if owner is not None and owner != entry.group:
            raise AuthorizationError(f"primary {principal!r} (trust group {entry.group!r}) may not "
                                     f"replicate disk {disk_id}, which belongs to trust group {owner!r}")

    def claim(self, disk_id: str, entry: AuthorizationEntry) -> None:
        """Record the entry's trust group as the disk's owner, unless it has one (call once the disk exists).
        The replica server and `seed import` may claim in one root at once: the read-modify-write holds an
        flock on ROOT/owners.lock as well as the thread lock, so neither loses the other's claim."""
        with self._lock:
            fd = os.open(self.path[:-len(".json")] + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                owners = self._load()
                if disk_id not in owners:
                    owners[disk_id] = entry.group
                    write_json_atomic(self.path, owners)
            finally:
                os.close(fd)

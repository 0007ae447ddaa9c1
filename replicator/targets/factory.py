"""A target from its URL: local:///path, https://host:8084 (certificates), http://host:8083 (Kerberos),
azure://account/container. Retry and bandwidth limits are stacked on whichever it is."""
from __future__ import annotations

from urllib.parse import urlparse

from ..errors import UsageError
from .base import BandwidthLimit, ForMachine, ReplicaTarget, Retry


def open_target(url: str, *, cert: str | None = None, key: str | None = None, ca: str | None = None,
                kerberos: bool = False, bandwidth_limit: float | None = None, retries: int = 5,
                machine: str = "", epoch: int | None = None,
                encryption_key_file: str | None = None) -> ReplicaTarget:
    """`machine`: the protected machine whose disks go there (the replica groups them by it); `epoch`: its
    fencing epoch, sent to a peer replica with every request (daemon/fencing.py); `encryption_key_file`: an
    azure:// target's customer key (the setting of that name)."""
    parsed = urlparse(url)
    target: ReplicaTarget
    if parsed.scheme == "local":
        from .local import LocalTarget
        target = LocalTarget(parsed.path)
    elif parsed.scheme in ("https", "http"):
        from .peer import PeerTarget
        target = PeerTarget(url, cert=cert, key=key, ca=ca, kerberos=kerberos, bandwidth_limit=bandwidth_limit,
                            epoch=epoch)
        bandwidth_limit = None                  # the client's own token bucket covers the whole link
    elif parsed.scheme == "azure":
        from ..azure import open_target as open_azure
        target = open_azure(url, key_file=encryption_key_file)
    else:
        raise UsageError(f"unknown target {url!r}: use local:///PATH, https://HOST:8084, http://HOST:8083 "
                         "(Kerberos) or azure://ACCOUNT/CONTAINER")
    target = Retry(target, attempts=retries)
    if bandwidth_limit:
        target = BandwidthLimit(target, bandwidth_limit)
    return ForMachine(target, machine) if machine else target

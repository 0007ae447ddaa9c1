"""Transport between primary and replica: HTTPS with mutual TLS (port 8084) or HTTP with Kerberos
mutual authentication (port 8083), authorization entries with storage mapping, resumable uploads.

The server and client import aiohttp (and gssapi only in Kerberos mode) when first used.
"""
from .auth import (AuthenticationError, AuthorizationEntry, AuthorizationError, Fenced, ReplicaRefused,
                   ResumeTokenError, TransportError, authorize)

__all__ = ["AuthenticationError", "AuthorizationEntry", "AuthorizationError", "Fenced", "ReplicaClient", "ReplicaRefused",
           "ReplicaServer", "ResumeTokenError", "ServerThread", "TransportError", "authorize"]


def __getattr__(name: str):
    if name in ("ReplicaServer", "ServerThread"):
        from . import server
        return getattr(server, name)
    if name == "ReplicaClient":
        from .client import ReplicaClient
        return ReplicaClient
    raise AttributeError(name)

"""Fixtures for the fencing tests: the transport tests' PKI and replica servers over real mutual TLS on
loopback, and the hardening tests' Peer (the project's client, or raw HTTPS requests)."""
from __future__ import annotations

from ..hardening.conftest import Peer, peer_factory  # noqa: F401 (fixtures)
from ..transport.conftest import MiB, Primary, image_bytes, pki, run, servers, write  # noqa: F401 (fixtures)

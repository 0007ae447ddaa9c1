"""The controller's HTTPS listener: uvicorn with the deployment CA, a client certificate optional (a host
that registers has none yet) but verified when sent, and the verified certificate handed to the app.

uvicorn does not put the peer certificate into the ASGI scope, so its h11 protocol is extended here: each
connection, once the TLS handshake is done, wraps the app so that every request's scope carries the ASGI
TLS extension (`scope["extensions"]["tls"]["client_cert_chain"]`, PEM), which hosts_api.py reads.
"""
from __future__ import annotations

import ssl

from cryptography import x509
from cryptography.x509.oid import NameOID
from uvicorn.protocols.http.h11_impl import H11Protocol

from .ca import CertificateAuthority


class PeerCertProtocol(H11Protocol):
    """uvicorn's h11 protocol, adding the connection's verified client certificate to each request's scope."""

    def connection_made(self, transport) -> None:        # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        tls = {"client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
               "client_cert_error": None,
               "tls_version": ssl_object.version() if ssl_object is not None else None}
        app = self.app

        async def with_tls(scope, receive, send):
            scope.setdefault("extensions", {})["tls"] = tls
            await app(scope, receive, send)

        self.app = with_tls


def uvicorn_options(ca: CertificateAuthority, names: list[str]) -> dict:
    """Keyword arguments for uvicorn.Config/uvicorn.run: the controller's certificate for `names` (the
    listen address and host names), the CA, client certificates optional but verified, PeerCertProtocol."""
    cert, key = ca.server_certificate(names)
    return {"ssl_certfile": cert, "ssl_keyfile": key, "ssl_ca_certs": ca.path, "ssl_cert_reqs": ssl.CERT_OPTIONAL,
            "http": PeerCertProtocol}


def peer_common_name(scope) -> str | None:
    """The subject CN of the client certificate the TLS layer verified for this request, or None."""
    chain = scope.get("extensions", {}).get("tls", {}).get("client_cert_chain") or []
    if not chain:
        return None
    cert = x509.load_pem_x509_certificate(chain[0].encode())
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None

"""The deployment's certificate authority: made in the controller's data folder at first start, it signs the
controller's own HTTPS certificate and every registered host's certificate, so no one copies PKI by hand.

A host certificate names the host id as subject CN (what the controller's host channel and the replica
servers' allow lists match) and the host's names as SANs; it carries client and server usage because the
same certificate authenticates the host to the controller and on the replication data path (8084). Host
certificates are short-lived (30 days by default) and renewed by the agent after two thirds of that.

Files in DATA/ca/: ca.pem, ca.key (0600), controller.pem, controller.key (0600). transport/certs.py makes
the CA and the controller's key pair; this module adds what a CA serving a fleet needs: CSR signing.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..transport import certs

DEFAULT_LIFETIME = dt.timedelta(days=30)
MAX_CSR = 16 * 1024                      # bytes of PEM: a CSR is ~0.5-2 KiB


class CSRRefused(ValueError):
    """The CSR cannot be signed; the message is one line for the host."""


@dataclass(frozen=True)
class Issued:
    pem: str
    serial: str                          # hex
    not_before: dt.datetime              # a little before issued_at, for hosts whose clock is behind
    not_after: dt.datetime
    issued_at: dt.datetime

    @property
    def renew_after(self) -> dt.datetime:
        """Two thirds into the lifetime: time to renew, with a third left for an unreachable controller."""
        return self.issued_at + (self.not_after - self.issued_at) * 2 / 3


def ca_fingerprint(ca_pem: bytes) -> str:
    """The hex SHA-256 of the CA certificate's DER: what a registration key pins (as kubeadm's discovery hash)."""
    cert = x509.load_pem_x509_certificate(ca_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _names(names) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for n in dict.fromkeys(n for n in names if n):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n.strip("[]"))))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


class CertificateAuthority:
    def __init__(self, directory: str, lifetime: dt.timedelta = DEFAULT_LIFETIME):
        self.dir = directory
        self.lifetime = lifetime
        self.cert, self.key = certs.load_ca(directory)
        with open(os.path.join(directory, "ca.pem"), "rb") as f:
            self.pem = f.read()
        self.sha256 = ca_fingerprint(self.pem)

    @classmethod
    def open(cls, data_dir: str, lifetime: dt.timedelta = DEFAULT_LIFETIME) -> "CertificateAuthority":
        """The CA in DATA/ca, made at the first start (its key 0600)."""
        directory = os.path.join(data_dir, "ca")
        if not os.path.exists(os.path.join(directory, "ca.pem")):
            certs.init_ca(directory, name="replicator controller CA")
        return cls(directory, lifetime)

    @property
    def path(self) -> str:
        return os.path.join(self.dir, "ca.pem")

    # ------------------------------------------------------------------ the controller's own listener
    def server_certificate(self, names: list[str]) -> tuple[str, str]:
        """(cert, key) files for the controller's HTTPS listener, naming `names` (addresses, host names);
        issued again when the names change or less than a third of its life is left."""
        cert_path = os.path.join(self.dir, "controller.pem")
        key_path = os.path.join(self.dir, "controller.key")
        wanted = {str(g.value) for g in _names(names)}
        if os.path.exists(cert_path) and os.path.exists(key_path):
            with open(cert_path, "rb") as f:
                cur = x509.load_pem_x509_certificate(f.read())
            try:
                have = {str(v.value) for v in cur.extensions.get_extension_for_class(x509.SubjectAlternativeName).value}
            except x509.ExtensionNotFound:
                have = set()
            left = cur.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
            if wanted <= have and left > (cur.not_valid_after_utc - cur.not_valid_before_utc) / 3:
                return cert_path, key_path
        dns = [str(g.value) for g in _names(names) if isinstance(g, x509.DNSName)]
        ips = [str(g.value) for g in _names(names) if isinstance(g, x509.IPAddress)]
        return certs.issue(self.dir, "controller", dns=dns, ips=ips, days=825, usages=("server",))

    # ------------------------------------------------------------------ hosts
    def sign(self, csr_pem: str, host_id: str, names: list[str]) -> Issued:
        """Sign a host's CSR: CN = host id (whatever the CSR asked), SANs = `names`, client and server usage,
        this CA's lifetime. The CSR's own signature proves the host holds the key."""
        if not isinstance(csr_pem, str) or not csr_pem.strip() or len(csr_pem) > MAX_CSR:
            raise CSRRefused(f"csr must be a PEM certificate signing request (at most {MAX_CSR} bytes)")
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError:
            raise CSRRefused("csr is not a PEM certificate signing request") from None
        if not csr.is_signature_valid:
            raise CSRRefused("csr signature does not verify (it must be signed by the host's own key)")
        public = csr.public_key()
        if isinstance(public, rsa.RSAPublicKey) and public.key_size < 2048:
            raise CSRRefused(f"csr key is RSA-{public.key_size}: at least 2048 bits")
        if not isinstance(public, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
            raise CSRRefused("csr key must be EC (P-256/P-384) or RSA")
        if isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name not in ("secp256r1", "secp384r1"):
            raise CSRRefused(f"csr key curve {public.curve.name} is not P-256 or P-384")
        now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        start, end = now - dt.timedelta(seconds=30), now + self.lifetime
        serial = x509.random_serial_number()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host_id)]))
                .issuer_name(self.cert.subject).public_key(public)
                .serial_number(serial).not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True,
                                             key_encipherment=isinstance(public, rsa.RSAPublicKey),
                                             content_commitment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=False, crl_sign=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName(_names(names)), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        return Issued(cert.public_bytes(serialization.Encoding.PEM).decode(), format(serial, "x"), start, end, now)

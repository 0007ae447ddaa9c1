"""A private CA and host certificates for mutual TLS, so a replication setup needs no hand-made PKI.

Every host certificate carries both serverAuth and clientAuth (a host is a primary for some disks and a
replica for others, as in Hyper-V Replica), its name as subject CN and as a DNS SAN, plus IP 127.0.0.1.
Files in the CA directory: ca.pem, ca.key (0600); per host NAME.pem (certificate) and NAME.key (0600).
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import UsageError

_EKU = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _new_key(key_type: str):
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise UsageError(f"unknown key type {key_type!r}: use ec (P-256) or rsa (2048 bits)")


def _write(path: str, data: bytes, mode: int) -> None:
    """Create the file with its final mode from the start: a key is never readable by others, even briefly."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def init_ca(directory: str, *, name: str = "replicator CA", days: int = 3650, key_type: str = "ec",
            force: bool = False) -> str:
    """Make DIR/ca.pem and DIR/ca.key; refuses to overwrite an existing CA unless force (that would
    orphan every certificate it issued)."""
    os.makedirs(directory, exist_ok=True)
    cert_path = os.path.join(directory, "ca.pem")
    if os.path.exists(cert_path) and not force:
        raise UsageError(f"{cert_path} exists: a CA is already initialised there")
    key = _new_key(key_type)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    _write(os.path.join(directory, "ca.key"), _key_pem(key), 0o600)
    _write(cert_path, _cert_pem(cert), 0o644)
    return cert_path


def load_ca(directory: str):
    """(certificate, private key) of the CA in DIR."""
    try:
        with open(os.path.join(directory, "ca.pem"), "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(os.path.join(directory, "ca.key"), "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except FileNotFoundError as e:
        raise UsageError(f"no CA in {directory} ({e.filename} missing): run 'replicator certs init' first") \
            from None
    return cert, key


def _san(name: str, dns: list[str], ips: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for d in dict.fromkeys([name, *dns]):
        names.append(x509.DNSName(d))
    for ip in dict.fromkeys(ips):
        names.append(x509.IPAddress(ipaddress.ip_address(ip)))
    return x509.SubjectAlternativeName(names)


def issue(ca_dir: str, name: str, *, dns: list[str] | tuple = (), ips: list[str] | tuple = ("127.0.0.1",),
          out_dir: str | None = None, days: int = 825, key_type: str = "ec",
          usages: tuple[str, ...] = ("server", "client"), not_before: dt.datetime | None = None,
          not_after: dt.datetime | None = None) -> tuple[str, str]:
    """Issue a host certificate NAME.pem / NAME.key signed by the CA in CA_DIR; returns both paths.
    not_before/not_after override the validity (tests use them to make expired certificates)."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise UsageError(f"invalid host name {name!r}: use letters, digits, '.', '-', '_'")
    ca_cert, ca_key = load_ca(ca_dir)
    key = _new_key(key_type)
    start = not_before or (_now() - dt.timedelta(minutes=5))
    end = not_after or (_now() + dt.timedelta(days=days))
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=key_type == "rsa",
                                            content_commitment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=False, crl_sign=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([_EKU[u] for u in usages]), critical=False)
               .add_extension(_san(name, list(dns), list(ips)), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    cert = builder.sign(ca_key, hashes.SHA256())
    out = out_dir or ca_dir
    os.makedirs(out, exist_ok=True)
    key_path, cert_path = os.path.join(out, f"{name}.key"), os.path.join(out, f"{name}.pem")
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, _cert_pem(cert), 0o644)
    return cert_path, key_path


def describe(cert_path: str) -> str:
    """One line for the CLI: subject, SANs, validity."""
    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(v) for v in san.get_values_for_type(x509.DNSName)] + \
                [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    return (f"{cert.subject.rfc4514_string()} SAN={','.join(names) or '-'} "
            f"valid {cert.not_valid_before_utc:%Y-%m-%d} .. {cert.not_valid_after_utc:%Y-%m-%d}")

"""The controller's CA: made once in the data folder (key 0600), host CSRs signed with CN = host id, SANs and
both usages, a short lifetime; the chain verified by openssl itself; bad CSRs refused in one line."""
from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from replicator.controller.ca import CertificateAuthority, CSRRefused, ca_fingerprint
from replicator.daemon.enrol import HostFiles


def _openssl_verify(ca: str, cert: str, purpose: str) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", "verify", "-CAfile", ca, "-purpose", purpose, cert], capture_output=True,
                          text=True)


def test_ca_is_made_once_and_signs_host_csrs_that_openssl_verifies(tmp_path):
    ca = CertificateAuthority.open(str(tmp_path), lifetime=dt.timedelta(seconds=90))
    assert stat.S_IMODE(os.stat(tmp_path / "ca" / "ca.key").st_mode) == 0o600
    again = CertificateAuthority.open(str(tmp_path))
    assert again.sha256 == ca.sha256 == ca_fingerprint(ca.pem)            # the second start keeps the CA

    host = HostFiles(str(tmp_path / "host-state"))
    csr = host.csr("p1.example")
    assert stat.S_IMODE(os.stat(host.key).st_mode) == 0o600
    issued = ca.sign(csr, "c0ffee", ["p1.example", "127.0.0.1"])
    host.write_cert(issued.pem)
    cert = x509.load_pem_x509_certificate(issued.pem.encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "c0ffee"   # not the CSR's CN
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["p1.example"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(seconds=90) <= lifetime <= dt.timedelta(seconds=121)
    assert format(cert.serial_number, "x") == issued.serial
    assert issued.not_before < issued.renew_after < issued.not_after
    for purpose in ("sslclient", "sslserver"):
        r = _openssl_verify(ca.path, host.cert, purpose)
        assert r.returncode == 0 and ": OK" in r.stdout, r.stdout + r.stderr
    # another CA does not vouch for it
    other = CertificateAuthority.open(str(tmp_path / "other"))
    assert _openssl_verify(other.path, host.cert, "sslclient").returncode != 0

    # the controller's own listener certificate: server usage, the names asked, issued once
    cert_path, key_path = ca.server_certificate(["127.0.0.1", "controller.example"])
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert _openssl_verify(ca.path, cert_path, "sslserver").returncode == 0
    before = open(cert_path).read()
    assert ca.server_certificate(["127.0.0.1"])[0] == cert_path and open(cert_path).read() == before
    ca.server_certificate(["127.0.0.1", "other.example"])                 # a new name: issued again
    assert open(cert_path).read() != before


def _csr(key, cn="x") -> str:
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                                               cn)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_bad_csrs_are_refused_in_one_line(tmp_path):
    ca = CertificateAuthority.open(str(tmp_path))
    good = _csr(ec.generate_private_key(ec.SECP256R1()))
    tampered = good.replace(good.splitlines()[3], good.splitlines()[3][:-4] + "AAAA")
    cases = {"": "PEM certificate signing request", "hello": "not a PEM certificate signing request",
             "x" * 20000: "at most", tampered: "",
             _csr(rsa.generate_private_key(public_exponent=65537, key_size=1024)): "RSA-1024",
             _csr(ec.generate_private_key(ec.SECP521R1())): "secp521r1"}
    for csr, words in cases.items():
        with pytest.raises(CSRRefused) as e:
            ca.sign(csr, "h", ["h"])
        assert "\n" not in str(e.value) and words in str(e.value), str(e.value)

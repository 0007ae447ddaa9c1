"""`replicator certs` makes a PKI that openssl accepts, and `replicator replica serve` runs a working
replica from the command line (default ports 8084/8083; here on free ports)."""
from __future__ import annotations

import argparse
import os
import stat
import subprocess
import sys
import time

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from replicator.cli import certs as certs_cmd
from replicator.cli import replica as replica_cmd
from replicator.errors import UsageError
from replicator.transport import ReplicaClient, certs
from replicator.transport.server import DEFAULT_PORTS

from ..externals import run as run_tool
from .conftest import Primary, run, write
from .kdc import free_port


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="replicator")
    sub = parser.add_subparsers(dest="area", required=True)
    certs_cmd.register(sub)
    replica_cmd.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_certs_init_and_issue(tmp_path, capsys):
    d = str(tmp_path / "pki")
    assert cli("certs", "init", d) == 0
    assert cli("certs", "issue", d, "hv1.contoso.com", "--dns", "hv1", "--ip", "127.0.0.1", "--ip", "::1") == 0
    assert "CN=hv1.contoso.com" in capsys.readouterr().out
    for key in ("ca.key", "hv1.contoso.com.key"):
        assert stat.S_IMODE(os.stat(os.path.join(d, key)).st_mode) == 0o600
    with open(os.path.join(d, "hv1.contoso.com.pem"), "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hv1.contoso.com", "hv1"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    # openssl agrees: the chain verifies for both purposes
    for purpose in ("sslserver", "sslclient"):
        r = run_tool("openssl", "verify", "-purpose", purpose, "-CAfile", os.path.join(d, "ca.pem"),
                     os.path.join(d, "hv1.contoso.com.pem"))
        assert b": OK" in r.stdout


def test_rsa_keys_and_separate_output_dir(tmp_path):
    d, out = str(tmp_path / "pki"), str(tmp_path / "out")
    certs.init_ca(d, key_type="rsa")
    cert, key = certs.issue(d, "replica", out_dir=out, key_type="rsa")
    assert os.path.dirname(cert) == out and os.path.exists(key)
    r = run_tool("openssl", "x509", "-in", cert, "-noout", "-text")
    assert b"Public-Key: (2048 bit)" in r.stdout


def test_refuses_to_overwrite_a_ca_or_issue_without_one(tmp_path):
    d = str(tmp_path / "pki")
    certs.init_ca(d)
    with pytest.raises(UsageError, match="already initialised"):
        cli("certs", "init", d)
    with pytest.raises(UsageError, match="no CA in"):
        certs.issue(str(tmp_path / "nothing"), "host")
    with pytest.raises(UsageError, match="invalid host name"):
        certs.issue(d, "../etc/passwd")


def test_default_ports():
    assert DEFAULT_PORTS == {"cert": 8084, "kerberos": 8083}


def test_replica_serve_from_the_command_line(tmp_path, pki):
    port = free_port()
    p = pki.pair("replica1")
    code = ("import argparse, sys\n"
            "from replicator.cli import replica\n"
            "parser = argparse.ArgumentParser(); replica.register(parser.add_subparsers())\n"
            "args = parser.parse_args(sys.argv[1:]); sys.exit(args.func(args))\n")
    root = str(tmp_path / "root")
    proc = subprocess.Popen([sys.executable, "-c", code, "replica", "serve", "--host", "127.0.0.1",
                             "--port", str(port), "--cert", p["cert"], "--key", p["key"], "--ca", p["ca"],
                             "--root", root, "--allow", "primary1", "--allow", f"primary2={root}-2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("serving on" in ln for ln in lines):
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        assert f"serving on https://127.0.0.1:{port}" in "".join(lines)
        primary = Primary()
        path = write(tmp_path, "c1.delta", primary.cycle())

        async def go():
            async with ReplicaClient(f"https://127.0.0.1:{port}", **pki.pair("primary2")) as c:
                await c.ensure_disk(primary.disk_id, primary.size)
                return await c.send_stream(primary.disk_id, "c1", path)

        assert run(go())["generation"] == 1
        assert os.listdir(os.path.join(f"{root}-2", "disks")) == [str(primary.disk_id)]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "stopped cleanly" in out


def test_replica_serve_needs_an_allow_entry(tmp_path):
    with pytest.raises(UsageError, match="no --allow"):
        cli("replica", "serve", "--root", str(tmp_path))

"""`replicator-controller --data DIR key create --site NAME`: a registration key made in the store directly
(a first host can join before anyone has an API client), audited, the key file 0600; refusals one line."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import select

from replicator.controller import models as m
from replicator.controller.db import Store, sqlite_url

BIN = os.path.join(os.path.dirname(sys.executable), "replicator-controller")


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=120)


def test_key_create_writes_a_key_file_and_audits_it(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    store = Store.open(sqlite_url(data))
    with store.session() as s:
        s.add(m.Site(name="east"))
    store.close()
    out = tmp_path / "east.key"
    p = _run("--data", str(data), "--public-url", "https://ctl.example:8086", "key", "create", "--site", "east",
             "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    doc = json.loads(out.read_text())
    assert doc["controller"] == "https://ctl.example:8086" and doc["site"] == "east" and doc["token"]
    ca = x509.load_pem_x509_certificate((data / "ca" / "ca.pem").read_bytes())
    assert doc["ca_sha256"] == hashlib.sha256(ca.public_bytes(Encoding.DER)).hexdigest()
    store = Store.open(sqlite_url(data))
    with store.session() as s:
        [key] = s.scalars(select(m.RegistrationKey)).all()
        assert key.site.name == "east" and doc["token"] not in (key.token_hash or "")
        assert [a.action for a in s.scalars(select(m.AuditEntry).where(m.AuditEntry.action == "key.create"))] \
            == ["key.create"]
    store.close()
    again = _run("--data", str(data), "key", "create", "--site", "east", "--out", str(out))
    assert again.returncode == 1 and "File exists" in again.stderr and len(again.stderr.splitlines()) == 1


def test_an_unknown_site_is_one_line(tmp_path):
    p = _run("--data", str(tmp_path / "d"), "key", "create", "--site", "nowhere")
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "replicator-controller: error: no site 'nowhere' (create it first: POST /v1/sites)"]

"""The host channel against a real `replicator-controller` (HTTPS on loopback, the deployment CA, SQLite and
a real PostgreSQL): registration with a key pinned by the CA's hash, the refusals (used, expired, wrong-site
key, wrong CA hash) in one line, the certificate chain verified by openssl, host-authenticated desired and
report routes, renewal with a short lifetime, a removed host refused."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from replicator.daemon import enrol
from replicator.daemon.agent import Agent

from .conftest import free_port

BIN = os.path.dirname(sys.executable)


class ControllerProc:
    """`replicator-controller` in a subprocess: HTTPS on 127.0.0.1, its data folder, its admin token."""

    def __init__(self, folder, database_url: str | None = None, cert_lifetime: float = 3600):
        self.dir = folder
        self.data = folder / "controller-data"
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.database_url, self.cert_lifetime = database_url, cert_lifetime
        self.proc = None

    def start(self) -> "ControllerProc":
        self.log = open(self.dir / "controller.log", "ab")
        cmd = [os.path.join(BIN, "replicator-controller"), "--data", str(self.data), "--listen",
               f"127.0.0.1:{self.port}", "--cert-lifetime", str(self.cert_lifetime), "--log-level", "warning"]
        if self.database_url:
            cmd += ["--database", self.database_url]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.dir / "controller.log").read_text()
            try:
                self.api("GET", "/v1/sites")
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        raise AssertionError("the controller did not start:\n" + (self.dir / "controller.log").read_text())

    def stop(self) -> None:
        """SIGTERM and wait; its log closed (also used by test_fleet.py's hosts)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        if self.proc is not None:
            self.log.close()
            self.proc = None

    @property
    def ca_path(self) -> str:
        return str(self.data / "ca" / "ca.pem")

    @property
    def token(self) -> str:
        return (self.data / "admin.token").read_text().strip()

    def api(self, method: str, path: str, body=None, *, cert=None, token: bool = True) -> tuple[int, dict]:
        """A request to the REST API (admin token) or, with cert=(certfile, keyfile), as a host."""
        ctx = ssl.create_default_context(cafile=self.ca_path)
        if cert:
            ctx.load_cert_chain(*cert)
        headers = {"Content-Type": "application/json"}
        if token and not cert:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, method=method, headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else {}
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def ok(self, method: str, path: str, body=None) -> dict:
        code, data = self.api(method, path, body)
        assert code < 300, f"{method} {path}: {code} {data}"
        return data

    def key_file(self, folder, site: str, **body) -> str:
        """A registration key for `site`, saved as a host's key file."""
        doc = self.ok("POST", f"/v1/sites/{site}/registration-keys", body or None)
        path = folder / f"key-{site}-{os.urandom(3).hex()}.json"
        path.write_text(json.dumps(doc))
        return str(path)


@pytest.fixture
def ctl(tmp_path, database_url):
    c = ControllerProc(tmp_path, database_url, cert_lifetime=10).start()      # the shortest it takes
    yield c
    c.stop()


def _register(folder, ctl, key, hostname, data_port=8084):
    files = enrol.HostFiles(str(folder / hostname))
    info = asyncio.run(enrol.register(files, ctl.url, key, hostname=hostname, admin_url="http://127.0.0.1:18085",
                                      data_url=f"https://127.0.0.1:{data_port}"))
    return files, info


def _refused(coro) -> str:
    with pytest.raises(enrol.EnrolError) as e:
        asyncio.run(coro)
    assert "\n" not in e.value.message
    return e.value.message


def test_registration_issues_a_verified_certificate_and_refuses_bad_keys(tmp_path, ctl):
    ctl.ok("POST", "/v1/sites", {"name": "east"})
    ctl.ok("POST", "/v1/sites", {"name": "west"})
    key = ctl.key_file(tmp_path, "east")
    doc = json.loads(open(key).read())
    assert doc["controller"] == ctl.url and doc["site"] == "east" and len(doc["ca_sha256"]) == 64

    files, info = _register(tmp_path, ctl, key, "p1")
    # openssl verifies the chain with the controller's CA, for both purposes
    for purpose in ("sslclient", "sslserver"):
        r = subprocess.run(["openssl", "verify", "-CAfile", ctl.ca_path, "-purpose", purpose, files.cert],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    cert = x509.load_pem_x509_certificate(open(files.cert, "rb").read())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == info["host_id"]
    assert open(files.ca).read() == open(ctl.ca_path).read()
    assert oct(os.stat(files.key).st_mode & 0o777) == "0o600"
    saved = json.loads(open(files.info).read())
    assert saved["host_id"] == info["host_id"] and saved["ca_sha256"] == doc["ca_sha256"]
    host = ctl.ok("GET", f"/v1/hosts/{info['host_id']}")
    assert host["hostname"] == "p1" and host["site"] == "east" and host["data_url"] == "https://127.0.0.1:8084"

    # the same key again: by another host refused; the same host retrying gets its own record again
    assert "already used" in _refused(enrol.register(enrol.HostFiles(str(tmp_path / "p2")), ctl.url, key,
                                                     hostname="p2", admin_url="http://127.0.0.1:1",
                                                     data_url="https://127.0.0.1:2"))
    _, again = _register(tmp_path / "retry", ctl, key, "p1")
    assert again["host_id"] == info["host_id"]
    # a key of another site for a host registered in east
    west = ctl.key_file(tmp_path, "west")
    assert "registered in site 'east'" in _refused(enrol.register(enrol.HostFiles(str(tmp_path / "x")), ctl.url,
                                                                  west, hostname="p1", admin_url="http://a:1",
                                                                  data_url="https://a:2"))
    # a key file naming another site than its token's
    doc_w = json.loads(open(west).read())
    bad_site = tmp_path / "bad-site.json"
    bad_site.write_text(json.dumps({**doc_w, "site": "east"}))
    files_b = enrol.HostFiles(str(tmp_path / "b"))
    assert "it is for site 'west', not 'east'" in _refused(
        enrol.register(files_b, ctl.url, str(bad_site), hostname="b1", admin_url="http://a:1",
                       data_url="https://a:2"))
    # a wrong CA hash: refused before the token is sent (the key stays unused: it registers r1 next)
    wrong = tmp_path / "wrong-ca.json"
    wrong.write_text(json.dumps({**doc_w, "ca_sha256": "0" * 64}))
    assert "does not match the key's ca_sha256" in _refused(
        enrol.register(enrol.HostFiles(str(tmp_path / "w")), ctl.url, str(wrong), hostname="r1",
                       admin_url="http://a:1", data_url="https://a:2"))
    _register(tmp_path, ctl, west, "r1")
    # an expired key: refused by the controller (its clock), and by the host itself from the file
    stale = ctl.key_file(tmp_path, "east", expires_in=60)
    with _store(ctl) as s:
        from replicator.controller import models as m
        from replicator.controller.auth import hash_token
        k = s.query(m.RegistrationKey).filter_by(token_hash=hash_token(json.loads(open(stale).read())["token"])).one()
        k.expires_at = m.utcnow().replace(year=2020)
    assert "expired" in _refused(enrol.register(enrol.HostFiles(str(tmp_path / "e")), ctl.url, stale,
                                                hostname="e1", admin_url="http://a:1", data_url="https://a:2"))
    expired_file = tmp_path / "expired.json"
    expired_file.write_text(json.dumps({**json.loads(open(stale).read()), "expires": "2020-01-01T00:00:00+00:00"}))
    assert "expired at 2020-01-01" in _refused(enrol.register(enrol.HostFiles(str(tmp_path / "e")), ctl.url,
                                                              str(expired_file), hostname="e1",
                                                              admin_url="http://a:1", data_url="https://a:2"))
    # replicatord itself says it in one line, with an exit code
    p = subprocess.run([os.path.join(BIN, "replicatord"), "--register", ctl.url, "--key", key, "--state",
                        str(tmp_path / "cli"), "--hostname", "p9"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "already used" in p.stderr, p.stderr
    # the admin route needs an admin token; an unknown site is a 404
    assert ctl.api("POST", "/v1/sites/east/registration-keys", token=False)[0] == 401
    code, body = ctl.api("POST", "/v1/sites/nowhere/registration-keys")
    assert code == 404 and "nowhere" in body["error"]


class _store:
    """The controller's store, opened beside it (to age a key as time would)."""

    def __init__(self, ctl):
        from replicator.controller.db import Store, sqlite_url
        self.store = Store.open(ctl.database_url or sqlite_url(ctl.data), migrate=False)

    def __enter__(self):
        self.cm = self.store.session()
        return self.cm.__enter__()

    def __exit__(self, *exc):
        try:
            return self.cm.__exit__(*exc)
        finally:
            self.store.close()


def test_host_routes_need_the_host_certificate_and_renewal_replaces_it(tmp_path, ctl):
    ctl.ok("POST", "/v1/sites", {"name": "east"})
    files, info = _register(tmp_path, ctl, ctl.key_file(tmp_path, "east"), "p1", data_port=18084)
    me = (files.cert, files.key)
    code, doc = ctl.api("GET", "/v1/hosts/self/desired", cert=me)
    assert code == 200 and doc["revision"] >= 1 and doc["fencing"] == {}
    assert doc["config"] == {"daemon": {"state_dir": "..", "admin_listen": "127.0.0.1:18085"}}
    code, body = ctl.api("GET", "/v1/hosts/self/desired", token=False)
    assert code == 401 and "client certificate" in body["error"]
    code, body = ctl.api("POST", "/v1/hosts/self/report", {"revision": doc["revision"], "status": {"machines": []},
                                                           "problems": ["a note"]}, cert=me)
    assert code == 200 and body == {"revision": doc["revision"]}
    host = ctl.ok("GET", f"/v1/hosts/{info['host_id']}")
    assert host["applied_revision"] == doc["revision"] and host["last_seen"]
    code, body = ctl.api("POST", "/v1/hosts/self/report", {"revision": "x", "status": {}}, cert=me)
    assert code == 422 and "revision" in body["error"]

    # renewal: the lifetime is 10 s, renewal is due two thirds into it (the controller's renew_after, well before
    # the certificate lapses), waited for, not a fixed time; the new certificate works, with a new serial
    agent = Agent(files.state_dir, poll_interval=0.5)
    assert not asyncio.run(agent.renew_if_due())
    old = x509.load_pem_x509_certificate(open(files.cert, "rb").read())
    due = dt.datetime.fromisoformat(info["renew_after"]).timestamp()
    assert due <= old.not_valid_after_utc.timestamp() - 3, (info["renew_after"], old.not_valid_after_utc)
    time.sleep(max(0.0, due + 0.2 - time.time()))
    assert asyncio.run(agent.renew_if_due())
    new = x509.load_pem_x509_certificate(open(files.cert, "rb").read())
    assert new.serial_number != old.serial_number and new.not_valid_after_utc > old.not_valid_after_utc
    assert new.subject == old.subject
    asyncio.run(agent.poll_once())
    assert agent.status()["state"] == "connected", agent.status()
    assert ctl.ok("GET", f"/v1/hosts/{info['host_id']}")["cert_not_after"].startswith(
        new.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%S"))

    # a host removed through the API is refused, in one line
    assert ctl.api("DELETE", f"/v1/hosts/{info['host_id']}")[0] == 204
    code, body = ctl.api("DELETE", "/v1/hosts/p1")
    assert code == 404 and "no host 'p1'" in body["error"]
    asyncio.run(agent.poll_once())
    st = agent.status()
    assert st["state"].startswith("refused: host ") and "not registered here" in st["state"], st
    # the controller away: the agent says since when
    ctl.stop()
    agent.refused = None
    asyncio.run(agent.poll_once())
    assert agent.status()["state"].startswith("unreachable since "), agent.status()
    # another controller (its own CA) where this one was: the host refuses it, one line
    (tmp_path / "impostor").mkdir()
    impostor = ControllerProc(tmp_path / "impostor")          # its own store and CA
    impostor.port, impostor.url = ctl.port, ctl.url
    impostor.start()
    try:
        asyncio.run(agent.poll_once())
        assert agent.status()["state"].startswith("refused: the controller's certificate does not verify with the "
                                                  "CA pinned at registration"), agent.status()
    finally:
        impostor.stop()

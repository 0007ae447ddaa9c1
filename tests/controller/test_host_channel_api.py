"""The host channel's routes through the app itself (no TLS here: the TLS path is test_host_channel.py's):
what needs a host certificate refuses without one, bad registrations are one-line 4xx that consume nothing,
keys need an admin, GET /v1/ca is public."""
from __future__ import annotations

import os

from replicator.daemon.enrol import HostFiles


def test_routes_refuse_in_one_line_and_a_refused_registration_takes_nothing(controller, tmp_path):
    c = controller.client
    pem = c.get("/v1/ca")
    assert pem.status_code == 200 and pem.text == open(os.path.join(controller.data_dir, "ca", "ca.pem")).read()
    for method, path in (("GET", "/v1/hosts/self/desired"), ("POST", "/v1/hosts/self/report"),
                         ("POST", "/v1/hosts/self/renew")):
        r = c.request(method, path, json={"csr": "x"} if "renew" in path else None)
        assert r.status_code in (401, 422), (path, r.text)
    r = c.get("/v1/hosts/self/desired")
    assert r.status_code == 401 and "client certificate" in r.json()["error"]

    assert c.post("/v1/sites", json={"name": "east"}).status_code == 201
    operator = controller.make_token("operator")
    r = c.post("/v1/sites/east/registration-keys", headers={"Authorization": f"Bearer {operator}"})
    assert r.status_code == 403 and "admin" in r.json()["error"]
    r = c.post("/v1/sites/east/registration-keys", json={"expires_in": 5})
    assert r.status_code == 422 and "expires_in" in r.json()["error"]
    key = c.post("/v1/sites/east/registration-keys", json={"expires_in": 600}).json()
    assert key["site"] == "east" and key["token"].startswith("rrk_")

    csr = HostFiles(str(tmp_path / "h")).csr("p1")
    good = {"token": key["token"], "hostname": "p1", "csr": csr, "admin_url": "http://127.0.0.1:8085",
            "data_url": "https://p1.example:8084"}
    for change, status, words in (({"token": "nope"}, 403, "unknown token"),
                                  ({"hostname": "bad host"}, 422, "hostname"),
                                  ({"data_url": "ftp://x"}, 422, "data_url"),
                                  ({"admin_url": "http://a:99999"}, 422, "admin_url"),
                                  ({"extra": 1}, 422, "extra"),
                                  ({"csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"}, 422, "csr"),
                                  ({"site": "west"}, 403, "for site 'east'")):
        r = c.post("/v1/register", json={**good, **change})
        assert r.status_code == status and words in r.json()["error"], (change, r.text)
        assert "\n" not in r.json()["error"]
    assert c.get("/v1/hosts").json() == []                    # nothing made, the key not used
    r = c.post("/v1/register", json=good)
    assert r.status_code == 200 and r.json()["certificate"].startswith("-----BEGIN CERTIFICATE-----")
    r = c.get("/v1/hosts/p1/report")
    assert r.status_code == 404 and "not reported yet" in r.json()["error"]
    assert c.get("/v1/hosts/nobody/report").status_code == 404


def test_replicatord_controller_options_refuse_in_one_line(tmp_path):
    import subprocess
    import sys
    run = lambda *a: subprocess.run([os.path.join(os.path.dirname(sys.executable), "replicatord"), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    broken = tmp_path / "broken" / "controller"
    broken.mkdir(parents=True)
    for name in ("host.key", "host.pem", "ca.pem"):
        (broken / name).write_text("")
    (broken / "controller.json").write_text("{")
    key = tmp_path / "key.json"
    key.write_text('{"controller": "https://127.0.0.1:1", "site": "s", "token": "t", "ca_sha256": "00", '
                   '"expires": "2020-01-01T00:00:00+00:00"}')
    for args, code, words in (
            (["--state", str(tmp_path / "s"), "--admin-listen", "0.0.0.0:80"], 2, "on loopback"),
            (["--state", str(tmp_path / "s"), "--poll", "0"], 2, "--poll"),
            (["--state", str(tmp_path / "s"), "--register", "https://127.0.0.1:1"], 2, "go together"),
            (["--state", str(tmp_path / "s")], 2, "holds no registration"),
            (["--state", str(tmp_path / "broken")], 1, "controller.json is unusable"),
            (["--state", str(tmp_path / "s"), "--register", "https://127.0.0.1:1", "--key", str(key)], 1,
             "expired at 2020-01-01"),
            (["--state", str(tmp_path / "s"), "--register", "https://127.0.0.1:1", "--key", str(tmp_path / "no")],
             1, "cannot read the registration key")):
        p = run(*args)
        assert p.returncode == code and p.stderr.count("\n") == 1 and words in p.stderr, (args, p.stderr)
        assert "Traceback" not in p.stderr
    p = run("--config", "x.toml", "--state", str(tmp_path / "s"))
    assert p.returncode == 2 and "give --config FILE (standalone) or --state DIR" in p.stderr

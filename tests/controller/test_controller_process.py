"""The real `replicator-controller` process on loopback: first start makes the store and DATA/admin.token, the
API answers with it over HTTPS (the deployment CA in DATA/ca, which the client verifies), SIGTERM stops it cleanly (exit 0), a restart keeps the data and the token; bad options
are one-line errors."""
from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import sys
import time

import httpx
import pytest

from .conftest import free_port

EXE = shutil.which("replicator-controller", path=os.path.dirname(sys.executable))


def start(data, database_url=None):
    port = free_port()
    argv = [EXE, "--data", str(data), "--listen", f"127.0.0.1:{port}", "--log-level", "warning"]
    if database_url:
        argv += ["--database", database_url]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"https://127.0.0.1:{port}"
    ca = data / "ca" / "ca.pem"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited {proc.returncode}: {proc.stderr.read()}"
        if ca.exists():
            client = httpx.Client(base_url=url, verify=ssl.create_default_context(cafile=str(ca)), timeout=10)
            try:
                client.get("/openapi.json")
                return proc, client
            except httpx.TransportError:
                client.close()
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise AssertionError("the controller did not start listening within 60 s")


def stop(proc) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, proc.stderr.read()


@pytest.mark.skipif(EXE is None, reason="replicator-controller is not installed in this environment (pip install -e .)")
def test_the_controller_process_serves_and_stops_on_sigterm(tmp_path, database_url):
    data = tmp_path / "data"
    proc, api = start(data, None if database_url.startswith("sqlite") else database_url)
    try:
        token = (data / "admin.token").read_text().strip()
        assert oct(os.stat(data / "admin.token").st_mode & 0o777) == "0o600"
        auth = {"Authorization": f"Bearer {token}"}
        assert api.get(f"/v1/sites").status_code == 401
        r = api.post(f"/v1/sites", json={"name": "a"}, headers=auth)
        assert r.status_code == 201, r.text
        r = api.post(f"/v1/sites", json={"name": "no good"}, headers=auth)
        assert r.status_code == 422 and list(r.json()) == ["error"]
        assert api.get(f"/openapi.json").json()["info"]["title"] == "replicator controller"
    finally:
        api.close()
        code, err = stop(proc)
    assert code == 0, err
    assert "Traceback" not in err
    if database_url.startswith("sqlite"):
        assert (data / "controller.db").exists()

    proc, api = start(data, None if database_url.startswith("sqlite") else database_url)
    try:
        assert (data / "admin.token").read_text().strip() == token, "a restart keeps the admin token"
        r = api.get(f"/v1/sites", headers={"Authorization": f"Bearer {token}"})
        assert [s["name"] for s in r.json()] == ["a"]
        audit = api.get(f"/v1/audit", headers={"Authorization": f"Bearer {token}"}).json()
        assert [(a["action"], a["outcome"][:3]) for a in audit[:2]] == [("POST /v1/sites", "422"),
                                                                        ("POST /v1/sites", "201")]
    finally:
        api.close()
        code, err = stop(proc)
    assert code == 0, err


@pytest.mark.skipif(EXE is None, reason="replicator-controller is not installed in this environment (pip install -e .)")
def test_bad_options_are_one_line_errors(tmp_path):
    cases = [(["--data", str(tmp_path / "d"), "--listen", "nowhere"], "must be HOST:PORT"),
             (["--data", str(tmp_path / "d"), "--database", "mysql://x@y/z"], "unsupported database 'mysql'"),
             (["--data", str(tmp_path / "d"), "--database", "postgresql://nobody@127.0.0.1:1/none"],
              "cannot open the store")]
    for argv, message in cases:
        r = subprocess.run([EXE, *argv], capture_output=True, text=True, timeout=60)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode != 0 and message in last and last.startswith("replicator-controller: error:"), r.stderr
        assert "Traceback" not in r.stderr, r.stderr

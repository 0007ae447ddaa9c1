"""`replicator --controller URL ...` against the real controller process over HTTPS: the test story's verbs
(cloud list, machine enable vm01 --cloud gold, job list) and the controller's refusals as one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from replicator.cli import main as cli
from replicator.controller import models as m
from replicator.controller.db import Store, sqlite_url

from .test_controller_process import EXE, start, stop


@pytest.fixture
def running(tmp_path, database_url):
    data = tmp_path / "data"
    url = None if database_url.startswith("sqlite") else database_url
    proc, api = start(data, url)
    store = Store.open(url or sqlite_url(data), migrate=False)
    try:
        yield api, store, data
    finally:
        api.close()
        store.close()
        code, err = stop(proc)
        assert code == 0, err


@pytest.mark.skipif(EXE is None, reason="replicator-controller is not installed in this environment")
def test_cli_story(running, capsys):
    api, store, data = running
    base = ["--controller", str(api.base_url).rstrip("/"), "--token", str(data / "admin.token"),
            "--ca", str(data / "ca" / "ca.pem")]

    def run(*argv, code=0):
        capsys.readouterr()
        got = cli([*base, *argv])
        out, err = capsys.readouterr()
        assert got == code, (argv, out, err)
        return out if code == 0 else err

    run("site", "create", "a")
    run("site", "create", "b")
    run("cloud", "create", "gold", "--site", "a")
    run("cloud", "create", "silver", "--site", "b")
    run("policy", "create", "p5", "--frequency", "5m", "--additional-points", "2", "--compression", "off",
        "--rpo-threshold", "20m", "--copy-rate-when-busy", "30M")
    run("pair", "create", "gold-silver", "--primary", "gold", "--recovery", "silver", "--policy", "p5")
    with store.session() as s:          # hosts register through the host channel; here they are put in directly
        for hostname, site, cloud in (("pa1", "a", "gold"), ("rb1", "b", "silver")):
            s.add(m.Host(hostname=hostname, site_id=s.query(m.Site).filter_by(name=site).one().id,
                         cloud_id=s.query(m.Cloud).filter_by(name=cloud).one().id))
    lines = run("cloud", "list").splitlines()
    assert lines[0].split() == ["NAME", "SITE", "PAIR", "PAIR_ROLE", "HOSTS"]
    assert lines[1].split() == ["gold", "a", "gold-silver", "primary", "pa1"]
    assert lines[2].split() == ["silver", "b", "gold-silver", "recovery", "rb1"]
    assert json.loads(run("policy", "show", "p5"))["compression"] is False
    assert json.loads(run("policy", "show", "p5"))["rpo_threshold"] == 1200
    assert json.loads(run("policy", "show", "p5"))["copy_rate_when_busy"] == 30 << 20

    enabled = json.loads(run("machine", "enable", "vm01", "--cloud", "gold"))
    assert (enabled["domain"], enabled["primary_host"], enabled["replica_host"]) == ("vm01", "pa1", "rb1")
    err = run("machine", "enable", "vm01", "--cloud", "gold", code=2)
    assert err.strip().splitlines() == ["replicator: error: machine 'vm01' is already protected (enabled)"]
    run("machine", "pause", "vm01")
    jobs = run("job", "list").splitlines()
    assert jobs[0].split()[:5] == ["ID", "KIND", "STATE", "MACHINE", "PROGRESS"]
    assert [line.split()[1:4] for line in jobs[1:]] == [["pause-protection", "queued", "vm01"],
                                                        ["enable-protection", "queued", "vm01"]]
    job_id = jobs[1].split()[0]
    assert json.loads(run("job", "cancel", job_id))["state"] == "cancelled"
    assert json.loads(run("job", "show", job_id))["log"][-1]["line"] == "cancelled by admin"
    assert [j["kind"] for j in json.loads(run("--json", "job", "list", "--state", "queued"))] == \
        ["enable-protection"]

    err = run("cloud", "create", "iron", "--site", "nowhere", code=2)
    assert err.strip() == "replicator: error: POST /v1/clouds: 422 site: no site 'nowhere'"
    err = run("policy", "create", "bad", "--frequency", "7m", code=2)
    assert "must be 30s, 5m or 15m" in err and len(err.strip().splitlines()) == 1

    reader = data / "reader.token"
    made = json.loads(run("token", "create", "watcher", "--role", "read-only"))
    assert made["role"] == "read-only" and made["token"].startswith("rpc_")
    reader.write_text(made["token"])
    assert [line.split()[:2] for line in run("token", "list").splitlines()[1:]] == [["admin", "admin"],
                                                                                  ["watcher", "read-only"]]
    capsys.readouterr()
    assert cli(["--controller", str(api.base_url).rstrip("/"), "--token", str(reader), "--ca",
                str(data / "ca" / "ca.pem"), "machine", "resume", "vm01"]) == 1
    assert "403 token 'watcher' is read-only; this needs operator" in capsys.readouterr().err
    run("token", "revoke", "watcher")
    assert cli(["--controller", str(api.base_url).rstrip("/"), "--token", str(reader), "--ca",
                str(data / "ca" / "ca.pem"), "site", "list"]) == 1
    assert "401 unknown or revoked API token" in capsys.readouterr().err

    # the console script itself dispatches --controller
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "replicator"), *base, "machine", "list"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1].split()[:5] == ["vm01", "gold", "pa1", "rb1", "paused"]


def test_cli_errors_without_a_controller(tmp_path, capsys):
    token = tmp_path / "t"
    token.write_text("x")
    assert cli(["--controller", "http://127.0.0.1:1", "--token", str(token), "site", "list"]) == 1
    assert capsys.readouterr().err.startswith("replicator: error: cannot reach the controller at http://127.0.0.1:1")
    assert cli(["--controller", "http://127.0.0.1:1", "site", "list"]) == 2
    assert "no API token" in capsys.readouterr().err

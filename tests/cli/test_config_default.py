"""Commands that talk to replicatord find its configuration in $REPLICATOR_CONFIG (or the system-wide
file) when --config is not given, and say clearly when there is none."""
from __future__ import annotations

import os
import subprocess
import sys

BIN = os.path.dirname(sys.executable)


def run(*args, env=None):
    return subprocess.run([os.path.join(BIN, "replicator"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)


def test_replicator_config_from_the_environment(tmp_path):
    missing = str(tmp_path / "nowhere.toml")
    p = run("status", env={"REPLICATOR_CONFIG": missing})
    assert p.returncode == 2 and f"no replicatord configuration at {missing}" in p.stderr, p.stderr
    cfg = tmp_path / "site.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{tmp_path}/state"\nadmin_listen = "127.0.0.1:9"\n'
                   '[[machine]]\nname = "vm"\ndisks = ["d.vhdx"]\ntarget = "local:///tmp/r"\n')
    p = run("status", env={"REPLICATOR_CONFIG": str(cfg)})         # found: now it looks for the daemon
    assert p.returncode != 0 and "admin token" in p.stderr, p.stderr
    p = run("plans", "--config", missing, env={"REPLICATOR_CONFIG": str(cfg)})   # --config wins
    assert f"no replicatord configuration at {missing}" in p.stderr, p.stderr

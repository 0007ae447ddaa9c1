"""replicatord whose replica port, admin port or metrics port is taken: one line naming the setting, exit 20
(CannotListen), no traceback, and nothing left running."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from .primary_harness import free_port
from .two_sites import make_pki

BIN = os.path.dirname(sys.executable)


@pytest.mark.parametrize("which", ["replica", "admin", "metrics"])
def test_a_taken_port_is_one_line(tmp_path, which):
    pki = make_pki(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = {k: (busy if k == which else free_port()) for k in ("replica", "admin", "metrics")}
        config = tmp_path / "replicatord.toml"
        config.write_text(f'''[daemon]
state_dir = "state"
admin_listen = "127.0.0.1:{ports['admin']}"
metrics_listen = "127.0.0.1:{ports['metrics']}"

[replica]
listen = "127.0.0.1"
port = {ports['replica']}
cert = "{pki}/site-b.pem"
key = "{pki}/site-b.key"
ca = "{pki}/ca.pem"

[[replica.allow]]
principal = "site-a"
storage = "replica"
''')
        p = subprocess.run([os.path.join(BIN, "replicatord"), "--config", str(config)], capture_output=True,
                           text=True, timeout=120, cwd=tmp_path)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 20, p.stderr
    assert "Traceback" not in p.stderr
    last = err[-1]
    assert last.startswith("replicatord: ") and "cannot listen" in last and str(busy) in last, p.stderr
    assert {"replica": "[replica] port", "admin": "admin_listen", "metrics": "metrics_listen"}[which] in last

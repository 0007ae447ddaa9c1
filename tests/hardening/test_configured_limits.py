"""The replica server's limits are the operator's: set with `replicator replica serve` options or
replicatord.toml's [replica] keys, they reach the running server (a careless primary's disk larger than
max_disk_size is refused in one line and leaves nothing), and a bad value is refused at start with its field."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import types
import uuid

import pytest

from replicator.transport import ReplicaRefused

from ..daemon.primary_harness import Daemon, free_port
from .conftest import MiB, Peer, tree

BIN = os.path.dirname(sys.executable)


def _refuses_a_larger_disk(peer: Peer, root: str, limit: int) -> None:
    """A disk of `limit` bytes is accepted, one 512 bytes larger refused in one line naming the limit, and
    nothing is left of it."""
    small, big = uuid.uuid4(), uuid.uuid4()
    peer.call("ensure_disk", small, limit, block_size=MiB)
    before = tree(root)
    with pytest.raises(ReplicaRefused, match="max_disk_size") as err:
        peer.call("ensure_disk", big, limit + 512, block_size=MiB)
    assert err.value.status == 400 and "\n" not in str(err.value) and str(limit) in str(err.value)
    assert tree(root) == before and sorted(os.listdir(os.path.join(root, "disks"))) == [str(small)]


def test_replica_serve_options_bound_what_a_primary_can_create(pki, tmp_path):
    root = str(tmp_path / "root")
    p = pki.pair("replica1")
    proc = subprocess.Popen([os.path.join(BIN, "replicator"), "replica", "serve", "--host", "127.0.0.1", "--port",
                             "0", "--cert", p["cert"], "--key", p["key"], "--ca", p["ca"],
                             "--allow", f"primary1={root}", "--max-disk-size", "16M", "--max-uploads", "3",
                             "--header-timeout", "20", "--read-timeout", "1m", "--digest-requests", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        while url is None:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            if line.startswith("serving on "):
                url = line.split()[2]
        _refuses_a_larger_disk(Peer(types.SimpleNamespace(url=url), pki, tmp_path, "primary1"), root, 16 * MiB)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "stopped cleanly" in out and "Traceback" not in err, err


@pytest.mark.parametrize("option, value, words", [
    ("--max-disk-size", "16 parsecs", ("--max-disk-size", "1M to 64T")),
    ("--max-disk-size", "100T", ("--max-disk-size", "1M to 64T")),
    ("--max-disks", "0", ("--max-disks", "from 1 to")),
    ("--max-uploads", "2.5", ("--max-uploads", "whole number")),
    ("--header-timeout", "0", ("--header-timeout", "seconds from 0.1 to 3600")),
    ("--read-timeout", "forever", ("--read-timeout", "seconds")),
    ("--digest-requests", "1000", ("--digest-requests", "from 1 to 64")),
])
def test_replica_serve_refuses_a_bad_limit_in_one_line(pki, tmp_path, option, value, words):
    from ..operator.helpers import assert_one_line_error, replicator
    p = pki.pair("replica1")
    proc = replicator("replica", "serve", "--port", "0", "--cert", p["cert"], "--key", p["key"], "--ca", p["ca"],
                      "--allow", f"primary1={tmp_path / 'root'}", option, value, timeout=30)
    assert_one_line_error(proc, 2, *words)
    assert not os.path.exists(tmp_path / "root")


def _replica_table(pki, root: str, port: int, limits: str) -> str:
    p = pki.pair("replica1")
    return f'''
[replica]
listen = "127.0.0.1"
port = {port}
cert = "{p["cert"]}"
key = "{p["key"]}"
ca = "{p["ca"]}"
{limits}

[[replica.allow]]
principal = "primary1"
storage = "{root}"
'''


def test_replicatord_replica_limits_reach_the_server(pki, tmp_path):
    root, port = str(tmp_path / "root"), free_port()
    d = Daemon(tmp_path, _replica_table(pki, root, port, 'max_disk_size = "32M"\nmax_disks = 4\nread_timeout = 30'),
               disks=(("d0.vhdx", 16),))
    d.start()
    try:
        _refuses_a_larger_disk(Peer(types.SimpleNamespace(url=f"https://127.0.0.1:{port}"), pki, tmp_path,
                                    "primary1"), root, 32 * MiB)
    finally:
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(30)
    assert "Traceback" not in d.daemon_log()


def test_replicatord_check_config_names_every_bad_limit(pki, tmp_path):
    bad = {"max_disk_size": '"huge"', "max_disks": "0", "max_uploads": "true", "header_timeout": "-1",
           "read_timeout": '"1h"', "digest_requests": "1.5"}
    config = tmp_path / "replicatord.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n' + _replica_table(
        pki, str(tmp_path / "root"), 8084, "\n".join(f"{k} = {v}" for k, v in bad.items())))
    proc = subprocess.run([os.path.join(BIN, "replicatord"), "--config", str(config), "--check-config"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    problems = [line.strip() for line in proc.stderr.splitlines()[1:]]
    assert sorted(line.split(":")[0] for line in problems) == sorted(f"replica.{k}" for k in bad), proc.stderr
    assert all("must be" in line for line in problems)
    assert not os.path.exists(tmp_path / "root")

"""Two replicatord sites on loopback, as an operator runs them: each a config file, a daemon process, the
CLI and the admin API; both with a replica role (mutual TLS, certificates from our own CA), site A also
protecting machines whose disks a VM writes over NBD (qemu-io). Byte comparisons read the disks' files:
a copy of a disk the daemon holds (its log replayed), or a replica image read-only."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from replicator.transport import certs
from replicator.vhdx import VhdxDisk, create_vhdx

from ..externals import tool
from ..ports import free_port  # noqa: F401 (the tests import it from here)

MiB = 1 << 20
BIN = os.path.dirname(sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_pki(folder) -> str:
    d = str(folder / "pki")
    certs.init_ca(d)
    for name in ("site-a", "site-b"):
        certs.issue(d, name)
    return d


class Site:
    """One site: `machines` maps a machine name to its disks [(file, MiB)] (site A), `extra` is appended to
    the config ([[plan]] tables)."""

    def __init__(self, folder, pki: str, name: str, peer: "Site | None" = None, *, machines=None, extra: str = ""):
        self.dir, self.pki, self.name = folder, pki, name
        folder.mkdir(exist_ok=True)
        self.port, self.admin = free_port(), free_port()
        self.machines = machines or {}
        self.extra = extra
        self.proc = None
        for k, disks in enumerate(self.machines.values()):
            for i, (disk, size) in enumerate(disks):
                with create_vhdx(str(folder / disk), size * MiB, block_size=MiB) as d:
                    d.write(0, bytes([0x40 + 16 * k + i]) * MiB)
                    d.write(size * MiB // 2, random.Random(16 * k + i).randbytes(4 * MiB))   # incompressible

    def tls(self) -> str:
        return f'cert = "{self.pki}/{self.name}.pem"\nkey = "{self.pki}/{self.name}.key"\nca = "{self.pki}/ca.pem"\n'

    def write_config(self, peer: "Site") -> None:
        machines = "".join(f'''
[[machine]]
name = "{m}"
disks = {json.dumps([d for d, _ in disks])}
target = "https://127.0.0.1:{peer.port}"
{self.tls()}frequency = "15m"
additional_points = 2
''' for m, disks in self.machines.items())
        self.config = str(self.dir / "replicatord.toml")
        with open(self.config, "w") as f:
            f.write(f'''[daemon]
state_dir = "state"
admin_listen = "127.0.0.1:{self.admin}"

[replica]
listen = "127.0.0.1"
port = {self.port}
{self.tls()}failover_dir = "failover"
test_failover_dir = "test-failover"

[[replica.allow]]
principal = "{peer.name}"
storage = "replica"

[replica.reverse]
target = "https://127.0.0.1:{peer.port}"
{self.tls()}frequency = "15m"
{machines}
{self.extra}''')

    # ------------------------------------------------------------------ the daemon
    def start(self, clock_shift: float = 0, ready=("Replicating",)) -> None:
        """Start replicatord (its clock set back `clock_shift` seconds) and wait until every protected
        machine is in a `ready` state."""
        self.log = open(self.dir / "daemon.log", "ab")
        if clock_shift:
            cmd = [sys.executable, "-m", "tests.daemon.shifted_replicatord", "--config", self.config]
        else:
            cmd = [os.path.join(BIN, "replicatord"), "--config", self.config]
        env = {**os.environ, "REPLICATOR_TEST_CLOCK_SHIFT": str(-clock_shift)}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        self.wait(lambda: all(m["state"] in ready for m in self.status()["machines"]), "the daemon to start")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(60)
        if self.proc is not None:
            self.log.close()
            self.proc = None

    def wait(self, predicate, what: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                break
            try:
                if predicate():
                    return
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: timed out waiting for {what}:\n" + (self.dir / "daemon.log").read_text())

    # ------------------------------------------------------------------ talking to it
    def api(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        token = (self.dir / "state" / "admin.token").read_text().strip()
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def status(self) -> dict:
        return self.api("GET", "/v1/status")[1]

    def machine(self, name: str) -> dict:
        return next(m for m in self.status()["machines"] if m["name"] == name)

    def replica_machine(self, name: str) -> dict:
        code, data = self.api("GET", f"/v1/replica/machines/{name}")
        assert code == 200, data
        return data

    def cli(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run([os.path.join(BIN, "replicator"), *args, "--config", self.config], capture_output=True,
                           text=True, timeout=300)
        if check and p.returncode != 0:
            raise AssertionError(f"replicator {' '.join(args)}: exit {p.returncode}\n{p.stdout}{p.stderr}")
        return p

    def qemu_io(self, machine: str, disk: str, *cmds: str) -> None:
        sock = self.dir / "state" / "nbd" / f"{machine}.sock"
        args = [tool("qemu-io"), "-f", "raw"] + [x for c in cmds for x in ("-c", c)]
        subprocess.run(args + [f"nbd+unix:///{disk}?socket={sock}"], check=True, capture_output=True, timeout=60)

    # ------------------------------------------------------------------ bytes
    def disk_bytes(self, path) -> bytes:
        """A disk this site's daemon may hold open: a copy, its log replayed, read whole."""
        out = str(self.dir / f"copy-{os.path.basename(str(path))}")
        shutil.copy(path, out)
        with VhdxDisk.open(out, read_only=False) as d:
            data = d.read(0, d.size)
        os.unlink(out)
        return data

    def replica_bytes(self, disk_id: str) -> bytes:
        """The replica image of a disk in this site's store (read-only, as the daemon left it)."""
        folder = self.dir / "replica" / "disks" / disk_id
        chain = json.loads((folder / "state.json").read_text())["chain"]
        with VhdxDisk.open(str(folder / "chain" / chain[-1]), read_only=True) as d:
            return d.read(0, d.size)


def read_vhdx(path) -> bytes:
    with VhdxDisk.open(str(path), read_only=True) as d:
        return d.read(0, d.size)


def same(a: bytes, b: bytes, what: str) -> None:
    """Byte equality with a short message (the first differing offset), not a 32 MiB diff."""
    assert len(a) == len(b), f"{what}: {len(a)} bytes, expected {len(b)}"
    if a != b:
        first = next(i for i in range(0, len(a), 4096) if a[i:i + 4096] != b[i:i + 4096])
        raise AssertionError(f"{what}: differs in the 4 KiB block at offset {first}")


def two_sites(tmp_path, machines, extra_b: str = "") -> tuple[Site, Site]:
    pki = make_pki(tmp_path)
    a = Site(tmp_path / "site-a", pki, "site-a", machines=machines)
    b = Site(tmp_path / "site-b", pki, "site-b", extra=extra_b)
    a.write_config(b)
    b.write_config(a)
    return a, b

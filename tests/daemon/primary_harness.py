"""Two ways to run the primary side for orchestration tests, both on real disks and a real replica store:

- `Machine`: one PrimaryMachine in this process on a FakeClock (the scheduler's), so windows and scheduled
  starts can be crossed in milliseconds; writes go through its export process over NBD, as a guest's.
- `Daemon`: replicatord as an operator runs it (a config file, the process, the CLI, qemu-io over NBD).

Both compare bytes: the replica's image (ReplicaStore(root).disk(id).image_path) against the primary's.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

from replicator.daemon.primary import PrimaryMachine
from replicator.orchestration import FakeClock, JobRegistry, parse_config
from replicator.replica import ReplicaStore
from replicator.tracking.nbdclient import NbdClient
from replicator.vhdx import VhdxDisk, create_vhdx

from ..externals import tool
from ..ports import free_port  # noqa: F401 (the tests import it from here)

MiB = 1 << 20
BIN = os.path.dirname(sys.executable)


def make_disks(folder, disks) -> None:
    """VHDX disks with a distinct first MiB each (sizes in MiB)."""
    for i, (name, size) in enumerate(disks):
        with create_vhdx(str(folder / name), size * MiB, block_size=MiB) as d:
            d.write(0, bytes([0x40 + i]) * MiB)


def config_text(folder, extra: str = "", disks=("d0.vhdx",), admin_port: int | None = None,
                target: str | None = None) -> str:
    listen = f'admin_listen = "127.0.0.1:{admin_port}"\n' if admin_port else ""
    return f'''[daemon]
state_dir = "state"
{listen}
[[machine]]
name = "vm01"
disks = {json.dumps(list(disks))}
target = "{target or f'local://{folder}/replica'}"
frequency = "15m"
{extra}
'''


def replica_bytes(folder, disk_id: str) -> bytes:
    rd = ReplicaStore(str(folder / "replica")).disk(disk_id)
    with VhdxDisk.open(rd.image_path, read_only=True) as img:
        return img.read(0, img.size)


def local_time(*args) -> float:
    return dt.datetime(*args).timestamp()


class Machine:
    """A PrimaryMachine on a FakeClock; call from inside an event loop, close() at the end."""

    def __init__(self, folder, extra: str = "", *, disks=(("d0.vhdx", 16),), start: float = 0.0,
                 target: str | None = None, reopen: bool = False):
        """reopen: the same disks and state directory as an earlier Machine (a daemon restart)."""
        self.folder = folder
        if not reopen:
            make_disks(folder, disks)
        cfg = parse_config(config_text(folder, extra, [n for n, _ in disks], target=target), base_dir=str(folder))
        self.clock = FakeClock(start)
        self.jobs = JobRegistry(str(folder / "state"))
        self.pm = PrimaryMachine(cfg.machines[0], str(folder / "state"), jobs=self.jobs, clock=self.clock)
        self.pm.start()

    @property
    def state(self) -> str:
        return self.pm.state.state.value

    async def tick(self):
        """What a scheduler tick does: the machine's cut, then its cycle."""
        await self.pm.cut()
        return await self.pm.run_cycle()

    async def write(self, disk: str, offset: int, data: bytes) -> None:
        """A guest's write, through the machine's export."""
        client = NbdClient(self.pm.export.nbd_socket, disk)
        try:
            await asyncio.to_thread(client.pwrite, offset, data)
        finally:
            client.close()
        await asyncio.to_thread(self.pm.export.refresh)      # what the trackers made of it (a resync trigger)

    async def primary_bytes(self, disk: str) -> bytes:
        d = self.pm.disks[disk].open_reader()
        try:
            return await asyncio.to_thread(d.read, 0, d.size)
        finally:
            d.close()

    async def replica_equals_primary(self, disk: str = "d0.vhdx") -> bool:
        disk_id = str(self.pm.disks[disk].virtual_disk_id)
        return replica_bytes(self.folder, disk_id) == await self.primary_bytes(disk)

    def set_time(self, ts: float) -> None:
        self.clock._now = ts                 # the machine reads the clock; nothing sleeps on it here

    async def close(self) -> None:
        await self.pm.stop()


class Daemon:
    """replicatord in a subprocess with machine vm01 protecting `disks` into a local replica store."""

    def __init__(self, folder, extra: str = "", *, disks=(("d0.vhdx", 32), ("d1.vhdx", 16))):
        self.dir = folder
        self.port = free_port()
        self.disk_names = [n for n, _ in disks]
        make_disks(folder, disks)
        self.config = str(folder / "replicatord.toml")
        with open(self.config, "w") as f:
            f.write(config_text(folder, extra, self.disk_names, self.port))
        self.proc = None

    def start(self, until: str | None = None, timeout: float = 30) -> dict:
        self.log = open(self.dir / "daemon.log", "ab")
        self.proc = subprocess.Popen([os.path.join(BIN, "replicatord"), "--config", self.config],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        return self.wait(lambda m: until is None or m["state"] == until, timeout)

    def wait(self, predicate, timeout: float = 30) -> dict:
        """The machine's status once `predicate(status)` holds."""
        deadline, last = time.time() + timeout, None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"replicatord exited {self.proc.returncode}: {self.daemon_log()}")
            try:
                last = self.machine()
                if predicate(last):
                    return last
            except (OSError, KeyError, IndexError):     # not listening yet
                pass
            time.sleep(0.2)
        raise AssertionError(f"timed out; last status {last}\n{self.daemon_log()}")

    def daemon_log(self) -> str:
        return open(self.dir / "daemon.log", errors="replace").read()[-4000:]

    def run(self, *args, check: bool = True, config: bool = True) -> subprocess.CompletedProcess:
        """`replicator ARGS --config replicatord.toml` (the daemon's commands; config=False for the others)."""
        argv = [os.path.join(BIN, "replicator"), *args] + (["--config", self.config] if config else [])
        return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=120)

    def cli(self, *args) -> str:
        return self.run(*args).stdout

    def api(self, path: str) -> dict:
        """GET on the admin API (what the CLI calls, without starting a process each time)."""
        token = open(self.dir / "state" / "admin.token").read().strip()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def machine(self) -> dict:
        return self.api("/v1/status")["machines"][0]

    def jobs(self) -> list[dict]:
        return self.api("/v1/jobs")["jobs"]

    def job(self, job_id: str) -> dict:
        return self.api(f"/v1/jobs/{job_id}")

    def qemu_io(self, disk: str, *cmds: str) -> None:
        sock = self.dir / "state" / "nbd" / "vm01.sock"
        args = [tool("qemu-io"), "-f", "raw"] + [x for c in cmds for x in ("-c", c)]
        subprocess.run(args + [f"nbd+unix:///{disk}?socket={sock}"], check=True, capture_output=True)

    def primary_bytes(self, disk: str) -> bytes:
        """The primary disk as of now: the daemon holds it open, so read a copy (its log replayed)."""
        copy = str(self.dir / f"copy-{disk}")
        shutil.copy(self.dir / disk, copy)
        with VhdxDisk.open(copy, read_only=False) as d:
            return d.read(0, d.size)

    def replica_equals_primary(self) -> bool:
        disks = self.machine()["disks"]
        return all(replica_bytes(self.dir, disks[n]["disk_id"]) == self.primary_bytes(n) for n in self.disk_names)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(60)
        if self.proc is not None:
            self.log.close()

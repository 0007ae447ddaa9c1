"""replicatord's side of a machine's export process (shim.py): start it or attach to the one running,
watch it, restart it if it dies, and drive its trackers through `RemoteTrackedDisk`, a stand-in for
`TrackedDisk` with the same attributes the replication cycle, the seed export and the daemon use.

Control calls are short (a cut, an acknowledgement); reading the disk goes through the NBD export, on the
caller's worker threads, so nothing here runs in the export process except tracking.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from types import SimpleNamespace

from .. import errors
from ..disk.base import Extent, ExtentKind
from ..errors import ExportUnavailable, ReplicatorError
from ..priority import cpu_list, export_cpus
from .nbdclient import NbdDisk
from . import memlogs
from .state import SealedLogRecord, Sidecar, SidecarState
from .tracker import SealedLog

log = logging.getLogger("replicatord")
START_TIMEOUT = float(os.environ.get("REPLICATOR_EXPORT_START_TIMEOUT", "60"))


class ControlClient:
    """JSON lines over the export's control socket; thread-safe, reconnects once on a broken connection."""

    def __init__(self, path: str, timeout: float = 120.0):
        self.path, self.timeout = path, timeout
        self._lock = threading.Lock()
        self._sock = self._file = None

    def _connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except OSError:
            s.close()
            raise
        self._sock, self._file = s, s.makefile("rb")

    def call(self, op: str, **args):
        with self._lock:
            for attempt in (0, 1):
                try:
                    if self._sock is None:
                        self._connect()
                    self._sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
                    line = self._file.readline()
                    if not line:
                        raise ConnectionResetError("the export closed the control connection")
                    break
                except OSError as e:
                    self.close_locked()
                    if attempt or op in ("cut", "acknowledge", "begin_resync", "end_resync"):
                        raise ExportUnavailable(f"export control {self.path}: {e.strerror or e}") from None
        reply = json.loads(line)
        if "error" in reply:
            cls = getattr(errors, reply.get("type", ""), None)
            if not (isinstance(cls, type) and issubclass(cls, ReplicatorError)) or cls is errors.FormatError:
                cls = ExportUnavailable
            raise cls(reply["error"])
        return reply["ok"]

    def close_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = self._file = None

    def close(self) -> None:
        with self._lock:
            self.close_locked()


def _state(raw: dict) -> SidecarState:
    raw = dict(raw)
    logs = [SealedLogRecord(**r) for r in raw.pop("sealed_logs", [])]
    return SidecarState(**raw, sealed_logs=logs)


class RemoteTrackedDisk:
    """A tracked disk owned by the export process. Reads go through NBD; the rest through control calls.
    `blocking` tells the cycle that calls may wait on another process (run them off the event loop) and
    that the disk may be read while the guest writes it (a fuzzy copy, made whole by the log after it)."""

    blocking = True

    def __init__(self, export: "ExportHandle", name: str, status: dict):
        self.export, self.name = export, name
        self.path = status["path"]
        self.size = status["size"]
        self.sidecar = Sidecar(self.path)
        self._disk: NbdDisk | None = None
        self._quiet_unknown = False
        self._apply(status)

    def _apply(self, status: dict) -> None:
        self.state = _state(status["state"])
        self.virtual_disk_id = uuid.UUID(status["virtual_disk_id"])
        self.logical_sector_size = status["logical_sector_size"]

    def _call(self, op: str, **args):
        out = self.export.control.call(op, disk=self.name, **args)
        if "status" in out:
            self._apply(out["status"])
        return out

    def refresh(self, status: dict) -> None:
        self._apply(status)

    def refresh_state(self) -> None:
        """The export's current view (it may have required a resync on its own: a failed log write)."""
        self._apply(self.export.control.call("status")[self.name])

    @property
    def disk(self):
        """The live disk, read through the export (one NBD connection per reader thread's disk)."""
        if self._disk is None:
            self._disk = self.open_reader()
        return self._disk

    def open_reader(self) -> NbdDisk:
        return NbdDisk(self.export.nbd_socket, self.name, extents=self._extents, mapper=self._map,
                       virtual_disk_id=self.virtual_disk_id, logical_sector_size=self.logical_sector_size,
                       path=self.path, size=self.size)

    def _map(self, offset: int, length: int):
        return self.export.control.call("map", disk=self.name, offset=offset, length=length)["map"]

    QUIET = "quiet"        # the control operation (an export from before it answers an error)

    def guest_quiet(self) -> float | None:
        """Seconds since the guest last wrote to any of the machine's disks (a copy's pacing watches them);
        None when it has not written since the export started, or when the export cannot say: one started
        by an older replicatord (it outlives restarts and upgrades) knows no such call. Pacing is advice: a
        copy never fails for want of it, and an export that is really gone fails the copy's own reads."""
        try:
            return self.export.control.call(self.QUIET)["seconds"]
        except ReplicatorError as e:
            if not self._quiet_unknown:
                log.info("%s: the export cannot say when the guest last wrote (%s): the copy is not held back "
                         "while it cannot", self.name, e.message)
            self._quiet_unknown = True
            return None

    def _extents(self, offset: int, length: int):
        return self.export.control.call("extents", disk=self.name, offset=offset, length=length)["extents"]

    def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        n = self.size - offset if length is None else length
        return [Extent(o, k, ExtentKind(kind)) for o, k, kind in self._extents(offset, n)]

    @property
    def resync_required(self) -> bool:
        return self.state.state == "resync_required"

    @property
    def reason(self) -> str | None:
        return self.state.reason

    def acknowledge(self, unique_id: uuid.UUID) -> None:
        self._call("acknowledge", unique_id=str(unique_id))

    def begin_resync(self) -> list[tuple[int, int]]:
        return [tuple(e) for e in self._call("begin_resync")["extents"]]

    def end_resync(self) -> None:
        self._call("end_resync")

    def _require_resync(self, reason: str) -> None:
        self._call("require_resync", reason=reason)

    def replica_diverged(self, reason: str) -> None:
        self._call("replica_diverged", reason=reason)

    def dirty_extents(self) -> list[tuple[int, int]]:
        return [tuple(e) for e in self._call("dirty_extents")["extents"]]

    def close_reader(self) -> None:
        if self._disk is not None:
            self._disk.close()
            self._disk = None


class ExportHandle:
    """One machine's export process, as replicatord sees it."""

    def __init__(self, name: str, disks: dict[str, str], run_dir: str, *, idle_grace: float = 10.0,
                 memory_logs: int | None = None, memory_root: str | None = None):
        """memory_logs: the host's budget for logs in memory, in bytes (tracking/memlogs.py); None: the
        export's own default (auto). memory_root: the tmpfs they go to (None: memlogs.ROOT)."""
        self.name, self.paths = name, {n: os.path.abspath(p) for n, p in disks.items()}
        self.nbd_socket = os.path.join(run_dir, f"{name}.sock")
        self.control_path = os.path.join(run_dir, f"{name}.control")
        self.log_path = os.path.join(run_dir, f"{name}.export.log")
        self.idle_grace = idle_grace
        self.memory_logs = memory_logs if memory_logs is not None else memlogs.configured()
        self.memory_root = memory_root
        self.control = ControlClient(self.control_path)
        self.disks: dict[str, RemoteTrackedDisk] = {}
        self.pid: int | None = None
        self.adopted = False            # attached to an export that was already running
        self._watch: socket.socket | None = None

    # ------------------------------------------------------------------ start / attach
    def start(self) -> "ExportHandle":
        """Attach to the running export of this machine, or start one."""
        hello = self._hello()
        if hello is not None and hello["disks"] != self.paths:
            log.warning("%s: the running export serves %s, the configuration names %s: restarting it",
                        self.name, hello["disks"], self.paths)
            self.control.call("shutdown")
            self.control.close()
            hello = None
        if hello is None:
            self._spawn()
            hello = self._hello()
            if hello is None:
                raise ExportUnavailable(f"{self.name}: the export process did not answer")
        else:
            self.adopted = True
            log.info("%s: attached to its running export (pid %d, %d NBD client(s))", self.name, hello["pid"],
                     hello["clients"])
        self.pid = hello["pid"]
        self.serving = hello["serving"]
        self._watch_start()
        status = self.control.call("status")
        self.disks = {n: RemoteTrackedDisk(self, n, st) for n, st in status.items()}
        return self

    def _hello(self) -> dict | None:
        if not os.path.exists(self.control_path):
            return None
        try:
            return self.control.call("hello")
        except ReplicatorError:
            self.control.close()
            return None

    def _spawn(self) -> None:
        cmd = [sys.executable, "-m", "replicator.tracking.shim", "--name", self.name, "--nbd-socket",
               self.nbd_socket, "--control", self.control_path, "--idle-grace", str(self.idle_grace)]
        if (cpus := export_cpus()) is not None:        # replicatord is pinned (replication_cpus): not the export
            cmd += ["--cpus", cpu_list(cpus)]
        if self.memory_logs is not None:
            cmd += ["--memory-logs", str(self.memory_logs)]
        if self.memory_root is not None:
            cmd += ["--memory-root", self.memory_root]
        cmd += [f"{n}={p}" for n, p in self.paths.items()]
        with open(self.log_path, "ab") as logf:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    start_new_session=True, close_fds=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            rc = proc.poll()
            if rc is not None:
                raise ExportUnavailable(f"{self.name}: the export process stopped (exit {rc}): {self._last_error()}")
            if os.path.exists(self.control_path) and self._hello() is not None:
                threading.Thread(target=proc.wait, daemon=True).start()    # reap it when it ends
                return
            time.sleep(0.05)
        proc.kill()
        raise ExportUnavailable(f"{self.name}: the export process did not start within {START_TIMEOUT:.0f} s")

    def _last_error(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read()[-4096:].decode("utf-8", "replace").strip().splitlines()
        except OSError:
            return "no log"
        for line in reversed(lines):
            if line.startswith("replicator-export: "):
                return line[len("replicator-export: "):]
        return lines[-1] if lines else "no log"

    def _watch_start(self) -> None:
        """A connection held open for as long as replicatord lives: the export stays up while it exists."""
        if self._watch is not None:
            self._watch.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.control_path)
        s.sendall(b'{"op": "watch"}\n')
        self._watch = s

    def watch_fd(self) -> int:
        return self._watch.fileno()

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except (OSError, TypeError):
            return False
        return self._hello() is not None

    # ------------------------------------------------------------------ operations
    def cut(self) -> list[SealedLog | None]:
        out = self.control.call("cut")
        sealed = []
        for n, d in self.disks.items():
            d.refresh(out[n]["status"])
            s = out[n]["sealed"]
            sealed.append(None if s is None else SealedLog(s["path"], uuid.UUID(s["unique_id"]),
                                                           uuid.UUID(s["previous_unique_id"]), s["data_bytes"]))
        return sealed

    def refresh(self) -> None:
        status = self.control.call("status")
        for n, d in self.disks.items():
            d.refresh(status[n])

    def stop_serving(self) -> None:
        self.control.call("stop_serving")
        self.serving = False

    def uri(self, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={self.nbd_socket}"

    def detach(self) -> bool:
        """replicatord stops: the export stays while a guest is connected, else it closes now. True when
        it stopped."""
        for d in self.disks.values():
            d.close_reader()
        try:
            stopped = self.control.call("detach", exit_if_idle=True)["exiting"]
        except ReplicatorError:
            stopped = not self.alive()
        self._close()
        if stopped:
            self._wait_gone()
        return stopped

    def shutdown(self) -> None:
        """Stop the export for good (protection removed): clients are disconnected, disks closed."""
        for d in self.disks.values():
            d.close_reader()
        try:
            self.control.call("shutdown")
        except ReplicatorError:
            pass
        self._close()
        self._wait_gone()

    def kill(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass

    def _wait_gone(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.pid and time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except OSError:
                return
            time.sleep(0.02)

    def _close(self) -> None:
        self.control.close()
        if self._watch is not None:
            self._watch.close()
            self._watch = None


def shutdown_all_under(folder: str) -> None:
    """Stop every export whose control socket is somewhere under `folder` (tests and benchmarks, whose
    daemons' exports outlive them for their idle grace)."""
    for control in glob.glob(os.path.join(folder, "**", "nbd", "*.control"), recursive=True):
        shutdown_running(os.path.dirname(control), os.path.basename(control)[:-len(".control")])


def shutdown_running(run_dir: str, name: str) -> bool:
    """Stop the export of a machine no longer protected, if one still runs; True when one did."""
    handle = ExportHandle(name, {}, run_dir)
    hello = handle._hello()
    if hello is None:
        return False
    handle.pid = hello["pid"]
    handle.shutdown()
    return True

"""The export process: one per protected machine, the only process that opens the machine's disks.

It serves the disks over NBD to the guest and tracks every write (dirty regions, Hyper-V Replica Logs),
and does nothing else: no encoding, hashing, TLS, scheduling or HTTP, so none of that can delay a guest
request or take the GIL from it. replicatord drives it over a control socket (control.py) and reads the
live disk through the export itself (nbdclient.py). It outlives replicatord, as a container runtime's
shim outlives its daemon: a restart, an upgrade or a configuration reload of replicatord leaves the
guest's disk connected. It exits on its own only when nobody needs it any more: no replicatord watching
and no NBD client connected for `idle_grace` seconds (or at once when replicatord detaches politely and
no client is connected).

Started as `python -m replicator.tracking.shim --name M --nbd-socket S --control C DISK=PATH ...`.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import logging
import os
import signal
import sys
import time
import uuid

from .. import errors
from ..disk.base import small_folios
from ..errors import ReplicatorError
from ..priority import background_priority, cpu_list, foreground_policy, guest_first, parse_cpu_list, run_on
from . import writeback
from .memlogs import ROOT, MemoryLogs, parse_budget
from .nbd import Export, NbdServer
from .service import new_event_loop
from .state import TrackingState
from .tracker import TrackedDisk, TrackingGroup

log = logging.getLogger("replicator.export")
MAX_CONTROL_LINE = 1 << 20
PRIORITY_BOOST = -5          # nice steps above replicatord (root only)


def disk_status(d: TrackedDisk) -> dict:
    from dataclasses import asdict
    return {"path": d.path, "size": d.size, "virtual_disk_id": str(d.disk.virtual_disk_id),
            "logical_sector_size": d.disk.logical_sector_size, "state": asdict(d.state),
            "resync_required": d.resync_required, "reason": d.reason, "unsynced": d.unsynced}


def _sealed(s) -> dict | None:
    return None if s is None else {"path": s.path, "unique_id": str(s.unique_id),
                                   "previous_unique_id": str(s.previous_unique_id), "data_bytes": s.data_bytes}


def open_disks(disks: dict[str, str], lock_wait: float, memory: MemoryLogs | None = None) -> dict[str, TrackedDisk]:
    """Open every disk read-write (taking its image lock); a lock still held by an export that is on its
    way out is waited for up to `lock_wait` seconds."""
    locked = getattr(errors, "ImageLocked", None)
    opened: dict[str, TrackedDisk] = {}
    deadline = time.monotonic() + lock_wait
    try:
        for name, path in disks.items():
            while True:
                try:
                    opened[name] = TrackedDisk(path, log_thread=True, memory=memory)
                    opened[name].disk.prepare_for_writes()     # the guest's first write pays no header flush
                    opened[name].disk.background_commits()     # nor a metadata commit's fsyncs
                    small_folios(opened[name].disk.io.fd, drop=True)    # cheap 4 KiB writes (see there)
                    break
                except ReplicatorError as e:
                    if locked is None or not isinstance(e, locked) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
    except BaseException:
        for d in opened.values():
            d.close()
        raise
    return opened


class ExportProcess:
    def __init__(self, name: str, disks: dict[str, TrackedDisk], nbd_socket: str, control: str,
                 idle_grace: float, memory: MemoryLogs | None = None):
        self.name, self.disks = name, disks
        self.memory = memory
        self.group = TrackingGroup(list(disks.values()))
        self.nbd_socket, self.control = nbd_socket, control
        self.idle_grace = idle_grace
        self.server = NbdServer([Export(n, d) for n, d in disks.items()])
        for d in disks.values():
            d.deferring = True          # no file work that may wait on the journal on the I/O path
        self.watchers = 0
        self.serving = True
        self.done = asyncio.Event()
        self._changing = asyncio.Lock()     # one change of tracking state at a time (a cut awaits its fsyncs)
        self._inodes: dict[str, int] = {}
        self.control_writers: set[asyncio.StreamWriter] = set()

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        _unlink_stale(self.nbd_socket)
        await self.server.start_unix(self.nbd_socket)
        self._inodes[self.nbd_socket] = os.stat(self.nbd_socket).st_ino
        _unlink_stale(self.control)
        self.control_server = await asyncio.start_unix_server(self._control_client, path=self.control,
                                                              limit=MAX_CONTROL_LINE)
        os.chmod(self.control, 0o600)
        self._inodes[self.control] = os.stat(self.control).st_ino
        log.info("export of %s serving %s on %s (pid %d)", self.name, ", ".join(self.disks), self.nbd_socket,
                 os.getpid())
        idle = asyncio.create_task(self._idle_watch())
        pacing = asyncio.create_task(self._writeback())
        await self.done.wait()
        idle.cancel()
        pacing.cancel()

    def _run_deferred(self) -> None:
        """The trackers' queued file work (state saves, bitmap rewrites, unlinks: tracker._later)."""
        for d in self.disks.values():
            if d.disk is not None:
                d.run_deferred()

    def nbd_clients(self) -> int:
        return len(self.server.clients)

    async def _idle_watch(self) -> None:
        idle_since = None
        while True:
            await asyncio.sleep(0.25)
            if self.watchers or self.nbd_clients():
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= self.idle_grace:
                log.info("no replicatord and no NBD client for %.0f s: the export of %s stops", self.idle_grace,
                         self.name)
                await self.shutdown()
                return

    async def _writeback(self) -> None:
        """Write a disk's data back on a worker thread once its guest has been quiet for a second, or in
        steps while it is being copied or the host's dirty pages near the kernel's background threshold;
        else the kernel's flusher does it, as for qemu-nbd (tracking/writeback.py says why)."""
        host, checked, measured = 0.0, float("-inf"), float("-inf")
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            if self.memory is not None and now - measured >= 0.5:
                measured = now              # the host's logs in memory, against its budget (memlogs.py)
                if await asyncio.to_thread(self.memory.measure) > self.memory.budget:
                    for d in self.disks.values():
                        if d.disk is not None:
                            d.spill_log()
            disks = [d for d in self.disks.values() if d.disk is not None and d.unsynced]
            if now - checked >= 0.5 and any(d.unsynced >= writeback.STEP for d in disks):
                checked = now               # /proc read off the loop, at most twice a second
                host = await asyncio.to_thread(writeback.host_pressure)
            due = [d for d in disks if writeback.due(d.unsynced, now - d.last_write, host,
                                                     d.state.state == TrackingState.RESYNCHRONIZING.value)]
            if due:
                await asyncio.to_thread(lambda: [d.writeback() for d in due])

    async def stop_serving(self) -> None:
        """Disconnect every NBD client and accept no more (a planned failover's primary stops)."""
        if self.serving:
            self.serving = False
            await self.server.close()

    async def shutdown(self) -> None:
        """Clean stop: clients disconnected, logs sealed, disks closed (their locks released)."""
        async with self._changing:
            await self._shutdown()

    async def _shutdown(self) -> None:
        if self.done.is_set():
            return
        await self.stop_serving()
        self.control_server.close()
        for d in self.disks.values():
            try:
                d.close()
            except ReplicatorError as e:
                log.error("closing %s: %s", d.path, e.message)
        for path, ino in self._inodes.items():
            try:
                if os.stat(path).st_ino == ino:
                    os.unlink(path)
            except OSError:
                pass
        self.done.set()

    # ------------------------------------------------------------------ control
    async def _control_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        watching = False
        self.control_writers.add(writer)
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    break
                if not line:
                    break
                try:
                    req = json.loads(line)
                    op = req["op"]
                except (ValueError, KeyError, TypeError):
                    writer.write(b'{"error": "malformed control request"}\n')
                    await writer.drain()
                    continue
                if op == "watch":          # held open while replicatord lives; no answer
                    if not watching:
                        watching = True
                        self.watchers += 1
                    continue
                try:
                    if op in ("hello", "extents", "dirty_extents", "map", "quiet"):
                        reply = {"ok": await self._do(op, req)}
                    else:
                        async with self._changing:
                            reply = {"ok": await self._do(op, req)}
                            await asyncio.to_thread(self._run_deferred)
                except ReplicatorError as e:
                    reply = {"error": e.message, "type": type(e).__name__}
                except (KeyError, TypeError, ValueError) as e:
                    reply = {"error": f"bad control request {op!r}: {e}"}
                if writer.is_closing():
                    break                  # the export stopped meanwhile (_end_tasks): nobody to answer
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
                if op == "shutdown" or (op == "detach" and reply.get("ok", {}).get("exiting")):
                    self.done.set()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if watching:
                self.watchers -= 1
            self.control_writers.discard(writer)
            writer.close()

    def _disk(self, req) -> TrackedDisk:
        name = req["disk"]
        if name not in self.disks:
            raise errors.UsageError(f"the export of {self.name} has no disk {name!r}")
        return self.disks[name]

    async def _do(self, op: str, req: dict):
        if op == "hello":
            return {"pid": os.getpid(), "name": self.name, "nbd_socket": self.nbd_socket, "serving": self.serving,
                    "disks": {n: d.path for n, d in self.disks.items()}, "clients": self.nbd_clients()}
        if op == "status":
            return {n: disk_status(d) for n, d in self.disks.items()}
        if op == "quiet":             # seconds since the guest last wrote to any of the machine's disks (pacing)
            last = max(d.last_write for d in self.disks.values())
            return {"seconds": None if last == float("-inf") else time.monotonic() - last}
        if op == "cut":               # the guest's requests go on through the cut's fsyncs (tracker.cut)
            sealed = await self.group.cut_async()
            return {n: {"sealed": _sealed(s), "status": disk_status(d)}
                    for (n, d), s in zip(self.disks.items(), sealed)}
        if op == "stop_serving":
            await self.stop_serving()
            return {"serving": False}
        if op == "detach":
            for _ in range(20):             # replicatord's own readers may be a moment from gone
                if not self.nbd_clients():
                    break
                await asyncio.sleep(0.025)
            if req.get("exit_if_idle") and not self.nbd_clients():
                await self._shutdown()          # (control requests hold self._changing)
                return {"exiting": True}
            return {"exiting": False, "clients": self.nbd_clients()}
        if op == "shutdown":
            await self._shutdown()
            return {"exiting": True}
        d = self._disk(req)
        if op == "acknowledge":       # its file work runs after, off the I/O path (_run_deferred)
            d.acknowledge(uuid.UUID(req["unique_id"]))
        elif op == "begin_resync":
            return {"extents": d.begin_resync(), "status": disk_status(d)}
        elif op == "end_resync":
            d.end_resync()
        elif op == "require_resync":
            if not d.resync_required:
                d._require_resync(str(req["reason"]))
        elif op == "replica_diverged":
            d.replica_diverged(str(req["reason"]))
        elif op == "dirty_extents":
            return {"extents": d.dirty_extents()}
        elif op == "map":
            return {"map": d.disk.map_range(int(req["offset"]), int(req["length"]))}
        elif op == "extents":
            off, n = int(req["offset"]), int(req["length"])
            return {"extents": [[e.offset, e.length, e.kind.value] for e in d.extents(off, n)]}
        else:
            raise errors.UsageError(f"unknown control operation {op!r}")
        return {"status": disk_status(d)}


def _unlink_stale(path: str) -> None:
    """Remove a socket file nobody listens on any more; refuse one that is alive (another export)."""
    import socket
    if not os.path.exists(path):
        return
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        s.close()
    raise errors.UsageError(f"{path} is in use by another running export")


def _end_tasks(loop: asyncio.AbstractEventLoop, proc: "ExportProcess") -> None:
    """Control connections still open when the export stops (replicatord's watch, the reply to its
    shutdown) end here: closed, so that their handlers return, and what is still running after a moment is
    cancelled. Left pending, each was logged as an error ("Task was destroyed but it is pending!") at every
    clean stop; cancelled at once, Python 3.11's streams log one too."""
    for writer in list(proc.control_writers):
        writer.close()
    pending = asyncio.all_tasks(loop)
    if pending:
        _, pending = loop.run_until_complete(asyncio.wait(pending, timeout=2.0))
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="replicator-export", description="the export process of one machine")
    ap.add_argument("--name", required=True, help="the protected machine")
    ap.add_argument("--nbd-socket", required=True, help="the NBD socket the guest's disk is served on")
    ap.add_argument("--control", required=True, help="the control socket replicatord drives the export through")
    ap.add_argument("--idle-grace", type=float, default=10.0,
                    help="seconds with no replicatord and no NBD client before the export stops on its own")
    ap.add_argument("--lock-wait", type=float, default=10.0,
                    help="seconds to wait for an image lock held by an export on its way out")
    ap.add_argument("--cpus", type=parse_cpu_list, metavar="LIST",
                    help="run on these CPUs (replicatord passes the ones it was started with when replication is "
                         "pinned to others: replication_cpus)")
    ap.add_argument("--memory-logs", type=parse_budget, default="auto", metavar="BYTES",
                    help="the host's budget for logs written to memory (tmpfs) instead of the disk: auto (an "
                         "eighth of the memory, at most half the tmpfs), 0 (none), or a size such as 2G")
    ap.add_argument("--memory-root", default=ROOT, metavar="DIR",
                    help=f"the tmpfs the logs in memory go to, in a folder of this user's (default {ROOT})")
    ap.add_argument("disks", nargs="+", metavar="NAME=PATH", help="the machine's disks")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    disks = dict(d.split("=", 1) for d in args.disks)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)       # a reload of replicatord is not ours
    foreground_policy()
    if args.cpus is not None:
        try:
            run_on(args.cpus)
        except OSError as e:        # the guest's disk is served on whatever CPUs it got
            log.warning("cannot run on CPUs %s: %s", cpu_list(args.cpus), e.strerror)
    try:        # the guest's requests before replication's encoding and hashing when CPUs are short
        os.setpriority(os.PRIO_PROCESS, 0, max(-20, os.getpriority(os.PRIO_PROCESS, 0) + PRIORITY_BOOST))
    except OSError:
        pass    # not permitted (not root): the same priority as replicatord
    guest_first(PRIORITY_BOOST)     # this thread runs the loop that serves every request
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    memory = None
    if args.memory_logs > 0:
        try:
            memory = MemoryLogs.open(args.memory_logs, args.memory_root)
        except ValueError as e:
            log.warning("logs stay on disk: %s", e)
    try:
        opened = open_disks(disks, args.lock_wait, memory)
    except ReplicatorError as e:
        print(f"replicator-export: {e.message}", file=sys.stderr, flush=True)
        return e.exit_code
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    # the file work handed off the loop (writeback, cuts' seals, state saves) must not preempt the loop
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(
        max_workers=4, thread_name_prefix="export-io", initializer=background_priority))
    proc = ExportProcess(args.name, opened, args.nbd_socket, args.control, args.idle_grace, memory)
    loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(proc.shutdown()))
    try:
        loop.run_until_complete(proc.run())
    except ReplicatorError as e:
        print(f"replicator-export: {e.message}", file=sys.stderr, flush=True)
        for d in opened.values():
            d.close()
        return e.exit_code
    finally:
        if not proc.done.is_set():
            for d in opened.values():
                d.close()
        _end_tasks(loop, proc)
        loop.close()
    log.info("export of %s stopped cleanly", args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())

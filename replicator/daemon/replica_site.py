"""The replica site of replicatord: the machines replicated here, their recovery points, and what Hyper-V
Replica and ASR let an operator do on the replica side -- test failover and its cleanup, planned and
unplanned failover (latest or a chosen point), commit or cancel it, reverse replication, and accepting
reverse replication on the former primary -- on the admin API.

Machines: the primary names the machine of every disk it ensures (ensure_disk's `machine`); a disk from a
primary that does not is a machine of its own, named after the disk. A machine is identified by that name
*within* the storage root and trust group its primary authenticated into (the transport's ownership of
each disk): primaries of other trust groups never add disks to it, whatever they call their machines.
With one root and trust group configured a machine's key is its name; with several, NAME@SCOPE (SCOPE
the trust group, made file-name safe), so two tenants' machines of one name stay two machines. A machine's recovery points are the
primary's checkpoints -- one cut across its disks, see ReplicaTarget.checkpoint -- that every disk still
holds; without checkpoints, the generations every disk holds.

One state per machine and site, STATE_DIR/machines/NAME.json like a protected machine's, with
data["role"] = "replica" while this site holds the machine's replica: reverse replication turns it into the
protected machine's state, accepting reverse replication turns a protected machine's state into the
replica's (docs/states.md, "Two sites"). A machine reverse replication protects from here is generated from
[replica.reverse] and the operator's settings and kept in STATE_DIR/reverse/NAME.json, so it survives a
restart.

Admin API (with daemon/main.py's):
  GET  /v1/replica/machines                 replicated machines: state, disks, recovery points, NBD exports
  GET  /v1/replica/machines/NAME
  POST /v1/replica/machines/NAME/OP         test-failover {point, network}, cleanup-test-failover, failover {point,
                                            planned}, commit-failover, cancel-failover, reverse {target, cert,
                                            key, ca, ... protection keys, full_copy}, accept-reverse {from, force}
Unknown machine or point: 404; refused by the state or the sites: 409; bad settings: 400.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass

from aiohttp import web

from ..durable import fsync_dir
from ..errors import ReplicatorError, UsageError
from ..orchestration.settings import ConfigError, parse_machine
from ..orchestration.states import Event, MachineState, ReplicationState, StateError, state_path
from ..tracking import TrackedDisk
from ..tracking.service import ExportService
from ..tracking.state import Sidecar
from . import domains
from .replica_domains import ReplicaDomains
from .reverse import RUNNING_HERE, ReverseReplication

log = logging.getLogger("replicatord")
S = ReplicationState
OPERATIONS = ("test-failover", "cleanup-test-failover", "failover", "commit-failover", "cancel-failover", "reverse",
              "accept-reverse")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")         # as a configured machine's (and a file's) name


class NotFound(UsageError):
    """An unknown machine, recovery point or plan (HTTP 404)."""


# ---------------------------------------------------------------------------------------------- machines
@dataclass
class DiskRef:
    """One replica disk of a machine and the store that holds it."""
    store: object
    disk: object

    @property
    def id(self) -> str:
        return self.disk.state.disk_id

    @property
    def name(self) -> str:
        """The primary's disk file name; the disk id when that is not a plain file name (it came over the
        network, and failover and test disks are named after it)."""
        n = self.disk.state.name
        return n if n and _NAME.match(n) else self.id


@dataclass
class ReplicatedMachine:
    name: str                   # the key this site knows the machine by (see the module's docstring)
    disks: list[DiskRef]
    scope: tuple = ()           # (storage root, trust group) every disk of the machine belongs to

    def points(self) -> list[dict]:
        """Recovery points at which every disk of the machine is at the same cut, oldest first."""
        held = [{p.generation: p for p in d.disk.points} for d in self.disks]
        if any(d.disk.state.cuts for d in self.disks):
            marks = [{pt: g for pt, g in d.disk.state.cuts if g in h} for d, h in zip(self.disks, held)]
        else:
            marks = [{g: g for g in h} for h in held]
        common = set.intersection(*(set(m) for m in marks)) if marks else set()
        if common:                  # a cut a disk keeps for its siblings is no point once a newer one is common
            newest = max(common)
            spare = [d.disk.held_for_siblings() for d in self.disks]
            common = {pt for pt in common if pt == newest or not any(m[pt] in s for m, s in zip(marks, spare))}
        out = []
        for pt in sorted(common):
            points = [h[m[pt]] for h, m in zip(held, marks)]
            out.append({"point": pt, "time": max(p.time for p in points),
                        "consistency": "application" if all(p.consistency == "application" for p in points)
                        else "crash", "generations": {d.id: m[pt] for d, m in zip(self.disks, marks)}})
        return out

    def point(self, wanted: int | None = None) -> dict:
        """The latest point, or the one asked for; NotFound names the points there are."""
        points = self.points()
        if not points:
            raise StateError(f"{self.name}: no recovery point holds all its disks yet "
                             f"({', '.join(d.name for d in self.disks)})")
        if wanted is None:
            return points[-1]
        for p in points:
            if p["point"] == wanted:
                return p
        raise NotFound(f"{self.name} has no recovery point {wanted} (points: "
                       f"{', '.join(str(p['point']) for p in points)})")

    def file_names(self) -> dict[str, str]:
        """Disk id -> the file name its failover and test disks get (the primary's disk file name)."""
        names: dict[str, str] = {}
        for d in self.disks:
            names[d.id] = d.name if d.name not in names.values() else f"{d.id}-{d.name}"
        return names


class FailedOverMachine:
    """A failed-over machine running on this site: its disks served over NBD for the VM, and tracked, so
    reverse replication later sends back only what changed."""

    def __init__(self, paths: dict[str, str], socket_path: str):
        disks: dict[str, TrackedDisk] = {}
        try:
            for name, path in paths.items():
                disks[name] = TrackedDisk(path)
        except BaseException:
            for d in disks.values():
                d.close()
            raise
        self.service = ExportService(disks, socket_path=socket_path).start()

    def uris(self) -> dict[str, str]:
        return {n: self.service.uri(n) for n in self.service.disks}

    def stop(self) -> None:
        self.service.stop()


# ---------------------------------------------------------------------------------------------- the site
class ReplicaSite(ReplicaDomains, ReverseReplication):
    """The replica side's operations, attached to the Daemon (its machines, scheduler, jobs, replica server).
    Created before the daemon starts its protected machines: it takes out those handed over to the other
    site and adds those reverse replication protects from here."""

    def __init__(self, daemon):
        from .plan_runs import PlanRunner
        self.daemon = daemon
        self.settings = daemon.config.replica
        self.state_dir = daemon.state_dir
        self.running: dict[str, FailedOverMachine] = {}
        self.testing: dict[str, FailedOverMachine] = {}     # test-failover disks served to an isolated VM
        self.handed_over: dict = {}                 # config machines whose replica this site now holds
        self.busy: set[str] = set()                 # machines with an operation under way
        self.settling: dict[str, asyncio.Task] = {}  # booted domains followed until they answer (replica_domains)
        self.plans = PlanRunner(self, daemon.config.plans, daemon.jobs)
        self._arrange_machines()

    # ------------------------------------------------------------------ lifecycle
    def _arrange_machines(self) -> None:
        keep = []
        for m in self.daemon.config.machines:
            if self._role(m.name) == "replica":
                self.handed_over[m.name] = m
                log.info("%s: not protected from this site: it holds the machine's replica (reverse replication)",
                         m.name)
            else:
                keep.append(m)
        for m in self._reverse_machines():
            if any(k.name == m.name for k in keep) or m.name in self.handed_over:
                log.error("%s: a reverse machine and a configured machine share the name: the configured one wins",
                          m.name)
            elif self._role(m.name) == "primary":
                keep.append(m)
        self.daemon.config.machines[:] = keep

    def _reverse_machines(self) -> list:
        folder = os.path.join(self.state_dir, "reverse")
        out = []
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            path = os.path.join(folder, name)
            try:
                with open(path, encoding="utf-8") as f:
                    out.append(parse_machine(json.load(f)["machine"], base_dir=self.state_dir, source=path))
            except (OSError, ValueError, KeyError, TypeError, ConfigError) as e:
                log.error("%s: unusable reverse machine (%s): not protected", path, getattr(e, "message", e))
        return out

    async def start(self) -> None:
        """Bring failed-over machines back up after a restart; finish failovers a stop interrupted."""
        for name in self._state_names():
            st = self._state(name)
            failover = st.data.get("failover")
            if st.data.get("role") == "replica" and (st.test_failover or {}).get("disks"):
                await self._serve_tests(name, st.test_failover["disks"])
                await self._resume_domain(name, st.test_failover.get("domain"))
            if st.data.get("role") != "replica" or not failover:
                continue
            if st.state in RUNNING_HERE:
                await self._run_here(name, failover)
                await self._resume_domain(name, failover.get("domain"))
            elif st.state is S.RecoveryInProgress:
                asyncio.create_task(self._resume_failover(name), name=f"failover-{name}")
        self._domain_watch = asyncio.create_task(self._watch_domains(), name="replica-domains")

    async def _resume_failover(self, name: str) -> None:
        try:
            await self._materialize_and_run(self._machine(name), self._state(name))
        except ReplicatorError as e:
            log.error("%s: the failover interrupted by the stop could not be finished: %s", name, e.message)

    async def stop(self) -> None:
        watch = getattr(self, "_domain_watch", None)
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        await self.plans.stop()
        for task in self.settling.values():
            task.cancel()
        await asyncio.gather(*self.settling.values(), return_exceptions=True)
        for fo in [*self.running.values(), *self.testing.values()]:
            await asyncio.to_thread(fo.stop)
        self.running.clear()
        self.testing.clear()

    # ------------------------------------------------------------------ what the site holds
    def _server(self):
        if self.daemon.replica_server is None:
            raise StateError("this replicatord has no replica role: add a [replica] table to its configuration")
        return self.daemon.replica_server.server

    def machines(self) -> dict[str, ReplicatedMachine]:
        if self.daemon.replica_server is None:
            return {}
        server = self._server()
        found: dict[tuple, list[DiskRef]] = {}
        for store in server.stores().values():
            for disk_id in store.disk_ids():
                d = store.disk(disk_id)
                name = next((n for n in (d.state.machine, d.state.name) if n and _NAME.match(n)), disk_id)
                found.setdefault((_disk_scope(server, store, disk_id), name), []).append(DiskRef(store, d))
        scopes = _configured_scopes(server) | {scope for scope, _ in found}
        qualify = len(scopes) > 1
        machines = {}
        for (scope, name), ds in sorted(found.items(), key=lambda kv: (kv[0][1], str(kv[0][0]))):
            key = f"{name}@{_scope_label(scope, scopes)}" if qualify else name
            machines[key] = ReplicatedMachine(key, sorted(ds, key=lambda r: r.name), scope)
        return dict(sorted(machines.items()))

    def _machine(self, name: str) -> ReplicatedMachine:
        machines = self.machines()
        if name not in machines:
            raise NotFound(f"this replica site holds no machine {name!r} (machines: {', '.join(machines) or 'none'})")
        return machines[name]

    def _role(self, name: str) -> str | None:
        path = state_path(self.state_dir, name)
        try:
            with open(path, encoding="utf-8") as f:
                return (json.load(f).get("data") or {}).get("role", "primary")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError):
            return "primary"                        # the protected machine's own loading reports the file

    def _state_names(self) -> list[str]:
        folder = os.path.join(self.state_dir, "machines")
        return sorted(n[:-5] for n in os.listdir(folder) if n.endswith(".json")) if os.path.isdir(folder) else []

    def _state(self, name: str, machine: ReplicatedMachine | None = None) -> MachineState:
        """The machine's state on this site (a replica machine seen for the first time starts as Replicating
        once it has a recovery point); read fresh for every operation, never cached beside the primary's."""
        if name in self.daemon.machines:
            return self.daemon.machines[name].state
        new = self._role(name) is None
        st = MachineState.load(self.state_dir, name, initial=S.ReadyForInitialReplication)
        if new:
            st.data["role"] = "replica"
            st.save()
        if (st.data.get("role") == "replica" and st.state is S.ReadyForInitialReplication and machine is not None
                and machine.points()):
            st.fire(Event.start_initial, "the replica receives the machine's first cycles")
            st.fire(Event.initial_done, "the replica holds a recovery point of every disk")
        return st

    def _replica_state(self, m: ReplicatedMachine) -> MachineState:
        st = self._state(m.name, m)
        if st.data.get("role") != "replica":
            raise StateError(f"{m.name} is protected from this site (reverse replication made it a primary here): "
                             "its replica here is no longer used")
        return st

    def view(self, m: ReplicatedMachine) -> dict:
        st = self._state(m.name, m)
        points = m.points()
        return {"name": m.name, "role": st.data.get("role", "primary"), "state": st.state.value,
                "reason": st.reason, "since": st.since, "reversed": st.reversed, "test_failover": st.test_failover,
                "failover": st.data.get("failover"),
                "nbd": self.running[m.name].uris() if m.name in self.running else None,
                "test_nbd": self.testing[m.name].uris() if m.name in self.testing else None,
                "points": points, "latest_point": points[-1]["point"] if points else None,
                "disks": [{"name": d.name, "disk_id": d.id, "root": d.store.root, "generation": d.disk.generation,
                           "points": [p.generation for p in d.disk.points], "prepared": d.disk.state.prepared,
                           "failed_over": bool(d.disk.state.failover), "epoch": d.disk.state.epoch}
                          for d in m.disks]}

    # ------------------------------------------------------------------ helpers
    def _lock(self, d: DiskRef) -> asyncio.Lock:
        return self._server().disk_lock(d.store, d.id)

    def _begin(self, name: str) -> None:
        if name in self.busy:
            raise StateError(f"{name}: another operation on this machine is under way")
        self.busy.add(name)

    def _socket(self, name: str) -> str:
        os.makedirs(os.path.join(self.state_dir, "nbd"), exist_ok=True)
        return os.path.join(self.state_dir, "nbd", f"{name}.sock")

    async def _run_here(self, name: str, failover: dict) -> None:
        paths = {os.path.basename(p): p for p in failover["paths"].values()}
        self.running[name] = await asyncio.to_thread(FailedOverMachine, paths, self._socket(name))

    async def _stop_here(self, name: str) -> None:
        fo = self.running.pop(name, None)
        if fo is not None:
            await asyncio.to_thread(fo.stop)

    # ------------------------------------------------------------------ test failover
    async def test_failover(self, name: str, point: int | None = None, network: str | None = None) -> dict:
        """Differencing disks of a point for every disk of the machine, in TEST_FAILOVER_DIR/NAME/: the
        replica is not touched and replication goes on. `network` (a domain machine): "isolated" (the
        default: [replica] test_network) or "none" (its NICs connected to nothing)."""
        if network not in (None, "isolated", "none"):
            raise UsageError(f"network must be \"isolated\" or \"none\", not {network!r}")
        m = self._machine(name)
        st = self._replica_state(m)
        pt = m.point(point)
        folder = os.path.join(self.settings.test_failover_dir, name)
        self._begin(name)
        try:
            st.start_test_failover(pt["point"], folder)
            made = {}
            try:
                os.makedirs(folder, exist_ok=True)
                for d, fname in ((d, m.file_names()[d.id]) for d in m.disks):
                    out = os.path.join(folder, fname)
                    if os.path.exists(out):             # left by a crash: not one of the disk's tests
                        os.unlink(out)
                    async with self._lock(d):
                        made[d.name] = await asyncio.to_thread(d.disk.test_failover, pt["generations"][d.id], out)
            except BaseException:
                await self._remove_tests(m, folder)
                st.stop_test_failover()
                raise
            st.test_failover["disks"] = made
            st.save()
            await self._serve_tests(name, made)
            try:
                await self._boot_test(m, st, made, unplugged=network == "none")
            except BaseException:
                served = self.testing.pop(name, None)
                if served is not None:
                    await asyncio.to_thread(served.stop)
                await self._remove_tests(m, folder)
                st.stop_test_failover()
                raise
        finally:
            self.busy.discard(name)
        log.info("%s: test failover at point %d in %s", name, pt["point"], folder)
        return self.view(m)

    async def cleanup_test_failover(self, name: str) -> dict:
        m = self._machine(name)
        st = self._replica_state(m)
        if st.test_failover is None:
            raise StateError(f"{name}: no test failover is running")
        self._begin(name)
        try:
            dom = st.test_failover.get("domain")
            self._cancel_settle(name)
            if dom:                             # the test machine goes before its disks
                for done in await asyncio.to_thread(domains.remove, dom["libvirt"], dom["name"], dom.get("network")):
                    log.info("%s: cleanup of the test failover: %s", name, done)
                st.test_failover.pop("domain")
                st.save()
            served = self.testing.pop(name, None)
            if served is not None:
                await asyncio.to_thread(served.stop)
            await self._remove_tests(m, st.test_failover["path"])
            st.stop_test_failover()
        finally:
            self.busy.discard(name)
        return self.view(m)

    async def _serve_tests(self, name: str, disks: dict[str, str]) -> None:
        """Serve the test disks over NBD (an isolated VM boots from them; qemu cannot open a VHDX
        differencing disk itself). Their tracking sidecars live in the test folder and go with it."""
        paths = {os.path.basename(p): p for p in disks.values()}
        self.testing[name] = await asyncio.to_thread(FailedOverMachine, paths, self._socket(f"{name}.test"))

    async def _remove_tests(self, m: ReplicatedMachine, folder: str) -> None:
        for d in m.disks:
            for test in [t for t in d.disk.state.tests if os.path.dirname(t) == folder]:
                async with self._lock(d):
                    await asyncio.to_thread(d.disk.cleanup_test_failover, test)
        if os.path.isdir(folder):
            shutil.rmtree(folder)

    # ------------------------------------------------------------------ failover
    async def failover(self, name: str, point: int | None = None, planned: bool = False) -> dict:
        """Every disk of the machine as a standalone VHDX of one point, then the machine runs here (NBD).
        Planned: only after the primary reported its final cycle (PreparedForFailover), at the latest point."""
        m = self._machine(name)
        st = self._replica_state(m)
        if name in self.daemon.machines:
            raise StateError(f"{name} is also a protected machine of this site: it cannot fail over here")
        if st.test_failover is not None:
            raise StateError(f"{name}: a test failover is running ({st.test_failover['path']}): clean it up first "
                             f"(`replicator replica-machine {name} cleanup-test-failover`)")
        pt = self._planned_point(m) if planned else m.point(point)
        if planned and point is not None and point != pt["point"]:
            raise UsageError(f"{name}: a planned failover takes the latest point ({pt['point']}), not {point}")
        self._begin(name)
        try:
            kind = "planned" if planned else "unplanned"
            st.fire(Event.failover, f"{kind} failover to point {pt['point']}")
            names = m.file_names()
            paths = {d.id: (st.data.get("primary_disks") or {}).get(d.id)
                     or os.path.join(self.settings.failover_dir, name, names[d.id]) for d in m.disks}
            st.data["failover"] = {"kind": kind, "point": pt["point"], "generations": pt["generations"],
                                   "paths": paths, "time": time.time(),
                                   "domain": (st.data.get("failover") or {}).get("domain")}   # goes first
            st.save()
            await self._materialize_and_run(m, st)
        finally:
            self.busy.discard(name)
        return self.view(m)

    def _planned_point(self, m: ReplicatedMachine) -> dict:
        """The latest point, when it is the final cycle the primary reported before stopping."""
        waiting = [d.name for d in m.disks if d.disk.state.prepared != d.disk.generation]
        if waiting:
            raise StateError(f"{m.name}: the primary has not reported PreparedForFailover ({', '.join(waiting)} "
                             f"without its final cycle): run `replicator machine {m.name} planned-failover` on the "
                             "primary site first, or fail over unplanned")
        pt = m.point()
        if any(pt["generations"][d.id] != d.disk.generation for d in m.disks):
            raise StateError(f"{m.name}: the final cycle is not a recovery point of every disk")
        return pt

    async def _materialize_and_run(self, m: ReplicatedMachine, st: MachineState) -> None:
        fo = st.data["failover"]
        job = self.daemon.jobs.create("failover", m.name, total=sum(d.disk.state.size for d in m.disks))
        try:
            await self._remove_domain(m.name, fo.pop("domain", None), job)   # another point: its domain goes first
            await self._stop_here(m.name)               # another point of a machine already failed over
            for d in m.disks:
                job.note(f"{d.name}: point {fo['point']} (generation {fo['generations'][d.id]}) -> {fo['paths'][d.id]}")
                async with self._lock(d):
                    await asyncio.to_thread(_materialize, d.disk, fo["generations"][d.id], fo["paths"][d.id])
                    await asyncio.to_thread(d.disk.set_failover, {"machine": m.name, "point": fo["point"],
                                                                  "time": fo["time"], "path": fo["paths"][d.id]})
                job.add(d.disk.state.size)
            await self._run_here(m.name, fo)
            await self._boot_failover(m, st, job)
        except BaseException as e:
            job.fail(getattr(e, "message", None) or repr(e))
            await self._undo_failover(m, st, f"failover failed: {getattr(e, 'message', e)}")
            raise
        st.fire(Event.failover_done, f"{fo['kind']} failover to point {fo['point']}: running on this site "
                                     f"(NBD {self._socket(m.name)})")
        job.succeed(f"{m.name} runs on this site from point {fo['point']}")

    async def _undo_failover(self, m: ReplicatedMachine, st: MachineState, reason: str) -> None:
        """Back to replicating: the failed-over disks go (what the machine wrote here is discarded), the
        replica takes the primary's cycles again."""
        fo = st.data.get("failover") or {}
        await self._remove_domain(m.name, fo.get("domain"))
        st.data.pop("failover", None)
        await self._stop_here(m.name)
        for d in m.disks:
            async with self._lock(d):
                await asyncio.to_thread(d.disk.set_failover, None)
            path = (fo.get("paths") or {}).get(d.id)
            if path and path.startswith(os.path.join(self.settings.failover_dir, "")):
                await asyncio.to_thread(_remove_disk, path)
        st.fire(Event.cancel_failover, reason)

    async def commit_failover(self, name: str) -> dict:
        m = self._machine(name)
        st = self._replica_state(m)
        st.fire(Event.commit_failover, f"failover to point {(st.data.get('failover') or {}).get('point')} committed")
        if getattr(self.daemon, "replica_server", None) is not None:     # an extended leg goes on from here
            await self.daemon.replica_server.continue_extended(name, self)
            m = self._machine(name)
        return self.view(m)

    async def cancel_failover(self, name: str) -> dict:
        m = self._machine(name)
        st = self._replica_state(m)
        if not st.can(Event.cancel_failover) or st.state is S.FailedOver:
            raise StateError(f"{name}: cancel-failover needs a failover not yet committed (state {st.state.value})")
        self._begin(name)
        try:
            await self._undo_failover(m, st, "failover cancelled: the replica takes the primary's cycles again; "
                                             "what the machine wrote on this site is discarded")
        finally:
            self.busy.discard(name)
        return self.view(m)

    # ------------------------------------------------------------------ admin API
    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/replica/machines", self._list)
        app.router.add_get("/v1/replica/machines/{name}", self._get)
        app.router.add_post("/v1/replica/machines/{name}/{op}", self._operation)
        self.plans.add_routes(app)

    async def _list(self, request):
        return web.json_response({"machines": [self.view(m) for m in self.machines().values()]})

    async def _get(self, request):
        return await answer(lambda: self._view_of(request.match_info["name"]))

    async def _view_of(self, name: str) -> dict:
        return self.view(self._machine(name))

    async def _operation(self, request):
        name, op = request.match_info["name"], request.match_info["op"]

        async def run():
            body = await json_body(request)
            if op == "test-failover":
                network = body.get("network")
                if network is not None and not isinstance(network, str):
                    raise UsageError(f"network must be \"isolated\" or \"none\", not {network!r}")
                return await self.test_failover(name, _int(body, "point"), network)
            if op == "cleanup-test-failover":
                return await self.cleanup_test_failover(name)
            if op == "failover":
                return await self.failover(name, _int(body, "point"), bool(body.get("planned", False)))
            if op == "commit-failover":
                return await self.commit_failover(name)
            if op == "cancel-failover":
                return await self.cancel_failover(name)
            if op == "reverse":
                return await self.reverse(name, body)
            if op == "accept-reverse":
                return await self.accept_reverse(name, body.get("from"), bool(body.get("force", False)))
            raise NotFound(f"unknown operation {op!r} (known: {', '.join(OPERATIONS)})")
        return await answer(run)


# ---------------------------------------------------------------------------------------------- helpers
def _configured_scopes(server) -> set[tuple]:
    return {(os.path.abspath(e.storage_root), e.group) for e in server.entries}


def _disk_scope(server, store, disk_id: str) -> tuple:
    """(storage root, trust group) of a disk: the group that owns it in its root; a disk no primary claimed
    (a seed imported or a disk adopted on this host) belongs to the root's group when only one is mapped
    there, else to the root alone."""
    owner = server._owners[store.root].owner(disk_id) if store.root in server._owners else None
    if owner is None:
        groups = {g for root, g in _configured_scopes(server) if root == store.root}
        owner = groups.pop() if len(groups) == 1 else None
    return store.root, owner


def _scope_label(scope: tuple, scopes: set[tuple]) -> str:
    """A file- and URL-safe name of a scope among `scopes`: its trust group where that is safe and no other
    root has the group, else a cleaned form with a digest of the whole scope (no two scopes share one)."""
    root, group = scope
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", group or "local")[:40]
    if group and clean == group and sum(1 for _, g in scopes if g == group) == 1:
        return group
    return f"{clean}-{hashlib.sha256(repr(scope).encode()).hexdigest()[:8]}"


def _materialize(disk, generation: int, path: str) -> None:
    """The point as a standalone VHDX at `path`, written beside it and renamed into place; any tracking
    state left there by an earlier life of the file goes (the new file is tracked from scratch)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    part = path + ".part"
    if os.path.exists(part):
        os.unlink(part)
    disk.materialize(generation, part)
    os.replace(part, path)
    fsync_dir(os.path.dirname(path))
    if os.path.isdir(Sidecar(path).dir):
        shutil.rmtree(Sidecar(path).dir)


def _remove_disk(path: str) -> None:
    for p in (path, path + ".part"):
        if os.path.exists(p):
            os.unlink(p)
    if os.path.isdir(Sidecar(path).dir):
        shutil.rmtree(Sidecar(path).dir)


def _int(body: dict, key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise UsageError(f"{key} must be an integer, not {v!r}")
    return v


async def json_body(request) -> dict:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise UsageError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise UsageError("the request body must be a JSON object")
    return body


async def answer(call) -> web.Response:
    """The operation's result as JSON, or its refusal: 404 unknown, 400 bad settings, 409 refused."""
    try:
        return web.json_response(await call())
    except NotFound as e:
        return web.json_response({"error": e.message}, status=404)
    except ConfigError as e:
        return web.json_response({"error": e.message, "problems": e.problems}, status=400)
    except ReplicatorError as e:
        return web.json_response({"error": e.message}, status=409)

"""One protected machine inside replicatord: its disks tracked and served over NBD, its cycles, its state
machine, its jobs and its health.

The machine's disks belong to its export process (tracking/shim.py), which serves them to the guest and
tracks every write, and nothing else; replicatord drives it (tracking/remote.py): a cut is one instant
across the machine's disks, taken there between NBD requests. Everything heavy -- reading the disk for an
initial copy or a resync, digests, encoding, TLS -- runs here, in another process, on worker threads, so
it cannot delay a guest request. One cycle at a time (a lock), whether the scheduler or an operator asked.
The export outlives replicatord: a restart or a reload attaches to it again, the guest keeps its disk.

Long work runs as a job with progress (initial replication, seed export, resynchronization, an operator's
cycle, planned failover's final cycle). Progress reports come from the export's loop or its worker threads
and are handed to the daemon's loop, which alone touches jobs.

What a cycle does follows the state and the settings: the initial replication (over the network, at a
scheduled time, from an offline seed, or levelling an existing copy on the replica), a resynchronization
(automatic inside its window, or on demand), or the sealed logs. A machine that must not start now says
why and until when in its reason (`Waiting`).

Fencing (docs/management-plane.md): a machine with an epoch in the host's fencing table (fencing.py) sends
it with every request to its replica. When the replica refuses it as stale (the machine was failed over),
the machine is marked fenced (its state's `fenced` field, its reason one line saying why): no cycle runs
and no request is sent for it until its epoch is raised (a reload with a newer table), it leaves the table
(standalone), or an operator resumes it; the host's other machines go on.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import time
from urllib.parse import urlparse

from ..disk.base import ExtentKind
from ..errors import DiskIOError, ReplicatorError, UsageError
from ..orchestration import MachineState, MachineStats
from ..orchestration.jobs import Job, JobRegistry, PartsProgress
from ..orchestration.scheduler import SystemClock, next_time_of_day, window_opens
from ..orchestration.states import Event, ReplicationState, StateError
from ..replication import DiskReplicator
from ..seed import export_machine
from ..seed import media as seed_media
from ..targets.base import TargetUnavailable
from ..azure import site as azure_site
from ..targets.factory import open_target
from ..tracking.remote import ExportHandle
from ..transport.auth import Fenced
from . import fencing
from .domains import DomainProtection

log = logging.getLogger("replicatord")
S = ReplicationState

CYCLING_STATES = {S.ReadyForInitialReplication, S.InitialReplicationInProgress, S.WaitingForInitialReplication,
                  S.Replicating, S.Error, S.WaitingForStartResynchronize, S.Resynchronizing}
OPERATIONS = ("resync", "cycle", "planned-failover", *azure_site.OPERATIONS)   # an operator's long operations
LONG_KINDS = ("initial", "seed-export", "resync")          # cycles that run as a job of their own
COPY_KINDS = ("initial", "resync")                         # cycles that read the disk while the guest writes
SEED_VOLUME = (4 << 30) - (1 << 20)    # seed volumes FAT32/exFAT media take (a file under 4 GiB)


class Waiting(StateError):
    """The machine does not start now: it waits for a moment or for an operator (a resync window, a
    scheduled initial replication, a seed import), or cannot do what its settings ask; the message says."""


def end_job(job: Job, e: BaseException) -> None:
    """A job ended by an exception: cancelled (the daemon stops), or failed with the error's message."""
    if isinstance(e, asyncio.CancelledError):
        job.cancelled()
    else:
        job.fail(e.message if isinstance(e, ReplicatorError) else (str(e) or type(e).__name__))


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _window(w) -> str:
    return f"{w[0].strftime('%H:%M')}-{w[1].strftime('%H:%M')}"


class PrimaryMachine:
    def __init__(self, machine, state_dir: str, *, jobs: JobRegistry | None = None, clock=None):
        self.name = machine.name
        self.settings = machine.protection
        self.state_dir, self.azure_vm = state_dir, machine.azure_vm
        self.initial = self.settings.initial_replication
        self.state = MachineState.load(state_dir, machine.name)
        self.stats = MachineStats(machine.name, self.settings.frequency, stale_after=self.settings.rpo_threshold)
        self.stats.restore(self.state.data.get("stats") or {})
        self.jobs = jobs if jobs is not None else JobRegistry(None)
        self.clock = clock or SystemClock()
        p = self.settings
        self.epoch = fencing.epoch_of(state_dir, machine.name)     # None: standalone, no epoch sent
        fencing.lift_if_raised(self.state, self.epoch)
        self.target = open_target(p.target, cert=p.cert, key=p.key, ca=p.ca, kerberos=p.auth == "kerberos",
                                  bandwidth_limit=p.bandwidth_limit, machine=machine.name, epoch=self.epoch,
                                  encryption_key_file=p.encryption_key_file)
        sock_dir = os.path.join(state_dir, "nbd")
        os.makedirs(sock_dir, exist_ok=True)
        export = ExportHandle(machine.name, {os.path.basename(p): p for p in machine.disks}, sock_dir)
        self.domain = DomainProtection(machine, self.state) if machine.domain else None
        if self.domain is not None:             # a libvirt domain (domains.py): refused before the export starts
            self.domain.check(export.nbd_socket)
        self.export = export.start()
        if self.domain is not None:
            try:
                self.domain.point(self.export)
            except BaseException:
                with contextlib.suppress(Exception):
                    self.export.detach()
                raise
        self.disks = self.export.disks
        self.replicators = [DiskReplicator(d, self.target, compress=p.compression, name=n,
                                           copy_rate=p.copy_rate_when_busy)
                            for n, d in self.disks.items()]
        self.state.data["protection"] = {      # what removing the protection later needs (removal.py)
            "target": p.target, "cert": p.cert, "key": p.key, "ca": p.ca, "kerberos": p.auth == "kerberos",
            "delete_replica_on_remove": p.delete_replica_on_remove,
            "disks": {n: {"path": d.path, "disk_id": str(d.virtual_disk_id)} for n, d in self.disks.items()}}
        if self.domain is not None:
            self.state.data["protection"]["domain"] = self.domain.removal_record()
        self.state.save()
        self.last_result = None
        self.exporting = self.export.serving      # the NBD export serves the VM (a planned failover stops it)
        self._lock = asyncio.Lock()                 # one cycle at a time
        self.tasks: set[asyncio.Task] = set()       # operators' operations running in the background

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.export.watch_fd(), self._export_gone)
        if self.domain is not None:
            self.domain.start(lambda: self.exporting)
            self._background(self.domain.resume_if_paused("its export is up"), "resume-domain")
        for d in self.disks.values():
            if d.resync_required and self.state.state in (S.Replicating, S.Error):
                reason = d.reason or ""
                if self.state.reversed and "no tracking state" in reason:
                    reason = ("reverse replication: a checksum resynchronization against the other site's copy "
                              "sends only the blocks that differ")
                self.state.fire(Event.resync_needed, reason)

    def _export_gone(self) -> None:
        """The export process ended without being asked (killed, crashed): start it again at once. Its
        trackers find their logs not closed cleanly, so the disks are resynchronized; a guest configured
        as docs/operations.md says only paused meanwhile."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.export.watch_fd())
        log.error("%s: its export process (pid %s) ended unexpectedly: restarting it", self.name, self.export.pid)
        task = asyncio.create_task(self._restart_export(), name=f"restart-export-{self.name}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _restart_export(self) -> None:
        async with self._lock:
            while True:
                try:
                    await asyncio.to_thread(self.export.start)
                    break
                except ReplicatorError as e:
                    log.error("%s: the export could not be restarted (tried again in 5 s): %s", self.name, e.message)
                    await asyncio.sleep(5)
            for d in self.disks.values():
                d.close_reader()            # connections to the export that died
            for r in self.replicators:
                r.tracker = self.export.disks[os.path.basename(r.tracker.path)]
            self.disks = self.export.disks
            self.exporting = self.export.serving
            asyncio.get_running_loop().add_reader(self.export.watch_fd(), self._export_gone)
            needing = [d for d in self.disks.values() if d.resync_required]
            if needing and self.state.can(Event.resync_needed):
                self.state.fire(Event.resync_needed, f"the export process was restarted: {needing[0].reason}")
            log.info("%s: export restarted (pid %d)", self.name, self.export.pid)
        if self.domain is not None:             # paused by error_policy='stop' while the export was away
            await self.domain.resume_if_paused("its export process was restarted")

    def _background(self, work, what: str) -> None:
        task = asyncio.create_task(work, name=f"{what}-{self.name}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ------------------------------------------------------------------ scheduler hooks
    async def cut(self) -> None:
        if self.state.fenced:           # nothing ships while fenced: the writes stay in one open log
            return
        await asyncio.to_thread(self.export.cut)

    async def run_cycle(self, consistency: str = "crash", *, job: Job | None = None, forced: str | None = None):
        """One cycle of every disk; state transitions follow what it had to do. None when the machine does
        not cycle now (its state, or it waits: its reason says for what). `forced` is an operator's "now":
        "cycle" starts a scheduled initial replication early, "resync" a resync outside its window; an
        operator also hears (Waiting, StateError) why nothing ran."""
        async with self._lock:
            if self.state.fenced:               # no request at all until the fence is lifted
                if forced:
                    raise StateError(f"{self.name}: {self.state.reason}")
                return None
            if self.state.state not in CYCLING_STATES:
                if forced:
                    raise StateError(f"{self.name}: no replication in state {self.state.state.value}")
                return None
            own = False
            try:
                kind = self._prepare(forced)
                own = job is None and kind in LONG_KINDS
                job = self._job_for(kind, job)
                try:
                    results = await self._run(kind, consistency, job)
                except ReplicatorError as e:
                    if not isinstance(e, Waiting):
                        self._after_failure(e)
                    raise
                try:
                    await self._checkpoint(results)
                    if self.domain is not None and results:
                        await self.domain.replicate_config(
                            self.target, {n: str(d.virtual_disk_id) for n, d in self.disks.items()})
                finally:
                    # the new state (Replicating after the initial copy) and the end of the cycle's job are
                    # seen together: no await between them and job.succeed/end_job below
                    self._after_success(kind, results)
            except Waiting as e:
                self._explain(e.message)
                if own:
                    job.fail(e.message)
                if forced:
                    raise
                return None
            except BaseException as e:
                if own:
                    end_job(job, e)
                raise
            if own:
                job.succeed(f"{kind} complete")
            return results

    def _prepare(self, forced: str | None) -> str:
        """What this cycle does -- "initial", "seed-export", "seed-check", "resync" or "delta" -- after the
        transitions that lead there; Waiting when it must not start now."""
        st = self.state
        if st.state == S.ReadyForInitialReplication:
            st.fire(Event.start_initial, self._initial_start(forced))
        if st.state == S.InitialReplicationInProgress:
            return "seed-export" if self.initial.mode == "offline" else "initial"
        if st.state == S.WaitingForInitialReplication:
            return "seed-check"
        needing = [d for d in self.disks.values() if d.resync_required]
        if needing and st.state in (S.Replicating, S.Error):
            st.fire(Event.resync_needed, needing[0].reason or "resynchronization required")
        if st.state == S.WaitingForStartResynchronize:
            st.fire(Event.resync_start, self._resync_start(forced))
        return "resync" if st.state == S.Resynchronizing else "delta"

    # ------------------------------------------------------------------ when to start
    def _initial_start(self, forced: str | None) -> str:
        """The reason the initial replication starts with; Waiting when it must not start yet."""
        mode = self.initial.mode
        if mode == "scheduled" and not forced:
            at = self.scheduled_start()
            if at > self.clock.now():
                raise Waiting(f"initial replication scheduled for {_when(at)}; `replicator machine {self.name} "
                              "cycle` starts it now")
        if mode == "existing":
            where = self.initial.path if self._existing_sources() else "the replica host"
            return f"initial replication from the existing copies in {where}: only differing blocks are sent"
        if mode == "offline":
            return f"offline initial replication: exporting a seed to {self.initial.seed_dir}"
        return ("scheduled " if mode == "scheduled" else "") + "initial replication over the network"

    def scheduled_start(self) -> float:
        """When a scheduled initial replication starts: the configured moment, or the first time the
        configured time of day comes after protection began (kept, so a restart does not move it)."""
        at = self.initial.at
        if isinstance(at, dt.datetime):
            return at.timestamp()
        kept = self.state.data.get("initial_at")
        if not kept or kept.get("at") != at.isoformat():
            kept = self.state.data["initial_at"] = {"at": at.isoformat(),
                                                   "time": next_time_of_day(at, self.clock.now())}
            self.state.save()
        return float(kept["time"])

    def _resync_start(self, forced: str | None) -> str:
        why = next((d.reason for d in self.disks.values() if d.reason), None) or "resynchronization required"
        if forced == "resync":
            return "resynchronization started by the operator"
        now_cmd = f"`replicator machine {self.name} resync` starts it now"
        if self.settings.resync == "manual":
            raise Waiting(f"{why}; resync = \"manual\": {now_cmd}")
        window = self.settings.resync_window
        opens = window_opens(window, self.clock.now())
        if opens > self.clock.now():
            raise Waiting(f"{why}; the automatic resynchronization waits for its window {_window(window)} "
                          f"(starts {_when(opens)}); {now_cmd}")
        return "automatic resynchronization" + (f" (inside its window {_window(window)})" if window else "")

    def due_at(self) -> float | None:
        """When this machine next has something to start (the daemon asks the scheduler for a tick then)."""
        now, st = self.clock.now(), self.state.state
        if st == S.ReadyForInitialReplication and self.initial.mode == "scheduled":
            at = self.scheduled_start()
        elif st == S.WaitingForStartResynchronize and self.settings.resync == "auto":
            at = window_opens(self.settings.resync_window, now)
        else:
            return None
        return at if at > now else None

    def _explain(self, reason: str) -> None:
        """A waiting machine's reason, kept without a transition (and logged once when it changes)."""
        self.stats.resync_required = any(d.resync_required for d in self.disks.values())
        if self.state.reason != reason:
            log.info("%s: %s", self.name, reason)
            self.state.reason = reason
            self.state.save()

    # ------------------------------------------------------------------ the work
    def _job_for(self, kind: str, job: Job | None) -> Job | None:
        if job is not None:
            if job.kind == "cycle" and kind in LONG_KINDS:
                job.note(f"this cycle is the machine's {kind}")
                job.kind = kind
        elif kind in LONG_KINDS:
            job = self.jobs.create(kind, self.name)
        else:
            return None
        previous = self.state.data.get("job")
        if previous and previous != job.id and kind in LONG_KINDS:
            try:
                if (self.jobs.find(previous).get("error") or "").startswith("interrupted"):
                    job.note(f"continues {previous}, interrupted when the daemon stopped")
            except UsageError:
                pass
        self.state.data["job"] = job.id
        self.state.save()
        return job

    async def _run(self, kind: str, consistency: str, job: Job | None):
        if kind == "seed-export":
            await self._export_seed(job)
            return []
        if kind == "seed-check":
            await self._check_seed()
            kind = "delta"
        if kind == "initial" and self.initial.mode == "existing":
            await self._adopt_existing(job)
        return await self._replicate(kind, consistency, job)

    async def _replicate(self, kind: str, consistency: str, job: Job | None):
        meter = PartsProgress(job) if job is not None else None
        post = self._poster(meter)

        if meter is not None:
            post("estimate", await asyncio.to_thread(self._estimates, kind))
        for r in self.replicators:
            r.progress = (lambda done, total, part=r.name: post(part, done, total)) if meter else None
        try:
            # a copy cut short after it was read (its log unsent) is retried as the same kind: that log is
            # still the copy's, and goes at the copy's pace
            results = await self._all_disks(consistency, after_copy=kind in COPY_KINDS)
            if any(r.kind in COPY_KINDS for r in results):
                # The copies were read while the guest wrote: the log begun at their start makes them whole.
                # Cut it across the machine now and ship it: the replica's first consistent point. That cut is
                # not quiesced (the scheduler's quiesce covered the first one): crash-consistent.
                await self.cut()
                logs = await self._all_disks("crash", after_copy=True)
                results = [copy.then(log) for copy, log in zip(results, logs)]
        finally:
            for r in self.replicators:
                r.progress = None
        if meter is not None:
            meter.settle()
        return results

    async def _all_disks(self, consistency: str, *, after_copy: bool = False):
        """One cycle of every disk; the disks' streams travel at the same time (one cut sealed them)."""
        done = await asyncio.gather(*(r.run_cycle(consistency=consistency, cut=False, after_copy=after_copy)
                                      for r in self.replicators), return_exceptions=True)
        failed = [x for x in done if isinstance(x, BaseException)]
        if failed:                          # a fenced disk says the most: the machine stops on it
            raise next((x for x in failed if isinstance(x, Fenced)), failed[0])
        return done

    def _poster(self, meter: PartsProgress | None):
        """A progress callback for any thread: the report is applied on the daemon's loop, in order."""
        loop = asyncio.get_running_loop()

        def post(part, done=None, total=None):
            if meter is None:
                return
            if part == "estimate":
                loop.call_soon_threadsafe(meter.estimate, done)
            else:
                loop.call_soon_threadsafe(meter.update, part, done, total)
        return post

    def _estimates(self, kind: str) -> dict[str, int]:
        """Bytes each disk's streams will likely carry, until their own reports replace the guess (asks the
        export process: call it off the event loop)."""
        out = {}
        for name, d in self.disks.items():
            if kind == "initial" and self.initial.mode != "existing":
                out[name] = sum(e.length for e in d.extents() if e.kind is ExtentKind.DATA)
            elif d.resync_required or d.state.state == "resynchronizing":
                out[name] = sum(n for _, n in d.dirty_extents())
            else:
                out[name] = sum(rec.data_bytes for rec in d.state.sealed_logs)
        return out

    # ------------------------------------------------------------------ offline seed
    def _seed_dir(self) -> str:
        return os.path.join(self.initial.seed_dir, self.name)

    async def _export_seed(self, job: Job) -> None:
        """Export the seed (continuing an interrupted export when the disks are still at its cut), then
        wait for the operator to import it on the replica host."""
        meter = PartsProgress(job, {n: d.size for n, d in self.disks.items()})
        post = self._poster(meter)
        machine_dir = self._seed_dir()

        def do():
            stale = self._stale_seed(machine_dir)
            if stale:
                shutil.rmtree(machine_dir)
            manifest = export_machine(self.name, self.disks, self.initial.seed_dir, volume_size=SEED_VOLUME,
                                      compress=self.settings.compression, progress=post)
            return stale, manifest
        try:
            stale, manifest = await asyncio.to_thread(do)
        except OSError as e:
            raise DiskIOError(f"seed export of {self.name} to {machine_dir} failed: {e.strerror or e}") from None
        if stale:
            job.note(f"the partial seed in {machine_dir} was from before a crash (the disks left its cut): "
                     "exported again")
        meter.settle()
        self.state.data["seed"] = {"dir": machine_dir,
                                   "generations": {d.disk_id: len(d.volumes) for d in manifest.disks}}
        self.state.fire(Event.seed_exported, f"offline seed written to {machine_dir}: {self._seed_import()}; "
                        "replication continues once the replica holds it")
        job.note(self.state.reason)

    def _seed_import(self) -> str:
        """What the operator does with the seed."""
        url = urlparse(self.settings.target)
        root = url.path if url.scheme == "local" else "ROOT"
        seed = (self.state.data.get("seed") or {}).get("dir", self._seed_dir())
        return f"an operator must import it on the replica host (`replicator seed import {seed} --replica-root {root}`)"

    def _stale_seed(self, machine_dir: str) -> bool:
        """A partial seed of ours whose disks are no longer at its cut (a crash during the export)."""
        if not os.path.exists(seed_media.manifest_path(machine_dir)):
            return False
        manifest = seed_media.load(machine_dir)
        ids = {str(d.virtual_disk_id): d for d in self.disks.values()}
        return manifest.machine == self.name and any(
            not e.complete and e.disk_id in ids and ids[e.disk_id].state.state != "resynchronizing"
            for e in manifest.disks)

    async def _check_seed(self) -> None:
        """Initial replication is done once the replica holds every disk's seed generation."""
        wanted = (self.state.data.get("seed") or {}).get("generations", {})
        missing = []
        for r in self.replicators:
            have = await self._replica_generation(r)
            if have < wanted.get(str(r.disk_id), 1):
                missing.append(f"{r.name} (generation {have} of {wanted.get(str(r.disk_id), 1)})")
        if missing:
            seed = (self.state.data.get("seed") or {}).get("dir", self._seed_dir())
            raise Waiting(f"offline seed written to {seed}; the replica does not hold it yet ({', '.join(missing)}): "
                          f"{self._seed_import()}")
        self.state.fire(Event.initial_done, "the replica holds the offline seed: replicating the changes since")

    async def _replica_generation(self, r: DiskReplicator) -> int:
        url = urlparse(self.settings.target)
        if url.scheme == "local":
            # Read what another process (`replicator seed import`) committed, without opening the disk in
            # this process's store: that would cache it, and recover a journal the importer is writing.
            try:
                with open(os.path.join(url.path, "disks", str(r.disk_id), "state.json"), encoding="utf-8") as f:
                    return int(json.load(f).get("generation", 0))
            except FileNotFoundError:
                return 0
            except (OSError, ValueError) as e:
                raise DiskIOError(f"cannot read the replica state of {r.name} under {url.path}: {e}") from None

        try:
            return (await self.target.disk_info(r.disk_id)).generation
        except TargetUnavailable:
            raise
        except ReplicatorError:                 # the replica has no such disk yet
            return 0

    # ------------------------------------------------------------------ existing copy on the replica
    def _existing_sources(self) -> dict[str, str]:
        """Disk name -> the existing copy the replica starts from; Waiting when that cannot be done."""
        url = urlparse(self.settings.target)
        if url.scheme in ("https", "http"):
            return {}                   # the copies are on the replica host, adopted there (_adopt_existing)
        if url.scheme != "local":
            raise Waiting(f"initial replication from an existing disk needs a replica that adopts the copy and "
                          f"compares block digests with the primary; {self.settings.target} cannot: use "
                          'initial_replication = "network" or "offline"')
        path = self.initial.path
        if os.path.isdir(path):
            found = {n: os.path.join(path, n) for n in self.disks}
        elif len(self.disks) == 1:
            found = {next(iter(self.disks)): path}
        else:
            raise Waiting(f"initial_replication.path {path} is one file, but {self.name} has {len(self.disks)} "
                          f"disks: give a folder holding {', '.join(self.disks)}")
        missing = [p for p in found.values() if not os.path.isfile(p)]
        if missing:
            raise Waiting(f"existing cop{'ies' if len(missing) > 1 else 'y'} {', '.join(missing)} not found: "
                          "the initial replication waits for them")
        from ..disk.probe import open_disk
        for name, src in found.items():
            with open_disk(src) as d:
                if d.size != self.disks[name].size:
                    raise Waiting(f"existing copy {src} is {d.size} bytes, {name} is {self.disks[name].size}: it "
                                  "cannot be the replica's starting point")
        return found

    async def _adopt_existing(self, job: Job) -> None:
        """The replica store takes each existing copy as its base (once); the cycle then sends only the
        blocks whose digests differ."""
        from ..replica import ReplicaStore
        if urlparse(self.settings.target).scheme in ("https", "http"):
            return await self._await_adopted()
        store = ReplicaStore(urlparse(self.settings.target).path)
        for name, src in self._existing_sources().items():
            key = str(self.disks[name].virtual_disk_id)
            if key in store.disk_ids() and (store.disk(key).generation > 0 or store.disk(key).state.adopted):
                continue
            job.note(f"{name}: the replica starts from {src}")
            await asyncio.to_thread(store.adopt, key, src, name=name)

    async def _await_adopted(self) -> None:
        """A peer replica adopts the existing copies on its own host; until it has, the machine waits and
        says how to do it there."""
        missing = []
        for name, d in self.disks.items():
            try:
                info = await self.target.disk_info(d.virtual_disk_id)
                ready = info.adopted or info.generation > 0
            except ReplicatorError:
                ready = False
            if not ready:
                missing.append(f"replicator seed import --from-existing COPY-OF-{name} --disk-id "
                               f"{d.virtual_disk_id} --machine {self.name} --replica-root ROOT")
        if missing:
            raise Waiting("initial replication from existing copies: adopt them on the replica host first: "
                          + "; ".join(missing))

    # ------------------------------------------------------------------ after a cycle
    def _after_success(self, kind: str, results) -> None:
        st = self.state
        if st.state == S.InitialReplicationInProgress and kind != "seed-export":
            st.fire(Event.initial_done, "initial replication complete")
        elif st.state == S.Resynchronizing:
            st.fire(Event.resync_done, "resynchronization complete")
        elif st.state == S.Error:
            st.fire(Event.recovered, "a cycle succeeded")
        self.stats.resync_required = any(d.resync_required for d in self.disks.values())
        if kind == "seed-export":
            return
        self.stats.record_result(results)
        self.keep_stats()
        self.last_result = {"time": time.time(), "kinds": sorted({r.kind for r in results}),
                            "bytes_sent": sum(r.bytes_sent for r in results)}
        sent, secs = self.last_result["bytes_sent"], max((r.seconds for r in results), default=0.0)
        self.last_result["seconds"] = round(secs, 3)          # the controller's history charts it
        paced = max((r.paced_seconds for r in results), default=0.0)
        if paced:
            self.last_result["paced_seconds"] = round(paced, 3)
        changed, stream = sum(r.plain_bytes for r in results), sum(r.stream_bytes for r in results)
        # every cycle leaves one line; which bytes: changed (the data the cycle carries), stream (encoded),
        # sent (uploaded now: less than the stream when an interrupted upload resumed)
        log.info("%s: %s cycle replicated %d stream(s): %.1f MiB changed, %.1f MiB encoded, %.1f MiB sent, "
                 "in %.1f s%s", self.name, kind, sum(r.streams for r in results), changed / (1 << 20),
                 stream / (1 << 20), sent / (1 << 20), secs,
                 f" ({paced:.1f} s of it held back while the guest wrote)" if paced else "")

    def _after_failure(self, e: ReplicatorError) -> None:
        self.stats.record_failure(e)
        self.keep_stats()
        log.error("%s: cycle failed: %s", self.name, e.message)
        if self.state.state == S.Replicating:
            self.state.fire(Event.error, e.message)
        elif self.state.state == S.InitialReplicationInProgress:
            self.state.fire(Event.initial_failed, e.message)
        if isinstance(e, Fenced):
            fencing.fence(self.state, self.epoch, e)

    def keep_stats(self) -> None:
        """Statistics go into the machine's state file, so a restarted daemon goes on counting."""
        self.state.data["stats"] = self.stats.snapshot()
        self.state.save()

    # ------------------------------------------------------------------ operations
    async def cycle_now(self, consistency: str = "crash", *, job: Job | None = None):
        """An operator's "replicate now": cut, then ship (the scheduler cuts on its own ticks)."""
        await self.cut()
        return await self.run_cycle(consistency, job=job, forced="cycle")

    async def planned_failover(self, job: Job | None = None):
        """The primary stops (its NBD clients are disconnected and no more are accepted), a final cycle
        ships everything: zero data loss; the machine is then PreparedForFailover on the replica site."""
        self._check_planned_failover()
        if self.domain is not None:             # the guest stops first: all it wrote goes with the final cycle
            await self.domain.shut_down(job)
        await asyncio.to_thread(self.export.stop_serving)
        self.exporting = False
        results = await self.cycle_now(job=job)
        await self._checkpoint(results, prepared=True)
        if self.state.reversed:             # back to the original primary site: a failback (docs/states.md)
            self.state.fire(Event.failback_start, "failback: primary stopped, final cycle replicated")
            self.state.fire(Event.failback_done, "failback: the original site completes it (failover --planned)")
        else:
            self.state.fire(Event.prepare_failover, "planned failover: primary stopped, final cycle replicated")
        return results

    async def _checkpoint(self, results, prepared: bool = False) -> None:
        """Tell the replica which generation of each disk ends this cycle -- one cut across the machine --
        so a failover takes every disk at the same instant; `prepared`: it was the final cycle. A lost
        checkpoint only costs this cycle its place among the machine's recovery points."""
        if not results:
            return
        point = max(r.generation for r in results)

        try:
            for r, result in zip(self.replicators, results):
                await self.target.checkpoint(r.disk_id, result.generation, point, prepared,
                                             self.settings.additional_points, len(self.replicators))
        except ReplicatorError as e:
            if prepared:
                raise
            log.warning("%s: the replica did not take the checkpoint of point %d: %s", self.name, point, e.message)

    def _check_planned_failover(self) -> None:
        """Refused before the VM's disks stop: a final cycle must be able to make the replica whole."""
        if not self.state.can(Event.prepare_failover):
            raise StateError(f"{self.name}: planned failover needs state Replicating, not {self.state.state.value}")
        needing = [n for n, d in self.disks.items() if d.resync_required]
        if needing:
            raise StateError(f"{self.name}: {', '.join(needing)} need{'s' if len(needing) == 1 else ''} a "
                             f"resynchronization before a planned failover (`replicator machine {self.name} resync`)")

    def pause(self) -> None:
        self.state.fire(Event.pause, "paused by the operator")

    def resume(self) -> None:
        """Resume a paused machine; on a fenced one, the operator lifts the fence: its next cycle asks the
        replica again (and is fenced again if the epoch is still stale)."""
        if self.state.fenced is not None:
            self.state.unfence(f"fence lifted by the operator: the next cycle tries epoch {self.epoch} again")
            if not self.state.can(Event.resume):
                return
        self.state.fire(Event.resume, "resumed by the operator")

    async def request_resync(self) -> None:
        """Mark every disk for resynchronization (the export process owns the trackers)."""
        if self.state.state == S.Resynchronizing and self._lock.locked():
            raise StateError(f"{self.name}: a resynchronization is already running "
                             f"({self.state.data.get('job', 'its job')})")
        if not self.state.can(Event.resync_needed):
            raise StateError(f"{self.name}: resynchronization is not possible in state {self.state.state.value}")

        def mark():
            for d in self.disks.values():
                if not d.resync_required:
                    d._require_resync("resynchronization requested by the operator")
        await asyncio.to_thread(mark)
        self.state.fire(Event.resync_needed, "resynchronization requested by the operator")

    async def begin(self, op: str, params: dict | None = None) -> tuple[Job, asyncio.Task]:
        """Start an operator's operation as a job running in the background; refused at once (StateError)
        when the machine's state does not allow it. `params`: the request's query (the Azure operations')."""
        if self.state.fenced is not None and op in OPERATIONS:
            raise StateError(f"{self.name}: {self.state.reason}")
        if op == "resync":
            await self.request_resync()
            work = lambda job: self.run_cycle(job=job, forced="resync")      # noqa: E731
        elif op == "cycle":
            if self.state.state not in CYCLING_STATES:
                raise StateError(f"{self.name}: no replication in state {self.state.state.value}")
            work = lambda job: self.cycle_now(job=job)                       # noqa: E731
        elif op == "planned-failover":
            self._check_planned_failover()
            work = self.planned_failover
        elif op in azure_site.OPERATIONS:        # Azure as the recovery site (azure/site.py)
            work = azure_site.operation(self, op, params or {})
        else:
            raise UsageError(f"unknown operation {op!r} (known: {', '.join(OPERATIONS)})")
        job = self.jobs.create(op, self.name)
        task = asyncio.create_task(self._finish(job, work(job)), name=f"{op}-{self.name}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return job, task

    async def _finish(self, job: Job, work) -> None:
        """Run an operation and end its job; the job holds the outcome (nobody may await the task)."""
        try:
            await work
        except ReplicatorError as e:
            end_job(job, e)
        except BaseException as e:                  # a bug (or the daemon stopping): end the job, leave a trace
            if not isinstance(e, asyncio.CancelledError):
                log.exception("%s: %s failed", self.name, job.kind)
            end_job(job, e)
            if not isinstance(e, Exception):
                raise
        else:
            job.succeed(f"{job.kind} complete")

    def running_jobs(self) -> list[dict]:
        return [j.summary(log_lines=5) for j in self.jobs.running() if j.subject == self.name]

    def status(self, now: float | None = None) -> dict:
        now = now or time.time()
        return {"name": self.name, "role": "primary", "state": self.state.state.name, "reason": self.state.reason,
                "since": self.state.since, "stats": self.stats.to_dict(now), "target": self.settings.target,
                "initial_replication": self.initial.mode, "starts_at": self.due_at(), "jobs": self.running_jobs(),
                "disks": {n: {"disk_id": str(d.virtual_disk_id), "tracking": d.state.state, "reason": d.reason,
                              "nbd": self.export.uri(n) if self.exporting else None, "log": _log_place(d)}
                          for n, d in self.disks.items()},
                "export": {"pid": self.export.pid, "serving": self.exporting},
                "last_cycle": self.last_result, "epoch": self.epoch, "fenced": self.state.fenced,
                **({"domain": self.domain.view()} if self.domain is not None else {})}

    async def stop(self, final: bool = False) -> None:
        """replicatord stops: the export stays while a guest is connected to it (else it closes).
        final: the machine is no longer protected here; its export ends, clients or not."""
        await self.target.close()
        if self.domain is not None:
            await self.domain.stop()
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.export.watch_fd())
        if final:
            await asyncio.to_thread(self.export.shutdown)
        elif not await asyncio.to_thread(self.export.detach):
            log.info("%s: its export (pid %d) keeps serving the guest", self.name, self.export.pid)


def _log_place(d) -> str | None:
    """Where the disk's active change log is written, as of its last known state: "memory" (tmpfs,
    tracking/memlogs.py), "disk", or None (no log: a resync is due)."""
    active = d.state.active_log
    if active is None:
        return None
    where = d.sidecar.log_path(active, d.state.memory_dir)
    return "memory" if d.state.memory_dir and os.path.dirname(where) == d.state.memory_dir else "disk"

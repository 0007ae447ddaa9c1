"""One protected machine inside replicatord: its disks tracked and served over NBD, its cycles, its state
machine and its health.

The export's event loop owns the machine's disks: cuts and cycles run there, between NBD requests, so a
cut is one instant across the machine's disks. The daemon's scheduler runs on the daemon's loop and hands
each cycle over.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

from ..errors import ReplicatorError
from ..orchestration import MachineState, MachineStats
from ..orchestration.states import Event, ReplicationState
from ..replication import DiskReplicator
from ..targets.factory import open_target
from ..tracking import TrackedDisk
from ..tracking.service import ExportService

log = logging.getLogger("replicatord")
S = ReplicationState

CYCLING_STATES = {S.ReadyForInitialReplication, S.InitialReplicationInProgress, S.Replicating, S.Error,
                  S.WaitingForStartResynchronize, S.Resynchronizing}


class PrimaryMachine:
    def __init__(self, machine, state_dir: str):
        self.name = machine.name
        self.settings = machine.protection
        self.state = MachineState.load(state_dir, machine.name)
        self.stats = MachineStats(machine.name, self.settings.frequency)
        p = self.settings
        self.target = open_target(p.target, cert=p.cert, key=p.key, ca=p.ca, kerberos=p.auth == "kerberos",
                                  bandwidth_limit=p.bandwidth_limit)
        self.disks: dict[str, TrackedDisk] = {}
        try:
            for path in machine.disks:
                self.disks[os.path.basename(path)] = TrackedDisk(path)
        except BaseException:
            for d in self.disks.values():
                d.close()
            raise
        sock_dir = os.path.join(state_dir, "nbd")
        os.makedirs(sock_dir, exist_ok=True)
        self.service = ExportService(self.disks, socket_path=os.path.join(sock_dir, f"{machine.name}.sock"))
        self.replicators = [DiskReplicator(d, self.target, compress=p.compression, name=n)
                            for n, d in self.disks.items()]
        self.last_result = None

    def start(self) -> None:
        self.service.start()
        for d in self.disks.values():
            if d.resync_required and self.state.state in (S.Replicating, S.Error):
                self.state.fire(Event.resync_needed, d.reason or "")

    # ------------------------------------------------------------------ scheduler hooks
    async def _on_export_loop(self, coro):
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.service.loop))

    async def cut(self) -> None:
        async def do():
            self.service.group.cut()
        await self._on_export_loop(do())

    async def run_cycle(self, consistency: str = "crash"):
        """One cycle of every disk; state transitions follow what the cycle had to do."""
        if self.state.state not in CYCLING_STATES:
            return None
        self._before_cycle()

        async def do():
            return [await r.run_cycle(consistency=consistency, cut=False) for r in self.replicators]
        try:
            results = await self._on_export_loop(do())
        except ReplicatorError as e:
            self._after_failure(e)
            raise
        self._after_success(results)
        return results

    def _before_cycle(self) -> None:
        st = self.state
        if st.state == S.ReadyForInitialReplication:
            st.fire(Event.start_initial, "initial replication over the network")
        elif any(d.resync_required for d in self.disks.values()):
            if st.state in (S.Replicating, S.Error):
                st.fire(Event.resync_needed, next(d.reason for d in self.disks.values() if d.reason))
            if st.state == S.WaitingForStartResynchronize and self.settings.resync == "auto":
                st.fire(Event.resync_start, "automatic resynchronization")

    def _after_success(self, results) -> None:
        st = self.state
        kinds = {r.kind for r in results}
        if st.state == S.InitialReplicationInProgress:
            st.fire(Event.initial_done, "initial replication complete")
        elif st.state == S.Resynchronizing:
            st.fire(Event.resync_done, "resynchronization complete")
        elif st.state == S.WaitingForStartResynchronize and "resync" in kinds:
            st.fire(Event.resync_start, "resynchronization")
            st.fire(Event.resync_done, "resynchronization complete")
        elif st.state == S.Error:
            st.fire(Event.recovered, "a cycle succeeded")
        self.stats.record_result(results)
        self.stats.resync_required = any(d.resync_required for d in self.disks.values())
        self.last_result = {"time": time.time(), "kinds": sorted(kinds),
                            "bytes_sent": sum(r.bytes_sent for r in results)}

    def _after_failure(self, e: ReplicatorError) -> None:
        self.stats.record_failure(e)
        log.error("%s: cycle failed: %s", self.name, e.message)
        if self.state.state == S.Replicating:
            self.state.fire(Event.error, e.message)
        elif self.state.state == S.InitialReplicationInProgress:
            self.state.fire(Event.initial_failed, e.message)

    async def cycle_now(self, consistency: str = "crash"):
        """An operator's "replicate now": cut, then ship (the scheduler cuts on its own ticks)."""
        await self.cut()
        return await self.run_cycle(consistency)

    async def planned_failover(self):
        """The primary stops (its NBD clients are disconnected and no more are accepted), a final cycle
        ships everything: zero data loss; the machine is then PreparedForFailover on the replica site."""
        async def stop_export():
            await self.service.server.close()
        await self._on_export_loop(stop_export())
        results = await self.cycle_now()
        self.state.fire(Event.prepare_failover, "planned failover: primary stopped, final cycle replicated")
        return results

    # ------------------------------------------------------------------ operations
    def pause(self) -> None:
        self.state.fire(Event.pause, "paused by the operator")

    def resume(self) -> None:
        self.state.fire(Event.resume, "resumed by the operator")

    def request_resync(self) -> None:
        for d in self.disks.values():
            if not d.resync_required:
                d._require_resync("resynchronization requested by the operator")
        if self.state.can(Event.resync_needed):
            self.state.fire(Event.resync_needed, "resynchronization requested by the operator")

    def status(self, now: float | None = None) -> dict:
        now = now or time.time()
        return {"name": self.name, "role": "primary", "state": self.state.state.name, "reason": self.state.reason,
                "since": self.state.since, "stats": self.stats.to_dict(now), "target": self.settings.target,
                "disks": {n: {"disk_id": str(d.disk.virtual_disk_id) if d.disk else None,
                              "tracking": d.state.state, "reason": d.reason, "nbd": self.service.uri(n)}
                          for n, d in self.disks.items()},
                "last_cycle": self.last_result}

    def stop(self) -> None:
        self.service._call(self.target.close())     # the target's session lives on the export's loop
        self.service.stop()

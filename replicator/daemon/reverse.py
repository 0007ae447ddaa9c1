"""Reverse replication and failback on a replica site (a part of ReplicaSite, daemon/replica_site.py).

After a failover the machine runs here; `reverse` makes it a protected machine replicating back to its
original site, generated from [replica.reverse] and the operator's settings and kept in
STATE_DIR/reverse/NAME.json. On that original site `accept_reverse` stops protecting the machine there and
adopts its old disks as the replica's starting point, so the first cycle is a checksum resync that sends
only the blocks that differ. Failback is a planned failover in the reverse direction (docs/states.md).
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from ..durable import fsync_dir, write_json_atomic
from ..errors import ReplicatorError, UsageError
from ..orchestration.settings import ConfigError, PROTECTION_KEYS, parse_machine
from ..orchestration.states import Event, MachineState, ReplicationState, StateError

if TYPE_CHECKING:
    from .replica_site import ReplicatedMachine

log = logging.getLogger("replicatord")
S = ReplicationState
RUNNING_HERE = (S.FailedOverWaitingCompletion, S.FailedOver)     # a failed-over machine runs on this site


class ReverseReplication:
    """Methods of ReplicaSite: they use its machines, states and locks."""

    # ------------------------------------------------------------------ reverse replication
    async def reverse(self, name: str, settings: dict) -> dict:
        """The failed-over machine becomes a protected machine replicating back to its original site, which
        must have accepted it (accept-reverse: its old disks are the starting point, only differences travel)."""
        m = self._machine(name)
        st = self._replica_state(m)
        fo = st.data.get("failover")
        if st.state not in RUNNING_HERE or not fo:
            raise StateError(f"{name}: reverse replication needs a failed-over machine (state {st.state.value})")
        settings = dict(settings)
        full_copy = bool(settings.pop("full_copy", False))
        machine, raw = self._reverse_machine(name, fo, settings)
        self._begin(name)
        try:
            if not full_copy:
                await self._check_other_site(machine, m)
            await self._stop_here(name)
            planned = fo.get("kind") == "planned"
            st.fire(Event.reverse_in_sync if planned else Event.reverse,
                    f"reverse replication to {machine.protection.target}" + ("" if planned else
                    ": a checksum resync levels the other site's copy first"))
            st.data.update(role="primary", failed_over=st.data.pop("failover"))
            st.save()
            if raw is not None:
                write_json_atomic(os.path.join(self.state_dir, "reverse", f"{name}.json"), {"machine": raw})
            self.handed_over.pop(name, None)
            await self._protect(machine)
        finally:
            self.busy.discard(name)
        return self.daemon.machines[name].status()

    def _reverse_machine(self, name: str, fo: dict, settings: dict):
        """The machine to protect: the configured one when this site was its primary (failback), else one
        generated from [replica.reverse] and the operator's settings (returned raw, to be kept)."""
        if name in self.handed_over:
            if settings:
                raise UsageError(f"{name} is a configured machine of this site: its protection settings come from "
                                 f"the configuration, not from reverse ({', '.join(settings)})")
            return self.handed_over[name], None
        unknown = sorted(set(settings) - PROTECTION_KEYS)
        if unknown:
            raise ConfigError([(k, f"unknown key (known: {', '.join(sorted(PROTECTION_KEYS))}, full_copy)")
                               for k in unknown], "reverse")
        raw = {**(self.settings.reverse if self.settings else {}), **settings, "name": name,
               "disks": list(fo["paths"].values())}
        dom = fo.get("domain") or {}
        if dom.get("targets"):                                # the domain the failover booted here: protected
            raw.update(domain=dom["name"], libvirt=dom["libvirt"],   # with its disks, shut down by a failback
                       disks={t: fo["paths"][i] for t, i in dom["targets"].items() if i in fo["paths"]})
        return parse_machine(raw, base_dir=self.state_dir, source="reverse"), raw

    async def _check_other_site(self, machine, m: ReplicatedMachine) -> None:
        """The other site must hold a copy of each disk (it accepted reverse replication), or the first cycle
        would be a full copy over the network."""
        from ..targets.factory import open_target
        p = machine.protection
        target = open_target(p.target, cert=p.cert, key=p.key, ca=p.ca, kerberos=p.auth == "kerberos", retries=1)
        try:
            accept = f"run `replicator replica-machine {m.name} accept-reverse` on that site first"
            for d in m.disks:
                try:
                    info = await target.disk_info(d.id)
                except ReplicatorError as e:
                    raise StateError(f"{m.name}: {p.target} holds no copy of {d.name} ({e.message}): {accept}, "
                                     "or reverse with full_copy for an initial replication over the network") \
                        from None
                if info.failed_over:
                    raise StateError(f"{m.name}: {p.target} still runs the machine (its copy of {d.name} is failed "
                                     f"over there): {accept}")
        finally:
            await target.close()

    async def accept_reverse(self, name: str, principal: str | None = None, force: bool = False) -> dict:
        """On the former primary: stop protecting the machine and adopt its disks as the replica the other
        site (where it failed over) replicates back into."""
        if principal is not None and not isinstance(principal, str):     # a peer's or an operator's JSON
            raise UsageError(f"accept-reverse: from must be a principal, not {principal!r:.40}")
        pm = self.daemon.machines.get(name)
        if pm is None:
            from .replica_site import NotFound
            raise NotFound(f"{name} is not a protected machine of this site")
        planned = pm.state.state in (S.PreparedForFailover, S.FailbackComplete)
        event = Event.reverse_in_sync if planned else Event.reverse
        if pm.state.state is S.Replicating and not force:
            raise StateError(f"{name} is Replicating from this site, so its replica site has not refused a cycle: "
                             "fail it over there first (planned: `replicator machine NAME planned-failover` here), "
                             "or pass force when this site was cut off")
        if not pm.state.can(event):
            raise StateError(f"{name}: accepting reverse replication is not possible in state {pm.state.state.value}")
        store = self._store_for(principal, name)
        disks = {str(d.virtual_disk_id): (n, d.path) for n, d in pm.disks.items()}
        self._begin(name)
        try:
            await self._unprotect(name)
            for disk_id, (disk_name, path) in disks.items():
                await self._adopt(store, disk_id, disk_name, path, name)
            st = MachineState.load(self.state_dir, name)
            st.fire(event, "this site holds the replica now: the machine runs on the other site, which replicates "
                           "it back here" + ("" if planned else " after a checksum resync"))
            st.data.update(role="replica", primary_disks={i: p for i, (_, p) in disks.items()})
            st.save()
            self._forget_protection(name)
        finally:
            self.busy.discard(name)
        return self.view(self._machine(name))

    def _store_for(self, principal: str | None, name: str):
        server = self._server()
        if principal:
            return server.store_for(principal)
        stores = server.stores()
        if len(stores) != 1:
            raise UsageError(f"this replica site has {len(stores)} storage roots ({', '.join(stores)}): say which "
                             f"site will replicate {name} here (from = its certificate name or principal)")
        return next(iter(stores.values()))

    async def _adopt(self, store, disk_id: str, disk_name: str, path: str, machine: str) -> None:
        """The former primary's disk becomes the replica's base (an older replica of it is retired)."""
        for other in self._server().stores().values():
            if disk_id in other.disk_ids():
                async with self._server().disk_lock(other, disk_id):
                    old = await asyncio.to_thread(other.retire, disk_id)
                log.info("%s: the old replica of %s moved to %s", machine, disk_name, old)
        async with self._server().disk_lock(store, disk_id):
            await asyncio.to_thread(store.adopt, disk_id, path, name=disk_name, machine=machine)

    def _forget_protection(self, name: str) -> None:
        generated = os.path.join(self.state_dir, "reverse", f"{name}.json")
        if os.path.exists(generated):
            os.unlink(generated)
            fsync_dir(os.path.dirname(generated))
        for m in self.daemon.config.machines:
            if m.name == name:
                self.handed_over[name] = m
        self.daemon.config.machines[:] = [m for m in self.daemon.config.machines if m.name != name]

    # ------------------------------------------------------------------ protecting from here
    async def _protect(self, machine) -> None:
        """As the daemon starts a configured machine (daemon/main.py)."""
        d = self.daemon
        d.protect(machine)
        if all(m.name != machine.name for m in d.config.machines):
            d.config.machines.append(machine)

    async def _unprotect(self, name: str) -> None:
        d = self.daemon
        if name in d.scheduler.machines:
            await d.scheduler.wait_idle(name)
            await d.scheduler.remove(name)
        pm = d.machines.pop(name)
        await asyncio.gather(*pm.tasks, return_exceptions=True)
        await pm.stop(final=True)           # the disks become the replica: their export ends for good

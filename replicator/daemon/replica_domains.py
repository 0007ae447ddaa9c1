"""The machines' domains on the replica site (a part of ReplicaSite, daemon/replica_site.py; domains.py does
the hypervisor's work): a test failover or a failover boots the machine's replicated domain, a booted
domain is followed until it runs and its guest agent answers guest-ping, then its failover IPs are set in
the guest (recovery plans wait for that before their next group); a domain paused on the I/O error of a
restart is resumed; cleanup and cancel remove it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

from ..errors import ReplicatorError
from ..hypervisor import DomainConfig
from ..orchestration import failover_ips
from ..orchestration.states import MachineState
from . import domains

if TYPE_CHECKING:
    from .replica_site import ReplicatedMachine

log = logging.getLogger("replicatord")


class ReplicaDomains:
    """Methods of ReplicaSite: they use its machines, states and settings."""

    def _domain_payload(self, m: ReplicatedMachine) -> dict | None:
        """The machine's replicated domain configuration when this site boots domains ([replica] libvirt)."""
        if not self.settings.libvirt:
            return None
        return domains.replicated_domain([d.disk.path for d in m.disks])

    async def _boot_test(self, m: ReplicatedMachine, st: MachineState, made: dict[str, str],
                         unplugged: bool = False) -> None:
        """`NAME - Test` on the test disks' exports, every NIC on the isolated test network (or, `unplugged`,
        connected to nothing), started."""
        payload = self._domain_payload(m)
        if payload is None:
            return
        sock = self._socket(f"{m.name}.test")
        sources = {d.id: (sock, os.path.basename(made[d.name])) for d in m.disks if d.name in made}
        name = f"{payload['domain']['name']} - Test"
        info = await asyncio.to_thread(domains.boot, self.settings.libvirt, payload, name, sources, {},
                                       test_network=None if unplugged else self.settings.test_network,
                                       console=os.path.join(st.test_failover["path"], "console.log"), test=True)
        for note in info["notes"]:
            log.info("%s: test failover: %s", m.name, note)
        log.info("%s: test failover: domain %r started %s", m.name, name, "with its NICs connected to nothing"
                 if unplugged else f"on the isolated network {self.settings.test_network!r}")
        st.test_failover["domain"] = info
        st.save()
        self._settle(m.name, "test", info, payload)

    async def _boot_failover(self, m: ReplicatedMachine, st: MachineState, job) -> None:
        """The domain defined under its own name on the failed-over disks' exports, its NICs on the networks
        network_map gives (the others unplugged, said in the job's log), started."""
        payload = self._domain_payload(m)
        fo = st.data["failover"]
        if payload is None:
            if self.settings.libvirt:
                job.note(f"no replicated domain configuration of {m.name}: its disks are served over NBD only")
            return
        name = payload["domain"]["name"]
        sock = self._socket(m.name)
        sources = {d.id: (sock, os.path.basename(fo["paths"][d.id])) for d in m.disks}
        folder = os.path.dirname(next(iter(fo["paths"].values())))
        info = await asyncio.to_thread(domains.boot, self.settings.libvirt, payload, name, sources,
                                       self.settings.network_map, console=os.path.join(folder, f"{m.name}.console.log"))
        for note in info["notes"]:
            job.note(f"domain {name!r}: {note}")
        job.note(f"domain {name!r} defined and started (uuid {info['uuid']})")
        fo["domain"] = info
        st.save()
        self._settle(m.name, "failover", info, payload, ips=not info.get("existing"))

    # ------------------------------------------------------------------ after the boot
    def _settle(self, name: str, where: str, info: dict, payload: dict, ips: bool = True) -> None:
        """Follow the booted domain in the background until it runs and its agent answers guest-ping, then
        set its failover IPs (`ips`: not on a domain that was defined here before, a failback: its own
        settings are in the guest); the outcome goes to the domain's record (`settled`) and the log.
        Recovery plans wait for it (`booted`)."""
        async def run() -> dict:
            try:
                out = await asyncio.to_thread(domains.settle, info["libvirt"], info["name"], payload,
                                              self.settings.boot_timeout, ips)
            except ReplicatorError as e:
                log.error("%s: domain %r: %s", name, info["name"], e.message)
                self._record_settled(name, where, info, {"error": e.message})
                raise
            for net, address in out["ips"].items():
                log.info("%s: domain %r: failover IP of %s: %s", name, info["name"], net, address)
            for note in out["notes"]:
                log.info("%s: domain %r: %s", name, info["name"], note)
            self._record_settled(name, where, info, out)
            return out
        self._cancel_settle(name)
        task = asyncio.create_task(run(), name=f"settle-{name}")
        task.add_done_callback(lambda t: t.cancelled() or t.exception())    # retrieved: no "never retrieved"
        self.settling[name] = task

    def _record_settled(self, name: str, where: str, info: dict, out: dict) -> None:
        st = self._state(name)
        rec = (st.test_failover or {}).get("domain") if where == "test" else (st.data.get("failover") or {}).get("domain")
        if rec and rec.get("uuid") == info["uuid"] and rec.get("started") == info["started"]:
            rec["settled"] = out
            st.save()

    def _cancel_settle(self, name: str) -> None:
        task = self.settling.pop(name, None)
        if task is not None and not task.done():
            task.cancel()

    async def booted(self, name: str) -> str | None:
        """Wait until the machine's domain booted by the last test failover or failover runs and its agent
        answered guest-ping (and its failover IPs were set); what it took, or None when no domain was booted.
        Raises the reason when it does not run or answer within [replica] boot_timeout."""
        task = self.settling.get(name)
        if task is None:
            return None
        out = await asyncio.shield(task)
        text = f"running after {out['running']} s"
        if out["agent"] is not None:
            text += f", its guest agent answered guest-ping after {out['agent']} s"
        if out["ips"]:
            text += "; failover IPs: " + ", ".join(f"{k} {v}" for k, v in out["ips"].items())
        return text + "".join(f"; {n}" for n in out["notes"])

    def failover_ip_env(self, members) -> dict[str, str]:
        """REPLICATOR_IP_<MACHINE>_NET<k> = ADDRESS/PREFIX of every member's failover IPs, from its
        replicated configuration (with or without [replica] libvirt): for recovery-plan scripts."""
        env, machines = {}, self.machines()
        for name in members:
            m = machines.get(name)
            payload = domains.replicated_domain([d.disk.path for d in m.disks]) if m is not None else None
            if not payload:
                continue
            nics = DomainConfig.from_dict(payload["domain"]).nics
            found, _ = failover_ips.resolve(failover_ips.from_payload(payload.get("failover_ips")), nics)
            for k, _, ip in found:
                env[failover_ips.env_name(name, k)] = ip.address
        return env

    async def _remove_domain(self, name: str, info: dict | None, job=None) -> None:
        self._cancel_settle(name)
        if not info:
            return
        for done in await asyncio.to_thread(domains.remove, info["libvirt"], info["name"], info.get("network"),
                                            undefine=not info.get("existing")):
            log.info("%s: %s", name, done)
            if job is not None:
                job.note(done)

    async def _resume_domain(self, name: str, info: dict | None) -> bool | None:
        """A domain whose NBD exports this daemon serves again (a restart) was paused on the I/O error."""
        if not info:
            return None
        try:
            resumed = await asyncio.to_thread(domains.resume_paused, info["libvirt"], info["name"])
        except ReplicatorError as e:
            log.error("%s: domain %r could not be resumed: %s", name, info["name"], e.message)
            return False
        if resumed is not None:
            log.log(logging.INFO if resumed else logging.ERROR, "%s: domain %r %s", name, info["name"],
                    "was paused on an I/O error; resumed" if resumed else "stays paused on an I/O error")
        return resumed

    async def _watch_domains(self, every: float = 3.0, backoff: float = 30.0) -> None:
        """The domains booted on exports this site serves (test failovers, failovers) pause on an I/O error
        when their exports went away (a restart) and the guest's next request found them gone, which may be
        after the restart: each one paused while served is resumed (a resume that did not hold is tried
        again after `backoff` seconds)."""
        later: dict[str, float] = {}
        while True:
            await asyncio.sleep(every)
            for name in [*self.testing, *self.running]:
                if name in self.busy or later.get(name, 0) > time.monotonic():
                    continue
                st = self._state(name)
                info = (st.test_failover or {}).get("domain") if name in self.testing else \
                    (st.data.get("failover") or {}).get("domain")
                if await self._resume_domain(name, info) is False:
                    later[name] = time.monotonic() + backoff


"""Machines that are libvirt domains (issue 13): what replicatord does with the domain around its disks.

On the primary site (`DomainProtection`, used by PrimaryMachine for a `[[machine]]` with `domain = NAME`):
- before the export takes the disks, the domain is checked: it exists and is persistent, each of its disks
  is either mapped to a VHDX file (`disks = { vda = "/srv/web1.vhdx" }`) or excluded (`exclude = ["vdb"]`),
  every mapped VHDX exists (else the refusal says how to make it: `replicator vhdx convert`), and those disks
  were not written after their VHDX was made. A domain running on its own disks has its persistent
  definition pointed at the export at once, and is then switched onto the export while it runs (the export
  started for it, each disk copied in and the guest pivoted onto it: `_LiveSwitch`, `disks_pointed: live`),
  or -- `live_switch = false`, or the switch failed -- protected from its next boot: the machine's reason
  says `protection: pending next boot`, and once the domain is shut off each VHDX is made again from the
  disk it ran on (what it wrote there is not lost) before the export starts;
- then the mapped disks are pointed at the export (Hypervisor.point_disks_at_export: NBD over the export's
  Unix socket, export names = the VHDX file names, error_policy='stop'); the disks' previous definitions are
  kept in the machine's state file (data["domain"]["originals"], and in data["protection"] for removal.py);
- after the export process was restarted, a domain paused on the I/O error is resumed;
- with every cycle the domain's configuration (DomainConfig as JSON, with the disk target -> replica disk
  id mapping) is written next to the replica: `domain.json` in each replica disk's folder (local store, or
  the peer's PUT /v1/disks/ID/domain); Azure targets do not keep it.

On the replica site (`replicated_domain`, `boot`, `remove`, used by ReplicaSite): a test failover or a
failover defines the domain from the newest replicated configuration (`NAME - Test` on the isolated test
network, or NAME on the networks `[replica] network_map` maps to), each replicated disk on its failed-over
data served over NBD, and starts it; cleanup and cancel destroy and undefine it.

Every hypervisor call is blocking (libvirt-python): callers run them in a thread (asyncio.to_thread), each on
a connection of its own, closed at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import threading
import time

from ..durable import write_json_atomic
from ..errors import DomainExists, DomainStateError, GuestAgentError, HypervisorError, ReplicatorError, UsageError
from ..hypervisor import LIVE, NEXT_BOOT, NOW, DomainConfig, DomainState, Hypervisor
from ..orchestration import failover_ips

log = logging.getLogger("replicatord")
CONFIG_FILE = "domain.json"         # in a replica disk's folder: the machine's replicated domain configuration
CONFIG_VERSION = 1
MAX_CONFIG = 1 << 20                # bytes: a replicated configuration is a few KiB
STATE_EVERY = 2.0                   # seconds between two looks at the domain's state (status)
RESUME_TIMEOUT = 30.0               # seconds a resume keeps trying (the guest may pause again at first)
RESUME_BACKOFF = 30.0               # seconds before a resume that did not hold is tried again
SHUTDOWN_TIMEOUT = 120.0            # seconds a planned failover gives the guest to shut down before powering it off


def convert_hint(path: str) -> str:
    return (f"make it once from the domain's disk while the domain is shut off: `replicator vhdx convert -O vhdx "
            f"SOURCE {path}` (docs/operations.md, \"Protecting a libvirt domain\")")


def _on_export(disk, socket: str, export: str) -> bool:
    s = disk.source
    return s is not None and s.kind == "nbd" and s.socket == socket and s.export == export


class DomainProtection:
    """The domain of one protected machine (see the module's docstring)."""

    def __init__(self, machine, state):
        self.machine = machine.name
        self.name = machine.domain
        self.uri = machine.libvirt
        self.targets = dict(machine.targets)            # disk target -> VHDX path
        self.excluded = tuple(machine.excluded)         # disk targets not protected
        self.app_consistent = bool(machine.protection.app_consistent_hours)
        self.failover_ips = tuple(getattr(machine, "failover_ips", ()))   # FailoverIp: set after a failover
        self.live_switch = bool(getattr(machine, "live_switch", True))   # a running domain: onto the export now
        self.state = state                              # the machine's MachineState: data["domain"]
        self.seen: DomainState | None = None            # the domain's state at the last look
        self.seen_error: str | None = None
        self.seen_at = 0.0
        self.config_sent: dict | None = None            # the last configuration replicated: when, where
        self._watch: asyncio.Task | None = None
        self._export_up = lambda: False
        self._resume_after = 0.0

    def _open(self) -> Hypervisor:
        return Hypervisor.open(self.uri)

    @property
    def record(self) -> dict:
        return self.state.data.setdefault("domain", {})

    # ------------------------------------------------------------------ before the export starts
    def check(self, socket: str) -> DomainConfig:
        """Refused (a one-line reason) unless the domain can be protected now; `socket`: the export's."""
        missing = [(t, p) for t, p in self.targets.items() if not os.path.isfile(p)]
        if missing:
            t, p = missing[0]
            raise UsageError(f"{self.machine}: {t} of domain {self.name!r} is to be protected as {p}, which does "
                             f"not exist: {convert_hint(p)}")
        with self._open() as hv:
            config = hv.domain_config(self.name)
            st = hv.state(self.name)
        disks = {d.target: d for d in config.disks if d.device in ("disk", "lun")}
        unknown = sorted(t for t in self.targets if t not in disks)
        if unknown:
            raise UsageError(f"{self.machine}: domain {self.name!r} has no disk {', '.join(unknown)} (its disks: "
                             f"{', '.join(disks) or 'none'})")
        loose = sorted(t for t in disks if t not in self.targets and t not in self.excluded)
        if loose:
            raise UsageError(f"{self.machine}: disk {', '.join(loose)} of domain {self.name!r} is neither protected "
                             "(disks = { TARGET = VHDX }) nor excluded (exclude = [TARGET])")
        own = {t: disks[t] for t, p in self.targets.items() if not _on_export(disks[t], socket, os.path.basename(p))}
        if own and st.state != "shutoff":
            self._point_for_next_boot(own, socket)
        if self.record.get("pending"):
            self._pending_done(st)
            own = {}                                    # moved onto the export: nothing of their own to check
        for t, d in own.items():
            src, vhdx = d.source, self.targets[t]
            if src is not None and src.kind == "file" and os.path.isfile(src.path) \
                    and os.path.getmtime(src.path) > os.path.getmtime(vhdx):
                raise UsageError(f"{self.machine}: {src.path} ({t} of domain {self.name!r}) was written after {vhdx} "
                                 f"was made from it: {convert_hint(vhdx)}, again")
        for note in failover_ips.resolve(self.failover_ips, config.nics)[1]:
            log.warning("%s: %s (failover_ip)", self.machine, note)
        if self.failover_ips and not config.guest_agent:
            log.warning("%s: domain %r has no guest agent channel: its failover IPs will not be set in the guest "
                        "(recovery-plan scripts get them)", self.machine, self.name)
        if self.app_consistent and not config.guest_agent:
            log.warning("%s: domain %r has no guest agent channel (org.qemu.guest_agent.0): its application-"
                        "consistent points will be crash-consistent, with a warning each time", self.machine, self.name)
        return config

    # ------------------------------------------------------------------ a running domain: at its next boot
    def _point_for_next_boot(self, own: dict, socket: str) -> None:
        """A domain running on its own disks: its persistent definition is pointed at the export now (the
        running guest keeps its disks) and those disks are pending (`_pending_done`): switched onto the
        export live, or, when that is off or failed, once the domain is shut off each VHDX is made again from
        its disk (what the guest wrote there is not lost) before the export starts."""
        exports = {t: (socket, os.path.basename(self.targets[t])) for t in own}
        with self._open() as hv:
            _, originals = hv.point_disks_at_export(self.name, exports)
        rec = self.record
        rec.setdefault("originals", {}).update(originals)
        rec.update(name=self.name, uri=self.uri, socket=socket, disks_pointed=NEXT_BOOT,
                   pending=sorted(set(rec.get("pending") or ()) | set(own)))
        self.state.save()
        log.info("%s: domain %r runs on its own disks (%s): its definition uses the export from its next boot",
                 self.machine, self.name, ", ".join(_where(d) for d in own.values()))

    def _pending_reason(self, st: DomainState) -> str:
        return (f"protection: pending next boot: domain {self.name!r} is {st.state} on its own disks "
                f"({', '.join(sorted(self.record['pending']))}); its definition uses the export from its next boot. "
                "Once it is shut off, each VHDX is made again from its disk and protection starts (looked at every "
                "30 s; a start before then fails, the export does not serve yet)")

    def _pending_done(self, st: DomainState) -> None:
        """Protection pending the next boot: raises ProtectionPending until the domain is shut off and every
        VHDX was made again from the disk it ran on (in a thread: a large disk takes a while)."""
        rec = self.record
        if st.state != "shutoff":
            if not self.live_switch or rec.get("switch_error"):
                raise ProtectionPending(self._pending_reason(st) + (f" (the switch while it ran failed: "
                                                                    f"{rec['switch_error']})" if rec.get("switch_error")
                                                                    else ""))
            return self._switch_live()
        from .removal import original_disk
        for t in list(rec["pending"]):
            vhdx = self.targets[t]
            kind, path, fmt = original_disk(rec["originals"][t])
            if path is None:
                raise UsageError(f"{self.machine}: {t} of domain {self.name!r} was not a file or block device: its "
                                 f"VHDX cannot be made again from it: {convert_hint(vhdx)}, then remove "
                                 f"'pending' from the machine's state file")
            job = _REMAKES.get(vhdx)
            if job is None:
                _REMAKES[vhdx] = job = _Remake(path, fmt, vhdx)
                log.info("%s: domain %r is shut off: making %s again from %s", self.machine, self.name, vhdx, path)
                job.thread.join(2)                  # a small disk is done at once, a large one at a later look
            if job.running():
                raise ProtectionPending(f"protection: pending next boot: domain {self.name!r} is shut off; making "
                                        f"{vhdx} again from {path} (its disk until now)")
            del _REMAKES[vhdx]
            if job.error is not None:
                raise UsageError(f"{self.machine}: making {vhdx} again from {path} failed (tried again in 30 s): "
                                 f"{job.error}")
            rec["pending"].remove(t)
            self.state.save()
        rec.pop("pending")
        rec.pop("switch_error", None)
        rec["disks_pointed"] = NOW
        self.state.save()

    def _switch_live(self) -> None:
        """The running domain's pending disks copied into the export and switched onto it while it runs
        (Hypervisor.copy_to_export, in a thread with the machine's export started for it): raises
        ProtectionPending while under way, and when it failed (then the next boot is the switch)."""
        rec = self.record
        sw = _SWITCHES.get(self.machine)
        if sw is None:
            sw = _SWITCHES[self.machine] = _LiveSwitch(self, rec["socket"], list(rec["pending"]))
            log.info("%s: domain %r runs: copying %s into the export and switching onto it while it runs",
                     self.machine, self.name, ", ".join(rec["pending"]))
            sw.thread.join(2)                   # a small disk is done at once, a large one at a later look
        if sw.thread.is_alive():
            raise ProtectionPending(f"protection: switching live: domain {self.name!r} runs; copying {sw.progress} "
                                    "into the export, then its disks switch onto it while it runs")
        del _SWITCHES[self.machine]
        if sw.error is not None:
            rec["switch_error"] = sw.error
            self.state.save()
            log.error("%s: domain %r could not be switched onto the export while it runs (%s): protection starts at "
                      "its next boot", self.machine, self.name, sw.error)
            raise ProtectionPending(self._pending_reason(DomainState("running", "")) +
                                    f" (the switch while it ran failed: {sw.error})")
        rec.pop("pending")
        rec["disks_pointed"] = LIVE
        rec["live"] = {"time": time.time(), "error_policy": sw.policies}
        self.state.save()
        kept = {t: p for t, p in sw.policies.items() if p != "stop"}
        log.info("%s: domain %r switched onto the export while it runs%s", self.machine, self.name,
                 f"; until its next boot {', '.join(kept)} keep{'s' if len(kept) == 1 else ''} error policy "
                 f"{', '.join(sorted(set(kept.values())))} (an export restart gives the guest I/O errors)"
                 if kept else "")

    # ------------------------------------------------------------------ once the export serves
    def point(self, export) -> str:
        """Point the mapped disks at the export; returns NOW or NEXT_BOOT, also kept in the state file."""
        exports = {t: (export.nbd_socket, os.path.basename(p)) for t, p in self.targets.items()}
        with self._open() as hv:
            mode, originals = hv.point_disks_at_export(self.name, exports)
            self.seen, self.seen_at = hv.state(self.name), time.monotonic()
        rec = self.record
        stored = rec.setdefault("originals", {})
        stored.update(originals)
        if originals or "disks_pointed" not in rec:
            rec["disks_pointed"] = mode if originals else NOW
        rec.update(name=self.name, uri=self.uri, targets={t: os.path.basename(p) for t, p in self.targets.items()},
                   socket=export.nbd_socket)
        if originals:
            log.info("%s: disk%s %s of domain %r now on the export %s (%s)", self.machine,
                     "s" if len(originals) > 1 else "", ", ".join(sorted(originals)), self.name, export.nbd_socket,
                     rec["disks_pointed"])
        return rec["disks_pointed"]

    def removal_record(self) -> dict:
        """What removal.py needs to give the domain its disks back."""
        rec = self.record
        return {"name": self.name, "uri": self.uri, "originals": dict(rec.get("originals") or {}),
                "targets": dict(self.targets)}

    # ------------------------------------------------------------------ while protected
    def start(self, export_up) -> None:
        """Look at the domain every STATE_EVERY seconds (status); one paused on an I/O error while the
        export serves (`export_up()`) -- its export went away and came back, e.g. while replicatord was
        down, or before the guest's next request found it gone -- is resumed."""
        self._export_up = export_up
        self._watch = asyncio.create_task(self._look_every(), name=f"domain-{self.machine}")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch

    async def _look_every(self) -> None:
        while True:
            st = await self.look()
            if st is not None and st.paused_on_io_error and self._export_up() \
                    and time.monotonic() >= self._resume_after:
                await self.resume_if_paused("its export serves")
            await asyncio.sleep(STATE_EVERY)

    async def look(self) -> DomainState | None:
        def get():
            with self._open() as hv:
                return hv.state(self.name)
        try:
            self.seen, self.seen_error = await asyncio.to_thread(get), None
        except ReplicatorError as e:
            self.seen, self.seen_error = None, e.message
        self.seen_at = time.monotonic()
        return self.seen

    async def resume_if_paused(self, why: str) -> bool:
        """Resume the domain when it is paused on an I/O error (its export went away and is back)."""
        def resume():
            with self._open() as hv:
                if not hv.state(self.name).paused_on_io_error:
                    return None
                return hv.resume(self.name, timeout=RESUME_TIMEOUT)
        try:
            done = await asyncio.to_thread(resume)
        except ReplicatorError as e:
            log.error("%s: domain %r could not be resumed (%s): %s", self.machine, self.name, why, e.message)
            return False
        if done is None:
            return False
        if done:
            log.info("%s: domain %r was paused on an I/O error; resumed (%s)", self.machine, self.name, why)
        else:
            self._resume_after = time.monotonic() + RESUME_BACKOFF
            log.error("%s: domain %r pauses again on I/O errors although %s (tried %d s; again in %d s)",
                      self.machine, self.name, why, RESUME_TIMEOUT, RESUME_BACKOFF)
        await self.look()
        return bool(done)

    async def shut_down(self, job=None, timeout: float = SHUTDOWN_TIMEOUT) -> str:
        """A planned failover stops the guest before the final cycle, so everything it wrote goes with it:
        a clean shutdown (through its guest agent, else ACPI), powered off (destroy) after `timeout` s."""
        def run() -> str:
            with self._open() as hv:
                if hv.state(self.name).state == "shutoff":
                    return "shut off already"
                t0 = time.monotonic()
                ways = ([True] if hv.domain_config(self.name).guest_agent and hv.agent_ping(self.name, 5) else []) \
                    + [False]
                for agent in ways:
                    try:
                        hv.shutdown(self.name, timeout=max(1.0, timeout - (time.monotonic() - t0)), agent=agent)
                        return (f"shut down cleanly in {time.monotonic() - t0:.1f} s "
                                f"({'guest agent' if agent else 'ACPI'})")
                    except GuestAgentError:
                        continue                    # the agent did not take it: ACPI, in the time left
                    except DomainStateError as e:
                        if hv.state(self.name).state == "shutoff":
                            return f"shut off in {time.monotonic() - t0:.1f} s"
                        why = e.message
                        break
                else:
                    why = "it could not be asked to"
                hv.destroy(self.name)
                return f"did not shut down cleanly ({why}): powered off (destroy)"
        done = await asyncio.to_thread(run)
        log.info("%s: planned failover: domain %r %s", self.machine, self.name, done)
        if job is not None:
            job.note(f"domain {self.name!r} {done}")
        await self.look()
        return done

    def view(self) -> dict:
        rec = self.record
        st = self.seen
        state = None if st is None else st.state + (f" ({st.reason})" if st.state == "paused" else "")
        return {"name": self.name, "libvirt": self.uri, "state": state, "error": self.seen_error,
                "disks_pointed": rec.get("disks_pointed"), "targets": rec.get("targets"),
                "excluded": list(self.excluded), "config_replicated": self.config_sent,
                **({"live": rec["live"]} if rec.get("disks_pointed") == LIVE and rec.get("live") else {})}

    # ------------------------------------------------------------------ the configuration, with every cycle
    async def replicate_config(self, target, disk_ids: dict[str, str]) -> bool:
        """Write the domain's configuration next to the replica; `disk_ids`: VHDX file name -> disk id.
        False when the target keeps no configuration (Azure); a failure is logged, never fails the cycle."""
        def read():
            with self._open() as hv:
                return hv.domain_config(self.name)
        try:
            config = await asyncio.to_thread(read)
            payload = {"version": CONFIG_VERSION, "machine": self.machine, "time": time.time(),
                       "domain": config.to_dict(), "excluded": list(self.excluded),
                       "failover_ips": failover_ips.to_payload(self.failover_ips),
                       "targets": {t: disk_ids[os.path.basename(p)] for t, p in self.targets.items()}}
            kept = await target.put_config(self.machine, payload, sorted(set(payload["targets"].values())))
        except Exception as e:          # noqa: BLE001 - never fails the cycle that replicated the disks
            log.warning("%s: the configuration of domain %r was not replicated: %s", self.machine, self.name,
                        getattr(e, "message", None) or f"{type(e).__name__}: {e}")
            return False
        if kept:
            self.config_sent = {"time": payload["time"], "uuid": config.uuid, "vcpus": config.vcpus,
                                "memory_kib": config.memory_kib, "networks": config.networks}
        elif self.config_sent is None:
            log.info("%s: target %s keeps no domain configuration: a failover there gives disks only",
                     self.machine, target.name)
            self.config_sent = {"time": None, "kept": False}
        return bool(kept)


class ProtectionPending(DomainStateError):
    """A running domain is protected from its next boot (status shows this as the machine's reason)."""


_REMAKES: dict[str, "_Remake"] = {}     # VHDX path -> its conversion from the domain's own disk, under way
_SWITCHES: dict[str, "_LiveSwitch"] = {}    # machine -> its running domain's switch onto the export, under way


class _LiveSwitch:
    """In a thread: the machine's export started (protection attaches to it later), each pending disk copied
    into it and the running guest switched onto it; the export stays up for the guest when this ends."""

    def __init__(self, dp: "DomainProtection", socket: str, targets: list[str]):
        self.error: str | None = None
        self.policies: dict[str, str] = {}          # target -> its error policy until the next boot
        self.progress = ", ".join(targets)
        paths = {os.path.basename(p): p for p in dp.targets.values()}
        exports = {t: os.path.basename(dp.targets[t]) for t in targets}
        self.thread = threading.Thread(target=self._run, args=(dp.machine, dp.uri, dp.name, paths, socket, exports),
                                       daemon=True, name=f"switch-{dp.machine}")
        self.thread.start()

    def _run(self, machine: str, uri: str, name: str, paths: dict, socket: str, exports: dict) -> None:
        from ..tracking.remote import ExportHandle
        try:
            export = ExportHandle(machine, paths, os.path.dirname(socket)).start()
            try:
                with Hypervisor.open(uri) as hv:
                    for t, name_ in exports.items():
                        def progress(done, total, t=t):
                            self.progress = f"{t} ({100 * done // total if total else 0}%)"
                        driver = hv.copy_to_export(name, t, export.nbd_socket, name_, progress)
                        self.policies[t] = driver.get("error_policy", "report")
            finally:
                export.detach()                     # the guest on it keeps it up; protection attaches to it
        except Exception as e:      # noqa: BLE001 - the machine's reason says it; the next boot is the switch
            self.error = getattr(e, "message", None) or f"{type(e).__name__}: {e}"


class _Remake:
    """The VHDX made again from a domain's own disk, in a thread, replacing it atomically: the project's
    copy for raw and VHD disks, qemu-img for the others (qcow2 ...)."""

    def __init__(self, source: str, fmt: str, vhdx: str):
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, args=(source, fmt, vhdx), daemon=True,
                                       name=f"remake-{os.path.basename(vhdx)}")
        self.thread.start()

    def running(self) -> bool:
        return self.thread.is_alive()

    def _run(self, source: str, fmt: str, vhdx: str) -> None:
        from ..disk.copy import copy_disk
        from ..disk.probe import create_disk, open_disk
        from ..durable import output_path
        from ..tracking.state import Sidecar
        try:
            with output_path(vhdx, replace=True) as tmp:
                if fmt in ("raw", "vpc"):
                    with open_disk(source, "vhd" if fmt == "vpc" else "raw") as src, \
                            create_disk(tmp, "vhdx", src.size, logical_sector_size=src.logical_sector_size) as dst:
                        copy_disk(src, dst)
                else:
                    done = subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "vhdx", "-o", "subformat=dynamic",
                                           source, tmp], capture_output=True, text=True)
                    if done.returncode != 0:
                        raise OSError(done.stderr.strip()[-300:])
            if os.path.isdir(Sidecar(vhdx).dir):        # tracking state of the VHDX it replaced
                shutil.rmtree(Sidecar(vhdx).dir)
        except Exception as e:      # noqa: BLE001 - reported as the machine's reason, tried again
            self.error = getattr(e, "message", None) or f"{type(e).__name__}: {e}"


def _where(disk) -> str:
    s = disk.source
    if s is None:
        return f"{disk.target}: empty"
    return f"{disk.target}: {s.path or s.socket}"


# ---------------------------------------------------------------------------------------------- replica side
def write_config(disk_dir: str, payload: dict) -> None:
    """Keep a replicated configuration in a replica disk's folder (atomic; the newest wins on read)."""
    check_payload(payload)
    write_json_atomic(os.path.join(disk_dir, CONFIG_FILE), payload)


def check_payload(payload) -> None:
    if not isinstance(payload, dict) or payload.get("version") != CONFIG_VERSION:
        raise UsageError(f"a domain configuration must be a JSON object of version {CONFIG_VERSION}")
    if not isinstance(payload.get("domain"), dict) or not isinstance(payload.get("targets"), dict) \
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in payload["targets"].items()):
        raise UsageError("a domain configuration needs domain (an object) and targets ({target: disk id})")
    if len(json.dumps(payload)) > MAX_CONFIG:
        raise UsageError(f"a domain configuration is at most {MAX_CONFIG} bytes")
    DomainConfig.from_dict(payload["domain"])          # HypervisorError when malformed


def replicated_domain(disk_dirs) -> dict | None:
    """The newest configuration kept in any of a machine's replica disk folders, or None."""
    best = None
    for d in disk_dirs:
        path = os.path.join(d, CONFIG_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                payload = json.load(f)
            check_payload(payload)
        except FileNotFoundError:
            continue
        except (OSError, ValueError, ReplicatorError) as e:
            log.warning("%s: unusable domain configuration: %s", path, getattr(e, "message", e))
            continue
        if best is None or float(payload.get("time") or 0) > float(best.get("time") or 0):
            best = payload
    return best


def boot(uri: str, payload: dict, name: str, sources: dict[str, tuple[str, str]], network_map: dict, *,
         test_network: str | None = None, console: str | None = None, test: bool = False) -> dict:
    """Define the domain `name` from a replicated configuration, each replicated disk on its failed-over data
    (`sources`: disk id -> (NBD socket, export)), its NICs on `network_map`'s networks (a test failover,
    `test`: every network on the isolated `test_network`, created on demand, or without one on none), and
    start it. Returns what was done (name, uuid, notes). Blocking: run it in a thread."""
    config = DomainConfig.from_dict(payload["domain"])
    disks, notes = {}, []
    for target, disk_id in sorted(payload["targets"].items()):
        if disk_id in sources:
            disks[target] = sources[disk_id]
        else:
            notes.append(f"{target}: its replica disk {disk_id} is not part of this failover, left out")
    if not disks:
        raise HypervisorError(f"{name}: none of the replicated disks of domain {config.name!r} is here")
    with Hypervisor.open(uri) as hv:
        if not test and hv.exists(name):
            return {**_start_existing(hv, name, disks, notes, uri), "targets": dict(payload["targets"])}
        if test:
            if test_network:
                hv.create_isolated_network(test_network)
            nmap = {n.source: test_network for n in config.nics if n.kind in ("network", "bridge") and n.source}
        else:
            nmap = dict(network_map)
        defined = None
        try:
            defined = hv.define(config, name, disks, nmap, console_path=console)
            hv.start(name)
        except BaseException:
            with contextlib.suppress(ReplicatorError):      # nothing of a failed boot stays behind
                if defined is not None:
                    hv.destroy(name)
                    hv.undefine(name)
                if test_network:
                    _delete_unused(hv, test_network)
            raise
    return {"name": defined.name, "uuid": defined.uuid, "notes": notes + list(defined.notes),
            "network": test_network, "libvirt": uri, "started": time.time(), "targets": dict(payload["targets"])}


def _start_existing(hv, name: str, disks: dict, notes: list, uri: str) -> dict:
    """A failover onto a site where the domain is defined already (a failback to the original site, whose
    definition points at the very exports this site now serves): started as it is, never redefined."""
    have = hv.domain_config(name)
    wrong = []
    for target, (socket, export) in disks.items():
        try:
            ok = _on_export(have.disk(target), socket, export)
        except KeyError:
            ok = False
        if not ok:
            wrong.append(target)
    if wrong:
        raise DomainExists(f"a domain named {name!r} is already defined on this site and its disk"
                           f"{'s' if len(wrong) > 1 else ''} {', '.join(wrong)} not the failed-over data: undefine or "
                           "rename it, or point it at the exports `replicator replica-machines` lists")
    if hv.state(name).state == "shutoff":
        hv.start(name)
        notes.append("the domain defined on this site already uses the failed-over disks: started as it is")
    else:
        notes.append("the domain defined on this site already uses the failed-over disks and is "
                     f"{hv.state(name).state}")
    return {"name": name, "uuid": have.uuid, "notes": notes, "network": None, "libvirt": uri,
            "started": time.time(), "existing": True}


def remove(uri: str, name: str, network: str | None = None, undefine: bool = True) -> list[str]:
    """Destroy and undefine the domain (gone already: nothing to do; undefine=False: a definition that was
    there before the failover, stopped only); delete `network` when no other domain has a NIC on it.
    Returns what was done. Blocking: run it in a thread."""
    done = []
    with Hypervisor.open(uri) as hv:
        if hv.exists(name):
            hv.destroy(name)
            if undefine:
                hv.undefine(name)
            done.append(f"domain {name!r} destroyed" + (" and undefined" if undefine else " (its definition stays)"))
        if network:
            done += _delete_unused(hv, network)
    return done


def _delete_unused(hv, network: str) -> list[str]:
    """Delete the network unless a domain has a NIC on it."""
    if not hv.network_exists(network):
        return []
    users = [d for d in hv.list_domains() if any(n.source == network for n in hv.domain_config(d).nics)]
    if users:
        return [f"network {network!r} kept: {', '.join(users)} use{'s' if len(users) == 1 else ''} it"]
    hv.delete_network(network)
    return [f"network {network!r} deleted"]


def settle(uri: str, name: str, payload: dict, timeout: float, ips: bool = True) -> dict:
    """After a boot: wait until the domain runs and, with a guest agent, answers guest-ping; then set the
    failover IPs in the guest (`ips`). Returns {running, agent: seconds after the start, ips: {netK: address
    or the error}, notes}. Raises when the domain does not run or its agent does not answer in `timeout`
    seconds. Blocking: run it in a thread."""
    config = DomainConfig.from_dict(payload["domain"])
    wanted, notes = failover_ips.resolve(failover_ips.from_payload(payload.get("failover_ips")) if ips else (),
                                         config.nics)
    out: dict = {"running": None, "agent": None, "ips": {}, "notes": notes}
    t0 = time.monotonic()
    with Hypervisor.open(uri) as hv:
        hv.wait_running(name, timeout)
        out["running"] = round(time.monotonic() - t0, 1)
        if not config.guest_agent:
            notes.append("no guest agent channel: running is all there is to wait for"
                         + ("; the failover IPs are not set in the guest (recovery-plan scripts get them)"
                            if wanted else ""))
            return out
        hv.guest_ping(name, max(1.0, timeout - (time.monotonic() - t0)))
        out["agent"] = round(time.monotonic() - t0, 1)
        for k, mac, ip in wanted:
            out["ips"][f"net{k}"] = _set_ip(hv, name, mac, ip)
    return out


def _set_ip(hv, name: str, mac: str, ip, wait: float = 30) -> str:
    """The address set on the guest's NIC (retried while the guest has not brought that NIC up yet: its
    driver may load after the agent started); returns the address, or the error."""
    deadline = time.monotonic() + wait
    while True:
        try:
            hv.set_guest_ip(name, mac, ip.address, ip.gateway)
            return ip.address
        except ReplicatorError as e:
            if "no interface with MAC" not in e.message or time.monotonic() > deadline:
                return f"not set: {e.message}"
        time.sleep(0.5)


def resume_paused(uri: str, name: str) -> bool | None:
    """Resume a domain paused on an I/O error (its NBD export came back); None when it was not paused."""
    with Hypervisor.open(uri) as hv:
        if not hv.exists(name) or not hv.state(name).paused_on_io_error:
            return None
        return hv.resume(name, timeout=RESUME_TIMEOUT)

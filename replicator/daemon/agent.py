"""The host side of the controller channel (docs/management-plane.md): replicatord run from what the
controller wants of this host, pulled, applied, reported, its certificate renewed -- and, when the controller is
away, replicatord keeps running from the last desired document it received (STATE/controller/desired.json).

The agent is one asyncio task on the daemon's loop, outside the data path: it only talks HTTPS to the
controller (aiohttp, this host's certificate), writes small files and asks for the daemon's ordinary reload
(serve() in main.py: the parts restart on the new configuration, the guests' exports stay). Every poll
(10 s by default):
  1. GET /v1/hosts/self/desired. A new revision is validated with the configuration loader; a valid one is
     written to desired.json (and its fencing part to fencing.json, daemon/fencing.py), then the daemon
     reloads; an invalid one changes nothing and is reported as a problem.
  2. POST /v1/renew once two thirds of the certificate's lifetime have passed (same key, new certificate),
     then a reload so the replica listener and the peers' TLS use it.
  3. POST /v1/hosts/self/report: the revision running, the daemon's status document, its jobs, problems;
     a replica host adds its recovery points per machine and its extended legs' status.
An unreachable controller is noted ("unreachable since ...") in the status document and the log (once);
a controller that refuses this host (removed, certificate expired) is said in one line, and the daemon goes on.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
from collections.abc import Callable

import aiohttp

from ..durable import write_json_atomic
from ..errors import ReplicatorError
from ..orchestration.settings import ConfigError, parse_config_data
from . import fencing, site_operations
from .enrol import HostFiles, _error_of, reason

log = logging.getLogger("replicatord.agent")
POLL_INTERVAL = 10.0
TIMEOUT = aiohttp.ClientTimeout(total=15)
_UNREACHABLE = (aiohttp.ClientError, TimeoutError, OSError)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


REPORTED_POINTS = 32         # per machine, the newest (the controller keeps up to 64)
REPORTED_MACHINES = 2000     # the controller refuses more in one report
REPORTED_LEGS = 200          # likewise for extended legs


def replica_points(daemon) -> dict[str, list[dict]] | None:
    """A replica host's recovery points per machine it holds (the replica site's view: points at which all
    the machine's disks are at one cut), the newest REPORTED_POINTS each. Read from the disks' state already
    in memory; None when the stores cannot be read now (the controller keeps what it had). Whatever goes wrong
    here is logged and costs the points only: the report itself, and the agent's loop, must go on."""
    try:
        machines = daemon.site.machines()
        return {name: [{"point": p["point"], "time": p["time"], "consistency": p["consistency"],
                        "generations": p["generations"]} for p in rm.points()[-REPORTED_POINTS:]]
                for name, rm in list(machines.items())[:REPORTED_MACHINES]}
    except ReplicatorError as e:
        log.debug("recovery points not reported: %s", e.message)
    except Exception as e:      # noqa: BLE001 -- a disk half-made or moving under the view (the next report)
        log.warning("recovery points not reported this time: %s: %s", type(e).__name__, e)
    return None


class Refused(ReplicatorError):
    """The controller answered 401/403: it no longer knows this host (or its certificate)."""


class Agent:
    def __init__(self, state_dir: str, poll_interval: float = POLL_INTERVAL):
        self.files = HostFiles(state_dir)
        self.info = self.files.read_info()
        self.url = self.info["controller"]
        self.poll_interval = poll_interval
        self.applied = self._held_revision()      # desired.json's revision (accepted)
        self.running: int | None = None           # the revision the running daemon started on
        self.latest: int | None = None            # the newest the controller has said
        self.unreachable_since: dt.datetime | None = None
        self.refused: str | None = None
        self.problems: list[str] = []             # about the newest desired document, for the next report
        self.failed_revision: int | None = None   # validated but could not start: not tried again
        self.last_contact: dt.datetime | None = None
        self.last_away: dict | None = None        # {from, to}: the last time the controller was unreachable
        self.daemon = None                        # the running Daemon (serve() sets it at every start)
        self.reload: Callable[[], None] | None = None
        self._task: asyncio.Task | None = None
        self._operating: asyncio.Task | None = None
        self.operations_done: dict = {}           # operations.json: what was applied (resync jobs), reported
        self._operations_lock = asyncio.Lock()
        try:
            with open(self.files.operations, encoding="utf-8") as f:
                self.operations_done = json.load(f)
            site_operations.interrupted(self.operations_done)
        except (OSError, ValueError, AttributeError):
            pass

    def _held_revision(self) -> int:
        try:
            with open(self.files.desired, encoding="utf-8") as f:
                return int(json.load(f).get("revision", 0))
        except (OSError, ValueError, AttributeError):
            return 0

    # ------------------------------------------------------------------ talking to the controller
    async def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        """One request with this host's certificate; Refused on 401/403, ReplicatorError on another refusal,
        the _UNREACHABLE errors when the controller cannot be reached."""
        ctx = self.files.client_context()          # read every time: a renewal replaces the files
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            async with s.request(method, f"{self.url}{path}", json=body, ssl=ctx) as r:
                if r.status in (401, 403):
                    raise Refused(await _error_of(r))
                if r.status != 200:
                    raise ReplicatorError(f"{method} {path}: HTTP {r.status}: {await _error_of(r)}")
                return await r.json()

    async def fetch_desired(self) -> dict:
        doc = await self._call("GET", "/v1/hosts/self/desired")
        if not isinstance(doc, dict) or not isinstance(doc.get("revision"), int) or not isinstance(doc.get("config"),
                                                                                                   dict):
            raise ReplicatorError("the controller's desired document has no revision or config")
        self.latest = doc["revision"]
        return doc

    def _keep(self, doc: dict) -> list[str]:
        """Validate and write desired.json and fencing.json (on a worker thread: the writes are fsynced)."""
        parse_config_data(doc["config"], base_dir=self.files.dir, source=f"desired revision {doc['revision']}",
                          allow_empty=True)
        changes = fencing.update(self.files.state_dir, doc.get("fencing") or {})
        if os.path.exists(self.files.desired):           # what roll_back() returns to
            os.replace(self.files.desired, self.files.previous)
        write_json_atomic(self.files.desired, {**doc, "received_at": _now().isoformat()})
        return changes

    async def accept(self, doc: dict) -> bool:
        """Validate a desired document and keep it (desired.json, fencing.json); False if it is refused."""
        try:
            changes = await asyncio.to_thread(self._keep, doc)
        except ConfigError as e:
            self.problems = [f"desired revision {doc['revision']} refused, revision {self.applied} runs on: "
                             + "; ".join(f"{p}: {r}" for p, r in e.problems)]
            log.error("%s", self.problems[0])
            return False
        except ReplicatorError as e:
            self.problems = [f"desired revision {doc['revision']} refused: {e.message}"]
            log.error("%s", self.problems[0])
            return False
        for line in changes:
            log.info("fencing: %s", line)
        log.info("desired revision %d from the controller (was %d)", doc["revision"], self.applied)
        self.applied, self.problems = doc["revision"], []
        return True

    def roll_back(self, why: str) -> bool:
        """The daemon could not start on the newest desired document: back to the previous one (False if
        there is none). That revision is not tried again; the next one from the controller is."""
        if not os.path.exists(self.files.previous):
            return False
        failed = self.applied
        os.replace(self.files.previous, self.files.desired)
        self.applied, self.failed_revision = self._held_revision(), failed
        self.problems = [f"desired revision {failed} could not start ({why}): revision {self.applied} runs again"]
        log.error("%s", self.problems[0])
        return True

    async def renew_if_due(self) -> bool:
        renew_after = dt.datetime.fromisoformat(self.info["renew_after"])
        if _now() < renew_after:
            return False
        answer = await self._call("POST", "/v1/hosts/self/renew", {"csr": self.files.csr(self.info["hostname"])})
        self.info["renew_after"] = answer["renew_after"]
        await asyncio.to_thread(self.files.write_cert, answer["certificate"])
        await asyncio.to_thread(self.files.write_info, self.info)
        log.info("certificate renewed: valid until %s, renewed again after %s",
                 self.files.not_after().isoformat(), answer["renew_after"])
        return True

    async def report(self) -> None:
        daemon = self.daemon
        body = {"revision": self.running or 0, "problems": list(self.problems), "operations": self.operations_done,
                "status": daemon.status_document() if daemon is not None else {"machines": [], "replica": None},
                "jobs": daemon.jobs.summaries()[-50:] if daemon is not None else []}
        if daemon is not None and daemon.replica_server is not None:
            body["extended"] = [leg.status() for leg in daemon.replica_server.legs][:REPORTED_LEGS]
            points = replica_points(daemon)
            if points is not None:
                body["points"] = points
        answer = await self._call("POST", "/v1/hosts/self/report", body)
        if isinstance(answer.get("revision"), int):
            self.latest = answer["revision"]

    # ------------------------------------------------------------------ the loop
    async def poll_once(self) -> None:
        """One round: desired, renewal, report. Never raises: what went wrong is the agent's state."""
        try:
            doc = await self.fetch_desired()
            self._reached()
            changed = doc["revision"] not in (self.applied, self.failed_revision) and await self.accept(doc)
            renewed = await self.renew_if_due()
            if (changed or renewed) and self.reload is not None and self.daemon is not None:
                self.reload()
                self.daemon = None             # reported again once it runs the new revision (attach)
            elif self.daemon is not None or self.running is None:      # not while the daemon restarts
                await self.report()
        except Refused as e:
            self._refuse(e.message)
        except aiohttp.ClientConnectorCertificateError as e:
            why = getattr(e.certificate_error, "verify_message", None) or e.certificate_error
            self._refuse(f"the controller's certificate does not verify with the CA pinned at registration ({why})")
        except _UNREACHABLE as e:
            if self.files.not_after() <= _now():
                self._refuse(f"this host's certificate expired at {self.files.not_after().isoformat()}")
            if self.unreachable_since is None:
                self.unreachable_since = _now()
                log.warning("controller %s unreachable (%s): running on from desired revision %d", self.url,
                            reason(e), self.applied)
            return
        except ReplicatorError as e:
            log.error("controller %s: %s", self.url, e.message)

    def _refuse(self, why: str) -> None:
        """Said once in the log, and in the status until the controller answers again."""
        if self.refused != why:
            log.error("the controller refuses this host (%s): running on from desired revision %d; register "
                      "again with a new key if it was removed", why, self.applied)
        self.refused = why

    def _reached(self) -> None:
        """The controller answered: no longer unreachable (the time it was goes in the next report)."""
        if self.unreachable_since is not None:
            log.info("controller %s reachable again (unreachable since %s)", self.url,
                     self.unreachable_since.isoformat())
            self.last_away = {"from": self.unreachable_since.isoformat(timespec="seconds"),
                              "to": _now().isoformat(timespec="seconds")}
        self.unreachable_since, self.refused, self.last_contact = None, None, _now()

    async def first_config(self) -> None:
        """Before the daemon first starts without a desired.json: poll until the controller gave one."""
        while not os.path.exists(self.files.desired):
            await self.poll_once()
            if not os.path.exists(self.files.desired):
                await asyncio.sleep(self.poll_interval)

    async def _loop(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.poll_interval)

    def attach(self, daemon, reload: Callable[[], None]) -> None:
        """serve() started a daemon from desired.json: apply the document's operations, poll on."""
        self.daemon, self.reload, self.running = daemon, reload, self.applied
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="controller-agent")
        self._operating = asyncio.create_task(self.apply_operations(daemon), name="controller-operations")

    async def apply_operations(self, daemon) -> None:
        async with self._operations_lock:         # one daemon's round at a time (reloads come quickly)
            await self._apply_operations(daemon)

    async def _apply_operations(self, daemon) -> None:
        """The desired document's `operations`: pause or resume a machine when the controller's desired state
        for it changed since last applied, and run one resync per raise of its resync counter. Changes only:
        an operator's pause through the admin API stands until the controller says otherwise."""
        try:
            with open(self.files.desired, encoding="utf-8") as f:
                wanted = json.load(f).get("operations") or {}
            with open(self.files.operations, encoding="utf-8") as f:
                done = json.load(f)
        except FileNotFoundError:
            done = {}
        except (OSError, ValueError) as e:
            log.error("operations not applied: %s", e)
            return
        for name, op in sorted(wanted.items()):
            pm, last = daemon.machines.get(name), done.get(name)
            if pm is None or not isinstance(op, dict):
                continue
            # the host job of the last resync asked (or why it could not start): the controller's job follows it
            entry = {k: v for k, v in (last or {}).items() if k in ("resync_job", "resync_error", "site")}
            entry.update(state=op.get("state"), resync=op.get("resync", 0))
            try:
                if last is not None and op.get("state") != last.get("state") and op.get("state") in ("paused",
                                                                                                      "enabled"):
                    if op["state"] == "paused":
                        pm.pause()
                        daemon.scheduler.pause(name)
                    else:
                        pm.resume()
                        daemon.scheduler.resume(name)
                    log.info("%s: %s by the controller", name, "paused" if op["state"] == "paused" else "resumed")
                if last is not None and isinstance(op.get("resync"), int) and op["resync"] > last.get("resync", 0):
                    entry.pop("resync_job", None)
                    entry["resync_error"] = "not started"
                    done[name] = entry            # at most once: kept as asked before it starts
                    await asyncio.to_thread(write_json_atomic, self.files.operations, done)
                    job, _ = await pm.begin("resync")
                    entry["resync_job"] = job.id
                    del entry["resync_error"]
                    daemon.scheduler.resume(name)
                    log.info("%s: resynchronization asked by the controller (%s)", name, job.id)
            except ReplicatorError as e:
                self.problems.append(f"{name}: {e.message}")
                if "resync_error" in entry:
                    entry["resync_error"] = e.message
                log.error("%s: the controller's operation is refused: %s", name, e.message)
            done[name] = entry
        self.operations_done = done
        await asyncio.to_thread(write_json_atomic, self.files.operations, done)
        for name, step in site_operations.pending(wanted, done):     # the controller's failover steps
            rec = done.setdefault(name, {})["site"] = {"job": step["job"], "op": step["op"], "state": "running"}
            await asyncio.to_thread(write_json_atomic, self.files.operations, done)   # at most once
            log.info("%s: %s asked by the controller (job %d)", name, step["op"], step["job"])
            try:
                rec.update(await site_operations.run(daemon, name, step), state="succeeded")
            except ReplicatorError as e:
                rec.update(state="failed", error=e.message)
                log.error("%s: the controller's %s failed: %s", name, step["op"], e.message)
            await asyncio.to_thread(write_json_atomic, self.files.operations, done)

    async def stop(self) -> None:
        for task in (self._task, self._operating):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._task = self._operating = None

    def status(self) -> dict:
        """The `controller` part of the daemon's status document."""
        if self.refused:
            state = f"refused: {self.refused}"
        elif self.unreachable_since is not None:
            state = f"unreachable since {self.unreachable_since.isoformat(timespec='seconds')}"
        elif self.last_contact is not None:
            state = "connected"
        else:
            state = "not contacted yet"
        return {"url": self.url, "host_id": self.info["host_id"], "site": self.info.get("site"), "state": state,
                "revision": self.running, "latest_revision": self.latest, "problems": list(self.problems),
                "last_contact": self.last_contact.isoformat() if self.last_contact else None,
                "last_unreachable": self.last_away,
                "certificate_not_after": self.files.not_after().isoformat(),
                "renew_after": self.info["renew_after"]}

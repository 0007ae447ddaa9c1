"""`replicatord --config replicatord.toml`: the primary role (protected machines), the replica role
(listener with authorization entries and storage locations), or both; an admin API on loopback.

Admin API (127.0.0.1 only, `Authorization: Bearer TOKEN` with the token from the token file):
  GET  /v1/status                          every machine: state, reason, health, statistics, disks, running jobs
  GET  /metrics                            Prometheus text format
  GET  /v1/jobs[?machine=NAME&state=S]     jobs of this run and recent ones from before a restart
  GET  /v1/jobs/ID                         one job: progress (bytes, percent, rate, ETA) and its log
  POST /v1/machines/NAME/pause|resume|resync|cycle|planned-failover[?wait=0|1]
       resync, cycle and planned-failover run as a job; the answer carries it ("job"). wait=1 answers when
       the job has ended (default for cycle and planned-failover), wait=0 once it started (default for resync)
  POST /v1/machines/NAME/azure-failover|azure-test-failover[?point=N], azure-cleanup-test-failover,
       failback[?mode=minimize-downtime|full&final=1]
       Azure as the recovery site (azure/site.py): jobs too, wait=1 by default
  POST /v1/reload                          read the configuration again (as SIGHUP does); the answer says
                                           whether it was valid (an invalid one changes nothing)

Reloading, restarting or upgrading replicatord leaves every guest's disk connected: the machines' export
processes (tracking/shim.py) outlive the daemon, and the new one attaches to them.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import secrets
import signal
import sys

from aiohttp import web

from ..errors import CannotListen, ReplicatorError
from ..tracking import memlogs
from ..priority import check_replication_cpus, cpu_list, pin_replication, replication_behind_guests
from ..orchestration import (JobRegistry, MachineStats, Scheduler, load_config, provider_from_settings,
                             render_prometheus)
from ..orchestration.settings import ConfigError
from .primary import OPERATIONS, PrimaryMachine
from .replica_site import ReplicaSite

log = logging.getLogger("replicatord")
RETRY_UNAVAILABLE = float(os.environ.get("REPLICATOR_RETRY_UNAVAILABLE", "30"))   # seconds


async def _listen(site, what: str, setting: str) -> None:
    """Start a listener; a taken port is one line (CannotListen, exit 20), not a traceback."""
    try:
        await site.start()
    except OSError as e:
        raise CannotListen(f"{what} cannot listen on {site.name}: {e.strerror} (another server there? "
                           f"{setting})") from None


def ensure_token(path: str) -> str:
    """The admin token; created (mode 0600) on first start."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    with open(path) as f:
        return f.read().strip()


class Daemon:
    def __init__(self, config):
        self.config = config
        self.state_dir = config.daemon.state_dir
        os.makedirs(self.state_dir, exist_ok=True)
        self.machines: dict[str, PrimaryMachine] = {}
        self.unavailable: dict[str, str] = {}     # configured machines that cannot be protected now: why
        self.pending: set[str] = set()            # of those, running domains on their way to the export
        self._retrying: asyncio.Task | None = None
        self.replica_server = None
        self.scheduler = Scheduler(self._run_cycle, cut=self._cut, on_missed=self._missed,
                                   on_warning=lambda m, text: log.warning("%s: %s", m, text),
                                   on_result=self._result)
        self.stopping = asyncio.Event()
        self.reload_requested = None         # set by serve(): ask for a reload
        self.jobs = JobRegistry(self.state_dir)
        self.agent = None                    # the controller agent (agent.py), when run from a controller

    async def _run_cycle(self, name: str, consistency: str):
        pm = self.machines[name]
        try:
            return await pm.run_cycle(consistency)
        finally:
            if (due := pm.due_at()) is not None:      # a resync window opens, a scheduled start comes
                self.scheduler.wake(name, due)

    @staticmethod
    def _result(tick, result, error) -> None:
        """A failure that is not a ReplicatorError is a bug: leave its trace (the others are logged already)."""
        if error is not None and not isinstance(error, ReplicatorError):
            log.error("%s: cycle failed", tick.machine, exc_info=error)

    async def _cut(self, name: str) -> None:
        await self.machines[name].cut()

    def _missed(self, name: str, scheduled: float) -> None:
        self.machines[name].stats.record_missed()
        self.machines[name].keep_stats()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.site = ReplicaSite(self)          # replica-site operations; adjusts config.machines (replica_site.py)
        for m in self.config.machines:
            self._try_protect(m)
        await self._removed_protections()
        if self.config.replica is not None:
            from .replica_role import start_replica_role
            self.replica_server = await start_replica_role(self.config.replica, self.config)
        self.scheduler.start()
        self._retrying = asyncio.create_task(self._retry_unavailable(), name="retry-unavailable")
        await self.site.start()
        self.token = ensure_token(self.config.daemon.admin_token_file or os.path.join(self.state_dir, "admin.token"))
        self.admin = web.AppRunner(self._admin_app(), access_log=None)
        await self.admin.setup()
        d = self.config.daemon
        await _listen(web.TCPSite(self.admin, d.admin_host, d.admin_port), "the admin API", "[daemon] admin_listen")
        if d.metrics_host is not None:     # scrapers on other hosts: /metrics and nothing else
            self.metrics_token = ensure_token(d.metrics_token_file)
            self.metrics = web.AppRunner(self._metrics_app(), access_log=None)
            await self.metrics.setup()
            await _listen(web.TCPSite(self.metrics, d.metrics_host, d.metrics_port), "the metrics listener",
                          "[daemon] metrics_listen")

    async def _removed_protections(self) -> None:
        from .removal import remove_protection, removed_machines
        configured = {m.name for m in self.config.machines} | set(self.site.handed_over)
        in_use = {os.path.abspath(d.path) for pm in self.machines.values() for d in pm.disks.values()}
        for name, protection in removed_machines(self.state_dir, configured):
            await remove_protection(self.state_dir, name, protection, in_use)

    def _try_protect(self, m) -> bool:
        """protect(), or note why not (a disk missing or unreadable): the machine shows as Critical with
        that reason, the other machines go on, and protection is tried again (RETRY_UNAVAILABLE, or when
        an operator addresses the machine)."""
        try:
            self.protect(m)
        except ReplicatorError as e:
            from .domains import ProtectionPending
            if self.unavailable.get(m.name) != e.message:
                (log.info if isinstance(e, ProtectionPending) else log.error)(
                    "%s: cannot be protected now (tried again every %d s): %s", m.name, RETRY_UNAVAILABLE, e.message)
            self.unavailable[m.name] = e.message
            if isinstance(e, ProtectionPending):       # a running domain: on its way, not broken
                self.pending.add(m.name)
            else:
                self.pending.discard(m.name)
            return False
        self.pending.discard(m.name)
        if self.unavailable.pop(m.name, None) is not None:
            log.info("%s: protected again", m.name)
        return True

    async def _retry_unavailable(self) -> None:
        while True:
            await asyncio.sleep(RETRY_UNAVAILABLE)
            for m in [m for m in self.config.machines if m.name in self.unavailable]:
                self._try_protect(m)

    def _unavailable_view(self, name: str) -> dict:
        """A status entry shaped like PrimaryMachine.status(): Critical, with why it is not protected; a
        running domain whose protection waits for a live switch or its next boot is ReadyForInitialReplication
        with a Warning instead (nothing is wrong: replication starts once its disks are on the export)."""
        reason = self.unavailable[name]
        m = next(m for m in self.config.machines if m.name == name)
        stats = MachineStats(name, m.protection.frequency, stale_after=m.protection.rpo_threshold).to_dict()
        pending = name in self.pending
        stats.update(health="Warning" if pending else "Critical", health_reasons=[reason])
        return {"name": name, "role": "primary", "state": "ReadyForInitialReplication" if pending else "Error",
                "reason": reason, "since": None,
                "stats": stats, "target": m.protection.target, "disks": {}, "jobs": [], "last_cycle": None}

    def protect(self, m) -> "PrimaryMachine":
        """Start protecting a machine: its disks tracked and exported, its cycles scheduled."""
        pm = PrimaryMachine(m, self.state_dir, jobs=self.jobs)
        pm.start()
        self.machines[m.name] = pm
        q = m.protection.quiesce
        self.scheduler.add(m.name, m.protection.frequency, app_consistent_hours=m.protection.app_consistent_hours,
                           quiesce=provider_from_settings(q) if q else None)
        log.info("%s: protecting %d disk(s) to %s, %s, every %d s", m.name, len(pm.disks), m.protection.target,
                 pm.state.state.name, m.protection.frequency)
        return pm

    async def stop(self) -> None:
        """Stop every part; also the parts a start() that failed halfway had started."""
        if self._retrying is not None:
            self._retrying.cancel()
        if hasattr(self, "site"):
            await self.site.stop()
        await self.scheduler.stop(wait=True)
        for pm in self.machines.values():         # operators' operations end too, as running cycles do
            await asyncio.gather(*pm.tasks, return_exceptions=True)
            await pm.stop()
        if self.replica_server is not None:
            await self.replica_server.stop()
        if hasattr(self, "admin"):
            await self.admin.cleanup()
        if hasattr(self, "metrics"):
            await self.metrics.cleanup()

    # ------------------------------------------------------------------ admin API
    def _admin_app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/v1/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/jobs", self._jobs)
        app.router.add_get("/v1/jobs/{id}", self._job)
        app.router.add_post("/v1/machines/{name}/{op}", self._operation)
        app.router.add_post("/v1/reload", self._reload)
        self.site.add_routes(app)              # /v1/replica/machines/..., /v1/plans/...
        if self.replica_server is not None:
            self.replica_server.add_routes(app)    # /v1/extended/...
        return app

    def _metrics_app(self) -> web.Application:
        """The metrics listener: its own token (STATE_DIR/metrics.token), which can read /metrics only."""
        @web.middleware
        async def auth(request, handler):
            header = request.headers.get("Authorization", "")
            if not hmac.compare_digest(header.encode("utf-8", "backslashreplace"),
                                       f"Bearer {self.metrics_token}".encode()):
                return web.json_response({"error": "missing or wrong metrics token"}, status=401)
            if request.method != "GET" or request.path != "/metrics":
                return web.json_response({"error": "this listener serves GET /metrics only"}, status=404)
            return await handler(request)
        app = web.Application(middlewares=[auth])
        app.router.add_get("/metrics", self._metrics)
        return app

    @web.middleware
    async def _auth(self, request, handler):
        header = request.headers.get("Authorization", "")       # whatever bytes a client sent: compare bytes
        if not hmac.compare_digest(header.encode("utf-8", "backslashreplace"), f"Bearer {self.token}".encode()):
            return web.json_response({"error": "missing or wrong admin token"}, status=401)
        try:
            return await handler(request)
        except web.HTTPException as e:           # aiohttp's own refusals (no such route, method, ...): as ours
            if e.status < 400:
                raise
            allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
            # the path as sent (still percent-encoded): a decoded %0a would break the one-line error
            return web.json_response({"error": f"{e.reason}: {request.method} {request.rel_url.raw_path[:200]}"},
                                     status=e.status, headers=allow)

    async def _reload(self, request):
        if self.reload_requested is None:
            return web.json_response({"error": "this daemon cannot reload"}, status=409)
        try:
            load_daemon_config(self.config.path)
        except ReplicatorError as e:
            return web.json_response({"error": f"configuration not reloaded: {e.message}"}, status=409)
        self.reload_requested()
        return web.json_response({"reloading": True})

    def status_document(self) -> dict:
        """GET /v1/status; also what the controller agent reports."""
        return {"machines": [pm.status() for pm in self.machines.values()]
                + [self._unavailable_view(n) for n in sorted(self.unavailable)],
                "replica": self.replica_server.status() if self.replica_server else None,
                **({"controller": self.agent.status()} if self.agent is not None else {})}

    async def _status(self, request):
        return web.json_response(self.status_document())

    async def _metrics(self, request):
        legs = [leg.stats for leg in self.replica_server.legs] if self.replica_server is not None else []
        text = render_prometheus([pm.stats for pm in self.machines.values()] + legs,
                                 states={n: pm.state.state.name for n, pm in self.machines.items()})
        return web.Response(text=text, content_type="text/plain")

    async def _jobs(self, request):
        jobs = self.jobs.summaries()
        for key in ("machine", "state"):
            if key in request.query:
                jobs = [j for j in jobs if j["subject" if key == "machine" else key] == request.query[key]]
        return web.json_response({"jobs": jobs})

    async def _job(self, request):
        try:
            return web.json_response(self.jobs.find(request.match_info["id"], log_lines=200))
        except ReplicatorError as e:
            return web.json_response({"error": e.message}, status=404)

    async def _operation(self, request):
        name = request.match_info["name"]
        if name in self.unavailable:                # the operator's attention: try again now
            m = next(m for m in self.config.machines if m.name == name)
            if not self._try_protect(m):
                return web.json_response({"error": f"{name} cannot be protected now: {self.unavailable[name]}"},
                                         status=409)
        pm = self.machines.get(name)
        if pm is None:
            return web.json_response({"error": "no such machine"}, status=404)
        op = request.match_info["op"]
        job = None
        try:
            if op == "pause":
                pm.pause()
                self.scheduler.pause(pm.name)
            elif op == "resume":
                pm.resume()
                self.scheduler.resume(pm.name)
            elif op in OPERATIONS:
                job, task = await pm.begin(op, dict(request.query))
                if op == "resync":                    # as Resume-VMReplication -Resynchronize, it ends a pause
                    self.scheduler.resume(pm.name)
                elif op == "planned-failover":        # the primary stays stopped: no more cycles
                    task.add_done_callback(lambda _, name=pm.name: job.error or self.scheduler.pause(name))
                if request.query.get("wait", "0" if op == "resync" else "1") not in ("0", "false", "no"):
                    await asyncio.shield(task)        # a client that hangs up does not cancel the operation
                    if job.error:
                        return web.json_response({"error": job.error, "job": job.summary()}, status=409)
            else:
                return web.json_response({"error": f"unknown operation {op}"}, status=404)
        except ReplicatorError as e:
            return web.json_response({"error": e.message}, status=409)
        return web.json_response({**pm.status(), **({"job": job.summary()} if job else {})})


def load_daemon_config(path: str):
    """load_config, and what only the daemon can judge: replication_cpus against the CPUs it may run on."""
    config = load_config(path)
    if config.daemon.replication_cpus is not None:
        try:
            check_replication_cpus(config.daemon.replication_cpus)
        except ValueError as e:
            raise ConfigError([("daemon.replication_cpus", str(e))], path) from None
    return config


def _place_replication(cpus) -> None:
    """replication_cpus, as load_daemon_config checked it; a cpuset that shrank since costs the placement,
    never the protection."""
    try:
        pin_replication(cpus)
    except (ValueError, OSError) as e:
        log.warning("replication_cpus not applied, replicatord stays on CPUs %s: %s",
                    cpu_list(os.sched_getaffinity(0)), e)


async def serve(config, agent=None) -> None:
    """Run until SIGTERM/SIGINT. SIGHUP (or POST /v1/reload) reads the configuration again and restarts the
    daemon's parts on it; the export processes stay, so no guest loses its disk. An invalid configuration
    is refused with its reason and the running one goes on. With a controller `agent`, the configuration is
    its desired.json and the agent asks for the reloads (agent.py)."""
    loop = asyncio.get_running_loop()
    stopping, reload = asyncio.Event(), asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    while True:
        if agent is None:               # from a controller, --replication-cpus and --memory-logs (agent_cli.py)
            _place_replication(config.daemon.replication_cpus)
            memlogs.configure(config.daemon.memory_logs)     # for the exports started from now on
        daemon = Daemon(config)
        daemon.stopping = stopping
        daemon.reload_requested = reload.set
        daemon.agent = agent
        try:
            await daemon.start()
        except (ReplicatorError, OSError) as e:
            # a desired revision that validated but cannot start (a port taken ...): the last one that ran
            # runs again, and the agent reports why; standalone (or nothing to go back to), replicatord stops
            if agent is None or not agent.roll_back(getattr(e, "message", None) or str(e)):
                raise
            await daemon.stop()
            config = load_config(config.path)
            continue
        if agent is not None:
            agent.attach(daemon, reload.set)
        listener = f"; replica listener {daemon.replica_server.server.url}" if daemon.replica_server else ""
        roles = f"{', '.join(config.roles)} role{'s' if len(config.roles) > 1 else ''}" if config.roles else "no role yet"
        print(f"replicatord: {roles}{listener}; admin "
              f"API on http://{config.daemon.admin_host}:{config.daemon.admin_port}", flush=True)
        while True:
            waits = [asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(reload.wait())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            if stopping.is_set():
                if agent is not None:
                    await agent.stop()
                await daemon.stop()
                print("replicatord: stopped cleanly", flush=True)
                return
            reload.clear()
            try:
                new = load_daemon_config(config.path) if agent is None else load_config(config.path)
            except ReplicatorError as e:
                log.error("configuration not reloaded, the running one goes on: %s", e.message)
                continue
            for w in new.warnings:
                log.warning("%s", w)
            log.info("reloading the configuration from %s (the exports stay)", config.path)
            if agent is not None:
                agent.daemon = None              # no report of a daemon being stopped
            await daemon.stop()
            config = new
            break


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="replicatord", description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="run from this replicatord.toml (standalone)")
    ap.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    from .agent_cli import add_options, run_from_controller
    add_options(ap)                  # --state, --register, --key ...: run from a controller (agent_cli.py)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if (args.config is None) == (args.state is None):
        ap.error("give --config FILE (standalone) or --state DIR (run from a controller, with --register the "
                 "first time)")
    if not args.check_config:
        replication_behind_guests()     # run from a controller too
    if args.state is not None:
        return run_from_controller(args, serve)
    if args.replication_cpus is not None and args.config is not None:
        ap.error("--replication-cpus is for a host run from a controller; standalone, set replication_cpus in "
                 "[daemon]")
    try:        # --check-config may run in a shell with fewer CPUs than the service: the syntax only
        config = load_config(args.config) if args.check_config else load_daemon_config(args.config)
    except ReplicatorError as e:
        print(f"replicatord: {e.message}", file=sys.stderr)
        return e.exit_code
    for w in config.warnings:
        print(f"replicatord: warning: {w}", file=sys.stderr)
    if args.check_config:
        print(f"{args.config}: valid; roles: {', '.join(config.roles)}; machines: "
              f"{', '.join(m.name for m in config.machines) or 'none'}")
        return 0
    try:
        import uvloop
        uvloop.run(serve(config))
    except ReplicatorError as e:
        print(f"replicatord: {e.message}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

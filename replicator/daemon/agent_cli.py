"""replicatord's options for running from a controller:

  replicatord --register https://controller:8086 --key host.key.json --state /var/lib/replicator
      [--hostname NAME] [--admin-listen 127.0.0.1:8085] [--data-url https://NAME:8084] [--poll SECONDS]
      [--replication-cpus LIST]

The first run registers (enrol.py) and then runs; later runs (`replicatord --state DIR`, or the same command:
a host already registered with that key does not use it again) run from the controller's desired
configuration, starting at once from the last one received (desired.json) when there is one. Another key
registers the host again (a host the controller removed, or whose certificate expired while it was away).
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys

from ..errors import ReplicatorError
from ..priority import parse_cpu_list, pin_replication


def add_options(ap) -> None:
    g = ap.add_argument_group("running from a controller (docs/management-plane.md)")
    g.add_argument("--state", metavar="DIR", help="replicatord's state directory; the controller's files are in "
                   "DIR/controller/")
    g.add_argument("--register", metavar="URL", help="register with the controller at URL first (needs --key)")
    g.add_argument("--key", metavar="FILE", help="the registration key file the controller made for this site")
    g.add_argument("--hostname", default=socket.gethostname(), help="this host's name (default: the system's)")
    g.add_argument("--admin-listen", default="127.0.0.1:8085", metavar="HOST:PORT",
                   help="where the admin API listens (loopback; default 127.0.0.1:8085)")
    g.add_argument("--data-url", metavar="URL", help="where other hosts reach this host's replica listener "
                   "(default https://HOSTNAME:8084)")
    g.add_argument("--replication-cpus", metavar="LIST", help="run replicatord's threads on these CPUs (like "
                   "0-3,8); its machines' exports stay on every CPU (replication_cpus, docs/operations.md)")
    g.add_argument("--memory-logs", metavar="BUDGET", help="the host's budget for change logs in memory: auto "
                   "(default), none, or a size like 2G (memory_logs, docs/operations.md)")
    g.add_argument("--poll", type=float, default=10.0, metavar="SECONDS",
                   help="how often to ask the controller for the desired configuration (default 10)")


def run_from_controller(args, serve) -> int:
    from . import enrol
    from .agent import Agent

    def fail(message: str, code: int = 1) -> int:
        print(f"replicatord: {message}", file=sys.stderr)
        return code

    if (args.register is None) != (args.key is None):
        return fail("--register URL and --key FILE go together", 2)
    if not args.poll > 0:
        return fail(f"--poll must be a positive number of seconds, not {args.poll}", 2)
    host, _, port = args.admin_listen.rpartition(":")
    try:
        loopback = host.strip("[]") == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
        if not (port.isdigit() and 0 < int(port) < 65536 and loopback):
            raise ValueError
    except ValueError:
        return fail(f"--admin-listen must be HOST:PORT on loopback (127.0.0.1:8085), not {args.admin_listen!r}", 2)
    if args.replication_cpus is not None:      # the host's own choice: the controller's configuration lacks it
        try:
            pin_replication(parse_cpu_list(args.replication_cpus))
        except (ValueError, OSError) as e:
            return fail(f"--replication-cpus: {e}", 2)
    if args.memory_logs is not None:           # the host's own choice too
        from ..tracking import memlogs
        try:
            memlogs.configure(memlogs.parse_setting(args.memory_logs))
        except ValueError:
            return fail(f"--memory-logs must be auto, none or a size like 2G, not {args.memory_logs!r}", 2)
    files = enrol.HostFiles(args.state)
    import uvloop

    async def run() -> int:
        if args.register is not None and (not files.registered or enrol.new_key(files, args.key)):
            info = await enrol.register(files, args.register, args.key, hostname=args.hostname,
                                        admin_url=f"http://{args.admin_listen}",
                                        data_url=args.data_url or f"https://{args.hostname}:8084")
            print(f"replicatord: registered with {info['controller']} as host {info['host_id']} "
                  f"(site {info['site']})", flush=True)
        elif args.register is not None:
            print(f"replicatord: already registered with this key ({files.info}); it is not used again",
                  flush=True)
        elif not files.registered:
            return fail(f"{files.dir} holds no registration: run once with --register URL --key FILE", 2)
        agent = Agent(args.state, poll_interval=args.poll)
        await agent.first_config()
        from ..orchestration import load_config
        config = load_config(files.desired)
        for w in config.warnings:
            print(f"replicatord: warning: {w}", file=sys.stderr)
        await serve(config, agent)
        return 0

    try:
        os.makedirs(args.state, exist_ok=True)
        return uvloop.run(run())
    except ReplicatorError as e:
        return fail(e.message, e.exit_code)

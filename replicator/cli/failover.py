"""The replica site's operations through replicatord's admin API:

  replicator replica-machines [--json]                       replicated machines, their disks and points
  replicator replica-machine NAME test-failover [--point N]  | cleanup-test-failover
  replicator replica-machine NAME failover [--point N | --planned] | commit-failover | cancel-failover
  replicator replica-machine NAME reverse [--target URL --cert --key --ca ...] [--full-copy]
  replicator replica-machine NAME accept-reverse [--from PRINCIPAL] [--force]     (on the former primary)
  replicator plans [--json]
  replicator plan NAME test|planned|unplanned [--wait] | show | confirm ACTION | decline ACTION | cleanup

(each with --config, the daemon's replicatord.toml). A refusal exits 1 with the daemon's reason.
"""
from __future__ import annotations

import json
import os
import time

from ..errors import ReplicatorError
from .common import add_config, add_json
from .status import call

POLL = 0.5
MACHINE_OPS = ("test-failover", "cleanup-test-failover", "failover", "commit-failover", "cancel-failover",
               "reverse", "accept-reverse")
PLAN_OPS = ("test", "planned", "unplanned", "show", "confirm", "decline", "cleanup")
REVERSE_KEYS = ("target", "auth", "frequency", "additional_points", "bandwidth_limit")


def register(sub) -> None:
    ls = sub.add_parser("replica-machines", help="machines replicated to this replica site (from replicatord)")
    add_config(ls)
    add_json(ls, "the machines")
    ls.set_defaults(func=cmd_list)
    m = sub.add_parser("replica-machine", help="fail over, test, reverse a replicated machine (replica site)")
    add_config(m)
    m.add_argument("name", help="the replicated machine's name")
    m.add_argument("op", choices=MACHINE_OPS, help="the operation")
    m.add_argument("--point", type=int, help="recovery point (default: the latest)")
    m.add_argument("--planned", action="store_true", help="failover: complete a planned failover (zero loss)")
    m.add_argument("--network", choices=("isolated", "none"),
                   help="test-failover: the test machine's NICs on the isolated test network (the default), or none "
                        "connected")
    for key in REVERSE_KEYS:
        m.add_argument("--" + key.replace("_", "-"), dest=key, help=f"reverse: {key} (default: [replica.reverse])")
    for key in ("cert", "key", "ca"):
        m.add_argument("--" + key, help=f"reverse: {key} file for the way back")
    m.add_argument("--full-copy", action="store_true",
                   help="reverse: allow an initial replication over the network when the other site holds no copy")
    m.add_argument("--from", dest="principal", help="accept-reverse: the certificate name (or Kerberos principal) "
                   "of the site that replicates the machine back")
    m.add_argument("--force", action="store_true", help="accept-reverse even though the machine is Replicating")
    add_json(m, "the daemon's answer")
    m.set_defaults(func=cmd_machine)
    pl = sub.add_parser("plans", help="recovery plans of this replica site and their last run")
    add_config(pl)
    add_json(pl, "the plans")
    pl.set_defaults(func=cmd_plans)
    p = sub.add_parser("plan", help="run a recovery plan, follow it, confirm its manual actions")
    add_config(p)
    p.add_argument("name", help="the recovery plan's name")
    p.add_argument("op", choices=PLAN_OPS, help="run it (test, planned, unplanned), or act on its run")
    p.add_argument("action", nargs="?", help="confirm/decline: the manual action's id (as the log shows it)")
    p.add_argument("--wait", action="store_true", help="follow the run until it ends; exit 1 when it failed")
    add_json(p, "the run")
    p.set_defaults(func=cmd_plan)


def request(config_path: str, method: str, path: str, body: dict | None = None) -> dict:
    """An admin API request that may run a whole failover: no short timeout."""
    return call(config_path, method, path, body, timeout=3600)


# ---------------------------------------------------------------------------------------------- machines
def cmd_list(args) -> int:
    data = request(args.config, "GET", "/v1/replica/machines")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for m in data["machines"]:
        show_machine(m)
    if not data["machines"]:
        print("no replicated machines")
    return 0


def show_machine(m: dict) -> None:
    points = m["points"]
    latest = f"latest point {m['latest_point']}, {len(points)} point{'s' if len(points) != 1 else ''}" \
        if points else "no recovery point yet"
    print(f"{m['name']}: {m['state']} ({m['role']}{', reversed' if m['reversed'] else ''}) - {latest}")
    if m["reason"]:
        print(f"   {m['reason']}")
    for d in m["disks"]:
        print(f"   {d['name']}  {d['disk_id']}  generation {d['generation']}"
              f"{'  failed over' if d['failed_over'] else ''}")
    for p in points:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p["time"]))
        print(f"   point {p['point']:>6}  {when}  {p['consistency']}")
    if m.get("test_failover"):
        t = m["test_failover"]
        print(f"   test failover of point {t['point']} in {t['path']}")
    for name, uri in (m.get("nbd") or {}).items():
        print(f"   running here: {name} {uri}")


def cmd_machine(args) -> int:
    body: dict = {}
    if args.point is not None:
        body["point"] = args.point
    if args.op == "failover":
        body["planned"] = args.planned
    if args.op == "test-failover" and args.network:
        body["network"] = args.network
    if args.op == "reverse":
        body.update({k: getattr(args, k) for k in REVERSE_KEYS if getattr(args, k) is not None})
        body.update({k: os.path.abspath(getattr(args, k)) for k in ("cert", "key", "ca") if getattr(args, k)})
        for k in ("additional_points",):
            if k in body:
                body[k] = int(body[k])
        if args.full_copy:
            body["full_copy"] = True
    if args.op == "accept-reverse":
        body.update({"from": args.principal, "force": args.force})
    data = request(args.config, "POST", f"/v1/replica/machines/{args.name}/{args.op}", body)
    if args.json:
        print(json.dumps(data, indent=2))
    elif "points" in data:
        show_machine(data)
    else:                                   # reverse: the machine is protected from here now
        print(f"{data['name']}: {data['state']} ({data['reason']}); replicating to {data.get('target')}")
        for name, d in data.get("disks", {}).items():
            print(f"   {name}: {d['nbd']}")
    return 0


# ---------------------------------------------------------------------------------------------- plans
def cmd_plans(args) -> int:
    data = request(args.config, "GET", "/v1/plans")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for p in data["plans"]:
        run = p["run"]
        last = f"last run: {run['kind']} {run['state']}" if run else "never run"
        print(f"{p['name']}: {len(p['groups'])} group{'s' if len(p['groups']) != 1 else ''}; {last}")
        for k, g in enumerate(p["groups"], 1):
            print(f"   group {k}: {', '.join(g['members']) or '-'}"
                  + "".join(f"\n      pre: {a}" for a in g["pre"]) + "".join(f"\n      post: {a}" for a in g["post"]))
    return 0


def cmd_plan(args) -> int:
    path = f"/v1/plans/{args.name}"
    if args.op in ("confirm", "decline"):
        if not args.action:
            raise ReplicatorError(f"`replicator plan {args.name} {args.op}` needs the action's id (e.g. g1.post1)")
        data = request(args.config, "POST", path + "/confirm", {"action": args.action, "ok": args.op == "confirm"})
        print(f"{args.name}: {args.action} {'confirmed' if args.op == 'confirm' else 'declined'}")
    elif args.op == "show":
        data = request(args.config, "GET", path)
    else:
        data = request(args.config, "POST", f"{path}/{args.op}", {})
        if args.op == "cleanup":
            print(f"{args.name}: the test failovers of the last run are cleaned up (test disks removed)")
    if args.json and not args.wait:
        print(json.dumps(data, indent=2))
        return 0
    if args.op in ("test", "planned", "unplanned") and args.wait:
        return follow(args.config, args.name)
    return 0 if args.op == "cleanup" else show_run(data, args.config)


def _hint(config: str, name: str, action: str) -> str:
    """A command the operator can paste as printed."""
    return f"replicator plan {name} confirm {action} --config {config}"


def show_run(data: dict, config: str) -> int:
    run = data.get("run")
    if run is None:
        print(f"{data['name']}: never run")
        return 0
    print(f"{data['name']}: {run['kind']} failover {run['state']} ({run['job']})")
    for entry in run["log"][-20:]:
        print(f"   {entry['text']}")
    for p in run["pending"]:
        print(f"   waiting for confirmation: {p['id']}: {p['text']}  (`{_hint(config, data['name'], p['id'])}`)")
    return 1 if run["state"] == "failed" else 0


def follow(config: str, name: str) -> int:
    """Print the run's log as it grows, and the manual actions it waits for, until it ends."""
    shown, asked = 0, set()
    while True:
        run = request(config, "GET", f"/v1/plans/{name}")["run"]
        for entry in run["log"][shown:]:
            print(f"{time.strftime('%H:%M:%S', time.localtime(entry['time']))} {entry['text']}", flush=True)
        shown = len(run["log"])
        for p in run["pending"]:
            if p["id"] not in asked:
                asked.add(p["id"])
                print(f"   -> confirm with `{_hint(config, name, p['id'])}` (or decline {p['id']})", flush=True)
        if run["state"] != "running":
            if run["state"] == "failed":
                print(f"{name}: {run['kind']} failover failed: {run['error']}")
                return 1
            print(f"{name}: {run['kind']} failover succeeded")
            return 0
        time.sleep(POLL)

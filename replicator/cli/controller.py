"""`replicator --controller URL [--token FILE] [--ca FILE] AREA VERB ...`: the controller's REST API from the
command line (docs/management-plane.md), e.g. `cloud list`, `machine enable vm01 --cloud gold`, `job list`.

Lists print a table (`--json` for the documents), `show` prints the JSON document. The controller's refusals are
printed as one line (`replicator: error: ...`, exit 2 for refused input, 1 otherwise).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request

from ..errors import ReplicatorError, UsageError


class ControllerError(ReplicatorError):
    """The controller answered with an error, or could not be reached."""


class Api:
    """A JSON client for the controller's REST API (stdlib only: the CLI needs nothing the daemon does not)."""

    def __init__(self, url: str, token: str, ca: str | None, timeout: float = 30):
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port
        except ValueError as e:
            raise UsageError(f"--controller {url!r}: {e}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"--controller must be http(s)://HOST[:PORT], not {url!r}")
        if not token or not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
            raise UsageError("the token file does not hold an API token (one line of printable ASCII)")
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout
        self.context = ssl.create_default_context(cafile=ca) if url.startswith("https") else None

    def call(self, method: str, path: str, body=None, query: dict | None = None):
        query = {k: v for k, v in (query or {}).items() if v is not None}
        url = self.url + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Accept": "application/json",
            **({"Content-Type": "application/json"} if data is not None else {})})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.context) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error") or e.reason
            except (ValueError, AttributeError):
                message = e.reason
            error = UsageError if 400 <= e.code < 500 and e.code not in (401, 403) else ControllerError
            raise error(f"{method} {path}: {e.code} {message}") from None
        except urllib.error.URLError as e:
            raise ControllerError(f"cannot reach the controller at {self.url}: {e.reason}") from None
        except (TimeoutError, OSError) as e:
            raise ControllerError(f"cannot reach the controller at {self.url}: {e}") from None
        except http.client.HTTPException as e:          # something that is not an HTTP server answered
            raise ControllerError(f"{self.url} does not answer as the controller does ({type(e).__name__})") from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise ControllerError(f"{method} {path}: {self.url} answered something that is not JSON (is it the "
                                  f"controller?)") from None


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


# ---------------------------------------------------------------------------------------------- output
COLUMNS = {
    "site": ("name", "description"),
    "cloud": ("name", "site", "pair", "pair_role", "hosts"),
    "pair": ("name", "primary", "recovery", "policy"),
    "policy": ("name", "target_kind", "frequency", "additional_points", "app_consistent_hours", "auth", "pairs"),
    "machine": ("name", "cloud", "primary_host", "replica_host", "desired_state", "health", "rpo_seconds"),
    "job": ("id", "kind", "state", "machine", "progress", "message"),
    "plan": ("name", "pair", "groups"),
    "host": ("hostname", "site", "cloud", "last_seen", "desired_revision", "applied_revision"),
    "token": ("name", "role", "created_by", "created_at", "last_used_at", "revoked_at"),
}


def _cell(v) -> str:
    if isinstance(v, list):
        return ",".join(str(x if not isinstance(x, dict) else len(x.get("members", []))) for x in v) or "-"
    return "-" if v is None else str(v)


def table(rows: list[dict], columns) -> str:
    cells = [[c.upper() for c in columns]] + [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells)


def emit(args, doc, area: str | None = None) -> None:
    if isinstance(doc, list) and area and not args.json:
        print(table(doc, COLUMNS[area]))
    elif doc is not None:
        print(json.dumps(doc, indent=2, sort_keys=True))


# ---------------------------------------------------------------------------------------------- verbs
PATHS = {"site": "sites", "cloud": "clouds", "pair": "pairs", "policy": "policies", "machine": "machines",
         "job": "jobs", "plan": "plans", "host": "hosts", "token": "tokens"}


def run(api: Api, args) -> None:
    area, verb = args.area, args.verb
    base = "/v1/" + PATHS[area]
    if verb == "list":
        query = {k: getattr(args, k, None) for k in ("cloud", "state", "machine")}
        return emit(args, api.call("GET", base, query=query), area)
    if verb == "show":
        return emit(args, api.call("GET", f"{base}/{_quote(str(args.name))}"))
    if verb == "create":
        return emit(args, api.call("POST", base, _create_body(area, args)))
    if area == "machine" and verb == "enable":
        return emit(args, _enable(api, args))
    if area == "machine" and verb in ("pause", "resume", "resync", "disable", "commit-failover", "cancel-failover",
                                      "cleanup-test-failover", "reverse", "failback"):
        return emit(args, api.call("POST", f"{base}/{_quote(args.name)}/{verb}"))
    if area == "machine" and verb == "failover":
        return emit(args, api.call("POST", f"{base}/{_quote(args.name)}/failover",
                                   {"kind": args.kind, "force": args.force, "point": args.point}))
    if area == "pair" and verb == "extend":
        body = {"cloud": args.cloud}
        for key in ("frequency", "additional_points", "bandwidth_limit", "auth", "storage"):
            if getattr(args, key) is not None:
                body[key] = getattr(args, key)
        if args.compression is not None:
            body["compression"] = args.compression == "on"
        return emit(args, api.call("POST", f"{base}/{_quote(args.name)}/extended", body))
    if area == "pair" and verb in ("show-extended", "remove-extended"):
        return emit(args, api.call("GET" if verb == "show-extended" else "DELETE",
                                   f"{base}/{_quote(args.name)}/extended"))
    if area == "token" and verb == "revoke":
        return emit(args, api.call("DELETE", f"{base}/{_quote(args.name)}"))
    if area == "job" and verb == "cancel":
        return emit(args, api.call("POST", f"{base}/{args.name}/cancel"))
    if area == "plan" and verb == "run":
        return emit(args, api.call("POST", f"{base}/{_quote(args.name)}/runs", {"kind": args.kind,
                                                                                "force": args.force}))
    if area == "plan" and verb == "confirm":
        return emit(args, api.call("POST", f"/v1/plan-runs/{args.run}/confirm",
                                   {"action_id": args.action, "note": args.note}))
    raise UsageError(f"{area} {verb}: not a verb")      # argparse refuses these first


def _create_body(area: str, args) -> dict:
    if area == "site":
        return {"name": args.name, "description": args.description}
    if area == "cloud":
        return {"name": args.name, "site": args.site, "description": args.description}
    if area == "pair":
        return {"name": args.name, "primary": args.primary, "recovery": args.recovery, "policy": args.policy}
    if area == "token":
        return {"name": args.name, "role": args.role}
    if area == "policy":
        body = {"name": args.name}
        for key in ("target_kind", "frequency", "additional_points", "app_consistent_hours", "auth", "port",
                    "bandwidth_limit", "initial_method", "initial_at", "initial_seed_dir", "initial_path",
                    "azure_storage_account", "azure_container", "rpo_threshold", "copy_rate_when_busy"):
            if getattr(args, key) is not None:
                body[key] = getattr(args, key)
        for key in ("compression", "delete_replica_on_remove", "azure_encrypt"):
            if getattr(args, key) is not None:
                body[key] = getattr(args, key) == "on"
        return body
    raise UsageError(f"{area} create: not a verb")


def _enable(api: Api, args):
    """A machine not yet known is protected (a libvirt domain of its name unless --disk is given); a disabled
    one is enabled again."""
    try:
        current = api.call("GET", f"/v1/machines/{_quote(args.name)}")
    except UsageError as e:
        if ": 404 " not in str(e):
            raise
        current = None
    if current is not None:
        if current["desired_state"] != "disabled":
            raise UsageError(f"machine {args.name!r} is already protected ({current['desired_state']})")
        return api.call("POST", f"/v1/machines/{_quote(args.name)}/enable")
    if not args.cloud:
        raise UsageError(f"machine {args.name!r} is not protected yet: give --cloud")
    body = {"name": args.name, "cloud": args.cloud, "primary_host": args.host, "replica_host": args.replica_host,
            "excluded": args.exclude, "policy": args.policy}
    if args.disk:
        body["disks"] = args.disk
    else:
        body["domain"] = args.domain or args.name
    return api.call("POST", "/v1/machines", body)


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="replicator --controller URL", description=__doc__.split("\n")[0])
    ap.add_argument("--controller", required=True, metavar="URL", help="https://HOST:8086")
    ap.add_argument("--token", metavar="FILE", default=os.environ.get("REPLICATOR_CONTROLLER_TOKEN"),
                    help="a file holding an API token (default $REPLICATOR_CONTROLLER_TOKEN)")
    ap.add_argument("--ca", metavar="FILE", default=os.environ.get("REPLICATOR_CONTROLLER_CA"),
                    help="the controller's CA certificate, DATA/ca/ca.pem (default $REPLICATOR_CONTROLLER_CA, "
                         "else the system's trust store)")
    ap.add_argument("--json", action="store_true", help="lists as JSON documents")
    areas = ap.add_subparsers(dest="area", required=True)

    def area(name: str, verbs: dict):
        p = areas.add_parser(name).add_subparsers(dest="verb", required=True)
        out = {}
        for verb, help_ in verbs.items():
            out[verb] = p.add_parser(verb, help=help_)
            if verb not in ("list",):
                out[verb].add_argument("name", type=int if name == "job" else str,
                                       metavar="ID" if name == "job" else "NAME")
        return out

    for name in ("site", "cloud", "pair", "policy", "host"):
        extra = {"extend": "give the pair an extended leg to a third cloud (extended replication)",
                 "show-extended": "the pair's extended leg as JSON, with each machine's extended host",
                 "remove-extended": "remove the pair's extended leg"} if name == "pair" else {}
        verbs = area(name, {"list": f"list {name}s", "show": f"one {name} as JSON",
                            **({"create": f"make a {name}"} if name != "host" else {}), **extra})
        if name == "site":
            verbs["create"].add_argument("--description", default="")
        if name == "cloud":
            verbs["create"].add_argument("--site", required=True)
            verbs["create"].add_argument("--description", default="")
        if name == "pair":
            for opt in ("--primary", "--recovery"):
                verbs["create"].add_argument(opt, required=True, metavar="CLOUD")
            verbs["create"].add_argument("--policy")
            x = verbs["extend"]
            x.add_argument("--cloud", required=True, help="the third cloud (on a third site, in no pair)")
            x.add_argument("--frequency", help="5m or 15m (default 5m; no more often than the pair's policy)")
            x.add_argument("--additional-points", type=int, help="the extended site's own hourly points (0-24)")
            x.add_argument("--compression", choices=("on", "off"))
            x.add_argument("--bandwidth-limit", help='bytes/s: "100M", or "none"')
            x.add_argument("--auth", choices=("certificate", "kerberos"))
            x.add_argument("--storage", help="the storage root on the third cloud's hosts")
        if name == "policy":
            c = verbs["create"]
            c.add_argument("--target-kind", choices=("peer", "azure"))
            c.add_argument("--frequency", help="30s, 5m or 15m")
            c.add_argument("--additional-points", type=int)
            c.add_argument("--app-consistent-hours", type=int)
            c.add_argument("--auth", choices=("certificate", "kerberos"))
            c.add_argument("--port", type=int)
            c.add_argument("--bandwidth-limit", help='bytes/s: "100M", or "none"')
            c.add_argument("--rpo-threshold", help='Warning when nothing replicated this long: "15m", "1h"')
            c.add_argument("--copy-rate-when-busy", help='bytes/s of a copy while the guest writes: "50M" (the '
                           'default), or "none" for full speed')
            c.add_argument("--initial-method", choices=("network", "scheduled", "offline", "existing"))
            c.add_argument("--initial-at")
            c.add_argument("--initial-seed-dir")
            c.add_argument("--initial-path")
            c.add_argument("--azure-storage-account")
            c.add_argument("--azure-container")
            for flag in ("--compression", "--delete-replica-on-remove", "--azure-encrypt"):
                c.add_argument(flag, choices=("on", "off"))
    token = area("token", {"list": "list API tokens (admin)", "create": "make a token; its secret is printed once",
                           "revoke": "revoke a token"})
    token["create"].add_argument("--role", required=True, choices=("read-only", "operator", "admin"))
    machine = area("machine", {"list": "list machines", "show": "one machine as JSON",
                               "enable": "protect a machine (or enable a disabled one again)",
                               "pause": "pause replication", "resume": "resume replication",
                               "resync": "ask for a resynchronization", "disable": "disable protection",
                               "failover": "ask for a failover (a job its hosts carry out)",
                               "commit-failover": "commit a failover (the machine stays on its recovery site)",
                               "cancel-failover": "cancel a failover not committed (the primary takes it back)",
                               "cleanup-test-failover": "remove a test failover on the replica host",
                               "reverse": "after a committed failover: replicate back to the primary host",
                               "failback": "while reverse replication runs: a planned failover back to the "
                                           "primary host, which then replicates forward again"})
    machine["list"].add_argument("--cloud")
    e = machine["enable"]
    e.add_argument("--cloud", help="its primary cloud (needed the first time)")
    e.add_argument("--host", help="the primary host it runs on (needed when the cloud has several)")
    e.add_argument("--replica-host", help="a host of the recovery cloud (default: the least loaded)")
    e.add_argument("--domain", help="the libvirt domain (default: NAME, unless --disk is given)")
    e.add_argument("--disk", action="append", default=[], metavar="PATH", help="a disk to protect (repeatable)")
    e.add_argument("--exclude", action="append", default=[], metavar="DISK", help="a disk left out (repeatable)")
    e.add_argument("--policy", help="default: the pair's")
    for verb in ("failover",):
        machine[verb].add_argument("--kind", required=True, choices=("test", "planned", "unplanned"))
        machine[verb].add_argument("--force", action="store_true")
        machine[verb].add_argument("--point", type=int, help="the recovery point (unplanned, test; default: latest)")
    job = area("job", {"list": "list jobs, newest first", "show": "one job with its log", "cancel": "cancel a job"})
    job["list"].add_argument("--state")
    job["list"].add_argument("--machine")
    plans = areas.add_parser("plan").add_subparsers(dest="verb", required=True)
    plans.add_parser("list", help="list recovery plans")
    plans.add_parser("show", help="one plan as JSON").add_argument("name")
    run_p = plans.add_parser("run", help="fail a plan over (test, planned, unplanned)")
    run_p.add_argument("name")
    run_p.add_argument("--kind", required=True, choices=("test", "planned", "unplanned"))
    run_p.add_argument("--force", action="store_true")
    confirm = plans.add_parser("confirm", help="confirm the manual action a run waits on")
    confirm.add_argument("run", type=int, metavar="RUN_ID")
    confirm.add_argument("action", type=int, metavar="ACTION_ID")
    confirm.add_argument("--note", default="")
    return ap


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not args.token:
        raise UsageError("no API token: give --token FILE (the controller's DATA/admin.token, or one an admin made)")
    with open(args.token) as f:
        token = f.read().strip()
    if args.controller.startswith("https") and args.ca and not os.path.exists(args.ca):
        raise UsageError(f"{args.ca}: no such CA certificate file")
    run(Api(args.controller, token, args.ca), args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

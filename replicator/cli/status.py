"""`replicator status [--json]`, `replicator machine NAME pause|resume|resync|cycle|planned-failover [--wait]`
and `replicator jobs [ID] [--follow]`: talk to a running replicatord through its admin API (loopback, bearer
token). Long operations are the daemon's jobs; `--wait` and `--follow` show their progress until they end
and exit non-zero when one failed."""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request

from ..errors import ReplicatorError, UsageError
from ..orchestration.jobs import format_progress
from .common import add_config, add_json
from .progress import JobDisplay

POLL = 0.5          # seconds between looks at a followed job


def register(sub) -> None:
    s = sub.add_parser("status", help="state and health of every protected machine (from replicatord)")
    add_config(s)
    add_json(s, "the daemon's status")
    s.set_defaults(func=cmd_status)
    m = sub.add_parser("machine", help="operate a protected machine through replicatord")
    add_config(m)
    m.add_argument("name", help="the machine's name in replicatord.toml")
    m.add_argument("op", choices=("pause", "resume", "resync", "cycle", "planned-failover", "azure-failover",
                                  "failback", "azure-test-failover", "azure-cleanup-test-failover"),
                   help="the operation (azure-*, failback: Azure as the recovery site, docs/operations.md)")
    m.add_argument("--point", type=int, help="azure-failover, azure-test-failover: the machine point (default: the "
                   "latest)")
    m.add_argument("--mode", choices=("minimize-downtime", "full"),
                   help="failback: a pass while the Azure VM runs, then --final after it stops (minimize-downtime, "
                        "the default), or one full download")
    m.add_argument("--final", action="store_true", help="failback: the Azure VM is stopped: the last pass, then "
                   "replication to Azure resumes")
    m.add_argument("--wait", action="store_true",
                   help="follow the operation's job until it ends (a progress bar on a terminal)")
    m.set_defaults(func=cmd_machine)
    j = sub.add_parser("jobs", help="replicatord's jobs (initial replication, resync, failover): progress and log")
    add_config(j)
    j.add_argument("id", nargs="?", help="one job: its progress and log")
    j.add_argument("--machine", help="only this machine's jobs")
    j.add_argument("--follow", action="store_true",
                   help="follow the job (or every running job) until it ends; exit 1 when one failed")
    add_json(j, "the jobs")
    j.set_defaults(func=cmd_jobs)
    r = sub.add_parser("reload", help="replicatord reads its configuration again (as SIGHUP and `systemctl "
                       "reload` do); guests keep their disks; an invalid configuration changes nothing")
    add_config(r)
    r.set_defaults(func=cmd_reload)


def cmd_reload(args) -> int:
    call(args.config, "POST", "/v1/reload")
    print("replicatord is reloading its configuration (the machines' exports stay)")
    return 0


def _admin(config_path: str):
    from ..orchestration import load_config
    if not os.path.exists(config_path):
        raise UsageError(f"no replicatord configuration at {config_path}: give --config FILE or set "
                         "REPLICATOR_CONFIG")
    cfg = load_config(config_path)
    token_file = cfg.daemon.admin_token_file or os.path.join(cfg.daemon.state_dir, "admin.token")
    try:
        with open(token_file) as f:
            token = f.read().strip()
    except OSError as e:
        raise UsageError(f"cannot read the admin token {token_file}: {e.strerror} (is replicatord running?)") \
            from None
    return f"http://{cfg.daemon.admin_host}:{cfg.daemon.admin_port}", token


def call(config_path: str, method: str, path: str, body: dict | None = None, timeout: float = 300) -> dict:
    """One admin API request; the daemon's refusal becomes a ReplicatorError carrying its reason."""
    base, token = _admin(config_path)
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            reason = json.loads(e.read()).get("error", e.reason)
        except ValueError:
            reason = e.reason
        raise ReplicatorError(f"replicatord refused: {reason}") from None
    except urllib.error.URLError as e:
        raise ReplicatorError(f"replicatord is not reachable at {base}: {e.reason}") from None


DOMAIN_PROTECTION = {"now": "its disks are the export", "next-boot": "pending next boot",
                     "live": "its disks were switched onto the export while it ran"}


def _domain_line(dom: dict) -> str:
    """A domain machine's domain: its state and how its disks are protected (daemon/domains.py's view)."""
    pointed = dom.get("disks_pointed")
    text = (f"domain {dom['name']}: {dom.get('state') or dom.get('error') or 'state unknown'}; "
            f"protection: {DOMAIN_PROTECTION.get(pointed, pointed or 'not yet')}")
    kept = {t: p for t, p in ((dom.get("live") or {}).get("error_policy") or {}).items() if p != "stop"}
    if pointed == "live" and kept:
        text += f" ({', '.join(sorted(kept))} keep error policy {', '.join(sorted(set(kept.values())))} until its next boot)"
    return text


def cmd_status(args) -> int:
    data = call(args.config, "GET", "/v1/status")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for m in data["machines"]:
        st = m["stats"]
        reasons = st.get("health_reasons") or []
        last = st.get("last_replication_time")
        ago = f"{time.time() - last:.0f} s ago" if last else "never"
        reasons = [r for r in reasons if r not in (m["reason"] or "")]     # said once is enough
        print(f"{m['name']}: {m['state']} ({m['reason']}) health {st.get('health')}"
              f"{' - ' + '; '.join(reasons) if reasons else ''}")
        print(f"   last replication {ago}; cycles ok {st.get('successful_cycles')}, missed "
              f"{st.get('missed_cycles')}, failed {st.get('failed_cycles')}")
        for name, d in m["disks"].items():
            log = f", log in {d['log']}" if d.get("log") else ""
            print(f"   {name}: {d['tracking']}{' (' + d['reason'] + ')' if d['reason'] else ''}{log}  "
                  f"{d['nbd'] or '(not exported: the primary is stopped)'}")
        if m.get("domain"):
            print(f"   {_domain_line(m['domain'])}")
        for job in m.get("jobs") or []:
            print(f"   {job['id']} {format_progress(job)}")
    if data.get("replica"):
        print(f"replica role: {data['replica']['url']} ({data['replica']['mode']}); replicated machines: "
              f"`replicator replica-machines --config {args.config}`")
        for leg in data["replica"].get("extended") or []:
            st = leg["stats"]
            last = st.get("last_replication_time")
            ago = f"{time.time() - last:.0f} s ago" if last else "never"
            print(f"{leg['machine']} (Extended -> {leg['target']}): {leg['state']}"
                  f"{' (' + leg['reason'] + ')' if leg.get('reason') else ''} health {st.get('health')}; "
                  f"last replication {ago}; cycles ok {st.get('successful_cycles')}, failed "
                  f"{st.get('failed_cycles')}")
    return 0


def cmd_machine(args) -> int:
    query = {k: v for k, v in (("wait", "0" if args.wait else None), ("point", args.point), ("mode", args.mode),
                               ("final", "1" if args.final else None)) if v is not None}
    query = "?" + urllib.parse.urlencode(query) if query else ""    # --wait: answered at once, followed here
    data = call(args.config, "POST", f"/v1/machines/{urllib.parse.quote(args.name)}/{args.op}{query}")
    job = data.get("job")
    print(f"{data['name']}: {data['state']} ({data['reason']})"
          + (f"; {job['id']} {job['kind']} {job['state']}" if job else ""))
    if job and args.wait:
        return follow(args.config, [job["id"]])
    if job and job["state"] == "running":
        print(f"follow it with: replicator jobs {job['id']} --follow --config {args.config}")
    return 0


def cmd_jobs(args) -> int:
    if args.id and not args.follow:
        job = call(args.config, "GET", f"/v1/jobs/{urllib.parse.quote(args.id)}")
        if args.json:
            print(json.dumps(job, indent=2))
            return 0
        print(f"{job['id']} {format_progress(job)}{' - ' + job['error'] if job.get('error') else ''}")
        for entry in job.get("log") or []:
            print(f"   {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(entry['time']))} {entry['text']}")
        return 0
    if args.follow:
        ids = [args.id] if args.id else [j["id"] for j in _list(args, "running")]
        if not ids:
            print("no job is running")
            return 0
        return follow(args.config, ids)
    jobs = _list(args)
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    for job in jobs:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job["created"]))
        print(f"{job['id']} {when} {format_progress(job)}{' - ' + job['error'] if job.get('error') else ''}")
    return 0


def _list(args, state: str | None = None) -> list[dict]:
    query = {k: v for k, v in (("machine", args.machine), ("state", state)) if v}
    return call(args.config, "GET", "/v1/jobs" + (f"?{urllib.parse.urlencode(query)}" if query else ""))["jobs"]


def follow(config_path: str, ids: list[str]) -> int:
    """Show each job until it ends, one after the other; a failed or cancelled job is an error (exit 1)."""
    display, failed = JobDisplay(), []
    for job_id in ids:
        job = call(config_path, "GET", f"/v1/jobs/{job_id}")
        while job["state"] == "running":
            display.update(job)
            time.sleep(POLL)
            job = call(config_path, "GET", f"/v1/jobs/{job_id}")
        display.close(job)
        if job["state"] != "succeeded":
            failed.append(f"{job_id} ({job['kind']} {job['subject']}) {job['state']}: {job.get('error') or ''}")
    if failed:
        raise ReplicatorError("; ".join(failed))
    return 0

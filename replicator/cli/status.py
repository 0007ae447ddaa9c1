"""`replicator status [--json]` and `replicator machine NAME pause|resume|resync|cycle`: talk to a running
replicatord through its admin API (loopback, bearer token)."""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

from ..errors import ReplicatorError, UsageError


def register(sub) -> None:
    s = sub.add_parser("status", help="state and health of every protected machine (from replicatord)")
    s.add_argument("--config", required=True, help="the daemon's replicatord.toml")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)
    m = sub.add_parser("machine", help="operate a protected machine through replicatord")
    m.add_argument("--config", required=True)
    m.add_argument("name")
    m.add_argument("op", choices=("pause", "resume", "resync", "cycle", "planned-failover"))
    m.set_defaults(func=cmd_machine)


def _admin(config_path: str):
    from ..orchestration import load_config
    cfg = load_config(config_path)
    token_file = cfg.daemon.admin_token_file or os.path.join(cfg.daemon.state_dir, "admin.token")
    try:
        with open(token_file) as f:
            token = f.read().strip()
    except OSError as e:
        raise UsageError(f"cannot read the admin token {token_file}: {e.strerror} (is replicatord running?)") \
            from None
    return f"http://{cfg.daemon.admin_host}:{cfg.daemon.admin_port}", token


def call(config_path: str, method: str, path: str) -> dict:
    base, token = _admin(config_path)
    req = urllib.request.Request(base + path, method=method, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise ReplicatorError(f"replicatord refused: {json.loads(e.read()).get('error', e.reason)}") from None
    except urllib.error.URLError as e:
        raise ReplicatorError(f"replicatord is not reachable at {base}: {e.reason}") from None


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
        print(f"{m['name']}: {m['state']} ({m['reason']}) health {st.get('health')}"
              f"{' - ' + '; '.join(reasons) if reasons else ''}")
        print(f"   last replication {ago}; cycles ok {st.get('successful_cycles')}, missed "
              f"{st.get('missed_cycles')}, failed {st.get('failed_cycles')}")
        for name, d in m["disks"].items():
            print(f"   {name}: {d['tracking']}{' (' + d['reason'] + ')' if d['reason'] else ''}  {d['nbd']}")
    if data.get("replica"):
        print(f"replica role: {data['replica']['url']} ({data['replica']['mode']})")
    return 0


def cmd_machine(args) -> int:
    data = call(args.config, "POST", f"/v1/machines/{args.name}/{args.op}")
    print(f"{data['name']}: {data['state']} ({data['reason']})")
    return 0

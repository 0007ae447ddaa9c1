"""`replicator replica serve`: receive replication from authorized primaries into replica stores."""
from __future__ import annotations

import errno
import os


from ..replica.limits import LIMITS, describe


def register(sub) -> None:
    p = sub.add_parser("replica", help="the replica server")
    cmds = p.add_subparsers(dest="command", required=True)
    s = cmds.add_parser("serve", help="accept replication over HTTPS (mutual TLS) or HTTP with Kerberos")
    s.add_argument("--root", help="storage root for --allow entries that name none")
    s.add_argument("--host", default="0.0.0.0", help="address to listen on (default all)")
    s.add_argument("--port", type=int, help="default 8084 with certificates, 8083 with Kerberos")
    s.add_argument("--auth", choices=("cert", "kerberos"), default="cert",
                   help="cert: HTTPS with mutual TLS (default); kerberos: HTTP with SPNEGO")
    s.add_argument("--cert", help="this server's certificate (certs issue)")
    s.add_argument("--key", help="its private key")
    s.add_argument("--ca", help="the CA certificate primaries' certificates must chain to")
    s.add_argument("--keytab", help="Kerberos keytab holding the HTTP/HOST service key")
    s.add_argument("--service", help="Kerberos service name to accept as, e.g. HTTP@replica.example.org "
                                     "(default: any key in the keytab)")
    s.add_argument("--allow", action="append", default=[], metavar="PATTERN[=ROOT]",
                   help="authorize primaries (certificate CN or Kerberos principal, one '*' wildcard) "
                        "into ROOT (default --root); repeatable")
    s.add_argument("--sync-mib", type=int, default=16, help="sync the spool every N MiB received")
    for limit in LIMITS:
        s.add_argument("--" + limit.name.replace("_", "-"),
                       metavar={"bytes": "SIZE", "seconds": "SECONDS"}.get(limit.unit, "N"),
                       help=f"{limit.help} (default {describe(limit)})")
    s.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from ..errors import UsageError
    from ..replica.limits import ReplicaLimits
    from ..transport.auth import parse_allow
    from ..transport.server import ReplicaServer
    from .common import require_files
    if not args.allow:
        raise UsageError("no --allow PATTERN[=ROOT] entries: no primary could replicate here")
    require_files(args, "cert", "key", "ca", "keytab")
    limits, problems = ReplicaLimits.read({k.name: getattr(args, k.name) for k in LIMITS
                                           if getattr(args, k.name) is not None})
    for name, reason in problems:
        raise UsageError(f"--{name.replace('_', '-')} {reason}")
    entries = [parse_allow(spec, args.root) for spec in args.allow]
    server = ReplicaServer(entries, mode=args.auth, host=args.host, port=args.port, certfile=args.cert,
                           keyfile=args.key, cafile=args.ca, keytab=args.keytab, service=args.service,
                           sync_interval=args.sync_mib << 20, limits=limits)

    def ready(srv) -> None:
        for e in entries:
            print(f"allow {e.principal_pattern} -> {e.storage_root}", flush=True)
        print(f"serving on {srv.url} (pid {os.getpid()})", flush=True)

    try:
        server.serve_forever(on_ready=ready)
    except OSError as e:
        if e.filename is None and e.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            from ..errors import CannotListen
            port = args.port or ("8084" if args.auth == "cert" else "8083")
            raise CannotListen(f"cannot listen on {args.host}:{port}: {e.strerror} (another server there? "
                               "choose another --port or --host)") from None
        raise
    print("stopped cleanly", flush=True)
    return 0

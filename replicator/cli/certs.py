"""`replicator certs init | issue`: a private CA and host certificates, so mutual TLS needs no hand-made PKI."""
from __future__ import annotations

import os


def register(sub) -> None:
    p = sub.add_parser("certs", help="private CA and host certificates for replication over mutual TLS")
    cmds = p.add_subparsers(dest="command", required=True)
    i = cmds.add_parser("init", help="make a CA: DIR/ca.pem and DIR/ca.key (0600)")
    i.add_argument("dir", help="folder for the CA (created)")
    i.add_argument("--name", default="replicator CA", help="the CA's common name")
    i.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    i.add_argument("--key-type", choices=("ec", "rsa"), default="ec", help="EC P-256 (default) or RSA-2048")
    i.add_argument("--force", action="store_true", help="replace an existing CA (its certificates stop working)")
    i.set_defaults(func=cmd_init)
    s = cmds.add_parser("issue", help="issue NAME.pem / NAME.key for a host (server and client authentication)")
    s.add_argument("dir", help="the CA directory")
    s.add_argument("name", help="the host name: subject CN and first DNS name (what authorization entries match)")
    s.add_argument("--dns", action="append", default=[], help="another DNS name (repeatable)")
    s.add_argument("--ip", action="append", default=None, help="an IP address (repeatable; default 127.0.0.1)")
    s.add_argument("--out", help="where to write the files (default: the CA directory)")
    s.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    s.add_argument("--key-type", choices=("ec", "rsa"), default="ec", help="EC P-256 (default) or RSA-2048")
    s.set_defaults(func=cmd_issue)


def cmd_init(args) -> int:
    from ..transport import certs
    path = certs.init_ca(args.dir, name=args.name, days=args.days, key_type=args.key_type, force=args.force)
    print(f"CA: {path}  ({certs.describe(path)})")
    print(f"key: {os.path.join(args.dir, 'ca.key')} (keep it private)")
    return 0


def cmd_issue(args) -> int:
    from ..transport import certs
    cert, key = certs.issue(args.dir, args.name, dns=args.dns, ips=args.ip or ["127.0.0.1"], out_dir=args.out,
                            days=args.days, key_type=args.key_type)
    print(f"certificate: {cert}  ({certs.describe(cert)})")
    print(f"key: {key}")
    return 0

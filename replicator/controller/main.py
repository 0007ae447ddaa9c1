"""replicator-controller: the management plane's service (docs/management-plane.md).

    replicator-controller --data DIR [--listen HOST:PORT] [--database URL]

DIR holds controller.db (SQLite, the default store) and admin.token (the first admin token, made at the first
start, 0600). --database postgresql://USER@HOST/DB puts the store on PostgreSQL instead (several controller
processes may share it). Migrations are applied at every start. SIGTERM or SIGINT stops it cleanly.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys

import uvicorn

from ..errors import ReplicatorError
from .app import create_app
from .plans_worker import PlanWorker
from .auth import ADMIN_TOKEN_FILE, ensure_admin_token
from .db import Store, sqlite_url

DEFAULT_LISTEN = "127.0.0.1:8086"
log = logging.getLogger("replicator.controller")


def listen_address(v: str) -> tuple[str, int]:
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT (e.g. {DEFAULT_LISTEN}), not {v!r}")
    return host.strip("[]"), int(port)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="replicator-controller", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, metavar="DIR", help="the controller's directory (made if missing)")
    ap.add_argument("--listen", type=listen_address, default=listen_address(DEFAULT_LISTEN), metavar="HOST:PORT",
                    help=f"where the REST API listens (default {DEFAULT_LISTEN})")
    ap.add_argument("--database", metavar="URL", help="sqlite:///PATH or postgresql://USER@HOST[:PORT]/DB "
                    "(default: DIR/controller.db)")
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    tls = ap.add_argument_group("HTTPS and host certificates (the deployment CA in DIR/ca)")
    tls.add_argument("--name", action="append", default=[], metavar="NAME",
                     help="another host name or address the controller's certificate names (repeatable)")
    tls.add_argument("--public-url", metavar="URL", help="the URL hosts reach the controller at, written in "
                     "registration keys (default https://LISTEN)")
    tls.add_argument("--cert-lifetime", type=float, default=30 * 86400, metavar="SECONDS",
                     help="lifetime of the host certificates the CA issues (default 30 days; hosts renew "
                     "after two thirds)")
    sub = ap.add_subparsers(dest="command", metavar="key create ...",
                            help="without a command: serve; `key create --site NAME`: a registration key now")
    key = sub.add_parser("key", help="registration keys, made in the store directly (no running controller needed)")
    verbs = key.add_subparsers(dest="verb", required=True)
    create = verbs.add_parser("create", help="a registration key for one site: single use, expiring")
    create.add_argument("--site", required=True, help="the site the host joins")
    create.add_argument("--expires", type=float, default=86400, metavar="SECONDS", help="validity (default 1 day)")
    create.add_argument("--out", metavar="FILE", help="write the key file here (mode 0600) instead of stdout")
    return ap


def create_key(args, store) -> int:
    """`replicator-controller --data DIR key create --site NAME`: the same key document as
    POST /v1/sites/{site}/registration-keys, audited as made here."""
    import datetime as dt
    import json

    from sqlalchemy import select

    from . import models as m
    from .ca import CertificateAuthority
    from .hosts_api import issue_key
    if not 60 <= args.expires <= 30 * 86400:       # as the API's expires_in
        print(f"replicator-controller: error: --expires must be 60 s to 30 days, not {args.expires}", file=sys.stderr)
        return 2
    ca = CertificateAuthority.open(args.data)
    url = public_url(args)
    with store.session() as s:
        site = s.scalar(select(m.Site).where(m.Site.name == args.site))
        if site is None:
            print(f"replicator-controller: error: no site {args.site!r} (create it first: POST /v1/sites)",
                  file=sys.stderr)
            return 2
        doc = issue_key(s, site, ca, url, dt.timedelta(seconds=args.expires), "replicator-controller key create")
        s.add(m.AuditEntry(actor="replicator-controller (local)", action="key.create", target=f"site/{site.name}",
                           outcome="ok", detail={"expires": doc["expires"]}))
    text = json.dumps(doc, indent=1) + "\n"
    if args.out:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        print(f"registration key for site {args.site} in {args.out} (expires {doc['expires']})")
    else:
        sys.stdout.write(text)
    return 0


class StoppableServer(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM/SIGINT it shut down for ends the process with status 0 (uvicorn
    raises the signal again once it has stopped, so a clean stop looked like a kill to service managers)."""

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def public_url(args) -> str:
    """The URL hosts reach the controller at, as registration keys name it: --public-url, else the listener."""
    host, port = args.listen
    return args.public_url or f"https://{host if ':' not in host else f'[{host}]'}:{port}"


def listener_options(args, app) -> dict:
    """uvicorn options of the listener beyond host and port: HTTPS with the deployment CA's certificate for
    the listen address and --name names, client certificates optional (a registering host has none) but
    verified and handed to the host channel (tls.py)."""
    import datetime as dt
    import socket

    from .tls import uvicorn_options
    host = args.listen[0]
    app.state.ca.lifetime = dt.timedelta(seconds=args.cert_lifetime)
    app.state.public_url = public_url(args)
    names = [host, *args.name] + ([socket.getfqdn()] if host in ("0.0.0.0", "::") else [])
    return uvicorn_options(app.state.ca, names)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.cert_lifetime >= 10:
        print(f"replicator-controller: error: --cert-lifetime must be at least 10 seconds, not {args.cert_lifetime}",
              file=sys.stderr)
        return 2
    level = args.log_level if args.command is None else "warning"       # a command's output is its answer
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        os.makedirs(args.data, mode=0o700, exist_ok=True)
        store = Store.open(args.database or sqlite_url(args.data))
    except ReplicatorError as e:
        print(f"replicator-controller: error: {e.message}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"replicator-controller: error: {e.filename or args.data}: {e.strerror or e}", file=sys.stderr)
        return 1
    except Exception as e:          # the database refused the connection or the migration: one line, no trace
        print(f"replicator-controller: error: cannot open the store: {' '.join(str(e).split())[:300]}",
              file=sys.stderr)
        return 1
    if args.command == "key":
        try:
            return create_key(args, store)
        except OSError as e:
            print(f"replicator-controller: error: {e.filename or args.out}: {e.strerror}", file=sys.stderr)
            return 1
        finally:
            store.close()
    try:
        if ensure_admin_token(store, args.data):
            log.info("admin token in %s", os.path.join(args.data, ADMIN_TOKEN_FILE))
        app = create_app(store, data_dir=args.data)
        host, port = args.listen
        # timeout_graceful_shutdown: an open console's event stream never ends by itself; stop waiting for it
        config = uvicorn.Config(app, host=host, port=port, log_level=args.log_level, access_log=False,
                                timeout_graceful_shutdown=5, **listener_options(args, app))
        server = StoppableServer(config)
        worker = PlanWorker(store).start()           # recovery plan runs (plans_worker.py)
        try:
            server.run()
        finally:
            worker.stop()
        return 0 if server.started else 1
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())

"""`replicator` command line: one sub-command module per area, one error handler for all."""
from __future__ import annotations

import argparse
import sys

from ..errors import DiskIOError, ReplicatorError
from . import azure as azure_cmd
from . import bench as bench_cmd
from . import certs as certs_cmd
from . import failover as failover_cmd
from . import hrl as hrl_cmd
from . import points as points_cmd
from . import replica as replica_cmd
from . import replicate as replicate_cmd
from . import resync as resync_cmd
from . import seed as seed_cmd
from . import status as status_cmd
from . import track as track_cmd
from . import vhdx as vhdx_cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="replicator", description="Block replication for virtual disks.")
    sub = parser.add_subparsers(dest="area", required=True)
    vhdx_cmd.register(sub)
    hrl_cmd.register(sub)
    track_cmd.register(sub)
    certs_cmd.register(sub)
    replica_cmd.register(sub)
    points_cmd.register(sub)
    resync_cmd.register(sub)
    seed_cmd.register(sub)
    replicate_cmd.register(sub)
    status_cmd.register(sub)
    failover_cmd.register(sub)
    bench_cmd.register(sub)
    azure_cmd.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].split("=", 1)[0] == "--controller":        # the controller's REST API (cli/controller.py)
        from . import controller as controller_cmd
        command = lambda: controller_cmd.main(argv)                 # noqa: E731
    else:
        args = build_parser().parse_args(argv)
        command = lambda: args.func(args) or 0                      # noqa: E731
    try:
        return command()
    except ReplicatorError as e:
        print(f"replicator: error: {e.message}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        return 1
    except OSError as e:              # the system refused something the user asked for: say what, one line
        print(f"replicator: error: {describe_os_error(e)}", file=sys.stderr)
        return DiskIOError.exit_code
    except KeyboardInterrupt:
        print("replicator: interrupted", file=sys.stderr)
        return 130


def describe_os_error(e: OSError) -> str:
    """'PATH: No such file or directory' (and the second path of a rename or link)."""
    what = e.strerror or str(e) or type(e).__name__
    names = [str(n) for n in (e.filename, e.filename2) if n is not None]
    return f"{' -> '.join(names)}: {what}" if names else what


if __name__ == "__main__":
    sys.exit(main())

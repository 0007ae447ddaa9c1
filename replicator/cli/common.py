"""Small helpers shared by the sub-commands."""
from __future__ import annotations

import os

from ..errors import UsageError
from ..units import size


def parse_size(text: str) -> int:
    """'512', '64M', '1.5G', '2T' (binary units, an optional trailing 'iB' or 'B')."""
    try:
        return size(text)
    except ValueError as e:
        if "whole number" in str(e):
            raise UsageError(f"size {text!r} is not a whole number of bytes") from None
        raise UsageError(f"cannot read size {text!r}: use a number with an optional K, M, G or T suffix") from None


def human(n: float, decimals: int = 2) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{decimals}f} {unit}"
        n /= 1024
    return str(n)


DEFAULT_CONFIG = "/etc/replicator/replicatord.toml"


def add_config(parser) -> None:
    """--config for commands that talk to replicatord: $REPLICATOR_CONFIG, else the system-wide file."""
    default = os.environ.get("REPLICATOR_CONFIG", DEFAULT_CONFIG)
    parser.add_argument("--config", default=default,
                        help=f"the daemon's replicatord.toml (default: $REPLICATOR_CONFIG or {DEFAULT_CONFIG}; "
                             f"now {default})")


def require_files(args, *names: str) -> None:
    """Every file option given (e.g. --cert, --key, --ca) must name a readable file: said up front, by option,
    instead of a nameless 'No such file or directory' from deep inside TLS set-up."""
    for name in names:
        path = getattr(args, name, None)
        if path is None:
            continue
        option = "--" + name.replace("_", "-")
        if not os.path.isfile(path):
            raise UsageError(f"{option} {path}: {'is a folder' if os.path.isdir(path) else 'no such file'}")
        if not os.access(path, os.R_OK):
            raise UsageError(f"{option} {path}: not readable by this user")


def add_json(parser, what: str = "the result") -> None:
    """--json, said the same way everywhere."""
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON (for scripts) instead of text")

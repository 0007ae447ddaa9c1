"""What a replica server lets its peers make it hold, as the operator sets it: one table of names, defaults,
bounds and meanings, read by the server (transport/server.py), replicatord.toml's [replica] table
(orchestration/settings.py) and `replicator replica serve` (cli/replica.py) alike."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..vhdx.structures import MAX_DISK_SIZE      # VHDX's own limit

MiB = 1 << 20


@dataclass(frozen=True)
class Limit:
    name: str
    default: int | float
    lo: int | float
    hi: int | float
    unit: str                     # "bytes", "seconds" or "count"
    help: str


LIMITS = (
    Limit("max_disk_size", MAX_DISK_SIZE, MiB, MAX_DISK_SIZE, "bytes",
          "largest disk a primary may create here (K, M, G, T suffixes)"),
    Limit("max_disks", 1024, 1, 1 << 20, "count", "disks each trust group may hold in a storage root"),
    Limit("max_uploads", 8, 1, 1024, "count", "unfinished uploads a disk may spool at once"),
    Limit("header_timeout", 30.0, 0.1, 3600, "seconds",
          "a connection that sends no complete request header this long is closed"),
    Limit("read_timeout", 60.0, 0.1, 3600, "seconds",
          "a request body or a digest answer that makes no progress this long is dropped"),
    Limit("digest_requests", 2, 1, 64, "count",
          "block-digest answers computed at once (each holds up to 16 MiB)"),
)
BY_NAME = {limit.name: limit for limit in LIMITS}
_UNITS = {   # how a string is read: its pattern (number, unit) and the units' scales
    "bytes": (re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.I),
              {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}),
    "seconds": (re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min)?\s*$", re.I), {"": 1, "s": 1, "m": 60, "min": 60}),
    "count": (re.compile(r"^\s*(\d+)()\s*$"), {"": 1}),
}


@dataclass(frozen=True)
class ReplicaLimits:
    max_disk_size: int = BY_NAME["max_disk_size"].default
    max_disks: int = BY_NAME["max_disks"].default
    max_uploads: int = BY_NAME["max_uploads"].default
    header_timeout: float = BY_NAME["header_timeout"].default
    read_timeout: float = BY_NAME["read_timeout"].default
    digest_requests: int = BY_NAME["digest_requests"].default

    @classmethod
    def read(cls, values: dict) -> tuple["ReplicaLimits", list[tuple[str, str]]]:
        """Limits from operator values (numbers, or strings like "2T", "90s"), the missing ones at their
        defaults: (limits, [(name, reason)] for every value refused, which keeps its default)."""
        good, problems = {}, []
        for name, value in values.items():
            try:
                good[name] = parse(BY_NAME[name], value)
            except ValueError as e:
                problems.append((name, str(e)))
        return cls(**good), problems

    def problems(self) -> list[tuple[str, str]]:
        out = []
        for limit in LIMITS:
            try:
                parse(limit, getattr(self, limit.name))
            except ValueError as e:
                out.append((limit.name, str(e)))
        return out


def parse(limit: Limit, value) -> int | float:
    """A limit's value from a number or a string ("2T", "90s", "5m"); ValueError says what it must be."""
    v = _number(limit, value) if isinstance(value, str) else value
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (limit.unit != "seconds" and v != int(v)) \
            or not limit.lo <= v <= limit.hi:
        raise ValueError(f"must be {_what(limit)}, not {value!r}")
    return float(v) if limit.unit == "seconds" else int(v)


def _number(limit: Limit, text: str) -> float | None:
    pattern, units = _UNITS[limit.unit]
    m = pattern.match(text)
    return float(m.group(1)) * units[(m.group(2) or "").lower()] if m else None


def _what(limit: Limit) -> str:
    if limit.unit == "bytes":
        return f"a size from {_size(limit.lo)} to {_size(limit.hi)} (bytes, or a number with K, M, G or T)"
    if limit.unit == "seconds":
        return f"a number of seconds from {limit.lo} to {limit.hi}"
    return f"a whole number from {limit.lo} to {limit.hi}"


def _size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        scale = 1024 ** " KMGT".index(unit)
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def describe(limit: Limit) -> str:
    """The default as an operator would write it."""
    return _size(limit.default) if limit.unit == "bytes" else (
        f"{limit.default:g} s" if limit.unit == "seconds" else str(limit.default))

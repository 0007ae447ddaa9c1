"""The replica's state, kept in the page blob's own metadata so the blob alone says what it holds.

A restarted primary (or another host after a crash) learns from it which generation the blob is at, which
stream ids were committed (commits are idempotent), and whether a stream was being applied and how far
(`ip_*`: the frames whose pages are all acknowledged), so an interrupted upload continues where it
stopped. Names are lowercase identifiers and values ASCII, as Azure requires; the whole set stays far
below the 8 KiB metadata limit (COMMITTED_KEPT ids).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from .errors import AzureError

PREFIX = "rpl_"
COMMITTED_KEPT = 32
SECTOR = 512
FOOTER = 512
PAGE_BLOB_MAX = 8 << 40                 # the page-blob size limit, footer included


def disk_area(size: int) -> int:
    """Bytes of the blob the disk occupies (its size rounded up to whole sectors)."""
    return -(-size // SECTOR) * SECTOR


def blob_size(size: int) -> int:
    return disk_area(size) + FOOTER


@dataclass
class InProgress:
    """A stream being applied: what it is (for the recovery point) and how far it got."""
    stream: str
    generation: int
    base: int
    created: float
    consistency: str
    kind: str
    frames_done: int = 0
    bytes_done: int = 0
    complete: bool = False
    on_zeros: bool = False               # began on a blob reading as zeros: zero ranges need not be sent


@dataclass
class BlobState:
    disk_id: str
    disk_size: int
    name: str = ""
    generation: int = 0
    committed: list[tuple[str, int]] = field(default_factory=list)
    zeroed: bool = True                  # never written since creation (or cleared): reads as zeros
    ip: InProgress | None = None
    machine: str = ""                    # the protected machine (machine points group its disks by it)
    cut_time: float = 0.0                # the primary's time of the current generation's stream (its cut)
    cut_consistency: str = "crash"
    additional: int = 0                  # the protection's additional (hourly) points, as last told
    key_id: str = ""                     # encryption (crypto.py): the master key's id, and the disk key's
    key_check: str = ""                  # check value; "" = stored in the clear
    rekey_from: str = ""                 # a key rotation under way: sectors from rekey_at on are still under
    rekey_at: int = 0                    # the key rekey_from (keys.py)

    def committed_generation(self, stream: str) -> int | None:
        for sid, gen in self.committed:
            if sid == stream:
                return gen
        return None

    def add_committed(self, stream: str, generation: int) -> None:
        self.committed = (self.committed + [(stream, generation)])[-COMMITTED_KEPT:]

    def to_metadata(self) -> dict[str, str]:
        m = {"disk_id": self.disk_id, "disk_size": str(self.disk_size), "name": _ascii(self.name),
             "generation": str(self.generation), "committed": ",".join(f"{s}:{g}" for s, g in self.committed),
             "zeroed": "1" if self.zeroed else "0", "machine": _ascii(self.machine),
             "cut_time": repr(float(self.cut_time)), "cut_consistency": self.cut_consistency,
             "additional": str(self.additional)}
        if self.key_id:
            m.update({"key_id": self.key_id, "key_check": self.key_check})
        if self.rekey_from:
            m.update({"rekey_from": self.rekey_from, "rekey_at": str(self.rekey_at)})
        if self.ip is not None:
            ip = self.ip
            m.update({"ip_stream": ip.stream, "ip_generation": str(ip.generation), "ip_base": str(ip.base),
                      "ip_created": repr(float(ip.created)), "ip_consistency": ip.consistency, "ip_kind": ip.kind,
                      "ip_frames_done": str(ip.frames_done), "ip_bytes_done": str(ip.bytes_done),
                      "ip_complete": "1" if ip.complete else "0", "ip_on_zeros": "1" if ip.on_zeros else "0"})
        return {PREFIX + k: v for k, v in m.items()}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: str) -> "BlobState":
        m = fields(meta)
        try:
            uuid.UUID(m["disk_id"])
            state = cls(m["disk_id"], int(m["disk_size"]), m.get("name", ""), int(m.get("generation", "0")),
                        _committed(m.get("committed", "")), m.get("zeroed", "0") == "1",
                        machine=m.get("machine", ""), cut_time=float(m.get("cut_time", "0")),
                        cut_consistency=m.get("cut_consistency", "crash"), additional=int(m.get("additional", "0")),
                        key_id=m.get("key_id", ""), key_check=m.get("key_check", ""),
                        rekey_from=m.get("rekey_from", ""), rekey_at=int(m.get("rekey_at", "0")))
            if m.get("ip_stream"):
                state.ip = InProgress(m["ip_stream"], int(m["ip_generation"]), int(m["ip_base"]),
                                      float(m["ip_created"]), m["ip_consistency"], m["ip_kind"],
                                      int(m["ip_frames_done"]), int(m["ip_bytes_done"]), m["ip_complete"] == "1",
                                      m.get("ip_on_zeros") == "1")
        except (KeyError, ValueError) as e:
            raise AzureError(f"{where}: not a replicator replica blob, or its metadata is damaged ({e})") from None
        return state


def point_metadata(generation: int, created: float, consistency: str, stream: str, kind: str,
                   key_id: str = "", **extra) -> dict[str, str]:
    """Metadata of a recovery-point snapshot (`key_id`: the key its data is encrypted with; `extra`: a
    machine point's fields, see points.py)."""
    m = {"generation": str(generation), "time": repr(float(created)), "consistency": consistency,
         "stream": stream, "kind": kind, **({"key_id": key_id} if key_id else {}), **extra}
    return {PREFIX + k: v for k, v in m.items()}


def fields(meta: dict[str, str] | None) -> dict[str, str]:
    """Our metadata keys without the prefix (Azure may return them in any case)."""
    return {k.lower()[len(PREFIX):]: v for k, v in (meta or {}).items() if k.lower().startswith(PREFIX)}


@dataclass(frozen=True)
class Point:
    """A recovery point: one snapshot of the replica blob."""
    generation: int
    time: float
    consistency: str
    stream: str
    snapshot: str                  # the snapshot's timestamp id
    machine_point: int | None = None   # the machine point it belongs to (points.py), None: a plain cycle point
    key_id: str = ""


def point_from(snapshot: str, meta: dict[str, str] | None) -> Point | None:
    """The point a snapshot stands for, or None for a snapshot someone else took."""
    m = fields(meta)
    try:
        return Point(int(m["generation"]), float(m["time"]), m.get("consistency", "crash"), m.get("stream", ""),
                     snapshot, int(m["point"]) if m.get("point") else None, m.get("key_id", ""))
    except (KeyError, ValueError):
        return None


def _committed(text: str) -> list[tuple[str, int]]:
    out = []
    for item in filter(None, text.split(",")):
        sid, gen = item.rsplit(":", 1)
        out.append((sid, int(gen)))
    return out


def _ascii(text: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 else "_" for c in text)[:200]

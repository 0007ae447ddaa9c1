"""Offline seed media: the manifest and volumes of an exported machine (docs/formats.md, "Seed media").

DIR/MACHINE/seed.json       manifest, replaced atomically after every finished volume (resume point)
DIR/MACHINE/DISK_ID/NNNN.delta  volumes: each one a complete delta stream over a disjoint range of the
                            disk; volume k carries generation k on base k-1, so import is the ordinary,
                            idempotent commit path and can resume anywhere.

Seed media travel by courier and through other hands: `load` checks every field of the manifest (type,
range, and how the fields agree with one another) and the header of every volume that is present against
it, so anything wrong is one FormatError naming the field, never a Python error further on.
"""
from __future__ import annotations

import json
import math
import os
import re
import uuid
from dataclasses import asdict, dataclass, field, fields

from ..delta.format import read_header
from ..durable import write_json_atomic
from ..errors import FormatError
from ..vhdx.structures import MAX_DISK_SIZE     # what the replica accepts

FORMAT = "replicator-seed"
VERSION = 1
MAX_MANIFEST = 64 << 20            # a manifest of a thousand disks of a thousand volumes is a few MiB
SECTOR_SIZES = (512, 4096)
_HEX = re.compile(r"[0-9a-f]+")


@dataclass
class Volume:
    file: str                 # relative to the machine folder
    stream_id: str
    generation: int
    start: int                # disk range the volume covers
    end: int
    bytes: int
    xxh3: str                 # of the whole volume file


@dataclass
class SeedDisk:
    disk_id: str
    name: str
    size: int
    logical_sector_size: int
    created: float
    volumes: list[Volume] = field(default_factory=list)
    complete: bool = False


@dataclass
class SeedManifest:
    machine: str
    format: str = FORMAT
    version: int = VERSION
    volume_size: int = 0
    compress: bool = True
    disks: list[SeedDisk] = field(default_factory=list)

    def disk(self, disk_id: str) -> SeedDisk | None:
        return next((d for d in self.disks if d.disk_id == disk_id), None)


def manifest_path(machine_dir: str) -> str:
    return os.path.join(machine_dir, "seed.json")


def save(machine_dir: str, m: SeedManifest) -> None:
    write_json_atomic(manifest_path(machine_dir), asdict(m))


def load(machine_dir: str) -> SeedManifest:
    """The manifest, every field checked, and the headers of the volumes present checked against it."""
    path = manifest_path(machine_dir)
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_MANIFEST + 1)
    except FileNotFoundError:
        raise FormatError("seed manifest", None, "missing: this folder holds no seed", path) from None
    except IsADirectoryError:
        raise FormatError("seed manifest", None, "is a folder, not a file", path) from None
    if len(text) > MAX_MANIFEST:
        raise FormatError("seed manifest", None, f"larger than {MAX_MANIFEST} bytes: not a manifest", path)
    try:
        raw = json.loads(text.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:          # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FormatError("seed manifest", None, f"not JSON: {e}", path) from None
    check = _Checker(path)
    manifest = check.manifest(raw)
    for disk in manifest.disks:
        for vol in disk.volumes:
            check_volume_header(machine_dir, disk, vol)
    return manifest


def check_volume_header(machine_dir: str, disk: SeedDisk, vol: Volume) -> None:
    """A present volume's stream header must be the one the manifest describes: the same disk and size, its
    generation on the one before, a full copy. (A missing or damaged volume is for verify to name.)"""
    path = os.path.join(machine_dir, vol.file)
    try:
        with open(path, "rb") as f:
            header, _ = read_header(f.read, path)
    except (OSError, FormatError):     # missing, unreadable or damaged: verify names it with its digest and size
        return
    expected = {"disk_id": uuid.UUID(disk.disk_id), "disk_size": disk.size, "generation": vol.generation,
                "base_generation": vol.generation - 1, "kind": "full"}
    for name, value in expected.items():
        got = getattr(header, name)
        if got != value:
            raise FormatError("seed volume header", None, f"{name} is {got}, the manifest says {value} "
                              f"(disk {disk.name}, volume {vol.file})", path)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number")


class _Checker:
    """Builds the manifest's objects from parsed JSON, refusing anything that is not exactly what export
    writes; each refusal names the field (e.g. disks[1].volumes[0].end)."""

    def __init__(self, path: str):
        self.path = path

    def bad(self, where: str, problem: str) -> FormatError:
        return FormatError("seed manifest", None, f"{where}: {problem}", self.path)

    def obj(self, value, where: str, cls) -> dict:
        if not isinstance(value, dict):
            raise self.bad(where, f"must be an object, not {_kind(value)}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise self.bad(where, f"unknown field {unknown[0]!r}")
        missing = sorted(n for n in names - set(value) if n not in _OPTIONAL.get(cls.__name__, ()))
        if missing:
            raise self.bad(where, f"field {missing[0]!r} is missing")
        return value

    def int(self, value, where: str, lo: int = 0, hi: int = 1 << 63) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.bad(where, f"must be a whole number, not {_kind(value)}")
        if not lo <= value <= hi:
            raise self.bad(where, f"{value} is not in [{lo}, {hi}]")
        return value

    def str(self, value, where: str, *, empty: bool = False, limit: int = 4096) -> str:
        if not isinstance(value, str):
            raise self.bad(where, f"must be a string, not {_kind(value)}")
        if not value and not empty:
            raise self.bad(where, "is empty")
        if len(value) > limit or "\0" in value or not value.isprintable():
            raise self.bad(where, "is not a printable name")
        return value

    def bool(self, value, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.bad(where, f"must be true or false, not {_kind(value)}")
        return value

    def list(self, value, where: str) -> list:
        if not isinstance(value, list):
            raise self.bad(where, f"must be a list, not {_kind(value)}")
        return value

    # ---- the structures
    def manifest(self, raw) -> SeedManifest:
        raw = self.obj(raw, "manifest", SeedManifest)
        if raw.get("format") != FORMAT or raw.get("version") != VERSION:
            raise FormatError("seed manifest", None, f"not a {FORMAT} version {VERSION} manifest", self.path)
        m = SeedManifest(machine=self.str(raw["machine"], "machine", limit=255),
                         volume_size=self.int(raw["volume_size"], "volume_size"),
                         compress=self.bool(raw["compress"], "compress"))
        seen = set()
        for k, d in enumerate(self.list(raw["disks"], "disks")):
            disk = self.disk(d, f"disks[{k}]")
            if disk.disk_id in seen:
                raise self.bad(f"disks[{k}].disk_id", f"disk {disk.disk_id} is listed twice")
            seen.add(disk.disk_id)
            m.disks.append(disk)
        if not m.disks:
            raise self.bad("disks", "the seed holds no disk")
        return m

    def disk(self, raw, where: str) -> SeedDisk:
        raw = self.obj(raw, where, SeedDisk)
        disk_id = self.str(raw["disk_id"], f"{where}.disk_id")
        try:
            disk_id = str(uuid.UUID(disk_id))
        except ValueError:
            raise self.bad(f"{where}.disk_id", f"{disk_id!r} is not a UUID") from None
        created = raw["created"]
        if not isinstance(created, (int, float)) or isinstance(created, bool) or not math.isfinite(created) \
                or created < 0:
            raise self.bad(f"{where}.created", f"must be a unix time, not {_kind(created)}")
        disk = SeedDisk(disk_id=disk_id, name=self.str(raw["name"], f"{where}.name", limit=255),
                        size=self.int(raw["size"], f"{where}.size", 1, MAX_DISK_SIZE),
                        logical_sector_size=self.int(raw["logical_sector_size"], f"{where}.logical_sector_size"),
                        created=float(created), complete=self.bool(raw.get("complete", False), f"{where}.complete"))
        if disk.logical_sector_size not in SECTOR_SIZES:
            raise self.bad(f"{where}.logical_sector_size", f"{disk.logical_sector_size} is not 512 or 4096")
        if disk.size % disk.logical_sector_size:
            raise self.bad(f"{where}.size", f"{disk.size} is not a multiple of the sector size")
        files = set()
        for k, v in enumerate(self.list(raw["volumes"], f"{where}.volumes")):
            vol = self.volume(v, f"{where}.volumes[{k}]", disk, k)
            if vol.file in files:
                raise self.bad(f"{where}.volumes[{k}].file", f"{vol.file} is listed twice")
            files.add(vol.file)
            disk.volumes.append(vol)
        if disk.complete and (not disk.volumes or disk.volumes[-1].end != disk.size):
            raise self.bad(f"{where}.volumes", f"the export is marked complete, but its volumes cover "
                           f"{disk.volumes[-1].end if disk.volumes else 0} of {disk.size} bytes")
        return disk

    def volume(self, raw, where: str, disk: SeedDisk, k: int) -> Volume:
        raw = self.obj(raw, where, Volume)
        vol = Volume(file=self.str(raw["file"], f"{where}.file"),
                     stream_id=self.str(raw["stream_id"], f"{where}.stream_id", limit=64),
                     generation=self.int(raw["generation"], f"{where}.generation", 1),
                     start=self.int(raw["start"], f"{where}.start", 0, disk.size),
                     end=self.int(raw["end"], f"{where}.end", 0, disk.size),
                     bytes=self.int(raw["bytes"], f"{where}.bytes"),
                     xxh3=self.str(raw["xxh3"], f"{where}.xxh3", limit=32))
        if os.path.isabs(vol.file) or "\\" in vol.file or \
                any(part in ("", ".", "..") for part in vol.file.split("/")):
            raise self.bad(f"{where}.file", f"{vol.file!r} is not a relative path inside the seed folder")
        if not _HEX.fullmatch(vol.stream_id.lower().replace("-", "")):
            raise self.bad(f"{where}.stream_id", f"{vol.stream_id!r} is not a hex stream id")
        if len(vol.xxh3) != 32 or not _HEX.fullmatch(vol.xxh3):
            raise self.bad(f"{where}.xxh3", f"{vol.xxh3!r} is not an XXH3-128 digest (32 lowercase hex digits)")
        if vol.generation != k + 1:
            raise self.bad(f"{where}.generation", f"is {vol.generation}; volume {k + 1} carries generation {k + 1}")
        expected_start = disk.volumes[-1].end if disk.volumes else 0
        if vol.start != expected_start:
            raise self.bad(f"{where}.start", f"is {vol.start}; the volume before ends at {expected_start}")
        if vol.end < vol.start:
            raise self.bad(f"{where}.end", f"{vol.end} is before its start {vol.start}")
        return vol


_OPTIONAL = {"SeedDisk": ("complete",)}


def _kind(value) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)

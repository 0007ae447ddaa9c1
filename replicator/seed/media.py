"""Offline seed media: the manifest and volumes of an exported machine (docs/formats.md, "Seed media").

DIR/MACHINE/seed.json       manifest, replaced atomically after every finished volume (resume point)
DIR/MACHINE/DISK_ID/NNNN.delta  volumes: each one a complete delta stream over a disjoint range of the
                            disk; volume k carries generation k+1 on base k, so import is the ordinary,
                            idempotent commit path and can resume anywhere.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from ..durable import write_json_atomic
from ..errors import FormatError

FORMAT = "replicator-seed"
VERSION = 1


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
    path = manifest_path(machine_dir)
    try:
        with open(path) as f:
            raw = json.load(f)
        if raw.get("format") != FORMAT or raw.get("version") != VERSION:
            raise FormatError("seed manifest", 0, f"not a {FORMAT} version {VERSION} manifest", path)
        disks = []
        for d in raw.pop("disks"):
            vols = [Volume(**v) for v in d.pop("volumes")]
            disks.append(SeedDisk(**d, volumes=vols))
        return SeedManifest(**raw, disks=disks)
    except FileNotFoundError:
        raise FormatError("seed manifest", None, "missing: this folder holds no seed", path) from None
    except (ValueError, TypeError, KeyError) as e:
        raise FormatError("seed manifest", 0, f"unreadable: {e}", path) from None

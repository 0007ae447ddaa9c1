"""Offline initial replication: export a machine's disks to seed media, import them on the replica."""
from .export import export_machine
from .importer import import_seed, verify_seed
from .media import SeedManifest, load

__all__ = ["SeedManifest", "export_machine", "import_seed", "load", "verify_seed"]

"""Primary-side replication: cycles that turn tracked changes into committed recovery points on a target."""
from .cycle import CycleResult, DiskReplicator

__all__ = ["CycleResult", "DiskReplicator"]

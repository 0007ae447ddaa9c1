"""Replica store: spool, verify and apply cycles crash-safely; recovery points as undo logs; failovers."""
from .store import RecoveryPoint, ReplicaDisk, ReplicaStore, SequenceError, StaleEpoch, Upload

__all__ = ["RecoveryPoint", "ReplicaDisk", "ReplicaStore", "SequenceError", "StaleEpoch", "Upload"]

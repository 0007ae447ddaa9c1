"""Replica targets behind one interface: the local store, a peer replica host, Azure page blobs."""
from .base import (BandwidthLimit, Decorator, DiskInfo, ForMachine, PointInfo, ReplicaTarget, Retry,
                   TargetUnavailable, TokenBucket)
from .local import LocalTarget

__all__ = ["BandwidthLimit", "Decorator", "DiskInfo", "ForMachine", "LocalTarget", "PointInfo", "ReplicaTarget",
           "Retry", "TargetUnavailable", "TokenBucket"]

"""Change tracking: a tracked NBD export that writes Hyper-V Replica Logs, with resync triggers."""
from .state import TrackingState
from .tracker import SealedLog, TrackedDisk, TrackingGroup

__all__ = ["SealedLog", "TrackedDisk", "TrackingGroup", "TrackingState"]

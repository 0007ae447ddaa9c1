"""replicator: block replication for virtual disks (VHDX, Hyper-V Replica Logs)."""
__version__ = "0.1.0"

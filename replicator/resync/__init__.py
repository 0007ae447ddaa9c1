"""Resync and scan: per-block digest comparison between disks, digest manifests, resumable copies."""
from .engine import (DEFAULT_BLOCK_SIZE, BlockCopier, ChangeSet, Grid, ResyncCancelled, ResyncPaths, ResyncStats,
                     SourceChanged, Window, differing_blocks, digest_window, manifest_windows, read_windows,
                     resync, runs_of)
from .manifest import (Identity, Manifest, checkpoint_path_for, disk_identity, load_manifest, manifest_path_for,
                       save_manifest)
from .scan import ScanResult, changed_mask, digest_disk, scan

__all__ = ["DEFAULT_BLOCK_SIZE", "BlockCopier", "ChangeSet", "Grid", "Identity", "Manifest", "ResyncCancelled",
           "ResyncPaths", "ResyncStats", "ScanResult", "SourceChanged", "Window", "changed_mask",
           "checkpoint_path_for", "differing_blocks", "digest_disk", "digest_window", "disk_identity",
           "load_manifest", "manifest_path_for", "manifest_windows", "read_windows", "resync", "runs_of",
           "save_manifest", "scan"]

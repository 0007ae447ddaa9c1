"""Hyper-V Replica Logs (MS-HRL): read, write, verify, coalesce and apply change logs."""
from .chain import ApplyStats, ChainError, apply_chain, open_chain
from .format import LogHeader, MetadataEntry
from .reader import Extent, HrlReader, LogNotSealed, LogWrite, coalesce
from .writer import HrlWriter

__all__ = ["ApplyStats", "ChainError", "Extent", "HrlReader", "HrlWriter", "LogHeader", "LogNotSealed", "LogWrite",
           "MetadataEntry", "apply_chain", "coalesce", "open_chain"]
